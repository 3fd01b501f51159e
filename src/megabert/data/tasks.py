"""Readers for fine-tuning data: the files people have, turned into plain example dataclasses.

One reader per task head:

- :func:`read_sequence_classification` -- GLUE TSV (with presets and header auto-detection), any
  TSV/CSV with a header or column indices, and JSONL; single sentences or pairs; single-label,
  regression and multi-label targets.
- :func:`read_conll` -- CoNLL-style token tagging (``word ... TAG`` per line).
- :func:`read_squad` -- SQuAD v1.1 / v2.0 JSON.
- :func:`read_multiple_choice` -- JSONL ``{"query", "choices", "gold"}`` and SWAG-style CSV.

:func:`read_examples` dispatches on a task name.

Bad input policy: every problem with a record (a malformed line, a label that is not a number, an
answer that is not at its offset, a short choice list...) is reported with its place
(``file:line``; for SQuAD JSON also the JSON path and question id) and either raises :class:`~megabert.errors.UserError`
(``on_bad="error"``, the default) or skips the record (``on_bad="skip"``). Skips are never silent:
they are listed in :attr:`ReadResult.skipped` and logged as one warning with their count. An input
with no usable example at all is always an error. Blank lines in TSV/CSV/JSONL files are ignored
(in CoNLL files they separate sentences).

GLUE presets (``format=``), also auto-detected from the first line of a ``.tsv`` file:

- ``glue-sst2``: header ``sentence label``; text ``sentence``; label ``label``.
- ``glue-mrpc``: header ``Quality #1 ID #2 ID #1 String #2 String`` (file starts with a BOM);
  text ``#1 String``, pair ``#2 String``; label ``Quality``.
- ``glue-stsb``: 10-column header ``index genre ... sentence1 sentence2 score``; text
  ``sentence1``, pair ``sentence2``; label ``score`` (regression).
- ``glue-cola``: no header, ``source label original_label sentence``; text column 3, label
  column 1.

CoLA has no header, so it is recognised by shape: four tab-separated columns whose second is 0 or
1 and whose third is empty or ``*``. Any column argument given explicitly overrides the preset.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Iterator, Literal, Sequence, TypeVar, overload

from megabert import task_table
from megabert.errors import UserError
from megabert.lines import iter_lines, jsonl_records, table_rows

logger = logging.getLogger("megabert.data")

OnBad = Literal["error", "skip"]
ProblemType = Literal["single_label_classification", "regression", "multi_label_classification"]
PROBLEM_TYPES: tuple[str, ...] = (
    "single_label_classification",
    "regression",
    "multi_label_classification",
)
# Views of megabert.task_table: the fine-tuning tasks, and the other names people use for them.
TASKS: tuple[str, ...] = task_table.names(task_table.FINETUNE)
TASK_ALIASES: dict[str, str] = task_table.aliases(task_table.FINETUNE)


# --------------------------------------------------------------------------------------------
# Example types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceExample:
    """One sentence (or sentence pair) with its target.

    ``label`` is a ``str`` for single-label classification, a ``float`` for regression, a tuple
    of ``str`` for multi-label classification, and ``None`` for unlabeled data.
    """

    text: str
    text_pair: str | None = None
    label: str | float | tuple[str, ...] | None = None
    where: str = ""  # "file:line", for messages


@dataclass(frozen=True)
class TokenExample:
    """One sentence of words with one tag per word (``tags`` is None for unlabeled data).

    Word ``i`` comes from line ``line + i`` of ``path``.
    """

    words: tuple[str, ...]
    tags: tuple[str, ...] | None
    path: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        """``file:line`` of the sentence's first word."""
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Answer:
    """An answer span: ``context[start:start + len(text)] == text``."""

    text: str
    start: int

    @property
    def end(self) -> int:
        """Character offset just past the answer."""
        return self.start + len(self.text)


@dataclass(frozen=True)
class QAExample:
    """One extractive question over a context. Unanswerable (SQuAD v2) questions have no answers."""

    id: str
    question: str
    context: str
    answers: tuple[Answer, ...] = ()
    is_impossible: bool = False
    title: str = ""
    where: str = ""


@dataclass(frozen=True)
class ChoiceExample:
    """A query with its candidate continuations; ``label`` is the index of the right one."""

    query: str
    choices: tuple[str, ...]
    label: int | None = None
    where: str = ""


E = TypeVar("E")


@dataclass
class ReadResult(Generic[E]):
    """The examples read from one file, and the records that were skipped (``file:line: why``).

    It behaves as a read-only list of the examples.
    """

    path: Path
    examples: list[E]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """How many records were skipped (``on_bad="skip"``)."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[E]:
        return iter(self.examples)

    @overload
    def __getitem__(self, i: int) -> E: ...

    @overload
    def __getitem__(self, i: slice) -> list[E]: ...

    def __getitem__(self, i):
        return self.examples[i]


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


class _Problems:
    """Collects bad records: raises at once (``on_bad="error"``) or remembers them as skips."""

    def __init__(self, path: Path, on_bad: str) -> None:
        if on_bad not in ("error", "skip"):
            raise UserError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.path = path
        self.on_bad = on_bad
        self.skipped: list[str] = []

    def bad(self, where: str, message: str) -> None:
        """Report a bad record found at ``where`` (``file:line`` or similar)."""
        text = f"{where}: {message}"
        if self.on_bad == "error":
            raise UserError(text)
        self.skipped.append(text)

    def finish(self, examples: list[E], what: str) -> ReadResult[E]:
        """Wrap up: no examples at all is an error; skips are logged once with their count."""
        if not examples:
            if self.skipped:
                raise UserError(
                    f"{self.path}: no usable {what}: all {len(self.skipped)} records were skipped;"
                    f" the first: {self.skipped[0]}"
                )
            raise UserError(f"{self.path}: no {what} found (the file is empty)")
        if self.skipped:
            logger.warning(
                "%s: skipped %d bad record(s) (kept %d %s); the first: %s",
                self.path,
                len(self.skipped),
                len(examples),
                what,
                self.skipped[0],
            )
        return ReadResult(self.path, examples, self.skipped)


def _open_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a folder, expected a data file")
    return p


def _read_lines(path: Path, keepends: bool = False) -> list[str]:
    """The file's lines as text (UTF-8, a leading BOM dropped); a bad byte is reported by line.

    The same reader as the prediction commands' and ``preprocess``'s (:func:`megabert.lines.iter_lines`).
    """
    return [line for _, line in iter_lines(path, keepends=keepends)]


def _sort_labels(labels: set[str]) -> list[str]:
    """Sorted label names: numerically when every label is a number ("2" before "10"), else by text."""
    try:
        return sorted(labels, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(labels)


def label_list_from(examples: Sequence[SequenceExample] | Sequence[TokenExample]) -> list[str]:
    """The label set of (training) examples, sorted and stable: the index of a label is its id.

    Works for single-label and multi-label sequence examples and for token examples (their tags).
    Labels are sorted numerically when all of them are numbers, else as text.
    """
    seen: set[str] = set()
    for ex in examples:
        if isinstance(ex, TokenExample):
            if ex.tags is None:
                raise UserError(f"{ex.where}: the sentence has no tags; cannot build a label list")
            seen.update(ex.tags)
        else:
            label = ex.label
            if label is None:
                raise UserError(f"{ex.where}: the example has no label; cannot build a label list")
            if isinstance(label, float):
                raise UserError(f"{ex.where}: regression targets (floats) have no label list")
            if isinstance(label, tuple):
                seen.update(label)
            else:
                seen.add(label)
    if not seen:
        raise UserError("no labels in the training examples")
    return _sort_labels(seen)


def check_labels(
    examples: Sequence[SequenceExample] | Sequence[TokenExample], label_list: Sequence[str]
) -> None:
    """Raise a :class:`UserError` naming ``file:line`` of the first label not in ``label_list``.

    Use it on validation/test data with the label list of the training data.
    """
    known = set(label_list)
    for ex in examples:
        if isinstance(ex, TokenExample):
            for i, tag in enumerate(ex.tags or ()):
                if tag not in known:
                    raise UserError(
                        f"{ex.path}:{ex.line + i}: tag {tag!r} is not among the training labels"
                        f" {list(label_list)}"
                    )
            continue
        labels = ex.label if isinstance(ex.label, tuple) else (ex.label,)
        for label in labels:
            if label is not None and not isinstance(label, float) and label not in known:
                raise UserError(
                    f"{ex.where}: label {label!r} is not among the training labels {list(label_list)}"
                )


# --------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------

Column = str | int


@dataclass(frozen=True)
class TablePreset:
    """Where the text, pair and label live in a known tab-separated file."""

    name: str
    header: tuple[str, ...] | None  # None: the file has no header line
    text: Column
    text_pair: Column | None
    label: Column
    problem_type: str = "single_label_classification"
    num_columns: int | None = None  # for header-less files


GLUE_PRESETS: dict[str, TablePreset] = {
    p.name: p
    for p in (
        TablePreset("glue-sst2", ("sentence", "label"), "sentence", None, "label"),
        TablePreset(
            "glue-mrpc",
            ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            "#1 String",
            "#2 String",
            "Quality",
        ),
        TablePreset(
            "glue-stsb",
            ("index", "genre", "filename", "year", "old_index", "source1", "source2",
             "sentence1", "sentence2", "score"),
            "sentence1",
            "sentence2",
            "score",
            problem_type="regression",
        ),
        TablePreset("glue-cola", None, 3, None, 1, num_columns=4),
    )
}
SEQUENCE_FORMATS: tuple[str, ...] = ("auto", "tsv", "csv", "jsonl", *GLUE_PRESETS)

# Column names tried, in order, when the caller names none.
_TEXT_NAMES = ("text", "sentence", "sentence1", "question", "premise")
_PAIR_NAMES = ("text_pair", "sentence2", "hypothesis")
_LABEL_NAMES = ("label", "labels", "score")


def detect_sequence_format(path: str | Path) -> str:
    """Guess the format of a sequence-classification file: a GLUE preset, ``tsv``, ``csv`` or ``jsonl``.

    ``.jsonl``/``.json`` -> ``jsonl``; ``.csv`` -> ``csv``; anything else is read as TSV and its
    first line compared with the GLUE headers (CoLA, having none, by its shape).
    """
    p = _open_path(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    lines = _read_lines(p)
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        return "tsv"
    cells = tuple(first.rstrip("\r\n").split("\t"))
    for preset in GLUE_PRESETS.values():
        if preset.header is not None and cells == preset.header:
            return preset.name
    if len(cells) == 4 and cells[1] in ("0", "1") and cells[2] in ("", "*"):
        return "glue-cola"
    return "tsv"


def _resolve_column(
    column: Column | None, header: Sequence[str] | None, candidates: Sequence[str], what: str,
    where: str, required: bool,
) -> int | None:
    """The index of a column given by name or index (or found among ``candidates``)."""
    if column is None:
        if header is not None:
            for name in candidates:
                if name in header:
                    return list(header).index(name)
        if required:
            have = f"the columns are {list(header)}" if header is not None else "the file has no header"
            raise UserError(
                f"{where}: cannot tell which column holds the {what} ({have}); name it explicitly"
            )
        return None
    # A string of digits is an index unless the header has a column of that name (CLI arguments
    # arrive as strings).
    is_index = isinstance(column, int) or (
        column.lstrip("-").isdigit() and (header is None or column not in header)
    )
    if is_index:
        index = int(column)
        width = len(header) if header is not None else None
        if width is not None and not -width <= index < width:
            raise UserError(f"{where}: {what} column {index} is out of range ({width} columns)")
        return index
    if header is None:
        raise UserError(f"{where}: {what} column {column!r} is a name but the file has no header")
    if column not in header:
        raise UserError(f"{where}: no {what} column {column!r}; the columns are {list(header)}")
    return list(header).index(column)


def _parse_label(
    value: Any, problem_type: str, separator: str, where: str
) -> tuple[str | float | tuple[str, ...] | None, str | None]:
    """(label, error message or None) for one raw label cell or JSON value."""
    if problem_type == "regression":
        if isinstance(value, bool):
            return None, f"regression label {value!r} is not a number"
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None, f"regression label {value!r} is not a number"
        if not math.isfinite(number):
            return None, f"regression label {value!r} is not finite"
        return number, None
    if problem_type == "multi_label_classification":
        if isinstance(value, list):
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
                return None, f"multi-label labels must be strings or integers, got {value!r}"
            return tuple(str(v) for v in value), None
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            parts = [s.strip() for s in str(value).split(separator)]
            return tuple(s for s in parts if s), None
        return None, f"multi-label labels must be a list or a {separator!r}-separated string, got {value!r}"
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        text = str(value).strip()
        if not text:
            return None, "empty label"
        return text, None
    return None, f"label {value!r} is not a string or an integer"


def read_sequence_classification(
    path: str | Path,
    *,
    format: str = "auto",
    text_column: Column | None = None,
    text_pair_column: Column | None = None,
    label_column: Column | None = None,
    problem_type: str | None = None,
    label_separator: str = ",",
    has_header: bool | None = None,
    labeled: bool = True,
    on_bad: OnBad = "error",
) -> ReadResult[SequenceExample]:
    """Read sentence (pair) classification / regression examples from TSV, CSV or JSONL.

    Args:
        path: the data file.
        format: ``auto`` (see :func:`detect_sequence_format`), ``tsv``, ``csv``, ``jsonl`` or a
            GLUE preset (``glue-sst2``, ``glue-mrpc``, ``glue-stsb``, ``glue-cola``).
        text_column, text_pair_column, label_column: a column name (header / JSON key) or a
            0-based index (TSV/CSV). Left out, they come from the preset, or the first present of
            ``text, sentence, sentence1, question, premise`` / ``text_pair, sentence2, hypothesis``
            (the pair is optional) / ``label, labels, score``.
        problem_type: ``single_label_classification`` (default; labels are strings),
            ``regression`` (float targets; the default for STS-B) or ``multi_label_classification``
            (a JSON list, or a string split on ``label_separator``).
        has_header: TSV/CSV only; default True (presets know their own).
        labeled: False for unlabeled (prediction) data: the label column is not read.
        on_bad: ``error`` raises on the first bad record; ``skip`` skips and reports them.

    Returns:
        A :class:`ReadResult` of :class:`SequenceExample`.
    """
    p = _open_path(path)
    fmt = detect_sequence_format(p) if format == "auto" else format
    if fmt not in SEQUENCE_FORMATS or fmt == "auto":
        raise UserError(f"unknown format {format!r}; choose one of {list(SEQUENCE_FORMATS)}")
    preset = GLUE_PRESETS.get(fmt)
    if preset is not None:
        text_column = preset.text if text_column is None else text_column
        text_pair_column = preset.text_pair if text_pair_column is None else text_pair_column
        label_column = preset.label if label_column is None else label_column
        problem_type = problem_type or preset.problem_type
        has_header = preset.header is not None
    problem_type = problem_type or "single_label_classification"
    if problem_type not in PROBLEM_TYPES:
        raise UserError(f"unknown problem_type {problem_type!r}; choose one of {list(PROBLEM_TYPES)}")
    problems = _Problems(p, on_bad)
    if fmt == "jsonl":
        records = _jsonl_records(p)
        header = None
    else:
        delimiter = "," if fmt == "csv" else "\t"
        has_header = True if has_header is None else has_header
        header, records = _table_records(p, delimiter, has_header, fmt == "csv")
        if preset is not None and preset.header is not None and header is not None:
            if tuple(header) != preset.header:
                raise UserError(
                    f"{p}:1: the header {header} is not the {preset.name} header {list(preset.header)}"
                )
    examples: list[SequenceExample] = []
    if fmt == "jsonl":
        text_key = _jsonl_key(text_column, records, _TEXT_NAMES, "text", p, True)
        pair_key = _jsonl_key(text_pair_column, records, _PAIR_NAMES, "text_pair", p, False)
        label_key = _jsonl_key(label_column, records, _LABEL_NAMES, "label", p, labeled) if labeled else None
        for line, obj in records:
            where = f"{p}:{line}"
            if isinstance(obj, str):
                problems.bad(where, obj)
                continue
            missing = [
                f"{what} key {key!r}"
                for what, key in (("text", text_key), ("text_pair", pair_key), ("label", label_key))
                if key is not None and key not in obj
            ]
            if missing:
                problems.bad(where, "missing " + ", ".join(missing))
                continue
            example = _sequence_from_values(
                where, problems, problem_type, label_separator,
                obj[text_key],
                obj[pair_key] if pair_key else None,
                obj[label_key] if label_key else None,
                pair_key is not None, label_key is not None,
            )
            if example is not None:
                examples.append(example)
    else:
        where0 = f"{p}:1"
        text_i = _resolve_column(text_column, header, _TEXT_NAMES, "text", where0, True)
        pair_i = _resolve_column(text_pair_column, header, _PAIR_NAMES, "text_pair", where0, False)
        label_i = (
            _resolve_column(label_column, header, _LABEL_NAMES, "label", where0, True) if labeled else None
        )
        width = len(header) if header is not None else (preset.num_columns if preset else None)
        needed = 1 + max(i if i >= 0 else -i - 1 for i in (text_i, pair_i, label_i) if i is not None)
        for line, cells in records:
            where = f"{p}:{line}"
            if width is not None and len(cells) != width:
                problems.bad(where, f"expected {width} columns, found {len(cells)}")
                continue
            if len(cells) < needed:
                problems.bad(where, f"expected at least {needed} columns, found {len(cells)}")
                continue
            example = _sequence_from_values(
                where, problems, problem_type, label_separator,
                cells[text_i],
                cells[pair_i] if pair_i is not None else None,
                cells[label_i] if label_i is not None else None,
                pair_i is not None, label_i is not None,
            )
            if example is not None:
                examples.append(example)
    return problems.finish(examples, "examples")


def _sequence_from_values(
    where: str, problems: _Problems, problem_type: str, separator: str,
    text: Any, pair: Any, label: Any, want_pair: bool, want_label: bool,
) -> SequenceExample | None:
    if not isinstance(text, str):
        problems.bad(where, f"the text must be a string, got {text!r}")
        return None
    if want_pair and not isinstance(pair, str):
        problems.bad(where, f"the text pair must be a string, got {pair!r}")
        return None
    parsed = None
    if want_label:
        parsed, error = _parse_label(label, problem_type, separator, where)
        if error is not None:
            problems.bad(where, error)
            return None
    return SequenceExample(text=text, text_pair=pair if want_pair else None, label=parsed, where=where)


def _table_records(
    path: Path, delimiter: str, has_header: bool, quoted: bool
) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header or None, [(line number, cells)]) of a TSV/CSV file.

    TSV is split on tabs with no quoting (GLUE TSVs hold unbalanced double quotes); CSV follows
    the usual quoting rules, so a quoted field may span lines (its first line is reported).
    """
    records = list(table_rows(path, delimiter=delimiter, quoted=quoted))
    header = None
    if has_header and records:
        header = [c.strip() for c in records[0][1]]
        records = records[1:]
    return header, records


def _jsonl_records(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    """[(line number, object)] of a JSONL file; a line that is not a JSON object gives its error text.

    Errors are returned, not raised, so that the caller reports all bad records in line order.
    """
    return list(jsonl_records(path))


def _jsonl_key(
    column: Column | None, records: list[tuple[int, dict[str, Any] | str]], candidates: Sequence[str],
    what: str, path: Path, required: bool,
) -> str | None:
    """The JSON key for a field: the one given, or the first candidate present in the first record."""
    if column is not None:
        if isinstance(column, int):
            raise UserError(f"{path}: JSONL fields are named, not numbered: got {what} column {column}")
        return column
    first_line, first = next(((n, r) for n, r in records if isinstance(r, dict)), (0, None))
    if first is not None:
        for name in candidates:
            if name in first:
                return name
        if required:
            raise UserError(
                f"{path}:{first_line}: cannot tell which key holds the {what} (keys: {sorted(first)});"
                " name it explicitly"
            )
    return None


# --------------------------------------------------------------------------------------------
# Token classification
# --------------------------------------------------------------------------------------------


def read_conll(
    path: str | Path, *, labeled: bool = True, on_bad: OnBad = "error"
) -> ReadResult[TokenExample]:
    """Read a CoNLL-style file: one ``word ... TAG`` per line, a blank line between sentences.

    The first column is the word and the last the tag (so CoNLL-2003's four-column and two-column
    files both work); columns are separated by whitespace. ``-DOCSTART-`` lines are skipped. With
    ``labeled=False`` only the first column is read and ``tags`` is None. A malformed line makes
    its whole sentence bad (``on_bad="skip"`` drops that sentence and reports it).
    """
    p = _open_path(path)
    problems = _Problems(p, on_bad)
    examples: list[TokenExample] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0
    error: tuple[int, str] | None = None  # (line, message) of the sentence's first bad line

    def close() -> None:
        nonlocal words, tags, error
        if words or error:
            if error is not None:
                problems.bad(f"{p}:{error[0]}", f"{error[1]} (in the sentence starting at line {start})")
            else:
                examples.append(TokenExample(tuple(words), tuple(tags) if labeled else None, str(p), start))
        words, tags, error = [], [], None

    for number, line in enumerate(_read_lines(p), start=1):
        cells = line.split()
        if not cells:
            close()
            continue
        if cells[0] == "-DOCSTART-":
            close()
            continue
        if not words and error is None:
            start = number
        if error is not None:
            continue
        if labeled and len(cells) < 2:
            error = (number, f"expected 'word ... TAG', found {line.strip()!r}")
            continue
        words.append(cells[0])
        tags.append(cells[-1])
    close()
    return problems.finish(examples, "sentences")


# --------------------------------------------------------------------------------------------
# Question answering
# --------------------------------------------------------------------------------------------


def read_squad(path: str | Path, *, labeled: bool = True, on_bad: OnBad = "error") -> ReadResult[QAExample]:
    """Read SQuAD v1.1 / v2.0 JSON: ``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``.

    Each question becomes a :class:`QAExample` with all of its answers (dev sets have several);
    v2.0 questions with ``"is_impossible": true`` have none. Every answer must occur in the
    context at its ``answer_start``. Places are reported as ``file:line (question id ...)``.
    ``labeled=False`` accepts questions without answers (prediction input).
    """
    p = _open_path(path)
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        raise UserError(f"{p}: no questions found (the file is empty)")
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f"{p}: not SQuAD JSON: expected an object with a 'data' list")

    def locate(qid: Any, json_path: str) -> str:
        # JSON has no record lines; find the id's first occurrence (only on the error path).
        pos = text.find(json.dumps(qid)) if qid is not None else -1
        line = f":{text.count(chr(10), 0, pos) + 1}" if pos >= 0 else ""
        return f"{p}{line} ({json_path}" + (f", question id {qid}" if qid is not None else "") + ")"

    problems = _Problems(p, on_bad)
    examples: list[QAExample] = []
    seen: set[str] = set()
    for i, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            problems.bad(locate(None, f"data[{i}]"), "expected an object with a 'paragraphs' list")
            continue
        title = str(article.get("title", ""))
        for j, paragraph in enumerate(paragraphs):
            json_path = f"data[{i}].paragraphs[{j}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not isinstance(qas, list):
                problems.bad(locate(None, json_path), "expected an object with a 'context' string and a 'qas' list")
                continue
            for k, qa in enumerate(qas):
                example = _squad_question(qa, context, title, labeled, f"{json_path}.qas[{k}]", locate, problems)
                if example is None:
                    continue
                if example.id in seen:
                    problems.bad(example.where, f"duplicate question id {example.id!r}")
                    continue
                seen.add(example.id)
                examples.append(example)
    return problems.finish(examples, "questions")


def _squad_question(
    qa: Any, context: str, title: str, labeled: bool, json_path: str, locate: Any, problems: _Problems
) -> QAExample | None:
    qid = qa.get("id") if isinstance(qa, dict) else None
    where = locate(qid, json_path)
    if not isinstance(qa, dict) or not isinstance(qid, (str, int)) or not isinstance(qa.get("question"), str):
        problems.bad(where, "expected an object with an 'id' and a 'question' string")
        return None
    if not context.strip():
        problems.bad(where, "the context is empty")
        return None
    impossible = bool(qa.get("is_impossible", False))
    raw_answers = qa.get("answers", [])
    if not isinstance(raw_answers, list):
        problems.bad(where, "'answers' must be a list")
        return None
    answers: list[Answer] = []
    if not impossible:
        for a in raw_answers:
            if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not isinstance(
                a.get("answer_start"), int
            ):
                problems.bad(where, f"an answer must be {{'text': str, 'answer_start': int}}, got {a!r}")
                return None
            start, answer_text = a["answer_start"], a["text"]
            found = context[start : start + len(answer_text)] if start >= 0 else ""
            if found != answer_text or not answer_text:
                problems.bad(
                    where,
                    f"answer {answer_text!r} does not occur at offset {start} of the context"
                    f" (found {found!r})",
                )
                return None
            answers.append(Answer(answer_text, start))
        if labeled and not answers:
            problems.bad(where, "an answerable question (no 'is_impossible': true) has no answers")
            return None
    return QAExample(str(qid), qa["question"], context, tuple(answers), impossible, title, where)


def qa_references(examples: Sequence[QAExample]) -> dict[str, list[str]]:
    """``{id: gold answer texts}`` (empty for unanswerable), the form the SQuAD metrics take."""
    return {ex.id: [a.text for a in ex.answers] for ex in examples}


# --------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------

MULTIPLE_CHOICE_FORMATS: tuple[str, ...] = ("auto", "jsonl", "swag")


def read_multiple_choice(
    path: str | Path, *, format: str = "auto", labeled: bool = True, on_bad: OnBad = "error"
) -> ReadResult[ChoiceExample]:
    """Read multiple-choice examples: JSONL ``{"query", "choices", "gold"}`` or SWAG-style CSV.

    SWAG CSV needs the columns ``sent1, sent2, ending0, ending1, ...`` and ``label``; the query is
    ``sent1`` and choice ``i`` is ``sent2 + " " + ending<i>``. Every example needs at least two
    choices and all examples of a file the same number (the first example sets it); ``gold`` /
    ``label`` must index a choice. ``format="auto"`` picks ``swag`` for ``.csv``, else ``jsonl``.
    """
    p = _open_path(path)
    fmt = format
    if fmt == "auto":
        fmt = "swag" if p.suffix.lower() == ".csv" else "jsonl"
    if fmt not in MULTIPLE_CHOICE_FORMATS:
        raise UserError(f"unknown format {format!r}; choose one of {list(MULTIPLE_CHOICE_FORMATS)}")
    problems = _Problems(p, on_bad)
    # (where, query, choices, gold, error): errors are reported in line order in the loop below.
    raw: list[tuple[str, Any, Any, Any, str | None]] = []
    if fmt == "jsonl":
        for line, obj in _jsonl_records(p):
            where = f"{p}:{line}"
            if isinstance(obj, str):
                raw.append((where, None, None, None, obj))
                continue
            missing = [k for k in ("query", "choices") + (("gold",) if labeled else ()) if k not in obj]
            error = f"missing key(s) {missing}" if missing else None
            raw.append((where, obj.get("query"), obj.get("choices"), obj.get("gold") if labeled else None, error))
    else:
        header, records = _table_records(p, ",", True, True)
        header = header or []
        endings = []
        while f"ending{len(endings)}" in header:
            endings.append(header.index(f"ending{len(endings)}"))
        needed = ["sent1", "sent2"] + (["label"] if labeled else [])
        missing = [c for c in needed if c not in header] + ([] if endings else ["ending0"])
        if missing:
            raise UserError(f"{p}:1: SWAG CSV is missing column(s) {missing}; the columns are {header}")
        s1, s2 = header.index("sent1"), header.index("sent2")
        label_i = header.index("label") if labeled else None
        for line, cells in records:
            where = f"{p}:{line}"
            if len(cells) != len(header):
                raw.append((where, None, None, None, f"expected {len(header)} columns, found {len(cells)}"))
                continue
            gold: Any = None
            if label_i is not None:
                try:
                    gold = int(cells[label_i])
                except ValueError:
                    raw.append((where, None, None, None, f"label {cells[label_i]!r} is not an integer"))
                    continue
            choices = [f"{cells[s2]} {cells[e]}".strip() for e in endings]
            raw.append((where, cells[s1], choices, gold, None))
    examples: list[ChoiceExample] = []
    expected: tuple[int, str] | None = None  # (number of choices, where it was set)
    for where, query, choices, gold, error in raw:
        if error is not None:
            problems.bad(where, error)
            continue
        if not isinstance(query, str):
            problems.bad(where, f"the query must be a string, got {query!r}")
            continue
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            problems.bad(where, f"'choices' must be a list of strings, got {choices!r}")
            continue
        if len(choices) < 2:
            problems.bad(where, f"needs at least 2 choices, found {len(choices)}")
            continue
        if expected is not None and len(choices) != expected[0]:
            problems.bad(
                where,
                f"has {len(choices)} choices but earlier examples have {expected[0]} (first at"
                f" {expected[1]}); all examples of a file need the same number",
            )
            continue
        if labeled:
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
                problems.bad(where, f"gold {gold!r} is not a choice index in [0, {len(choices) - 1}]")
                continue
        if expected is None:
            expected = (len(choices), where)
        examples.append(ChoiceExample(query, tuple(choices), gold if labeled else None, where))
    return problems.finish(examples, "examples")


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def canonical_task(task: str) -> str:
    """The canonical task name (one of :data:`TASKS`) for a task name or alias."""
    return task_table.resolve_task(task, task_table.FINETUNE).name


# The reader of each fine-tuning task (checked against the task table).
READERS: dict[str, Any] = {
    "sequence-classification": read_sequence_classification,
    "token-classification": read_conll,
    "question-answering": read_squad,
    "multiple-choice": read_multiple_choice,
}
task_table.check_covers(READERS, task_table.FINETUNE, "megabert.data.tasks.READERS")


def read_examples(task: str, path: str | Path, **options: Any) -> ReadResult[Any]:
    """Read the examples of ``task`` from ``path``; ``options`` go to that task's reader.

    ``sequence-classification`` -> :func:`read_sequence_classification`,
    ``token-classification`` -> :func:`read_conll`, ``question-answering`` -> :func:`read_squad`,
    ``multiple-choice`` -> :func:`read_multiple_choice`.
    """
    reader = READERS[canonical_task(task)]
    try:
        inspect.signature(reader).bind(path, **options)
    except TypeError as e:
        raise UserError(f"bad option for the {task} reader: {e}") from None
    return reader(path, **options)
