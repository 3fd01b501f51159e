"""Examples -> model inputs for each fine-tuning head, and the collator that batches them.

Every ``encode_*`` function returns a :class:`FeatureSet`: one row of unpadded model inputs per
feature (python lists, padded per batch by :class:`Collator`), with per-row metadata kept aside
for turning predictions back into words or answer spans. A :class:`FeatureSet` can be handed to
``torch.utils.data.DataLoader(features, collate_fn=Collator(tokenizer.pad_token_id))`` directly.

Inputs per head (the forward arguments of the ``MegatronBertFor*`` classes):

- sequence classification: ``input_ids, token_type_ids, attention_mask`` ``(seq,)`` and ``labels``:
  an int (single label), a float (regression) or a multi-hot float list (multi-label).
- token classification: the same plus ``labels`` ``(seq,)``: the tag id on the first word-piece of
  each word, -100 on the other pieces and on special tokens. Meta: :class:`TokenRowMeta`.
- question answering: one row per window of the context; ``start_positions, end_positions``
  (ints; the CLS index 0 when the answer is not inside the window or there is none).
  Meta: :class:`QAWindow`, consumed by :mod:`megabert.inference.qa_decoding`.
- multiple choice: ``input_ids, token_type_ids, attention_mask`` ``(num_choices, seq)`` and
  ``labels`` (the right choice's index).

Truncation is never silent: the number of examples that lost tokens is kept in
:attr:`FeatureSet.num_truncated` and logged as a warning.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from megabert import task_table
from megabert.data.tasks import (
    ChoiceExample,
    QAExample,
    SequenceExample,
    TokenExample,
    canonical_task,
)
from megabert.errors import UserError

logger = logging.getLogger("megabert.data")

IGNORE_INDEX = -100  # label value the loss ignores (torch.nn.CrossEntropyLoss's default)
_CHUNK = 1000  # examples per tokenizer call: big enough to batch, small enough for progress


@dataclass
class TokenRowMeta:
    """For one token-classification row: the word of each token (None for special tokens)."""

    word_ids: list[int | None]
    num_words: int


@dataclass
class QAWindow:
    """For one QA window: where its tokens come from in the example's context.

    ``offsets[t]`` is the ``(start, end)`` character span of token ``t`` in the context, or None
    when the token is not part of the context (question, special or padding tokens).
    ``word_ids[t]`` is the tokenizer's word index of a context token (None elsewhere); it lets
    decoding widen an answer to whole words as transformers' pipeline does.
    """

    example_index: int
    offsets: list[tuple[int, int] | None]
    word_ids: list[int | None]
    cls_index: int = 0


@dataclass
class FeatureSet:
    """Model-input rows (unpadded) plus per-row metadata; a map-style dataset of the rows."""

    task: str
    rows: list[dict[str, Any]]
    meta: list[Any] = field(default_factory=list)
    num_truncated: int = 0
    label_list: list[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


@dataclass
class Collator:
    """Pads a list of feature rows into a batch of tensors.

    Every list-valued field is padded to the longest in the batch (``input_ids`` with
    ``pad_token_id``, ``labels`` with -100, the rest with 0), in its last dimension, so
    ``(seq,)`` rows give ``(batch, seq)`` and multiple-choice ``(choices, seq)`` rows give
    ``(batch, choices, seq)``. Fixed-length lists (multi-hot labels) are stacked as they are.
    Labels holding floats become float tensors, everything else int64.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            if isinstance(values[0], list):
                pad = self.pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
                values = self._pad(values, pad, key)
            dtype = torch.float32 if _has_float(values) else torch.long
            batch[key] = torch.tensor(values, dtype=dtype)
        return batch

    def _pad(self, values: list[Any], pad: Any, key: str) -> list[Any]:
        if values and values[0] and isinstance(values[0][0], list):  # (choices, seq) rows
            counts = {len(v) for v in values}
            if len(counts) > 1:
                raise ValueError(f"{key}: rows in one batch have different numbers of choices {sorted(counts)}")
            longest = max(len(seq) for v in values for seq in v)
            longest = self._round(longest)
            return [[seq + [pad] * (longest - len(seq)) for seq in v] for v in values]
        longest = self._round(max(len(v) for v in values))
        return [v + [pad] * (longest - len(v)) for v in values]

    def _round(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m


def _has_float(values: list[Any]) -> bool:
    first = values[0]
    while isinstance(first, list) and first:
        first = first[0]
    return isinstance(first, float)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check_max_length(max_length: int, minimum: int) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < minimum:
        raise UserError(f"max_length must be an integer >= {minimum}, got {max_length!r}")


def _chunks(n: int, desc: str, progress: bool) -> Any:
    starts = range(0, n, _CHUNK)
    return tqdm(starts, desc=desc, unit="chunk", disable=not progress or n <= _CHUNK, leave=False)


def _truncated_rows(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, rows: list[list[int]], max_length: int
) -> set[int]:
    """Indices of rows that lost tokens: only rows that reached ``max_length`` are re-encoded whole."""
    full = [i for i, ids in enumerate(rows) if len(ids) >= max_length]
    if not full:
        return set()
    enc = tokenizer(
        [texts[i] for i in full], [pairs[i] for i in full] if pairs is not None else None, truncation=False
    )
    return {i for i, ids in zip(full, enc["input_ids"]) if len(ids) > max_length}


def _warn_truncated(count: int, total: int, what: str, max_length: int) -> None:
    if count:
        logger.warning(
            "%d of %d %s were longer than max_length=%d tokens and were truncated", count, total, what, max_length
        )


def _label_ids(
    examples: Sequence[SequenceExample], label_list: Sequence[str] | None, problem_type: str
) -> list[Any] | None:
    """Labels as model targets, or None when the examples are unlabeled."""
    labeled = [ex.label is not None for ex in examples]
    if not any(labeled):
        return None
    if not all(labeled):
        first = examples[labeled.index(False)]
        raise UserError(f"{first.where}: unlabeled example among labeled ones")
    if problem_type == "regression":
        out = []
        for ex in examples:
            if not isinstance(ex.label, float):
                raise UserError(f"{ex.where}: regression needs a float label, got {ex.label!r}")
            out.append(ex.label)
        return out
    if label_list is None:
        raise UserError("classification labels need a label_list (see tasks.label_list_from)")
    index = {label: i for i, label in enumerate(label_list)}

    def lookup(ex: SequenceExample, label: str) -> int:
        if label not in index:
            raise UserError(f"{ex.where}: label {label!r} is not among the training labels {list(label_list)}")
        return index[label]

    if problem_type == "multi_label_classification":
        out = []
        for ex in examples:
            labels = ex.label if isinstance(ex.label, tuple) else (ex.label,)
            hot = [0.0] * len(label_list)
            for label in labels:
                hot[lookup(ex, label)] = 1.0
            out.append(hot)
        return out
    if problem_type != "single_label_classification":
        raise UserError(f"unknown problem_type {problem_type!r}")
    return [lookup(ex, ex.label) for ex in examples]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------


def encode_sequence_classification(
    examples: Sequence[SequenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    label_list: Sequence[str] | None = None,
    problem_type: str = "single_label_classification",
    progress: bool = True,
) -> FeatureSet:
    """Tokenize sentences (or pairs) with ``longest_first`` truncation to ``max_length``.

    ``label_list`` (from the training data) maps label names to ids; a label outside it is a
    :class:`UserError` naming the example's ``file:line``. Regression targets stay floats;
    multi-label targets become multi-hot float lists over ``label_list``.
    """
    _check_max_length(max_length, 4)
    if not examples:
        raise UserError("no examples to encode")
    with_pair = [ex.text_pair is not None for ex in examples]
    if any(with_pair) and not all(with_pair):
        first = examples[with_pair.index(not with_pair[0])]
        raise UserError(f"{first.where}: mixes single sentences and sentence pairs; give all or none a pair")
    labels = _label_ids(examples, label_list, problem_type)
    rows: list[dict[str, Any]] = []
    truncated = 0
    for start in _chunks(len(examples), "tokenizing", progress):
        chunk = examples[start : start + _CHUNK]
        texts = [ex.text for ex in chunk]
        pairs = [ex.text_pair for ex in chunk] if with_pair[0] else None
        enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length)
        truncated += len(_truncated_rows(tokenizer, texts, pairs, enc["input_ids"], max_length))
        for i in range(len(chunk)):
            row = {
                "input_ids": list(enc["input_ids"][i]),
                "token_type_ids": list(enc["token_type_ids"][i]),
                "attention_mask": list(enc["attention_mask"][i]),
            }
            if labels is not None:
                row["labels"] = labels[start + i]
            rows.append(row)
    _warn_truncated(truncated, len(examples), "examples", max_length)
    return FeatureSet("sequence-classification", rows, [None] * len(rows), truncated,
                      list(label_list) if label_list is not None else None)


# --------------------------------------------------------------------------------------------
# Token classification
# --------------------------------------------------------------------------------------------


def _word_spans(words: Sequence[str]) -> tuple[str, list[int], list[int]]:
    """The words joined by single spaces, with each word's start and end character."""
    starts, ends, position = [], [], 0
    for word in words:
        starts.append(position)
        ends.append(position + len(word))
        position += len(word) + 1
    return " ".join(words), starts, ends


def encode_token_classification(
    examples: Sequence[TokenExample],
    tokenizer: Any,
    *,
    max_length: int,
    label_list: Sequence[str] | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Tokenize pre-split words; put each word's tag id on its first word-piece, -100 elsewhere.

    The words are joined with spaces and each token is mapped to its word through the offsets,
    so ``meta[i].word_ids`` holds, per token, the index of its word in ``examples[i].words``
    (None for special tokens). Words past ``max_length`` are cut (counted in ``num_truncated``);
    :func:`word_predictions` gives them a fallback tag.
    """
    _check_max_length(max_length, 3)
    if not examples:
        raise UserError("no examples to encode")
    labeled = examples[0].tags is not None
    index: dict[str, int] = {}
    if labeled:
        if label_list is None:
            raise UserError("token labels need a label_list (see tasks.label_list_from)")
        index = {tag: i for i, tag in enumerate(label_list)}
    rows: list[dict[str, Any]] = []
    meta: list[TokenRowMeta] = []
    truncated = 0
    for start in _chunks(len(examples), "tokenizing", progress):
        chunk = examples[start : start + _CHUNK]
        joined = [_word_spans(ex.words) for ex in chunk]
        enc = tokenizer(
            [text for text, _, _ in joined], truncation=True, max_length=max_length, return_offsets_mapping=True
        )
        for i, ex in enumerate(chunk):
            _, word_starts, word_ends = joined[i]
            sequence_ids = enc.sequence_ids(i)
            word_ids: list[int | None] = []
            for t, (begin, end) in enumerate(enc["offset_mapping"][i]):
                if sequence_ids[t] is None:
                    word_ids.append(None)
                    continue
                w = bisect.bisect_right(word_starts, begin) - 1
                # A token lies inside one word: words are separated by spaces the tokenizer drops.
                word_ids.append(w if 0 <= w and begin < word_ends[w] else None)
            row = {
                "input_ids": list(enc["input_ids"][i]),
                "token_type_ids": list(enc["token_type_ids"][i]),
                "attention_mask": list(enc["attention_mask"][i]),
            }
            if labeled:
                if ex.tags is None:
                    raise UserError(f"{ex.where}: unlabeled sentence among labeled ones")
                row["labels"] = _first_piece_labels(ex, word_ids, index, label_list or [])
            seen = [w for w in word_ids if w is not None]
            if len(row["input_ids"]) >= max_length and (max(seen) if seen else -1) < len(ex.words) - 1:
                truncated += 1
            rows.append(row)
            meta.append(TokenRowMeta(word_ids, len(ex.words)))
    _warn_truncated(truncated, len(examples), "sentences", max_length)
    return FeatureSet("token-classification", rows, meta, truncated,
                      list(label_list) if label_list is not None else None)


def _first_piece_labels(
    ex: TokenExample, word_ids: list[int | None], index: dict[str, int], label_list: Sequence[str]
) -> list[int]:
    labels: list[int] = []
    previous: int | None = None
    for w in word_ids:
        if w is None or w == previous:
            labels.append(IGNORE_INDEX)
        else:
            tag = ex.tags[w]  # type: ignore[index]
            if tag not in index:
                raise UserError(
                    f"{ex.path}:{ex.line + w}: tag {tag!r} is not among the training labels {list(label_list)}"
                )
            labels.append(index[tag])
        previous = w
    return labels


def word_predictions(
    token_predictions: Sequence[int],
    meta: TokenRowMeta,
    label_list: Sequence[str],
    fallback: str = "O",
) -> tuple[list[str], int]:
    """Per-word tags from one row's per-token predicted ids (the first word-piece decides).

    Returns ``(tags, missing)``: words with no token in the row (cut by ``max_length``) get
    ``fallback`` and are counted in ``missing``.
    """
    tags: list[str | None] = [None] * meta.num_words
    for t, w in enumerate(meta.word_ids):
        if w is not None and t < len(token_predictions) and tags[w] is None:
            tags[w] = label_list[int(token_predictions[t])]
    missing = sum(tag is None for tag in tags)
    return [fallback if tag is None else tag for tag in tags], missing


# --------------------------------------------------------------------------------------------
# Question answering
# --------------------------------------------------------------------------------------------


def _cut_questions(
    questions: list[str], tokenizer: Any, max_question_length: int | None
) -> tuple[list[str], list[int], int]:
    """(questions cut to ``max_question_length`` word-pieces, their lengths, how many were cut)."""
    enc = tokenizer(questions, return_offsets_mapping=True)
    out, lengths, cut = [], [], 0
    for q, offsets in zip(questions, enc["offset_mapping"]):
        n = len(offsets) - 2  # without [CLS] and [SEP]
        if max_question_length is not None and n > max_question_length:
            q = q[: offsets[max_question_length][1]]  # end of the last kept piece
            n = max_question_length
            cut += 1
        out.append(q)
        lengths.append(n)
    return out, lengths, cut


def _answer_positions(
    answer_start: int, answer_end: int, offsets: list[tuple[int, int] | None], cls_index: int
) -> tuple[int, int]:
    """Token positions of the first and last answer token in a window, or CLS when not inside."""
    context = [t for t, o in enumerate(offsets) if o is not None]
    if not context:
        return cls_index, cls_index
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= answer_start and offsets[last][1] >= answer_end):  # type: ignore[index]
        return cls_index, cls_index
    # The last token starting at or before the answer start; the first ending at or after its end.
    start = max(t for t in context if offsets[t][0] <= answer_start)  # type: ignore[index]
    end = min(t for t in context if offsets[t][1] >= answer_end)  # type: ignore[index]
    return start, end


def encode_question_answering(
    examples: Sequence[QAExample],
    tokenizer: Any,
    *,
    max_length: int = 384,
    doc_stride: int = 128,
    max_question_length: int | None = 64,
    with_labels: bool = True,
    progress: bool = True,
) -> FeatureSet:
    """Tokenize ``[CLS] question [SEP] context [SEP]`` into windows over long contexts.

    Contexts are cut with ``only_second`` truncation into ``max_length`` windows, consecutive
    windows sharing ``doc_stride`` context tokens. Questions longer than ``max_question_length``
    word-pieces are cut (counted; None: never cut, a question too long for the window is then an
    error). With ``with_labels`` each window gets ``start_positions``/``end_positions`` of the
    first answer's tokens, or the CLS index 0 when the answer is not wholly inside the window
    or the question is unanswerable. ``meta[i]`` is the :class:`QAWindow` of row i.
    """
    _check_max_length(max_length, 8)
    if not isinstance(doc_stride, int) or doc_stride < 0:
        raise UserError(f"doc_stride must be an integer >= 0, got {doc_stride!r}")
    if max_question_length is not None and max_question_length < 1:
        raise UserError(f"max_question_length must be >= 1 or None, got {max_question_length!r}")
    if not examples:
        raise UserError("no examples to encode")
    cls_id = tokenizer.cls_token_id
    rows: list[dict[str, Any]] = []
    meta: list[QAWindow] = []
    cut_total = 0
    for start in _chunks(len(examples), "tokenizing", progress):
        chunk = examples[start : start + _CHUNK]
        # Leading spaces carry nothing (as transformers' run_qa, strip them).
        questions, lengths, cut = _cut_questions([ex.question.lstrip() for ex in chunk], tokenizer,
                                                 max_question_length)
        cut_total += cut
        for ex, n in zip(chunk, lengths):
            room = max_length - n - 3  # context tokens per window: [CLS] q [SEP] ... [SEP]
            if room <= doc_stride:
                raise UserError(
                    f"{ex.where}: the question takes {n} word-pieces, leaving {room} context tokens"
                    f" per window of max_length={max_length}; that must exceed doc_stride={doc_stride}"
                    " (raise max_length, or lower doc_stride or max_question_length)"
                )
        enc = tokenizer(
            questions,
            [ex.context for ex in chunk],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        for r, sample in enumerate(enc["overflow_to_sample_mapping"]):
            ex = chunk[sample]
            sequence_ids = enc.sequence_ids(r)
            ids = list(enc["input_ids"][r])
            cls_index = ids.index(cls_id) if cls_id in ids else 0
            offsets = [
                (int(o[0]), int(o[1])) if sequence_ids[t] == 1 else None
                for t, o in enumerate(enc["offset_mapping"][r])
            ]
            word_ids = [w if sequence_ids[t] == 1 else None for t, w in enumerate(enc.word_ids(r))]
            row = {
                "input_ids": ids,
                "token_type_ids": list(enc["token_type_ids"][r]),
                "attention_mask": list(enc["attention_mask"][r]),
            }
            if with_labels:
                if ex.answers and not ex.is_impossible:
                    answer = ex.answers[0]
                    row["start_positions"], row["end_positions"] = _answer_positions(
                        answer.start, answer.end, offsets, cls_index
                    )
                else:
                    row["start_positions"] = row["end_positions"] = cls_index
            rows.append(row)
            meta.append(QAWindow(start + int(sample), offsets, word_ids, cls_index))
    if cut_total:
        logger.warning(
            "%d of %d questions were longer than max_question_length=%d word-pieces and were cut",
            cut_total, len(examples), max_question_length,
        )
    return FeatureSet("question-answering", rows, meta, cut_total)


# --------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------


def encode_multiple_choice(
    examples: Sequence[ChoiceExample],
    tokenizer: Any,
    *,
    max_length: int,
    progress: bool = True,
) -> FeatureSet:
    """Pair the query with each choice: rows of ``(num_choices, seq)`` inputs and the gold index.

    Pairs are cut with ``longest_first`` truncation to ``max_length`` (counted per example).
    """
    _check_max_length(max_length, 4)
    if not examples:
        raise UserError("no examples to encode")
    counts = {len(ex.choices) for ex in examples}
    if len(counts) > 1:
        raise UserError(f"examples have different numbers of choices {sorted(counts)}; all need the same")
    labeled = examples[0].label is not None
    rows: list[dict[str, Any]] = []
    truncated = 0
    per_chunk = max(1, _CHUNK // max(counts))
    for start in tqdm(range(0, len(examples), per_chunk), desc="tokenizing", unit="chunk",
                      disable=not progress or len(examples) <= per_chunk, leave=False):
        chunk = examples[start : start + per_chunk]
        queries = [ex.query for ex in chunk for _ in ex.choices]
        choices = [c for ex in chunk for c in ex.choices]
        enc = tokenizer(queries, choices, truncation="longest_first", max_length=max_length)
        cut_rows = _truncated_rows(tokenizer, queries, choices, enc["input_ids"], max_length)
        position = 0
        for ex in chunk:
            n = len(ex.choices)
            span = range(position, position + n)
            row: dict[str, Any] = {
                key: [list(enc[key][j]) for j in span] for key in ("input_ids", "token_type_ids", "attention_mask")
            }
            if labeled:
                if ex.label is None:
                    raise UserError(f"{ex.where}: unlabeled example among labeled ones")
                row["labels"] = int(ex.label)
            truncated += any(j in cut_rows for j in span)
            rows.append(row)
            position += n
    _warn_truncated(truncated, len(examples), "examples", max_length)
    return FeatureSet("multiple-choice", rows, [None] * len(rows), truncated)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

ENCODERS: dict[str, Callable[..., FeatureSet]] = {
    "sequence-classification": encode_sequence_classification,
    "token-classification": encode_token_classification,
    "question-answering": encode_question_answering,
    "multiple-choice": encode_multiple_choice,
}
task_table.check_covers(ENCODERS, task_table.FINETUNE, "megabert.data.features.ENCODERS")


def encode_examples(task: str, examples: Sequence[Any], tokenizer: Any, **options: Any) -> FeatureSet:
    """Encode ``examples`` for ``task`` (a name from :data:`megabert.data.tasks.TASKS`)."""
    return ENCODERS[canonical_task(task)](examples, tokenizer, **options)
