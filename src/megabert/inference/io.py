"""Reading pipeline inputs from files and writing results as JSON lines, for the command line.

Inputs are streamed: a file is read line by line (or record by record), never loaded whole.
Formats: ``text`` (one input per line; blank lines are skipped; a tab separates the two texts
of a pair), ``jsonl`` (one JSON object per line), ``csv`` and ``tsv`` (a header row names the
columns; TSV fields are taken verbatim, without quote processing, as GLUE files need). The
format comes from the file extension unless given; stdin (``-``) is plain text unless given.

Every problem is a :class:`~megabert.errors.UserError` that names the file and line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from pathlib import Path
from typing import IO, Any, Iterator

from megabert.errors import UserError
from megabert.lines import iter_lines, jsonl_records, table_rows
from megabert.utils import atomic_path

FORMATS = ("text", "jsonl", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
# QA contexts can be long: lift the csv module's 128 KB field limit.
csv.field_size_limit(2**31 - 1)


def detect_format(source: str, fmt: str | None) -> str:
    """The input format: ``fmt`` if given, else from the extension (plain text otherwise)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    if source == "-":
        return "text"
    return _EXTENSIONS.get(Path(source).suffix.lower(), "text")


def check_source(source: str) -> None:
    """A readable file (or ``-``), else a UserError."""
    if source == "-":
        return
    path = Path(source)
    if not path.exists():
        raise UserError(f"input file {source} does not exist")
    if path.is_dir():
        raise UserError(f"input {source} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"input file {source} is not readable")


def read_records(source: str, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each input of ``source``; a text line is ``{"text": line}``.

    For csv/tsv the line number is the record's first line (the header is line 1). Lines come
    from :func:`megabert.lines.iter_lines`, the reader ``preprocess`` and ``finetune`` use too,
    so a line that is not UTF-8 is named by its own number.
    """
    name = "<stdin>" if source == "-" else source
    if fmt == "text":
        for number, line in iter_lines(source, name=name):
            if line.strip():
                yield number, {"text": line}
    elif fmt == "jsonl":
        for number, record in jsonl_records(source, name=name):
            if isinstance(record, str):
                raise UserError(f"{name}:{number}: {record}")
            yield number, record
    else:
        yield from _table_records(source, name, fmt)


def _table_records(source: str, name: str, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    rows = table_rows(source, delimiter="\t" if fmt == "tsv" else ",", quoted=fmt != "tsv", name=name)
    first = next(rows, None)
    if first is None:
        return
    header = [column.strip() for column in first[1]]
    for number, row in rows:
        if len(row) != len(header):
            raise UserError(f"{name}:{number}: {len(row)} fields, but the header has {len(header)} ({', '.join(header)})")
        yield number, dict(zip(header, row))


def table_header(source: str, fmt: str) -> list[str] | None:
    """The column names of a csv/tsv file (None for other formats and stdin)."""
    if fmt not in ("csv", "tsv") or source == "-":
        return None
    with contextlib.closing(iter_lines(source)) as lines:
        line = next((text for _, text in lines), "")
    if not line.strip():
        return []
    if fmt == "tsv":
        return [column.strip() for column in line.rstrip("\r\n").split("\t")]
    return [column.strip() for column in next(csv.reader([line]))]


def count_records(source: str, fmt: str) -> int | None:
    """How many inputs a file holds (for the progress bar); None for stdin. Cheap: counts non-blank lines."""
    if source == "-":
        return None
    count = 0
    with open(source, "rb") as handle:
        for line in handle:
            if line.strip():
                count += 1
    if fmt in ("csv", "tsv"):
        count = max(count - 1, 0)  # the header
    return count


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[IO[str]]:
    """Stdout (``None`` or ``-``), or a file written atomically: it appears only when all is written."""
    if path is None or path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"output {path} is a folder; give a file name")
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            yield handle


def write_jsonl(handle: IO[str], record: dict[str, Any]) -> None:
    """One JSON object per line (UTF-8 text kept as is, not \\u-escaped)."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
