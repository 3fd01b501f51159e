"""``megabert serve``: an HTTP server over the pipelines (needs ``pip install megabert[serve]``)."""
