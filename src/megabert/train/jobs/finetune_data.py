"""Fine-tuning data: read a task's files, fix its label scheme, and turn examples into features.

The readers (:mod:`megabert.data.tasks`) and encoders (:mod:`megabert.data.features`) do the
work; this module holds what a fine-tuning job adds on top of them:

- :class:`DataOptions` -- how the files are read (format, columns, bad-record policy) and cut
  (max length, QA windows and decoding). Options that do not apply to the task are an error,
  never silently ignored.
- :class:`LabelScheme` -- the label set of the training data (or the regression / multi-label
  problem type), which becomes ``num_labels`` / ``id2label`` / ``label2id`` / ``problem_type``
  in the saved config, and is read back from a fine-tuned model's config for evaluation.
- :func:`read_split` / :func:`encode_split` -- one file in, examples and features out.
- :func:`default_metric` -- the validation metric that picks the best checkpoint, by the GLUE
  conventions where the file is a GLUE file (CoLA: MCC, MRPC: F1, STS-B: the mean of Pearson
  and Spearman, SST-2: accuracy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megabert import task_table
from megabert.data.features import FeatureSet, encode_examples
from megabert.data.tasks import (
    MULTIPLE_CHOICE_FORMATS,
    SEQUENCE_FORMATS,
    ReadResult,
    canonical_task,
    check_labels,
    detect_sequence_format,
    label_list_from,
    read_examples,
)
from megabert.errors import UserError
from megabert.train.jobs.metrics import is_bio_tagset

SEQUENCE = "sequence-classification"
TOKEN = "token-classification"
QA = "question-answering"
CHOICE = "multiple-choice"
task_table.check_covers((SEQUENCE, TOKEN, QA, CHOICE), task_table.FINETUNE, "megabert.train.jobs.finetune_data's tasks")

DEFAULT_MAX_LENGTH = 128
# Reader options that only sequence classification takes (the column layout of a table).
_SEQUENCE_ONLY = ("text_column", "text_pair_column", "label_column", "problem_type", "has_header")


@dataclass
class DataOptions:
    """How a task's files are read and encoded (shared by training, validation and evaluation).

    Reading: ``format`` (``auto``; sequence classification: ``tsv``, ``csv``, ``jsonl`` or a
    GLUE preset ``glue-sst2|glue-mrpc|glue-stsb|glue-cola``; multiple choice: ``jsonl`` or
    ``swag``), the columns and label type of a sequence-classification table, and ``on_bad``
    (``error``: the first bad record stops with ``file:line``; ``skip``: bad records are
    skipped, counted and reported).

    Encoding: ``max_length`` word-pieces per input (default: 128, or the model's
    ``max_position_embeddings`` when smaller); for question answering ``doc_stride``
    (context tokens shared by consecutive windows; default ``max_length // 4``),
    ``max_question_length`` and the decoding settings ``max_answer_length``, ``n_best`` and
    ``null_threshold``; ``version_2`` allows the empty answer (SQuAD v2.0; default: when the
    training or evaluation data has unanswerable questions).
    """

    format: str = "auto"
    text_column: str | int | None = None
    text_pair_column: str | int | None = None
    label_column: str | int | None = None
    problem_type: str | None = None
    label_separator: str = ","
    has_header: bool | None = None
    on_bad: str = "error"
    max_length: int | None = None
    doc_stride: int | None = None
    max_question_length: int | None = 64
    max_answer_length: int = 30
    n_best: int = 20
    null_threshold: float = 0.0
    version_2: bool | None = None

    def validate(self, task: str) -> None:
        """Raise UserError for a bad value, or for an option that does not apply to ``task``."""
        task = canonical_task(task)
        if task != SEQUENCE:
            given = [name for name in _SEQUENCE_ONLY if getattr(self, name) is not None]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise UserError(f"{flag} applies to sequence-classification only, not to {task}")
        if task == SEQUENCE and self.format not in SEQUENCE_FORMATS:
            raise UserError(f"unknown format {self.format!r} for {task}; choose one of {list(SEQUENCE_FORMATS)}")
        if task == CHOICE and self.format not in MULTIPLE_CHOICE_FORMATS:
            raise UserError(f"unknown format {self.format!r} for {task}; choose one of {list(MULTIPLE_CHOICE_FORMATS)}")
        if task in (TOKEN, QA) and self.format != "auto":
            kind = "CoNLL" if task == TOKEN else "SQuAD JSON"
            raise UserError(f"{task} reads {kind} only: leave --format out (got {self.format!r})")
        if self.on_bad not in ("error", "skip"):
            raise UserError(f"on_bad must be 'error' or 'skip', got {self.on_bad!r}")
        if self.max_length is not None:
            _check_int("max length", self.max_length, 8)
        if self.doc_stride is not None:
            _check_int("doc stride", self.doc_stride, 0)
        if self.max_question_length is not None:
            _check_int("max question length", self.max_question_length, 1)
        _check_int("max answer length", self.max_answer_length, 1)
        _check_int("n best", self.n_best, 1)
        if not math.isfinite(self.null_threshold):
            raise UserError(f"null threshold must be a finite number, got {self.null_threshold!r}")

    def fitted(self, max_position_embeddings: int) -> "DataOptions":
        """These options with ``max_length`` set: the default is 128, or the model's positions if fewer."""
        if self.max_length is not None:
            return self
        return replace(self, max_length=min(DEFAULT_MAX_LENGTH, max_position_embeddings))

    @property
    def length(self) -> int:
        """``max_length`` (after :meth:`fitted`)."""
        if self.max_length is None:
            raise ValueError("max_length is not set: call DataOptions.fitted(model positions) first")
        return self.max_length

    @property
    def stride(self) -> int:
        """The QA window stride in effect."""
        return self.doc_stride if self.doc_stride is not None else self.length // 4

    def reader_options(self, task: str, labeled: bool = True) -> dict[str, Any]:
        """Keyword arguments for :func:`megabert.data.tasks.read_examples`."""
        task = canonical_task(task)
        options: dict[str, Any] = {"labeled": labeled, "on_bad": self.on_bad}
        if task == SEQUENCE:
            options.update(
                format=self.format, text_column=self.text_column, text_pair_column=self.text_pair_column,
                label_column=self.label_column, problem_type=self.problem_type,
                label_separator=self.label_separator, has_header=self.has_header,
            )
        elif task == CHOICE:
            options["format"] = self.format
        return options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataOptions":
        """Options from a saved dict; unknown keys (a newer file) are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelScheme:
    """What the head predicts: names by id (classification and tags), or a regression target.

    ``problem_type`` is set for sequence classification only (``single_label_classification``,
    ``regression`` or ``multi_label_classification``).
    """

    task: str
    labels: tuple[str, ...] | None = None
    problem_type: str | None = None

    @property
    def num_labels(self) -> int:
        if self.problem_type == "regression":
            return 1
        if self.labels is not None:
            return len(self.labels)
        return 2  # question answering (start, end); unused by multiple choice

    def config_overrides(self) -> dict[str, Any]:
        """``num_labels``, ``id2label``, ``label2id`` and ``problem_type`` for the model config."""
        values: dict[str, Any] = {"num_labels": self.num_labels, "problem_type": self.problem_type}
        if self.labels is not None:
            values["id2label"] = {i: name for i, name in enumerate(self.labels)}
            values["label2id"] = {name: i for i, name in enumerate(self.labels)}
        else:
            values["id2label"] = {i: f"LABEL_{i}" for i in range(self.num_labels)}
            values["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return values

    @classmethod
    def from_config(cls, task: str, config: Any) -> "LabelScheme":
        """The scheme a fine-tuned model's config records (for evaluating it)."""
        task = canonical_task(task)
        if task in (QA, CHOICE):
            return cls(task)
        id2label = config.id2label or {}
        labels = tuple(id2label[i] for i in sorted(id2label))
        if task == SEQUENCE:
            problem_type = config.problem_type
            if problem_type is None:
                problem_type = "regression" if config.num_labels == 1 else "single_label_classification"
            if problem_type == "regression":
                return cls(task, None, problem_type)
            return cls(task, labels, problem_type)
        return cls(task, labels)


def label_scheme_from_examples(task: str, examples: Sequence[Any]) -> LabelScheme:
    """The label scheme of the training examples (their label set, sorted; or regression)."""
    task = canonical_task(task)
    if task == SEQUENCE:
        first = examples[0].label
        if isinstance(first, float):
            return LabelScheme(task, None, "regression")
        problem_type = "multi_label_classification" if isinstance(first, tuple) else "single_label_classification"
        labels = tuple(label_list_from(examples))
        if problem_type == "single_label_classification" and len(labels) < 2:
            raise UserError(
                f"{examples[0].where}: the training data has a single label {labels[0]!r}; classification needs"
                " at least two (for a numeric target use --problem-type regression)"
            )
        return LabelScheme(task, labels, problem_type)
    if task == TOKEN:
        return LabelScheme(task, tuple(label_list_from(examples)))
    return LabelScheme(task)


def check_split_labels(examples: Sequence[Any], scheme: LabelScheme) -> None:
    """Raise UserError (``file:line``) for a label the scheme does not know, or a label of the wrong kind."""
    if scheme.task == SEQUENCE:
        for ex in examples:
            label = ex.label
            if label is None:
                continue
            wrong = (
                (scheme.problem_type == "regression" and not isinstance(label, float))
                or (scheme.problem_type == "multi_label_classification" and not isinstance(label, tuple))
                or (scheme.problem_type == "single_label_classification" and not isinstance(label, str))
            )
            if wrong:
                raise UserError(f"{ex.where}: label {label!r} does not fit the model's {scheme.problem_type}")
    if scheme.labels is not None and scheme.task in (SEQUENCE, TOKEN):
        check_labels(examples, scheme.labels)


# ---------------------------------------------------------------------------------- files
@dataclass
class Split:
    """One data file read for a task: its examples, skipped records, and the format it had."""

    path: Path
    examples: list[Any]
    skipped: list[str]
    format: str
    total: int  # examples read before any subsampling

    def __len__(self) -> int:
        return len(self.examples)


def resolve_format(task: str, path: str | Path, options: DataOptions) -> str:
    """The format a file is read as: a GLUE preset / tsv / csv / jsonl / swag / conll / squad."""
    task = canonical_task(task)
    if task == SEQUENCE:
        return detect_sequence_format(path) if options.format == "auto" else options.format
    if task == CHOICE:
        if options.format != "auto":
            return options.format
        return "swag" if Path(path).suffix.lower() == ".csv" else "jsonl"
    return "conll" if task == TOKEN else "squad"


def read_split(
    task: str,
    path: str | Path,
    options: DataOptions,
    *,
    labeled: bool = True,
    limit: int | None = None,
    seed: int = 0,
) -> Split:
    """Read ``path`` for ``task``; with ``limit``, keep a random sample of that many examples (file order)."""
    task = canonical_task(task)
    fmt = resolve_format(task, path, options)
    result: ReadResult[Any] = read_examples(task, path, **options.reader_options(task, labeled))
    examples = list(result.examples)
    total = len(examples)
    if limit is not None:
        _check_int("example limit", limit, 1)
        if limit < total:
            keep = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
            examples = [examples[i] for i in keep]
    return Split(Path(path), examples, list(result.skipped), fmt, total)


def is_version_2(*splits: Split | None) -> bool:
    """True when any question of the splits is unanswerable (SQuAD v2.0 data)."""
    return any(getattr(ex, "is_impossible", False) for split in splits if split is not None for ex in split.examples)


def encode_split(
    task: str,
    examples: Sequence[Any],
    tokenizer: Any,
    options: DataOptions,
    scheme: LabelScheme,
    *,
    labeled: bool = True,
    progress: bool = True,
) -> FeatureSet:
    """Model inputs for ``examples`` (with their targets when ``labeled``)."""
    task = canonical_task(task)
    if task == SEQUENCE:
        return encode_examples(
            task, examples, tokenizer, max_length=options.length, label_list=scheme.labels,
            problem_type=scheme.problem_type or "single_label_classification", progress=progress,
        )
    if task == TOKEN:
        return encode_examples(task, examples, tokenizer, max_length=options.length,
                               label_list=scheme.labels, progress=progress)
    if task == QA:
        return encode_examples(
            task, examples, tokenizer, max_length=options.length, doc_stride=options.stride,
            max_question_length=options.max_question_length, with_labels=labeled, progress=progress,
        )
    return encode_examples(task, examples, tokenizer, max_length=options.length, progress=progress)


# -------------------------------------------------------------------------------- metrics
# Metrics where a smaller value is better; every other metric is maximised.
LOWER_IS_BETTER = ("loss", "mse")

# The metric keys each kind of task reports (besides "loss"): the metric to select on must be one.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "single_label_classification": ("accuracy", "macro_f1", "mcc", "f1"),
    "regression": ("pearson", "spearman", "pearson_spearman_mean", "mse"),
    "multi_label_classification": ("micro_f1", "macro_f1", "subset_accuracy"),
    TOKEN: ("accuracy", "precision", "recall", "f1"),
    QA: ("exact_match", "f1"),
    CHOICE: ("accuracy",),
}


def metric_kind(scheme: LabelScheme) -> str:
    """The key of :data:`METRIC_KEYS` (and the ``compute_metrics`` task) for a scheme."""
    if scheme.task == SEQUENCE:
        return scheme.problem_type or "single_label_classification"
    return scheme.task


def default_metric(scheme: LabelScheme, fmt: str) -> str:
    """The validation metric that selects the best checkpoint.

    GLUE conventions by preset (CoLA: ``mcc``; MRPC: ``f1``; STS-B: ``pearson_spearman_mean``;
    SST-2: ``accuracy``); else ``accuracy`` (classification, multiple choice),
    ``pearson_spearman_mean`` (regression), ``micro_f1`` (multi-label), entity ``f1``
    (token classification with BIO tags, else word ``accuracy``), ``f1`` (question answering).
    """
    kind = metric_kind(scheme)
    if fmt == "glue-cola":
        return "mcc"
    if fmt == "glue-mrpc":
        return "f1"
    if kind == "single_label_classification":
        return "accuracy"
    if kind == "regression":
        return "pearson_spearman_mean"
    if kind == "multi_label_classification":
        return "micro_f1"
    if kind == TOKEN:
        return "f1" if scheme.labels is not None and is_bio_tagset(scheme.labels) else "accuracy"
    if kind == QA:
        return "f1"
    return "accuracy"


def check_metric(metric: str, scheme: LabelScheme) -> None:
    """Raise UserError when ``metric`` is not a validation metric of the scheme's task."""
    kind = metric_kind(scheme)
    allowed = ("loss",) + METRIC_KEYS[kind]
    if kind == "single_label_classification" and (scheme.labels is None or len(scheme.labels) > 2):
        allowed = tuple(m for m in allowed if m != "f1")  # binary F1 needs two classes
    if kind == TOKEN and not (scheme.labels is not None and is_bio_tagset(scheme.labels)):
        allowed = ("loss", "accuracy")  # entity scores need BIO tags
    if metric not in allowed:
        raise UserError(f"--metric {metric!r} is not reported for this task; choose one of {list(allowed)}")


def greater_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better."""
    return not any(metric == name or metric.endswith("_" + name) for name in LOWER_IS_BETTER)
