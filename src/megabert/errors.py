"""Errors a user can fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user (a file, a value, an option): the message says what and where."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason its message states in full (training diverged, a peer
    rank failed): like UserError, the CLI prints it as one line, without a traceback."""


def require_file(path: str | os.PathLike, what: str, expected_name: str | None = None) -> Path:
    """``path`` as a Path when it is an existing file; else an error that says what it is instead.

    A missing path is a FileNotFoundError ("does not exist"); a folder is a UserError saying it
    is a folder (naming ``expected_name`` inside it, when the folder has that file), not
    reported as missing.
    """
    p = Path(path)
    if p.is_dir():
        hint = ""
        if expected_name is not None and (p / expected_name).is_file():
            hint = f"; did you mean {p / expected_name}?"
        raise UserError(f"{what} {p} is a folder, not a file{hint}")
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    if not p.is_file():
        raise UserError(f"{what} {p} is not a regular file")
    return p
