"""Errors a user can fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a file, a value, an option): the message says what and where."""
