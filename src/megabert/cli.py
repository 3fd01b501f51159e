"""The `megabert` command: one subcommand per job, each a thin layer over a Python function.

Each subcommand lives in ``megabert/commands/<name>.py`` with two functions:
``register(subparsers)`` adds its parser (help text from the function it wraps) and
``run(args) -> int`` does the work.

How a command ends, decided here once for every command (``MEGABERT_DEBUG=1`` re-raises
instead, with the traceback):

* an error a user can fix (bad path, bad file, bad value): :class:`megabert.errors.UserError`
  (or ValueError/FileNotFoundError at a boundary) -- one line, exit status 2;
* a run that cannot go on (:class:`megabert.errors.RunError`: training diverged, a peer rank
  failed) or an output that cannot be written (disk full, quota, read-only file system, no
  permission: an OSError of :data:`megabert.utils.WRITE_ERRNOS`) -- one line naming the
  file, exit status 1;
* Ctrl-C and SIGTERM -- the same path (KeyboardInterrupt), so that every atomic writer removes
  its temp file; exit status 130 / 143.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading

from megabert.errors import RunError, UserError
from megabert.utils import WRITE_ERRNOS, WriteError

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
    "megabert.commands.serve",
    "megabert.commands.demo",
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (see :func:`main`)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _install_sigterm() -> signal.Handlers | None:
    """Make SIGTERM take the Ctrl-C path, so ``with`` blocks and ``finally`` clauses run.

    Python's default for SIGTERM is to die at once, leaving the temp files of atomic writes
    (``.preds.jsonl.*.tmp``, ``.g.bin.*.tmp``) behind. Not under torchrun: its agent sends
    SIGTERM to stop the workers of a failed job, and a Python handler would only run once the
    collective a worker is blocked in returns, delaying the stop (training installs its own
    checkpoint-and-stop handlers either way). Returns the handler to put back, or None.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:  # someone (an embedding program) chose a handler already
        return None
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous


def one_line_error(exc: BaseException) -> tuple[str, int] | None:
    """(message, exit status) of an error the CLI reports in one line, or None for a bug (traceback)."""
    if isinstance(exc, (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError)):
        return str(exc), 2
    if isinstance(exc, RunError):
        return str(exc), 1
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        if isinstance(exc, WriteError):
            text = str(exc)
        elif exc.filename:
            text = f"{exc.filename}: {exc.strerror}"
        else:
            text = exc.strerror or str(exc)
        hint = _WRITE_HINTS.get(exc.errno)
        return (f"{text} ({hint})" if hint else text), 1
    return None


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "over the disk quota: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
}


def main(argv: list[str] | None = None) -> int:
    """Run ``megabert ARGS``; returns the exit status (see the module docstring for the errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    previous = _install_sigterm()
    try:
        return int(args.run(args) or 0)
    except Terminated:
        print(f"megabert {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
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
    except Exception as exc:
        found = one_line_error(exc)
        if found is None or os.environ.get("MEGABERT_DEBUG"):
            raise
        message, status = found
        print(f"megabert {args.command}: error: {message}", file=sys.stderr)
        return status
    finally:
        if previous is not None:  # main() called in-process (tests, scripts): leave SIGTERM as it was
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
