"""Fine-tuning and evaluation of the four task heads on the shared :class:`~megabert.train.engine.trainer.Trainer`.

:func:`finetune` trains a ``MegatronBertFor<Task>`` from a model folder (pretrained weights, or
only its config and tokenizer with ``random_init``) on a training file, evaluates it on a
validation file every ``eval_every`` steps (default: once per epoch) and at the end, and keeps
the best model by the validation metric. :func:`evaluate` scores a fine-tuned folder on a
labelled file (or, with ``labeled=False``, only predicts).

Tasks and files (read by :mod:`megabert.data.tasks`): ``sequence-classification`` (GLUE TSV,
TSV/CSV/JSONL; single sentences or pairs; single-label, regression, multi-label),
``token-classification`` (CoNLL), ``question-answering`` (SQuAD v1.1/v2.0 JSON; long contexts
in windows), ``multiple-choice`` (JSONL ``{"query", "choices", "gold"}`` or SWAG CSV).

Output folder of :func:`finetune`::

    OUT/best/                   the best model: config.json (with id2label / label2id /
                                problem_type), model.safetensors, the tokenizer files and
                                finetune.json (task, data options, metric): loads with megabert
                                (and `megabert evaluate`) and with transformers
    OUT/eval_results.json       the best model's validation metrics, the metric history of every
                                evaluation, the stop reason and the data counts (skips, cuts)
    OUT/eval_predictions.jsonl  the best model's validation predictions, one line per example
    OUT/metrics.jsonl           train and valid records of the trainer; OUT/run_config.json
    OUT/checkpoints/step-N/     the last training checkpoint (resume with ``resume="auto"``)

Early stopping ends the run after ``early_stopping_patience`` evaluations without an
improvement of more than ``early_stopping_threshold``, through ``Trainer.request_stop`` (the
run ends as at ``max_steps``: a checkpoint, no repeated evaluation).

Under torch.distributed (``distributed=`` the hooks of :func:`megabert.train.distributed.parallel.setup_parallel`),
each data-parallel rank trains on its share of every global batch (``batch_size`` per rank);
every rank evaluates the whole validation set (the ranks hold the same weights), and the
best-model decision uses the metric averaged over the ranks, so all ranks take it together.
Only the main rank writes files; ``OUT/best`` is gathered from the shards of a sharded model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from megabert.data.features import Collator
from megabert.data.tasks import canonical_task
from megabert.errors import UserError
from megabert.train.engine.checkpoint import CHECKPOINTS_DIR, CheckpointConfig
from megabert.train.jobs.finetune_data import (
    DataOptions,
    QA,
    LabelScheme,
    Split,
    check_metric,
    check_split_labels,
    default_metric,
    encode_split,
    greater_is_better,
    is_version_2,
    label_scheme_from_examples,
    read_split,
)
from megabert.train.jobs.finetune_eval import (
    EvalOutput,
    TaskEvaluator,
    predictions_and_metrics,
    run_model,
    write_json,
    write_jsonl,
)
from megabert.train.jobs.finetune_model import (
    FINETUNE_FILE,
    build_model,
    check_model_fits,
    load_finetuned,
    read_finetune_info,
    read_model_config,
    task_of_folder,
)
from megabert.train.engine.logging import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsConfig
from megabert.train.engine.optim import SCHEDULES, OptimizerConfig, ScheduleConfig
from megabert.train.engine.trainer import (
    DistributedHooks,
    ResumableLoader,
    Trainer,
    TrainerCallback,
    TrainerConfig,
    TrainResult,
    seed_everything,
)
from megabert.devices import resolve_device
from megabert.tokenization import load_tokenizer
from megabert.utils import atomic_folder, lock_output_folder

logger = logging.getLogger(__name__)

BEST_DIR = "best"
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "eval_predictions.jsonl"
RUN_CONFIG_FILE = "run_config.json"
# What a fine-tuning run writes into its output folder (removed by overwrite=True, nothing else).
_RUN_OUTPUTS = (BEST_DIR, RESULTS_FILE, PREDICTIONS_FILE, RUN_CONFIG_FILE, METRICS_FILE, CURVES_FILE,
                TENSORBOARD_DIR, CHECKPOINTS_DIR)


# ---------------------------------------------------------------------------------- config
@dataclass
class FinetuneConfig:
    """Settings of the fine-tuning loop (the data has :class:`DataOptions`).

    Length: ``epochs`` over the training set, or ``max_steps`` optimizer updates when given.
    Evaluation every ``eval_every`` steps (default once per epoch) and at the end; the best
    model by ``metric`` (default: :func:`~megabert.train.jobs.finetune_data.default_metric`) is kept.
    Warmup: ``warmup_steps``, or ``warmup_ratio`` of all steps.
    """

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None  # default: 2 x batch_size
    lr: float | None = None  # None: by the model's width, see default_finetune_lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: str = "linear"
    grad_accum: int = 1
    clip_grad: float | None = 1.0
    bf16: bool = False
    seed: int = 42
    eval_every: int | None = None
    metric: str | None = None
    early_stopping_patience: int | None = None  # evaluations without improvement (None: off)
    early_stopping_threshold: float = 0.0  # an improvement must exceed this
    max_train_examples: int | None = None  # a random subset of the training file
    max_eval_examples: int | None = None  # a random subset of the validation file
    random_init: bool = False  # the model folder's config and tokenizer, fresh weights
    # Train padded, on exactly the reference's loss. Only QA's loss differs when unpadded (pads
    # are left out of the start/end softmax); the other tasks get the same loss, slower.
    reference_loss: bool = False
    device: str = "auto"
    log_every: int = 10
    progress: bool = True
    plot: bool = False  # OUT/curves.png (needs matplotlib)
    resume: str | None = None  # "auto" or a checkpoint folder
    overwrite: bool = False  # replace the outputs of an earlier run in the same folder

    def validate(self) -> None:
        """Raise UserError naming the first bad setting."""
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)):
            raise UserError(f"epochs must be a positive number, got {self.epochs!r}")
        for name in ("max_steps", "eval_batch_size", "eval_every", "early_stopping_patience",
                     "max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"{name.replace('_', ' ')} must be an integer >= 1, got {value!r}")
        for name in ("batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name.replace('_', ' ')} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise UserError(f"warmup steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not self.early_stopping_threshold >= 0:
            raise UserError(f"early stopping threshold must be >= 0, got {self.early_stopping_threshold!r}")
        OptimizerConfig(lr=5e-5 if self.lr is None else self.lr, weight_decay=self.weight_decay).validate()


def default_finetune_lr(hidden_size: int) -> float:
    """The peak learning rate ``--lr`` defaults to, by the model's width.

    5e-5 for base size and up (BERT's published range is 2e-5 to 5e-5). Narrow models need a
    higher rate: on the tiny model (4 x 256), 2 epochs of 5,000 SST-2 rows from a random
    initialisation scored 0.642 at 5e-5, 0.675 at 1e-4 and 0.732 at 3e-4 on held-back sentences
    (warmup 10% + linear decay; docs/finetuning.md has the table).
    """
    if hidden_size <= 256:
        return 3e-4
    if hidden_size <= 512:
        return 1e-4
    return 5e-5


@dataclass
class FinetuneResult:
    """What :func:`finetune` did and where it left its outputs."""

    output_dir: Path
    best_dir: Path | None
    metric: str
    best_step: int | None
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    stop_reason: str  # max_steps | early stopping | time limit | SIGINT | SIGTERM
    steps: int
    train: TrainResult
    results_file: Path
    predictions_file: Path
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # per split: path, counts, skips, cuts

    @property
    def interrupted(self) -> bool:
        return self.stop_reason in ("SIGINT", "SIGTERM")


@dataclass
class EvaluationResult:
    """What :func:`evaluate` found: metrics (labelled data), prediction records, written files."""

    task: str
    metrics: dict[str, float]
    records: list[dict[str, Any]]
    metrics_file: Path | None = None
    predictions_file: Path | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -------------------------------------------------------------------- best model + stopping
class BestModelKeeper(TrainerCallback):
    """Keeps ``OUT/best`` (and its results and predictions) at the best validation metric so far.

    Also counts evaluations without improvement and asks the loop to stop after ``patience``.
    A NaN metric (e.g. a correlation of constant predictions) never counts as an improvement,
    but the first evaluation is always saved so that a finished run always has a best model.
    """

    def __init__(
        self,
        output_dir: Path,
        metric: str,
        evaluator: TaskEvaluator,
        save_extras: Any,
        info: dict[str, Any],
        *,
        patience: int | None = None,
        threshold: float = 0.0,
    ) -> None:
        self.output_dir = output_dir
        self.metric = metric
        self.greater = greater_is_better(metric)
        self.evaluator = evaluator
        self.save_extras = save_extras
        self.info = info
        self.patience = patience
        self.threshold = threshold
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.bad_evaluations = 0
        self.stop_requested = False
        self.stop_reason: str | None = None

    @property
    def best_dir(self) -> Path:
        return self.output_dir / BEST_DIR

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than the threshold."""
        if self.best_step is None:
            return True
        if math.isnan(value):
            return False
        if self.best is None or math.isnan(self.best):
            return True
        gain = value - self.best if self.greater else self.best - value
        return gain > self.threshold

    def on_evaluate(self, trainer: Trainer, step: int, results: Mapping[str, float]) -> None:
        results = {k: float(v) for k, v in results.items()}
        # One value on every rank (it may differ in the last bits between devices), so that all
        # ranks agree on saving (a collective for a sharded model) and on stopping.
        value = trainer.hooks.all_reduce({"value": results.get(self.metric, float("nan"))}, op="mean")["value"]
        self.history.append({"step": step, **results})
        if self.improves(value):
            self.best, self.best_step, self.best_metrics = value, step, dict(results)
            self.bad_evaluations = 0
            self._save(trainer, step)
        else:
            self.bad_evaluations += 1
            if self.patience is not None and self.bad_evaluations >= self.patience:
                self.stop_requested = True
                trainer.request_stop("early stopping")
        if trainer.hooks.is_main:
            self.write_results()

    def _save(self, trainer: Trainer, step: int) -> None:
        """Write ``OUT/best`` (and the predictions): every rank gathers the weights, the main rank writes."""
        with trainer.hooks.full_weights(trainer.model) as whole:
            if trainer.hooks.is_main:
                with atomic_folder(self.best_dir, overwrite=True) as tmp:
                    whole.save_pretrained(tmp)
                    self.save_extras(tmp)
                    write_json(tmp / FINETUNE_FILE, {**self.info, "step": step, self.metric: self.best})
                last = self.evaluator.last
                if last is not None:
                    write_jsonl(self.output_dir / PREDICTIONS_FILE, last.records)
        trainer.hooks.barrier()  # best/ is complete before any rank goes on

    def results(self) -> dict[str, Any]:
        """The content of ``eval_results.json``."""
        return {
            "task": self.info.get("task"),
            "metric": self.metric,
            "greater_is_better": self.greater,
            "best_step": self.best_step,
            "best": self.best,
            "metrics": self.best_metrics,
            "stop_reason": self.stop_reason,
            "history": self.history,
            **{k: v for k, v in self.info.items() if k in ("data", "model", "random_init", "max_steps", "epochs")},
        }

    def write_results(self) -> Path:
        return write_json(self.output_dir / RESULTS_FILE, self.results())

    def restore(self, step: int) -> None:
        """After a resume at ``step``: the history (and best) of the evaluations up to that step."""
        path = self.output_dir / RESULTS_FILE
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        for entry in saved.get("history", []):
            if entry.get("step", step + 1) > step:
                continue
            value = entry.get(self.metric)
            value = float("nan") if value is None else float(value)
            self.history.append(entry)
            if self.improves(value):
                self.best, self.best_step = value, entry["step"]
                self.best_metrics = {k: v for k, v in entry.items() if k != "step"}
                self.bad_evaluations = 0
            else:
                self.bad_evaluations += 1


# ---------------------------------------------------------------------------------- finetune
def _existing_outputs(output: Path, config: FinetuneConfig) -> list[str]:
    """The outputs of an earlier run in ``output`` that this run would replace (an error unless allowed)."""
    existing = [name for name in _RUN_OUTPUTS if (output / name).exists()]
    if existing and config.resume is None and not config.overwrite:
        raise UserError(
            f"{output} already holds a fine-tuning run ({', '.join(existing)}): choose another output folder, "
            "pass --resume auto to continue it, or --overwrite to replace it"
        )
    return existing if config.resume is None else []


def _remove_outputs(output: Path, names: list[str]) -> None:
    """Remove an earlier run's outputs (``overwrite``): only the files and folders a run writes."""
    for name in names:
        target = output / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _split_info(split: Split, features: Any) -> dict[str, Any]:
    return {
        "path": str(split.path),
        "format": split.format,
        "examples": len(split),
        "read": split.total,
        "skipped": len(split.skipped),
        "first_skipped": split.skipped[0] if split.skipped else None,
        "features": len(features),
        "truncated": features.num_truncated,
    }


def finetune(
    task: str,
    model: str | os.PathLike,
    train: str | os.PathLike,
    validation: str | os.PathLike,
    output: str | os.PathLike,
    *,
    data: DataOptions | None = None,
    config: FinetuneConfig | None = None,
    tokenizer: str | os.PathLike | None = None,
    distributed: DistributedHooks | None = None,
) -> FinetuneResult:
    """Fine-tune the model folder ``model`` for ``task`` and keep the best model in ``output/best``.

    Everything is checked before the first step: the settings, the model folder and its
    tokenizer, both data files (bad records: ``file:line`` errors, or counted skips with
    ``on_bad="skip"``), validation labels against the training label set, ``max_length``
    against the model's positions. See the module docstring for the outputs.

    ``distributed``: the Trainer's hooks of a torch.distributed run (every rank calls this
    function with its own); default: one process. The main rank holds the lock of ``output``
    for the whole run (:func:`megabert.utils.lock_output_folder`): a second run into the same
    folder stops at once, naming the holder's pid.
    """
    task = canonical_task(task)
    data = data or DataOptions()
    data.validate(task)
    config = config or FinetuneConfig()
    config.validate()
    hooks = distributed or DistributedHooks()
    # One run per output folder: the main rank (the only writer) holds the lock until the run
    # ends; a second run stops here, before it reads (or, with overwrite, removes) anything.
    lock = lock_output_folder(output, "finetune") if hooks.is_main else None
    try:
        return _finetune_locked(task, model, train, validation, output, data, config, tokenizer, hooks)
    finally:
        if lock is not None:
            lock.release()


def _finetune_locked(
    task: str,
    model: str | os.PathLike,
    train: str | os.PathLike,
    validation: str | os.PathLike,
    output: str | os.PathLike,
    data: DataOptions,
    config: FinetuneConfig,
    tokenizer: str | os.PathLike | None,
    hooks: DistributedHooks,
) -> FinetuneResult:
    """The body of :func:`finetune` (settings validated, output folder locked)."""
    progress = config.progress and hooks.is_main  # one set of progress bars, the main rank's
    model_dir = Path(model)
    output_dir = Path(output)
    base_config = read_model_config(model_dir)
    data = data.fitted(base_config.max_position_embeddings)
    tok = load_tokenizer(tokenizer, model_folder=model_dir)
    check_model_fits(base_config, tok, data.length, str(model_dir))
    resolve_device(config.device)
    replaced = _existing_outputs(output_dir, config)  # checked now, removed once the inputs are known good

    train_split = read_split(task, train, data, limit=config.max_train_examples, seed=config.seed)
    valid_split = read_split(task, validation, data, limit=config.max_eval_examples, seed=config.seed + 1)
    scheme = label_scheme_from_examples(task, train_split.examples)
    check_split_labels(train_split.examples, scheme)
    check_split_labels(valid_split.examples, scheme)
    metric = config.metric or default_metric(scheme, train_split.format)
    check_metric(metric, scheme)
    version_2 = data.version_2 if data.version_2 is not None else is_version_2(train_split, valid_split)

    train_features = encode_split(task, train_split.examples, tok, data, scheme, progress=progress)
    valid_features = encode_split(task, valid_split.examples, tok, data, scheme, progress=progress)

    seed_everything(config.seed)  # the same new head (or random init) for the same seed
    net = build_model(task, model_dir, scheme, random_init=config.random_init,
                      unpad_training=not config.reference_loss)
    if task == QA and not config.reference_loss and hooks.is_main:
        logger.warning(
            "question-answering loss: pad positions are left out of the start/end softmax (training "
            "runs on real tokens only); transformers includes them. --reference-loss trains on its loss"
        )
    # Data parallel: rank r takes its batch_size slice of each global batch (one epoch = the
    # same examples as in one process; batch_size x ranks examples per step).
    loader = ResumableLoader(train_features, config.batch_size, Collator(tok.pad_token_id), shuffle=True,
                             seed=config.seed, rank=hooks.rank, world_size=hooks.world_size)
    steps_per_epoch = max(1, loader.batches_per_epoch // config.grad_accum)
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    eval_every = config.eval_every or steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None else int(round(config.warmup_ratio * max_steps))

    lr = config.lr
    if lr is None:
        lr = default_finetune_lr(net.config.hidden_size)
        if hooks.is_main:
            logger.info("learning rate %g (the default for hidden size %d; --lr sets another)", lr, net.config.hidden_size)
    evaluator = TaskEvaluator(
        scheme, valid_split.examples, valid_features, data, pad_token_id=tok.pad_token_id,
        batch_size=config.eval_batch_size or 2 * config.batch_size, version_2=version_2, progress=progress,
    )
    info = {
        "task": task,
        "metric": metric,
        "format": train_split.format,
        "version_2": version_2,
        "data_options": data.to_dict(),
        "model": str(model_dir),
        "random_init": config.random_init,
        "lr": lr,
        "max_steps": max_steps,
        "epochs": max_steps / steps_per_epoch,
        "data": {"train": _split_info(train_split, train_features),
                 "validation": _split_info(valid_split, valid_features)},
    }
    # Every rank has checked the folder (above) before the main rank changes anything in it.
    hooks.barrier()
    if hooks.is_main:
        _remove_outputs(output_dir, replaced)
    keeper = BestModelKeeper(output_dir, metric, evaluator, tok.save_pretrained, info,
                             patience=config.early_stopping_patience, threshold=config.early_stopping_threshold)
    trainer = Trainer(
        net,
        loader,
        TrainerConfig(
            output_dir=output_dir, max_steps=max_steps, grad_accum=config.grad_accum, clip_grad=config.clip_grad,
            precision="bf16" if config.bf16 else "fp32", eval_every=eval_every, eval_at_end=True,
            seed=config.seed, device=config.device,
        ),
        optimizer=OptimizerConfig(lr=lr, weight_decay=config.weight_decay),
        schedule=ScheduleConfig(kind=config.schedule, warmup_steps=min(warmup, max_steps)),
        checkpoints=CheckpointConfig(save_every=0, keep_last=1, resume=config.resume),
        metrics=MetricsConfig(log_every=config.log_every, tensorboard=False, plot=config.plot,
                              progress=config.progress),
        eval_fn=evaluator,
        distributed=hooks,
        callbacks=[keeper],
        save_extras=tok.save_pretrained,
        run_signature={"task": task, "batch_size": config.batch_size, "max_length": data.max_length,
                       "train": str(train), "max_train_examples": config.max_train_examples,
                       "labels": list(scheme.labels or ()), "problem_type": scheme.problem_type,
                       # recorded only when on, so that runs from before the option resume
                       **({"reference_loss": True} if config.reference_loss else {})},
    )
    if trainer.resumed_from is not None:
        keeper.restore(trainer.state.step)
        if hooks.is_main:
            logger.warning("resuming from %s (step %d)", trainer.resumed_from, trainer.state.step)
    if hooks.is_main:
        write_json(output_dir / RUN_CONFIG_FILE, {
            "task": task, "model": str(model_dir), "train": str(train), "validation": str(validation),
            "tokenizer": str(tokenizer) if tokenizer is not None else None, "finetune": asdict(config),
            "data": data.to_dict(), "labels": list(scheme.labels or ()), "problem_type": scheme.problem_type,
            "metric": metric, "max_steps": max_steps, "steps_per_epoch": steps_per_epoch, "eval_every": eval_every,
            "warmup_steps": warmup, "world_size": hooks.world_size,
        })
    try:
        result = trainer.train()
    finally:
        trainer.close()
    keeper.stop_reason = result.stop_reason
    results_file = keeper.write_results() if hooks.is_main else output_dir / RESULTS_FILE
    return FinetuneResult(
        output_dir=output_dir,
        best_dir=keeper.best_dir if keeper.best_dir.is_dir() else None,
        metric=metric,
        best_step=keeper.best_step,
        best_metrics=keeper.best_metrics,
        history=keeper.history,
        stop_reason=keeper.stop_reason,
        steps=result.step,
        train=result,
        results_file=results_file,
        predictions_file=output_dir / PREDICTIONS_FILE,
        data=info["data"],
    )


# ---------------------------------------------------------------------------------- evaluate
def saved_data_options(model_dir: str | os.PathLike) -> DataOptions:
    """The data options a folder was fine-tuned with (``best/finetune.json``), else the defaults."""
    info = read_finetune_info(Path(model_dir))
    values = info.get("data_options")
    return DataOptions.from_dict(values) if isinstance(values, dict) else DataOptions()


def evaluate(
    model: str | os.PathLike,
    data_file: str | os.PathLike,
    *,
    task: str | None = None,
    output: str | os.PathLike | None = None,
    data: DataOptions | None = None,
    labeled: bool = True,
    batch_size: int = 64,
    bf16: bool = False,
    device: str = "auto",
    max_examples: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> EvaluationResult:
    """Score a fine-tuned model folder on ``data_file`` (or only predict, with ``labeled=False``).

    ``task`` defaults to the folder's (``finetune.json`` or its architecture); ``data`` to the
    options it was fine-tuned with. The labels come from the model's ``id2label``: a label in the
    file that the model does not know is an error naming its ``file:line``. With ``output`` (a
    folder), writes ``eval_results.json`` (labelled data) and ``eval_predictions.jsonl`` there.
    """
    folder = Path(model)
    config = read_model_config(folder)
    if task is None:
        task = task_of_folder(folder, config)
        if task is None:
            raise UserError(f"{folder}: cannot tell which task the model is for; pass --task")
    task = canonical_task(task)
    data = (data or saved_data_options(folder)).fitted(config.max_position_embeddings)
    data.validate(task)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
    target = resolve_device(device)
    net = load_finetuned(task, folder, device=target)
    tok = load_tokenizer(model_folder=folder)
    check_model_fits(config, tok, data.length, str(folder))
    scheme = LabelScheme.from_config(task, net.config)

    split = read_split(task, data_file, data, labeled=labeled, limit=max_examples, seed=seed)
    if labeled:
        check_split_labels(split.examples, scheme)
    features = encode_split(task, split.examples, tok, data, scheme, labeled=labeled, progress=progress)
    info = read_finetune_info(folder)
    version_2 = data.version_2 if data.version_2 is not None else bool(info.get("version_2")) or is_version_2(split)
    autocast = torch.autocast(device_type=target.type, dtype=torch.bfloat16) if bf16 else None
    outputs = run_model(net, features, pad_token_id=tok.pad_token_id, batch_size=batch_size, autocast=autocast,
                        progress=progress)
    out: EvalOutput = predictions_and_metrics(scheme, split.examples, features, outputs, data, labeled=labeled,
                                              version_2=version_2)
    result = EvaluationResult(task, out.metrics, out.records, notes=out.notes, skipped=split.skipped)
    if output is not None:
        out_dir = Path(output)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--output {out_dir} is a file; give a folder")
        result.predictions_file = write_jsonl(out_dir / PREDICTIONS_FILE, out.records)
        if labeled:
            result.metrics_file = write_json(out_dir / RESULTS_FILE, {
                "task": task, "model": str(folder), "data": str(data_file), "examples": len(split),
                "skipped": len(split.skipped), "truncated": features.num_truncated, "metrics": out.metrics,
                "notes": out.notes,
            })
    return result


__all__ = [
    "BEST_DIR",
    "DataOptions",
    "EvaluationResult",
    "FinetuneConfig",
    "FinetuneResult",
    "evaluate",
    "finetune",
]
