"""`python -m megabert.demo ...` is `megabert demo ...` (the quickstart; `make demo` runs it)."""

import sys

from megabert.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["demo", *sys.argv[1:]]))
