"""n-best answer-span decoding for extractive question answering.

Shared by the question-answering pipeline and SQuAD evaluation. The input is, for each window
of an example (see :class:`megabert.data.features.QAWindow`), the model's start and end logits
and the window's token -> context-character offsets.

A candidate span starts and ends on context tokens of one window, with
``start <= end < start + max_answer_length``. Two scores are offered:

- ``score="probability"`` (default; transformers' question-answering pipeline): per window, the
  start and end logits of the context tokens and the CLS token are softmax-normalised
  separately, and a span scores ``p_start[s] * p_end[e]``. The null (no-answer) score is
  ``p_start[CLS] * p_end[CLS]``, its minimum over the windows.
- ``score="logit_sum"`` (the SQuAD v2 reference recipe): a span scores
  ``start_logit[s] + end_logit[e]``; the null score is the minimum over windows of
  ``start_logit[CLS] + end_logit[CLS]``.

With ``allow_null`` (SQuAD v2), the prediction is the empty answer when
``null_score > best_span_score + null_threshold``. Candidates from overlapping windows are not
merged (as in transformers), so the n-best list may repeat a span.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol, Sequence

import numpy as np

ScoreMode = Literal["probability", "logit_sum"]


class WindowLike(Protocol):
    """What decoding needs of a window (:class:`megabert.data.features.QAWindow` has it)."""

    offsets: Sequence[tuple[int, int] | None]
    word_ids: Sequence[int | None]
    cls_index: int


@dataclass(frozen=True)
class QASpan:
    """One candidate answer: ``context[start:end] == text``; tokens are positions in its window."""

    text: str
    start: int
    end: int
    score: float
    window: int
    start_token: int
    end_token: int


@dataclass(frozen=True)
class QAPrediction:
    """The decoded answer of one question, and the n-best spans it was chosen from.

    ``is_null`` marks the empty answer (no span, or the null score won); ``null_score`` is None
    unless ``allow_null`` was set.
    """

    text: str
    start: int
    end: int
    score: float
    is_null: bool
    null_score: float | None
    nbest: tuple[QASpan, ...]


def _to_numpy(x: Any) -> np.ndarray:
    """A float64 array from a numpy array, a list or a torch tensor (any dtype or device)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _window_candidates(
    start: np.ndarray, end: np.ndarray, window: WindowLike, max_answer_length: int, n_best: int, score: str
) -> tuple[list[tuple[float, int, int]], float]:
    """Top ``n_best`` (score, start token, end token) spans of one window, and its null score."""
    context = np.array([t for t, o in enumerate(window.offsets) if o is not None], dtype=np.int64)
    cls = window.cls_index
    if score == "probability":
        # Softmax over CLS and the context tokens only: question, special and padding tokens
        # take no probability mass (transformers masks them out the same way).
        keep = np.concatenate([[cls], context])
        p_start, p_end = _softmax(start[keep]), _softmax(end[keep])
        null = float(p_start[0] * p_end[0])
        table = p_start[1:, None] * p_end[None, 1:]  # (context, context)
    elif score == "logit_sum":
        null = float(start[cls] + end[cls])
        table = start[context][:, None] + end[context][None, :]
    else:
        raise ValueError(f"score must be 'probability' or 'logit_sum', got {score!r}")
    if len(context) == 0:
        return [], null
    gap = context[None, :] - context[:, None]  # end token - start token
    valid = (gap >= 0) & (gap < max_answer_length)
    table = np.where(valid, table, -np.inf)
    flat = table.ravel()
    k = min(n_best, int(valid.sum()))
    if k == 0:
        return [], null
    top = np.argpartition(-flat, k - 1)[:k]
    top = top[np.lexsort((top, -flat[top]))]  # best first; ties in token order
    rows, cols = np.unravel_index(top, table.shape)
    return [(float(flat[i]), int(context[r]), int(context[c])) for i, r, c in zip(top, rows, cols)], null


def _word_spans(windows: Sequence[WindowLike]) -> dict[int, tuple[int, int]]:
    """Character span of each context word over all windows (a word may straddle a window edge)."""
    spans: dict[int, tuple[int, int]] = {}
    for window in windows:
        for offset, word in zip(window.offsets, window.word_ids):
            if offset is None or word is None:
                continue
            begin, end = spans.get(word, offset)
            spans[word] = (min(begin, offset[0]), max(end, offset[1]))
    return spans


def decode_example(
    context: str,
    windows: Sequence[WindowLike],
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    score: ScoreMode = "probability",
    allow_null: bool = False,
    null_threshold: float = 0.0,
    align_to_words: bool = False,
) -> QAPrediction:
    """Decode one question from the logits of all of its windows.

    Args:
        context: the example's context (offsets index into it).
        windows: the example's windows, in order.
        start_logits, end_logits: per window a ``(seq,)`` array (numpy/torch/list; extra padded
            positions past the window's tokens are ignored).
        n_best: how many candidates to keep (``nbest``); each window contributes its top n_best.
        max_answer_length: longest answer, in tokens.
        score: ``probability`` or ``logit_sum`` (see the module docstring).
        allow_null: consider the empty answer (SQuAD v2).
        null_threshold: predict empty when ``null_score - best_span_score > null_threshold``.
        align_to_words: widen the answer to whole words (transformers' pipeline default).
    """
    if len(windows) == 0:
        raise ValueError("an example needs at least one window")
    if not (len(windows) == len(start_logits) == len(end_logits)):
        raise ValueError(f"{len(windows)} windows but {len(start_logits)}/{len(end_logits)} logit rows")
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best and max_answer_length must be >= 1, got {n_best} and {max_answer_length}")
    found: list[tuple[float, int, int, int]] = []  # (score, window, start token, end token)
    null_score = float("inf")
    for w, window in enumerate(windows):
        start = _to_numpy(start_logits[w]).reshape(-1)
        end = _to_numpy(end_logits[w]).reshape(-1)
        if len(start) < len(window.offsets) or len(end) < len(window.offsets):
            raise ValueError(f"window {w} has {len(window.offsets)} tokens but {len(start)}/{len(end)} logits")
        candidates, null = _window_candidates(start, end, window, max_answer_length, n_best, score)
        null_score = min(null_score, null)
        found.extend((s, w, a, b) for s, a, b in candidates)
    found.sort(key=lambda c: -c[0])  # stable: ties keep window and token order
    words = _word_spans(windows) if align_to_words else {}
    nbest = []
    for value, w, a, b in found[:n_best]:
        window = windows[w]
        begin, end = window.offsets[a][0], window.offsets[b][1]  # type: ignore[index]
        if align_to_words:
            begin = words.get(window.word_ids[a], (begin, 0))[0]  # type: ignore[arg-type]
            end = words.get(window.word_ids[b], (0, end))[1]  # type: ignore[arg-type]
        nbest.append(QASpan(context[begin:end], begin, end, value, w, a, b))
    reported_null = null_score if allow_null else None
    if not nbest or (allow_null and null_score - nbest[0].score > null_threshold):
        value = null_score if allow_null else float("nan")
        return QAPrediction("", 0, 0, value, True, reported_null, tuple(nbest))
    best = nbest[0]
    return QAPrediction(best.text, best.start, best.end, best.score, False, reported_null, tuple(nbest))


def decode_predictions(
    examples: Sequence[Any],
    windows: Sequence[Any],
    start_logits: Any,
    end_logits: Any,
    **options: Any,
) -> dict[str, QAPrediction]:
    """Decode every example: ``{example.id: QAPrediction}``.

    ``windows`` are the feature rows' metadata (``FeatureSet.meta`` of
    :func:`megabert.data.features.encode_question_answering`), each with an ``example_index``;
    ``start_logits``/``end_logits`` hold one row per window, ``(num_windows, seq)`` (padded
    rows are fine) or a list of per-window arrays. ``options`` go to :func:`decode_example`.
    """
    if len(start_logits) != len(windows) or len(end_logits) != len(windows):
        raise ValueError(f"{len(windows)} windows but {len(start_logits)}/{len(end_logits)} logit rows")
    by_example: dict[int, list[int]] = defaultdict(list)
    for row, window in enumerate(windows):
        by_example[window.example_index].append(row)
    predictions: dict[str, QAPrediction] = {}
    for index, example in enumerate(examples):
        rows = by_example.get(index)
        if not rows:
            raise ValueError(f"example {index} ({getattr(example, 'id', '?')}) has no window")
        predictions[example.id] = decode_example(
            example.context,
            [windows[r] for r in rows],
            [start_logits[r] for r in rows],
            [end_logits[r] for r in rows],
            **options,
        )
    return predictions


def answer_texts(predictions: Mapping[str, QAPrediction]) -> dict[str, str]:
    """``{id: answer text}``, the form :func:`megabert.train.jobs.metrics.squad_scores` takes."""
    return {qid: p.text for qid, p in predictions.items()}
