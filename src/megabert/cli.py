"""The `megabert` command: one subcommand per job, each a thin layer over a Python function.

Each subcommand lives in ``megabert/commands/<name>.py`` with two functions:
``register(subparsers)`` adds its parser (help text from the function it wraps) and
``run(args) -> int`` does the work. Errors a user can fix (bad path, bad file, bad value)
are raised as :class:`megabert.errors.UserError` (or ValueError/FileNotFoundError at a
boundary) and printed as one line, exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megabert.errors import UserError

# Subcommand modules, in the order `megabert --help` lists them. A module missing from an
# install is skipped rather than breaking the whole command.
COMMAND_MODULES = (
    "megabert.commands.predict",
    "megabert.commands.info",
    "megabert.commands.convert",
    "megabert.commands.export",
    "megabert.commands.preprocess",
    "megabert.commands.train_tokenizer",
    "megabert.commands.pretrain",
    "megabert.commands.finetune",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megabert",
        description=(
            "MegatronBERT in plain PyTorch: run pipelines, convert Megatron-LM checkpoints, "
            "pretrain and fine-tune (also under torchrun)."
        ),
        epilog="Run `megabert COMMAND --help` for a command's arguments and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from megabert import __version__

    parser.add_argument("--version", action="version", version=f"megabert {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
        if os.environ.get("MEGABERT_DEBUG"):
            raise
        print(f"megabert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megabert {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `megabert ... | head`: the reader went away; that is not an error.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
