"""Evaluation metrics for the fine-tuning heads (numpy only; no scikit-learn or scipy at run time).

Scales: every metric is a fraction in [0, 1] (correlations in [-1, 1]) except the SQuAD exact
match and F1, which are percentages in [0, 100] as the official SQuAD script reports them.

Undefined values follow the usual conventions: Matthews correlation is 0 when a marginal is
constant (as scikit-learn); precision/recall/F1 are 0 when their denominator is 0; Pearson and
Spearman correlations of a constant input are NaN (as scipy), since no correlation exists.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from megabert.errors import UserError

# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _pair(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and references as equal-length 1-D arrays."""
    p = np.asarray(predictions)
    r = np.asarray(references)
    if p.ndim != 1 or r.ndim != 1:
        raise ValueError(f"expected 1-D predictions and references, got shapes {p.shape} and {r.shape}")
    if len(p) != len(r):
        raise ValueError(f"{len(p)} predictions but {len(r)} references")
    if len(p) == 0:
        raise ValueError("no predictions to score")
    return p, r


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Fraction of predictions equal to their reference."""
    p, r = _pair(predictions, references)
    return float(np.mean(p == r))


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else float(2 * tp / denominator)


def f1_binary(predictions: Sequence[Any], references: Sequence[Any], pos_label: Any = 1) -> float:
    """F1 of the positive class ``pos_label`` (0 when it is neither predicted nor present)."""
    p, r = _pair(predictions, references)
    tp = np.sum((p == pos_label) & (r == pos_label))
    fp = np.sum((p == pos_label) & (r != pos_label))
    fn = np.sum((p != pos_label) & (r == pos_label))
    return _f1(tp, fp, fn)


def f1_macro(
    predictions: Sequence[Any], references: Sequence[Any], labels: Sequence[Any] | None = None
) -> float:
    """Unweighted mean of the per-class F1 over ``labels`` (default: every label seen in either)."""
    p, r = _pair(predictions, references)
    classes = list(labels) if labels is not None else sorted(set(p.tolist()) | set(r.tolist()))
    return float(np.mean([f1_binary(p, r, c) for c in classes]))


def confusion_matrix(
    predictions: Sequence[Any], references: Sequence[Any], labels: Sequence[Any] | None = None
) -> np.ndarray:
    """``m[i, j]`` = number of examples with reference ``labels[i]`` predicted as ``labels[j]``."""
    p, r = _pair(predictions, references)
    classes = list(labels) if labels is not None else sorted(set(p.tolist()) | set(r.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for ref, pred in zip(r.tolist(), p.tolist()):
        if ref in index and pred in index:
            m[index[ref], index[pred]] += 1
    return m


def matthews_corrcoef(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Matthews correlation coefficient (multi-class form, R_K); 0 when it is undefined."""
    m = confusion_matrix(predictions, references).astype(np.float64)
    n = m.sum()
    correct = np.trace(m)
    predicted = m.sum(axis=0)  # per class, how often predicted
    actual = m.sum(axis=1)  # per class, how often true
    covariance = correct * n - predicted @ actual
    denominator = np.sqrt(n * n - predicted @ predicted) * np.sqrt(n * n - actual @ actual)
    return 0.0 if denominator == 0 else float(covariance / denominator)


# --------------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------------


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation; NaN when either input is constant."""
    p, r = _pair(predictions, references)
    x = p.astype(np.float64) - p.mean(dtype=np.float64)
    y = r.astype(np.float64) - r.mean(dtype=np.float64)
    denominator = np.sqrt((x @ x) * (y @ y))
    if denominator == 0:
        return float("nan")
    return float(np.clip((x @ y) / denominator, -1.0, 1.0))


def rank(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    v = np.asarray(values)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # Start of each run of equal values, and the average 1-based rank of the run.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(v)]
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when either input is constant."""
    p, r = _pair(predictions, references)
    return pearson(rank(p), rank(r))


def mean_squared_error(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Mean of the squared differences."""
    p, r = _pair(predictions, references)
    return float(np.mean((p.astype(np.float64) - r.astype(np.float64)) ** 2))


# --------------------------------------------------------------------------------------------
# Multi-label
# --------------------------------------------------------------------------------------------


def multi_label_scores(predictions: Any, references: Any) -> dict[str, float]:
    """Micro/macro F1 and subset accuracy of multi-hot arrays ``(num_examples, num_labels)``."""
    p = np.asarray(predictions).astype(bool)
    r = np.asarray(references).astype(bool)
    if p.shape != r.shape or p.ndim != 2:
        raise ValueError(f"expected two (examples, labels) arrays of one shape, got {p.shape} and {r.shape}")
    tp = (p & r).sum(axis=0)
    fp = (p & ~r).sum(axis=0)
    fn = (~p & r).sum(axis=0)
    return {
        "micro_f1": _f1(tp.sum(), fp.sum(), fn.sum()),
        "macro_f1": float(np.mean([_f1(a, b, c) for a, b, c in zip(tp, fp, fn)])),
        "subset_accuracy": float(np.mean(np.all(p == r, axis=1))),
    }


# --------------------------------------------------------------------------------------------
# Entity-level (NER) scores
# --------------------------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """("B"|"I"|"O", type) of a BIO tag; tags without a prefix are not entity tags."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
        return tag[0], tag[2:]
    raise ValueError(f"tag {tag!r} is not 'O', 'B-TYPE' or 'I-TYPE'")


def is_bio_tagset(tags: Iterable[str]) -> bool:
    """True when every tag is ``O``, ``B-TYPE`` or ``I-TYPE`` (so entity scores apply)."""
    try:
        for tag in tags:
            _split_tag(tag)
    except ValueError:
        return False
    return True


def extract_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive word indices) in one tag sequence.

    BIO, tolerant of IOB1 like seqeval's default mode: ``B-X`` always starts an entity;
    ``I-X`` continues the open entity when it has type X, and otherwise starts a new one.
    """
    entities: list[tuple[str, int, int]] = []
    open_type: str | None = None
    open_start = 0
    for i, tag in enumerate(tags):
        prefix, kind = _split_tag(tag)
        continues = prefix == "I" and open_type == kind
        if open_type is not None and not continues:
            entities.append((open_type, open_start, i - 1))
            open_type = None
        if prefix != "O" and not continues:
            open_type, open_start = kind, i
    if open_type is not None:
        entities.append((open_type, open_start, len(tags) - 1))
    return entities


def entity_scores(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """Entity-level micro precision/recall/F1 (a hit needs the exact span and type), plus per type.

    Returns ``{"precision", "recall", "f1", "accuracy" (per word), "per_type": {type: {...}}}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted sentences but {len(references)} references")
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # type -> [hit, pred, gold]
    words = correct_words = 0
    for n, (pred, gold) in enumerate(zip(predictions, references)):
        if len(pred) != len(gold):
            raise ValueError(f"sentence {n}: {len(pred)} predicted tags but {len(gold)} reference tags")
        words += len(gold)
        correct_words += sum(a == b for a, b in zip(pred, gold))
        pred_entities = set(extract_entities(pred))
        gold_entities = set(extract_entities(gold))
        for kind, *_ in pred_entities:
            counts[kind][1] += 1
        for kind, *_ in gold_entities:
            counts[kind][2] += 1
        for kind, *_ in pred_entities & gold_entities:
            counts[kind][0] += 1

    def prf(hit: int, pred: int, gold: int) -> dict[str, float]:
        precision = hit / pred if pred else 0.0
        recall = hit / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": gold}

    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    overall = prf(*total)
    return {
        "precision": overall["precision"],
        "recall": overall["recall"],
        "f1": overall["f1"],
        "accuracy": correct_words / words if words else 0.0,
        "per_type": {kind: prf(*counts[kind]) for kind in sorted(counts)},
    }


# --------------------------------------------------------------------------------------------
# SQuAD
# --------------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower-case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of the normalised answers (1.0 if both are empty, 0.0 if one is)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(
    predictions: Sequence[str] | Mapping[str, str],
    references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]],
) -> dict[str, float]:
    """SQuAD exact match and F1 in percent, each the max over a question's gold answers.

    ``references[i]`` lists the gold answer texts; an empty list (or only answers that normalise
    to nothing) means unanswerable, where only the empty prediction scores (SQuAD v2). When some
    questions are unanswerable, ``has_answer_*`` / ``no_answer_*`` split the scores.
    Predictions and references are parallel lists, or dicts keyed by question id.
    """
    if isinstance(predictions, Mapping) or isinstance(references, Mapping):
        if not (isinstance(predictions, Mapping) and isinstance(references, Mapping)):
            raise ValueError("give predictions and references both as lists or both as dicts by id")
        missing = [qid for qid in references if qid not in predictions]
        if missing:
            raise ValueError(f"{len(missing)} question(s) have no prediction, e.g. {missing[0]!r}")
        keys = list(references)
        predictions = [predictions[k] for k in keys]
        references = [references[k] for k in keys]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    em = np.zeros(len(predictions))
    f1 = np.zeros(len(predictions))
    has_answer = np.zeros(len(predictions), dtype=bool)
    for i, (pred, golds) in enumerate(zip(predictions, references)):
        golds = [g for g in golds if normalize_answer(g)] or [""]
        has_answer[i] = golds != [""]
        em[i] = max(squad_exact_match(pred, g) for g in golds)
        f1[i] = max(squad_f1(pred, g) for g in golds)
    scores = {"exact_match": 100.0 * em.mean(), "f1": 100.0 * f1.mean()}
    if not has_answer.all():
        for name, mask in (("has_answer", has_answer), ("no_answer", ~has_answer)):
            if mask.any():
                scores[f"{name}_exact_match"] = 100.0 * em[mask].mean()
                scores[f"{name}_f1"] = 100.0 * f1[mask].mean()
                scores[f"{name}_total"] = float(mask.sum())
    return {k: float(v) for k, v in scores.items()}


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

METRIC_TASKS: tuple[str, ...] = (
    "sequence-classification",
    "regression",
    "multi-label-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
)


def compute_metrics(
    task: str, predictions: Any, references: Any, *, label_list: Sequence[str] | None = None
) -> dict[str, float]:
    """The metrics of ``task`` as a flat ``{name: value}`` dict.

    - ``sequence-classification``: label ids (or names). ``accuracy``, ``macro_f1``, ``mcc``;
      with two classes also ``f1`` of class id 1 (``label_list[1]``, e.g. MRPC's paraphrase).
    - ``regression``: floats. ``pearson``, ``spearman``, ``pearson_spearman_mean``, ``mse``.
    - ``multi-label-classification``: multi-hot ``(examples, labels)``. ``micro_f1``,
      ``macro_f1``, ``subset_accuracy``.
    - ``token-classification``: lists of tag names per sentence. ``accuracy`` per word and, for
      BIO tag sets, entity-level ``precision``, ``recall``, ``f1`` and ``<TYPE>_f1`` per type.
    - ``question-answering``: answer texts and gold-answer lists (or dicts by id).
      ``exact_match``, ``f1`` in percent (see :func:`squad_scores`).
    - ``multiple-choice``: choice indices. ``accuracy``.
    """
    if task in ("sequence-classification", "text-classification", "single_label_classification"):
        p, r = _pair(predictions, references)
        scores = {"accuracy": accuracy(p, r), "macro_f1": f1_macro(p, r), "mcc": matthews_corrcoef(p, r)}
        classes = len(label_list) if label_list is not None else len(set(p.tolist()) | set(r.tolist()))
        if classes <= 2:
            positive: Any = 1
            if p.dtype.kind in "US" or r.dtype.kind in "US":
                if label_list is None or len(label_list) < 2:
                    raise ValueError("binary F1 of label names needs label_list to tell the positive class")
                positive = label_list[1]
            scores["f1"] = f1_binary(p, r, positive)
        return scores
    if task == "regression":
        p, r = _pair(np.asarray(predictions, dtype=np.float64).reshape(-1),
                     np.asarray(references, dtype=np.float64).reshape(-1))
        pr, sr = pearson(p, r), spearman(p, r)
        return {"pearson": pr, "spearman": sr, "pearson_spearman_mean": (pr + sr) / 2,
                "mse": mean_squared_error(p, r)}
    if task in ("multi-label-classification", "multi_label_classification"):
        return multi_label_scores(predictions, references)
    if task in ("token-classification", "ner"):
        all_tags = [t for sentence in references for t in sentence]
        all_tags += [t for sentence in predictions for t in sentence]
        if is_bio_tagset(all_tags):
            scores = entity_scores(predictions, references)
            per_type = scores.pop("per_type")
            scores.update({f"{kind}_f1": v["f1"] for kind, v in per_type.items()})
            return scores
        if len(predictions) != len(references) or any(
            len(a) != len(b) for a, b in zip(predictions, references)
        ):
            raise ValueError("predicted and reference tag sequences differ in length")
        flat_p = [t for sentence in predictions for t in sentence]
        flat_r = [t for sentence in references for t in sentence]
        return {"accuracy": accuracy(flat_p, flat_r)}
    if task in ("question-answering", "qa", "squad"):
        return squad_scores(predictions, references)
    if task == "multiple-choice":
        return {"accuracy": accuracy(predictions, references)}
    raise UserError(f"unknown metric task {task!r}; choose one of {list(METRIC_TASKS)}")
