"""`python -m megabert ...` is the same as the `megabert` command (and works under torchrun)."""

from megabert.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
