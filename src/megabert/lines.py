"""The one reader of UTF-8 text files, line by line, behind every command that takes text input.

The prediction commands (text, TSV, CSV and JSONL inputs), ``preprocess`` and the fine-tuning
readers all read their files through :func:`iter_lines`, so they agree on what a line is and
report a bad byte at the same, right place.

The file is read as bytes and each line is decoded on its own: a decoder that works on larger
blocks reads ahead of the line counter, and its error would name the wrong line. Lines end at
``\\n``, ``\\r\\n`` or a lone ``\\r`` (as Python's text mode reads them); a byte-order mark at the
start of the file is dropped. Memory holds one line at a time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Iterator

from megabert.errors import UserError

__all__ = ["iter_lines", "jsonl_records", "not_utf8_error"]

_BOM = b"\xef\xbb\xbf"


def not_utf8_error(name: str, line: int, exc: UnicodeDecodeError) -> UserError:
    """The error for a line that is not UTF-8: file, line, and the byte in that line."""
    return UserError(
        f"{name}:{line}: not valid UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line); "
        "the file may be binary or in another encoding"
    )


def _raw_lines(handle: IO[bytes]) -> Iterator[bytes]:
    """Byte lines with their ends, split at ``\\n``, ``\\r\\n`` and lone ``\\r``."""
    for chunk in handle:  # a binary handle splits at b"\n" only
        if b"\r" in chunk and not (chunk.endswith(b"\r\n") and chunk.count(b"\r") == 1):
            # A lone "\r" inside the chunk ends a line too (old Mac files); bytes.splitlines
            # splits at "\r", "\n" and "\r\n" only, unlike str.splitlines.
            yield from chunk.splitlines(keepends=True)
        else:
            yield chunk


def iter_lines(
    source: str | os.PathLike | IO[bytes], *, name: str | None = None, keepends: bool = False
) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line) for each line of ``source``.

    ``source``: a file path, ``"-"`` for standard input, or a binary handle. ``name``: how
    errors call the file (default: the path, ``<stdin>`` for ``-``). ``keepends``: keep the
    line ends (the csv module needs them for quoted fields that span lines). A line that is
    not UTF-8 raises :class:`~megabert.errors.UserError` naming the file and that line.
    """
    if isinstance(source, (str, os.PathLike)):
        if str(source) == "-":
            yield from _decoded(sys.stdin.buffer, name or "<stdin>", keepends)
            return
        with open(Path(source), "rb") as handle:
            yield from _decoded(handle, name or str(source), keepends)
        return
    yield from _decoded(source, name or getattr(source, "name", "<input>"), keepends)


def _decoded(handle: IO[bytes], name: str, keepends: bool) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(_raw_lines(handle), start=1):
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if not keepends:
            raw = raw.rstrip(b"\r\n")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise not_utf8_error(name, number, exc) from None
        yield number, line


def jsonl_records(
    source: str | os.PathLike | IO[bytes], *, name: str | None = None
) -> Iterator[tuple[int, dict | str]]:
    """(line number, object) for each non-blank line of a JSONL file, read by :func:`iter_lines`.

    A line that is not a JSON object gives its error text instead of the object ("not valid
    JSON (... at column N)", "expected a JSON object, got list"), so that a caller either raises
    it with the file and line in front or skips the line and counts it.
    """
    for number, line in iter_lines(source, name=name):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(record, dict):
            yield number, f"expected a JSON object, got {type(record).__name__}"
            continue
        yield number, record


def table_rows(
    source: str | os.PathLike, *, delimiter: str, quoted: bool, name: str | None = None
) -> Iterator[tuple[int, list[str]]]:
    """The non-blank rows of a TSV/CSV file as ``(line number, cells)``: the one table reader.

    ``quoted=False`` (TSV): split on ``delimiter`` with no quoting, so cells are taken verbatim
    (GLUE's TSVs hold unbalanced double quotes). ``quoted=True`` (CSV): the usual quoting rules,
    so a quoted cell may span lines; a row's number is that of its first line. The header, if
    any, is the first row. A malformed CSV row is a UserError naming the file and line.
    """
    import csv

    name = name or ("<stdin>" if str(source) == "-" else str(source))
    if not quoted:
        for number, line in iter_lines(source, name=name):
            if line.strip():
                yield number, line.split(delimiter)
        return
    # The csv module counts the lines it is given: with one line per item, reader.line_num is
    # the file's line number (line ends are kept for quoted cells that span lines).
    reader = csv.reader((line for _, line in iter_lines(source, name=name, keepends=True)), delimiter=delimiter)
    start = 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield start, cells
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(f"{name}:{reader.line_num}: malformed CSV ({exc})") from None
