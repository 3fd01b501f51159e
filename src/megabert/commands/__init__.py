"""`megabert` subcommands: each module has ``register(subparsers)`` and ``run(args)``; see megabert/cli.py."""
