"""Corpus preprocessing: text / JSONL files -> tokenized Megatron indexed dataset(s).

Inputs:

* plain text (any suffix but ``.jsonl``/``.json``): one sentence per line; a blank line or
  the end of a file ends a document;
* JSONL (``.jsonl``/``.json``): one JSON object per line, one document per object, its text
  under ``json_key`` (default ``"text"``).

With ``split_sentences`` each line / text is cut into sentences by :func:`split_sentences`
(a small rule-based splitter, no downloads); otherwise a JSONL document is a single sequence.
Sentences are tokenized with the tokenizer's ``encode_plain`` (word-piece ids, no special
tokens) in batches, optionally in worker processes, and written with
:class:`~megabert.data.indexed.IndexedDatasetWriter`.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megabert.data.indexed import IndexedDatasetWriter
from megabert.errors import UserError
from megabert.lines import iter_lines, jsonl_records
from megabert.tokenization import load_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json")
INPUT_FORMATS = ("auto", "text", "jsonl")
# How many bytes to inspect for NUL bytes when deciding a file is binary.
_SNIFF_BYTES = 8192

# --------------------------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------------------------

# Words that end in a period without ending the sentence (compared lower-case, no final dot).
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf al inc ltd co corp no nos fig figs vol
    vols ed eds p pp approx dept est gen gov lt col sgt capt rev hon jan feb mar apr jun jul
    aug sep sept oct nov dec u.s u.k a.m p.m ph.d""".split()
)
# A sentence end: terminal punctuation, optional closing quotes/brackets, then whitespace and a
# character that can start a sentence (upper-case letter, digit, opening quote or bracket).
_BOUNDARY = re.compile(r"""([.!?]+)(["'”’)\]]*)(\s+)(?=["'“‘(\[]?[A-Z0-9À-ÖØ-Þ])""")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with simple English punctuation rules.

    Line breaks are hard boundaries. Within a line, a sentence ends at ``.``, ``!`` or ``?``
    (plus closing quotes/brackets) followed by whitespace and a capital letter, a digit or an
    opening quote; a period after a known abbreviation ("Dr.", "e.g.") or a single-letter
    initial ("J. Smith") does not end a sentence. Empty pieces are dropped.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        start = 0
        for match in _BOUNDARY.finditer(line):
            if match.group(1) == ".":
                word = line[start : match.start(1)].rsplit(None, 1)[-1:] or [""]
                last = word[0].lstrip("\"'“‘([").lower()
                if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                    continue
            end = match.end(2)
            piece = line[start:end].strip()
            if piece:
                sentences.append(piece)
            start = match.end(3)
        rest = line[start:].strip()
        if rest:
            sentences.append(rest)
    return sentences


# --------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------


def resolve_format(path: Path, input_format: str = "auto") -> str:
    """``"text"`` or ``"jsonl"`` for ``path`` (``auto`` decides by suffix)."""
    if input_format not in INPUT_FORMATS:
        raise UserError(f"unknown input format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
    if input_format != "auto":
        return input_format
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def check_input_file(path: str | os.PathLike) -> Path:
    """Check that ``path`` is an existing, non-empty, text (not binary) file; return it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    if path.is_dir():
        raise UserError(f"input {path} is a directory; pass the files inside it")
    if path.stat().st_size == 0:
        raise UserError(f"input file {path} is empty")
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if b"\x00" in head:
        raise UserError(f"input file {path} looks binary (it contains NUL bytes); expected UTF-8 text")
    return path


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file (a leading BOM is dropped); clear error on bad bytes.

    Lines are decoded one by one so that an error names the exact line: the reader the
    prediction commands and the fine-tuning readers use too (:func:`megabert.lines.iter_lines`).
    """
    yield from iter_lines(path)


def _text_documents(path: Path, split: bool) -> Iterator[list[str]]:
    sentences: list[str] = []
    for _, line in _lines(path):
        line = line.strip()
        if not line:
            if sentences:
                yield sentences
                sentences = []
            continue
        if split:
            sentences.extend(split_sentences(line))
        else:
            sentences.append(line)
    if sentences:
        yield sentences


def _jsonl_documents(path: Path, split: bool, json_key: str) -> Iterator[list[str]]:
    for number, record in jsonl_records(path):
        if isinstance(record, str):
            raise UserError(f"{path}:{number}: {record}")
        if json_key not in record:
            keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise UserError(
                f"{path}:{number}: no key {json_key!r} in this JSON object (its keys: {keys}); "
                "choose the text field with --json-key"
            )
        text = record[json_key]
        if not isinstance(text, str):
            raise UserError(
                f"{path}:{number}: the value of {json_key!r} must be a string, got {type(text).__name__}"
            )
        if split:
            sentences = split_sentences(text)
        else:
            text = text.strip()
            sentences = [text] if text else []
        # An object with empty text is still a document slot (kept for the split bookkeeping);
        # the writer drops it.
        yield sentences


def read_documents(
    path: str | os.PathLike,
    split: bool = False,
    json_key: str = "text",
    input_format: str = "auto",
) -> Iterator[list[str]]:
    """Yield the documents of one input file, each a list of sentence strings.

    JSONL objects with empty text yield an empty list (the preprocessor counts and drops them).
    """
    path = check_input_file(path)
    if resolve_format(path, input_format) == "jsonl":
        yield from _jsonl_documents(path, split, json_key)
    else:
        yield from _text_documents(path, split)


def count_documents(
    paths: Sequence[str | os.PathLike], json_key: str = "text", input_format: str = "auto"
) -> list[int]:
    """Documents per input file; also validates every file (errors name the file and line)."""
    counts = []
    for path in paths:
        count = 0
        non_empty = 0
        for sentences in read_documents(path, split=False, json_key=json_key, input_format=input_format):
            count += 1
            non_empty += bool(sentences)
        if non_empty == 0:
            raise UserError(f"input file {path} contains no text (only blank lines or empty texts)")
        counts.append(count)
    return counts


# --------------------------------------------------------------------------------------------
# Tokenizing (in this process or in workers)
# --------------------------------------------------------------------------------------------

_worker_tokenizer: Any = None


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Vocabulary size of ``tokenizer`` (``len(tokenizer)``, falling back to ``vocab_size``)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        return int(tokenizer.vocab_size)


def _init_worker(spec: Any) -> None:
    global _worker_tokenizer
    # Each worker is one process; the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(spec)


def tokenize_documents(tokenizer: Any, documents: list[list[str]]) -> list[list[np.ndarray]]:
    """Tokenize a batch of documents in one ``encode_plain`` call; empty sentences are dropped.

    A sentence longer than :func:`megabert.data.text_limits.max_chars` (a whole document on one
    line, say) is tokenized in pieces cut at whitespace and its ids joined: the same ids, but
    the tokenizer's memory stays that of one piece (about 1 GB for a 5 MB line in one call).
    """
    from megabert.data.text_limits import max_chars

    flat = [sentence for document in documents for sentence in document]
    limit = max_chars()
    if any(len(sentence) > limit for sentence in flat):
        encoded = _encode_long(tokenizer, flat, limit)
    else:
        encoded = tokenizer.encode_plain(flat) if flat else []
    if len(encoded) != len(flat):
        raise RuntimeError(f"encode_plain returned {len(encoded)} encodings for {len(flat)} texts")
    result: list[list[np.ndarray]] = []
    position = 0
    for document in documents:
        ids = encoded[position : position + len(document)]
        position += len(document)
        result.append([np.asarray(s, dtype=np.int64) for s in ids if len(s)])
    return result


def _encode_long(tokenizer: Any, texts: list[str], limit: int) -> list[list[int]]:
    """``encode_plain(texts)`` with texts over ``limit`` characters encoded piece by piece.

    The short texts go in one call; the pieces of long ones in calls of at most 8 pieces, so
    that no call holds more than ``8 * limit`` characters of tokenizer state at once.
    """
    from megabert.data.text_limits import split_text

    short = [i for i, text in enumerate(texts) if len(text) <= limit]
    encoded: list[list[int]] = [[] for _ in texts]
    for i, ids in zip(short, tokenizer.encode_plain([texts[i] for i in short]) if short else []):
        encoded[i] = list(ids)
    for i, text in enumerate(texts):
        if len(text) <= limit:
            continue
        pieces = split_text(text, limit)
        ids: list[int] = []
        for start in range(0, len(pieces), 8):
            for piece_ids in tokenizer.encode_plain(pieces[start : start + 8]):
                ids.extend(piece_ids)
        encoded[i] = ids
    return encoded


def _ordered_map(pool: Any, batches: Iterator[Any], ahead: int) -> Iterator[Any]:
    """``pool.imap`` in input order, but with at most ``ahead`` batches in flight.

    (``Pool.imap`` reads its whole input ahead, which would hold a large corpus in memory.)
    """
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_tokenize_in_worker, (batch,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _tokenize_in_worker(batch: tuple[int, list[list[str]]]) -> tuple[int, list[list[np.ndarray]]]:
    first, documents = batch
    return first, tokenize_documents(_worker_tokenizer, documents)


# --------------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------------


@dataclass
class PreprocessSummary:
    """What :func:`preprocess_corpus` wrote."""

    documents: int = 0  # documents written (all outputs)
    sentences: int = 0
    tokens: int = 0
    empty_documents: int = 0  # documents dropped: no text, or no tokens after tokenization
    single_sentence_documents: int = 0  # written, but they cannot form NSP/SOP pairs alone
    seconds: float = 0.0
    outputs: dict[str, dict[str, int | str]] = field(default_factory=dict)  # split -> counts

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        """A human-readable multi-line summary."""
        lines = [
            f"documents: {self.documents:,}  sentences: {self.sentences:,}  tokens: {self.tokens:,}  "
            f"({self.seconds:.1f}s, {self.tokens_per_second:,.0f} tokens/s)"
        ]
        if self.empty_documents:
            lines.append(f"dropped {self.empty_documents:,} empty documents")
        if self.single_sentence_documents:
            lines.append(
                f"{self.single_sentence_documents:,} documents have a single sentence (NSP/SOP pairs "
                "need two; consider --split-sentences)"
            )
        for name, info in self.outputs.items():
            lines.append(
                f"{name}: {info['prefix']}.bin/.idx  documents {info['documents']:,}  "
                f"sentences {info['sentences']:,}  tokens {info['tokens']:,}"
            )
        return "\n".join(lines)


def _batches(
    paths: Sequence[Path], split: bool, json_key: str, input_format: str, batch_sentences: int
) -> Iterator[tuple[int, list[list[str]]]]:
    """(number of the batch's first document, documents) in input order."""
    batch: list[list[str]] = []
    first = 0
    size = 0
    number = 0
    for path in paths:
        for document in read_documents(path, split=split, json_key=json_key, input_format=input_format):
            batch.append(document)
            size += max(1, len(document))
            number += 1
            if size >= batch_sentences:
                yield first, batch
                first, batch, size = number, [], 0
    if batch:
        yield first, batch


def preprocess_corpus(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer: Any,
    *,
    split_sentences: bool = False,
    workers: int = 1,
    valid_fraction: float = 0.0,
    seed: int = 1234,
    json_key: str = "text",
    input_format: str = "auto",
    batch_sentences: int = 2048,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize ``inputs`` into ``OUTPUT.bin/.idx`` (or ``OUTPUT_train`` / ``OUTPUT_valid``).

    Args:
        inputs: text or JSONL files (see the module docstring), read in the order given.
        output_prefix: where to write; with ``valid_fraction > 0`` the prefixes
            ``OUTPUT_train`` and ``OUTPUT_valid`` are written instead.
        tokenizer: a tokenizer folder / ``vocab.txt`` path, or an object with
            ``encode_plain(list[str]) -> list[list[int]]`` and ``len()``.
        split_sentences: cut lines / JSON texts into sentences with :func:`split_sentences`.
        workers: tokenizer processes (1 = tokenize in this process).
        valid_fraction: fraction of documents (chosen at random with ``seed``) for validation.
        json_key: the JSONL field holding a document's text.
        input_format: ``auto`` (by suffix), ``text`` or ``jsonl`` for all inputs.
        batch_sentences: sentences per ``encode_plain`` call.
        progress: show a tqdm bar (documents, with token throughput) on stderr.

    Every input is validated (exists, non-empty, text, well-formed JSONL with the key) before
    any tokenization; nothing is written unless the whole corpus succeeds.
    """
    if not inputs:
        raise UserError("no input files given")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    if batch_sentences < 1:
        raise UserError(f"batch_sentences must be >= 1, got {batch_sentences}")
    paths = [check_input_file(path) for path in inputs]
    for path in paths:
        resolve_format(path, input_format)

    # Pass 1: validate every file and count documents (the train/valid draw needs the total).
    counts = count_documents(paths, json_key=json_key, input_format=input_format)
    total = sum(counts)
    is_valid = np.zeros(total, dtype=bool)
    prefix = Path(output_prefix)
    if valid_fraction > 0:
        n_valid = max(1, int(round(valid_fraction * total)))
        if n_valid >= total:
            raise UserError(
                f"valid fraction {valid_fraction} of {total} documents leaves no training documents"
            )
        is_valid[np.random.default_rng(seed).permutation(total)[:n_valid]] = True
        targets = {"train": Path(f"{prefix}_train"), "valid": Path(f"{prefix}_valid")}
    else:
        targets = {"all": prefix}

    tok = load_tokenizer(tokenizer)
    vocab_size = tokenizer_vocab_size(tok)
    spec = tokenizer if not hasattr(tokenizer, "encode_plain") else tok

    summary = PreprocessSummary()
    writers = {name: IndexedDatasetWriter(target, vocab_size=vocab_size) for name, target in targets.items()}
    counters = {name: {"documents": 0, "sentences": 0, "tokens": 0} for name in targets}
    start = time.perf_counter()
    pool = None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr)
    try:
        batches = _batches(paths, split_sentences, json_key, input_format, batch_sentences)
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(spec,))
            results = _ordered_map(pool, batches, ahead=2 * workers)
        else:
            results = ((first, tokenize_documents(tok, docs)) for first, docs in batches)
        for first, documents in results:
            for offset, sentences in enumerate(documents):
                number = first + offset
                if not sentences:
                    summary.empty_documents += 1
                    continue
                name = ("valid" if is_valid[number] else "train") if valid_fraction > 0 else "all"
                writers[name].add_document(sentences)
                tokens = sum(len(s) for s in sentences)
                counters[name]["documents"] += 1
                counters[name]["sentences"] += len(sentences)
                counters[name]["tokens"] += tokens
                summary.tokens += tokens
                summary.single_sentence_documents += len(sentences) == 1
            bar.update(len(documents))
            elapsed = time.perf_counter() - start
            bar.set_postfix(tokens=f"{summary.tokens:,}", tok_s=f"{summary.tokens / max(elapsed, 1e-9):,.0f}")
        if sum(c["documents"] for c in counters.values()) == 0:
            raise UserError("the inputs produced no tokens (every document was empty after tokenization)")
        for name, writer in writers.items():
            if counters[name]["documents"] == 0:
                raise UserError(f"the {name} split got no non-empty documents; lower or raise --valid-fraction")
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    summary.seconds = time.perf_counter() - start
    summary.documents = sum(c["documents"] for c in counters.values())
    summary.sentences = sum(c["sentences"] for c in counters.values())
    for name, target in targets.items():
        summary.outputs[name] = {"prefix": str(target), **counters[name]}
    return summary
