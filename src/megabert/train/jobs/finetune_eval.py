"""Evaluation for fine-tuning: run a model over features, decode predictions, score them, write them.

- :func:`run_model` -- batched forward passes (rows of similar length batched together), the
  per-row outputs trimmed to the row's tokens, and the mean validation loss.
- :func:`predictions_and_metrics` -- per-example prediction records (what the predictions
  JSONL holds) and the task's metrics (:func:`megabert.train.jobs.metrics.compute_metrics`).
- :class:`TaskEvaluator` -- both together as the trainer's ``eval_fn``; it keeps the last
  evaluation's records so that the best one can be written next to the best model.
- :func:`write_json` / :func:`write_jsonl` -- atomic writers (NaN becomes null).

Prediction records, one per example (``gold`` only for labelled data):

- sequence classification: ``{"where", "text", ["text_pair"], "label", "score", "gold"}``
  (``score``: the softmax probability of ``label``); regression: ``"score"`` is the prediction;
  multi-label: ``"labels"`` (sigmoid >= 0.5) and ``"scores"`` per label name.
- token classification: ``{"where", "words", "tags", "gold"}``.
- question answering: ``{"id", "question", "answer", "start", "score", "gold"}`` (``gold``: the
  reference answer texts; empty for an unanswerable question).
- multiple choice: ``{"where", "query", "prediction", "choice", "scores", "gold"}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from megabert.data.features import Collator, FeatureSet, word_predictions
from megabert.data.tasks import qa_references
from megabert.inference.qa_decoding import answer_texts, decode_predictions
from megabert.train.jobs.finetune_data import CHOICE, QA, SEQUENCE, TOKEN, DataOptions, LabelScheme, metric_kind
from megabert.train.jobs.metrics import compute_metrics
from megabert.utils import atomic_write_text

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- forward
@dataclass
class ModelOutputs:
    """Per feature row, the model's outputs for that row's tokens; and the mean loss (if labelled).

    Row shapes: sequence classification ``(num_labels,)`` logits; token classification
    ``(seq,)`` predicted label ids; question answering ``(seq, 2)`` start/end logits; multiple
    choice ``(num_choices,)`` logits.
    """

    rows: list[np.ndarray]
    loss: float | None


def _row_length(row: dict[str, Any]) -> int:
    ids = row["input_ids"]
    return max(len(seq) for seq in ids) if ids and isinstance(ids[0], list) else len(ids)


@torch.no_grad()
def run_model(
    model: nn.Module,
    features: FeatureSet,
    *,
    pad_token_id: int,
    batch_size: int = 64,
    autocast: ContextManager | None = None,
    progress: bool = True,
) -> ModelOutputs:
    """Run ``model`` (already in eval mode) over every row of ``features``.

    Rows are batched in order of length (less padding) and the outputs put back in row order.
    The loss is the mean of the batch losses weighted by the batch sizes.
    """
    task = features.task
    device = next(model.parameters()).device
    collate = Collator(pad_token_id)
    lengths = [_row_length(row) for row in features.rows]
    order = np.argsort(lengths, kind="stable")
    rows: list[np.ndarray | None] = [None] * len(features)
    loss_sum, loss_count = 0.0, 0
    starts = range(0, len(order), batch_size)
    bar = tqdm(starts, desc="evaluating", unit="batch", leave=False, disable=not progress or len(starts) < 2)
    for start in bar:
        index = order[start : start + batch_size]
        batch = collate([features.rows[i] for i in index])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            output = model(**batch, return_dict=True)
        if output.loss is not None:
            loss_sum += float(output.loss) * len(index)
            loss_count += len(index)
        for b, i in enumerate(index):
            rows[i] = _row_output(task, output, b, lengths[i])
    return ModelOutputs(rows, loss_sum / loss_count if loss_count else None)  # type: ignore[arg-type]


def _row_output(task: str, output: Any, b: int, length: int) -> np.ndarray:
    """Row ``b`` of a batch's outputs, trimmed to the row's ``length`` tokens."""
    if task == QA:
        start = output.start_logits[b, :length].float()
        end = output.end_logits[b, :length].float()
        return torch.stack([start, end], dim=-1).cpu().numpy()  # (seq, 2)
    if task == TOKEN:
        return output.logits[b, :length].argmax(-1).cpu().numpy()  # (seq,)
    return output.logits[b].float().cpu().numpy()  # (num_labels,) or (num_choices,)


# -------------------------------------------------------------------------- decode + score
@dataclass
class EvalOutput:
    """Metrics (empty for unlabelled data), per-example prediction records, and notes worth reporting."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _text_fields(ex: Any) -> dict[str, Any]:
    out = {"where": ex.where, "text": ex.text}
    if ex.text_pair is not None:
        out["text_pair"] = ex.text_pair
    return out


def predictions_and_metrics(
    scheme: LabelScheme,
    examples: Sequence[Any],
    features: FeatureSet,
    outputs: ModelOutputs,
    options: DataOptions,
    *,
    labeled: bool = True,
    version_2: bool = False,
) -> EvalOutput:
    """Decode ``outputs`` into one record per example, and score them when ``labeled``.

    The metrics are those of :func:`megabert.train.jobs.metrics.compute_metrics` for the task, plus
    ``loss`` when the model computed one.
    """
    kind = metric_kind(scheme)
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    metrics: dict[str, float] = {}
    if scheme.task == SEQUENCE:
        logits = np.stack(outputs.rows)  # (examples, num_labels)
        if kind == "regression":
            predicted = logits[:, 0]
            for ex, value in zip(examples, predicted):
                records.append({**_text_fields(ex), "score": float(value)})
            if labeled:
                gold = [float(ex.label) for ex in examples]
                metrics = compute_metrics("regression", predicted, gold)
        elif kind == "multi_label_classification":
            labels = scheme.labels or ()
            probs = 1.0 / (1.0 + np.exp(-logits))
            hot = probs >= 0.5  # (examples, num_labels)
            for ex, row, p in zip(examples, hot, probs):
                names = [labels[j] for j in np.flatnonzero(row)]
                records.append({**_text_fields(ex), "labels": names,
                                "scores": {labels[j]: float(p[j]) for j in range(len(labels))}})
            if labeled:
                index = {name: j for j, name in enumerate(labels)}
                gold_hot = np.zeros_like(hot)
                for i, ex in enumerate(examples):
                    for name in ex.label:
                        gold_hot[i, index[name]] = True
                metrics = compute_metrics("multi-label-classification", hot, gold_hot)
        else:
            labels = scheme.labels or ()
            probs = _softmax(logits)
            predicted = probs.argmax(-1)
            for ex, p, k in zip(examples, probs, predicted):
                records.append({**_text_fields(ex), "label": labels[k], "score": float(p[k])})
            if labeled:
                index = {name: j for j, name in enumerate(labels)}
                gold = [index[ex.label] for ex in examples]
                metrics = compute_metrics("sequence-classification", predicted, gold, label_list=list(labels))
        if labeled:
            for record, ex in zip(records, examples):
                record["gold"] = list(ex.label) if isinstance(ex.label, tuple) else ex.label
    elif scheme.task == TOKEN:
        labels = list(scheme.labels or ())
        missing = 0
        predicted_tags = []
        for ex, row, meta in zip(examples, outputs.rows, features.meta):
            tags, cut = word_predictions(row, meta, labels, fallback="O" if "O" in labels else labels[0])
            missing += cut
            predicted_tags.append(tags)
            record = {"where": ex.where, "words": list(ex.words), "tags": tags}
            if labeled:
                record["gold"] = list(ex.tags)
            records.append(record)
        if missing:
            notes.append(
                f"{missing} words lay past max_length={options.length} word-pieces and got the fallback tag"
            )
        if labeled:
            metrics = compute_metrics("token-classification", predicted_tags, [list(ex.tags) for ex in examples])
    elif scheme.task == QA:
        starts = [row[:, 0] for row in outputs.rows]
        ends = [row[:, 1] for row in outputs.rows]
        decoded = decode_predictions(
            examples, features.meta, starts, ends, n_best=options.n_best,
            max_answer_length=options.max_answer_length, score="logit_sum",
            allow_null=version_2, null_threshold=options.null_threshold,
        )
        for ex in examples:
            p = decoded[ex.id]
            record = {"id": ex.id, "question": ex.question, "answer": p.text,
                      "start": None if p.is_null else p.start, "score": _finite(p.score)}
            if labeled:
                record["gold"] = [a.text for a in ex.answers]
            records.append(record)
        if labeled:
            metrics = compute_metrics("question-answering", answer_texts(decoded), qa_references(examples))
    elif scheme.task == CHOICE:
        logits = np.stack(outputs.rows)  # (examples, num_choices)
        predicted = logits.argmax(-1)
        for ex, row, k in zip(examples, logits, predicted):
            record = {"where": ex.where, "query": ex.query, "prediction": int(k), "choice": ex.choices[k],
                      "scores": [float(v) for v in row]}
            if labeled:
                record["gold"] = ex.label
            records.append(record)
        if labeled:
            metrics = compute_metrics("multiple-choice", predicted, [ex.label for ex in examples])
    else:  # pragma: no cover - canonical_task guards this
        raise ValueError(f"unknown task {scheme.task!r}")
    metrics = {k: float(v) for k, v in metrics.items()}
    if labeled and outputs.loss is not None:
        metrics["loss"] = float(outputs.loss)
    return EvalOutput(metrics, records, notes)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ------------------------------------------------------------------------------ eval_fn
class TaskEvaluator:
    """The trainer's ``eval_fn``: validation metrics of the model; keeps the last records.

    Called by :meth:`megabert.train.engine.trainer.Trainer.evaluate` in eval mode, without
    gradients and under the training precision.
    """

    def __init__(
        self,
        scheme: LabelScheme,
        examples: Sequence[Any],
        features: FeatureSet,
        options: DataOptions,
        *,
        pad_token_id: int,
        batch_size: int,
        version_2: bool = False,
        progress: bool = True,
    ) -> None:
        self.scheme = scheme
        self.examples = examples
        self.features = features
        self.options = options
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.version_2 = version_2
        self.progress = progress
        self.last: EvalOutput | None = None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        outputs = run_model(model, self.features, pad_token_id=self.pad_token_id, batch_size=self.batch_size,
                            progress=self.progress)
        self.last = predictions_and_metrics(self.scheme, self.examples, self.features, outputs, self.options,
                                            version_2=self.version_2)
        for note in self.last.notes:
            logger.warning("validation: %s", note)
        return self.last.metrics


# ------------------------------------------------------------------------------ writing
def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> python, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False) + "\n")
    return path


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in records))
    return path
