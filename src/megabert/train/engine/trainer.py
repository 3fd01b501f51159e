"""One training loop for pretraining, fine-tuning and distributed training.

The :class:`Trainer` owns the loop and everything around it; what differs between jobs is
passed in:

* ``model`` -- the ``nn.Module`` being trained and saved (``save_pretrained`` when it has one);
* ``train_data`` -- where micro-batches come from: a :class:`BatchSource` (``batches(start)``
  yields micro-batches from micro-batch number ``start`` on, so a resumed run continues at the
  exact batch), a function ``start -> iterable``, or a list of batches (cycled);
* ``loss_fn(model, batch) -> StepOutput | Tensor`` -- the objective (default: ``model(**batch).loss``);
* ``eval_fn(model) -> {name: value}`` -- evaluation every ``eval_every`` steps and at the end,
  run in eval mode, without gradients, under the training precision, and with the RNG state
  saved and restored around it (so evaluating never changes the training run);
* ``distributed`` -- :class:`DistributedHooks`: how to wrap the module (DDP...), skip gradient
  sync on accumulation micro-batches, clip a sharded gradient, reduce metrics, agree to stop,
  gather RNG states, the checkpoint format (a sharded model's ranks each write their part), and
  which rank writes files. The defaults are the single-process behaviour;
* ``callbacks`` -- :class:`TrainerCallback` objects told about steps, evaluations and saves;
  one may call :meth:`Trainer.request_stop` (early stopping).

A step is ``grad_accum`` micro-batches (forward + backward each, gradients summed with the
loss divided by ``grad_accum``), an optional clip of the global gradient norm, one optimizer
update and one scheduler step. Precision: ``fp32``; ``bf16`` (autocast on CPU and CUDA, fp32
weights); ``fp16`` (CUDA autocast with a gradient scaler).

Stopping: at ``max_steps``, at ``max_seconds``, at a :meth:`Trainer.request_stop`, or on
SIGINT/SIGTERM (the current step finishes, a checkpoint is written, :meth:`Trainer.train`
returns with ``interrupted=True``; a second signal stops at once). Resuming restores weights,
optimizer, scheduler, scaler, RNG states and the data position, so the resumed losses equal the
uninterrupted ones. Checkpoints go through a :class:`~megabert.train.engine.checkpoint.CheckpointManager`,
which the Trainer hands its state as a :meth:`Trainer.snapshot`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from megabert.devices import resolve_device
from megabert.errors import RunError, UserError
from megabert.fast_paths import watch_optimizer
from megabert.train.engine import checkpoint as ckpt
from megabert.train.engine.checkpoint import TrainState
from megabert.train.engine.logging import MetricsConfig, MetricsLogger
from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler

Batch = Any  # usually a dict of tensors; anything the loss function accepts
PRECISIONS = ("fp32", "bf16", "fp16")


class TrainingError(RunError):
    """Training cannot go on (a non-finite loss, data that ran out); a RuntimeError (RunError)."""


# ---------------------------------------------------------------------------------- configs
# max_steps of a run that only its time limit ends (``--max-minutes`` without ``--max-steps``).
UNTIL_TIME_LIMIT = 2**40


@dataclass
class TrainerConfig:
    """The loop's settings (optimizer, schedule, checkpoints and metrics have their own configs)."""

    output_dir: str | os.PathLike
    max_steps: int
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = 1.0  # max global gradient norm (None: no clipping)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only)
    gradient_checkpointing: bool = False  # recompute layer activations in backward
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_at_end: bool = True
    seed: int = 1234  # python/numpy/torch seeds (+ the rank's offset)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_seconds: float | None = None  # stop (with a checkpoint) after this much training time

    def validate(self) -> None:
        """Raise UserError naming the first bad setting."""
        for name in ("max_steps", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name.replace('_', ' ')} must be an integer >= 1, got {value!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UserError(f"clip grad must be a positive norm (or None for no clipping), got {self.clip_grad!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_every < 0:
            raise UserError(f"eval every must be >= 0 steps, got {self.eval_every}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise UserError(f"max seconds must be positive, got {self.max_seconds}")
        if self.max_steps >= UNTIL_TIME_LIMIT and self.max_seconds is None:
            raise UserError("a run without a step limit needs a time limit (max seconds, --max-minutes)")


@dataclass
class StepOutput:
    """What a loss function returns for one micro-batch."""

    loss: torch.Tensor  # scalar, the value to minimise (mean over the micro-batch)
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # logged, averaged
    tokens: int | torch.Tensor | None = None  # real tokens processed (default: attention_mask sum)


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` did."""

    step: int
    stop_reason: str  # "max_steps" | "time limit" | "SIGINT" | "SIGTERM" | a request_stop() reason
    losses: list[float]  # loss of each step run in this call
    last_checkpoint: Path | None
    eval_results: dict[str, float] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return self.stop_reason in ("SIGINT", "SIGTERM")


# ------------------------------------------------------------------------------- batches
class BatchSource(Protocol):
    """Anything that can restart its stream of micro-batches at a given position."""

    def batches(self, start: int) -> Iterable[Batch]:
        """Micro-batches number ``start``, ``start + 1``, ... (endless, or long enough)."""
        ...


class ResumableLoader:
    """Micro-batches of a map-style dataset, endless over epochs, restartable at any position.

    Epoch ``e`` visits the examples in the order of a permutation drawn from ``seed + e``
    (or in order without ``shuffle``), in global batches of ``batch_size * world_size``
    (the last partial batch of an epoch is dropped); rank ``r`` takes its ``batch_size``
    slice of each. ``batches(start)`` therefore depends only on ``start``, never on history.
    Loading runs in ``num_workers`` DataLoader processes (0: in this process).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
        *,
        shuffle: bool = True,
        seed: int = 1234,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch < 1:
            raise UserError(
                f"the dataset has {len(dataset)} examples, fewer than one batch of {self.global_batch} "
                f"({batch_size} x {world_size} ranks): lower the batch size or add data"
            )

    def _epoch_order(self, epoch: int) -> Sequence[int]:
        if not self.shuffle:
            # A range, not an array: a dataset sized for a run that only its time limit ends
            # can be 2**40 batches long.
            return range(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def index_batches(self, start: int) -> Iterator[list[int]]:
        """Dataset indices of this rank's micro-batches from number ``start`` on (endless)."""
        position = start
        while True:
            epoch, within = divmod(position, self.batches_per_epoch)
            order = self._epoch_order(epoch)
            for b in range(within, self.batches_per_epoch):
                first = b * self.global_batch + self.rank * self.batch_size
                yield [int(i) for i in order[first : first + self.batch_size]]
                position += 1

    def batches(self, start: int) -> Iterable[Batch]:
        """Collated micro-batches from number ``start`` on."""
        sampler = _IndexBatches(self, start)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Worker seeds come from this generator, not the global RNG, so that creating the
            # loader (again, on resume) does not shift the training RNG stream.
            generator=torch.Generator().manual_seed(self.seed + start),
        )


class _IndexBatches(torch.utils.data.Sampler):
    def __init__(self, loader: ResumableLoader, start: int) -> None:
        self.loader = loader
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        return self.loader.index_batches(self.start)


class _SequenceSource:
    """A list of batches as a source: batch ``i`` is ``batches[i % len]``."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        if len(batches) == 0:
            raise UserError("the list of training batches is empty")
        self._batches = batches

    def batches(self, start: int) -> Iterator[Batch]:
        position = start
        while True:
            yield self._batches[position % len(self._batches)]
            position += 1


class _CallableSource:
    def __init__(self, fn: Callable[[int], Iterable[Batch]]) -> None:
        self._fn = fn

    def batches(self, start: int) -> Iterable[Batch]:
        return self._fn(start)


def as_batch_source(data: Any) -> BatchSource:
    """Accept a BatchSource, a ``start -> iterable`` function, or a sequence of batches."""
    if hasattr(data, "batches"):
        return data
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return _SequenceSource(data)
    if callable(data):
        return _CallableSource(data)
    raise UserError(
        f"train_data must be a BatchSource (with batches(start)), a function start -> batches, or a list "
        f"of batches; got {type(data).__name__}"
    )


def move_to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors inside dicts/lists/tuples moved to ``device`` (other values untouched)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _batch_size_of(batch: Batch) -> int:
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return int(batch.shape[0])
    return 0


def _token_count(batch: Batch) -> int:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return int(ids.numel())
    return 0


# ------------------------------------------------------------------------------ loss glue
def model_loss(model: nn.Module, batch: Batch) -> StepOutput:
    """The default objective: ``model(**batch).loss`` (a model with labels in the batch)."""
    output = model(**batch)
    loss = output.loss if hasattr(output, "loss") else output[0]
    if loss is None:
        raise UserError("the model returned no loss: the batches must carry labels for it")
    return StepOutput(loss=loss)


class LossModule(nn.Module):
    """``model`` + ``loss_fn`` as one module, so a distributed wrapper (DDP) sees the whole forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Batch], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> StepOutput:
        out = self.loss_fn(self.model, batch)
        if isinstance(out, StepOutput):
            return out
        if isinstance(out, torch.Tensor):
            return StepOutput(loss=out)
        if hasattr(out, "loss"):
            return StepOutput(loss=out.loss)
        raise TypeError(f"loss_fn must return a StepOutput or a scalar tensor, got {type(out).__name__}")


# ------------------------------------------------------------------------ extension hooks
class DistributedHooks:
    """How the loop runs across processes. These defaults are one process on one device.

    A torch.distributed plan subclasses this and overrides what it needs: ``rank``,
    ``world_size``, ``device``, :meth:`prepare_model` (shard the model before the optimizer is
    built), :meth:`wrap` (e.g. DDP around the :class:`LossModule`),
    :meth:`no_sync`, :meth:`clip_grad_norm` (a sharded model needs a global norm),
    :meth:`all_reduce` (metrics), :meth:`any_rank` (agree to stop), :meth:`gather_object`
    (RNG states for the checkpoint), :meth:`barrier`, the optimizer state (de)serialisers and
    :meth:`checkpoint_format`. Only ``is_main`` writes checkpoints, metrics and the progress bar.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: the TrainerConfig's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed_offset(self) -> int:
        """Added to the seed so ranks draw different dropout masks."""
        return self.rank

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module whose forward runs the loss (DDP(module) for data parallel)."""
        return module

    def no_sync(self, wrapped: nn.Module) -> ContextManager:
        """Context for accumulation micro-batches whose gradients need no all-reduce yet."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm`` (inf: measure only); returns the norm."""
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        """Combine per-rank scalars (``op`` "mean" or "sum")."""
        return values

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (a signal, a time limit)."""
        return flag

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on the main rank; others may get [])."""
        return [obj]

    def barrier(self) -> None:
        """Wait for all ranks."""

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def checkpoint_format(self) -> ckpt.CheckpointFormat:
        """How this layout writes and reads checkpoints (asked once, by the CheckpointManager).

        The default is :class:`~megabert.train.engine.checkpoint.SingleProcessFormat` (the main
        rank writes everything); torch.distributed's hooks give the sharded DCP format, in which
        every rank writes its part.
        """
        return ckpt.SingleProcessFormat(self)

    def full_weights(self, model: nn.Module) -> ContextManager:
        """Context in which ``model`` holds whole (unsharded) weights, e.g. to save it; every rank enters it."""
        return contextlib.nullcontext(model)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model as this layout trains it (e.g. sharded for tensor parallel); called by the Trainer
        before it builds the optimizer. Must be idempotent (a job may have prepared it already)."""
        return model


class TrainerCallback:
    """Override any of these to follow a run (all are called on every rank)."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Mapping[str, float]) -> None:
        """After each optimizer step; ``metrics``: this step's loss, lr, grad_norm and loss_fn metrics."""

    def on_evaluate(self, trainer: "Trainer", step: int, results: Mapping[str, float]) -> None:
        """After each evaluation."""

    def on_save(self, trainer: "Trainer", folder: Path | None) -> None:
        """After a checkpoint is written (``folder`` is None on non-main ranks)."""


# --------------------------------------------------------------------------------- trainer
class _Window:
    """Running sums of per-step values between two log records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tokens = 0
        self.samples = 0
        self.seconds = 0.0
        self.last_lr = 0.0

    def add(self, values: Mapping[str, float], tokens: int, samples: int, seconds: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.last_lr = values.get("lr", 0.0)
        self.tokens += tokens
        self.samples += samples
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """The training loop; see the module docstring for what each argument plugs in.

    Construction validates everything and (with ``checkpoints.resume``) loads the checkpoint,
    so bad settings fail before any training. :meth:`train` runs until ``max_steps``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchSource | Callable[[int], Iterable[Batch]] | Sequence[Batch],
        config: TrainerConfig,
        *,
        optimizer: OptimizerConfig | torch.optim.Optimizer | None = None,
        schedule: ScheduleConfig | None = None,
        checkpoints: ckpt.CheckpointConfig | None = None,
        metrics: MetricsConfig | None = None,
        loss_fn: Callable[[nn.Module, Batch], StepOutput | torch.Tensor] | None = None,
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        distributed: DistributedHooks | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        save_extras: Callable[[Path], None] | None = None,
        run_signature: Mapping[str, Any] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.schedule_config = schedule or ScheduleConfig()
        self.checkpoint_config = checkpoints or ckpt.CheckpointConfig()
        self.checkpoint_config.validate()
        self.metrics_config = metrics or MetricsConfig()
        if self.metrics_config.log_every < 1:
            raise UserError(f"log every must be >= 1 step, got {self.metrics_config.log_every}")
        self.hooks = distributed or DistributedHooks()
        self.callbacks = list(callbacks)
        self.eval_fn = eval_fn
        self.save_extras = save_extras
        self.run_signature = dict(run_signature or {})
        self.output_dir = Path(config.output_dir)
        self.checkpoints = ckpt.CheckpointManager(self.checkpoint_config, self.output_dir, self.hooks)

        self.device = self.hooks.device or resolve_device(config.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise UserError("fp16 training needs a CUDA device (it uses a gradient scaler); on CPU use bf16")
        if config.precision == "bf16" and self.device.type == "cpu" and self.hooks.is_main:
            from megabert.fast_paths import upcast_is_faster

            if upcast_is_faster(torch.bfloat16):
                print(
                    "note: this CPU multiplies bf16 matrices more slowly than fp32 ones (AVX512-BF16 "
                    "without AMX, or no bf16 instructions): the large products run in fp32 here, so "
                    "--bf16 saves activation memory but not time; fp32 (no --bf16) is as fast or faster",
                    file=sys.stderr,
                )
        seed_everything(config.seed + self.hooks.seed_offset())

        # Sharding (tensor parallel, FSDP) happens here, before the optimizer sees the parameters,
        # so every job runs under any layout without changes of its own (idempotent).
        model = self.hooks.prepare_model(model)
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise UserError(f"{type(model).__name__} has no gradient_checkpointing_enable(); switch the option off")
            model.gradient_checkpointing_enable()
        self.source = as_batch_source(train_data)

        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
            self.peak_lr = max(g["lr"] for g in optimizer.param_groups)
        else:
            optimizer = optimizer or OptimizerConfig()
            self.optimizer = build_optimizer(model, optimizer)
            self.peak_lr = optimizer.lr
        # The model's cached fused weights (CPU fast paths) go stale when a fused optimizer steps.
        watch_optimizer(self.optimizer, model)
        self.scheduler = build_scheduler(self.optimizer, self.schedule_config, config.max_steps)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

        self.state = TrainState()
        self.logger = MetricsLogger(self.output_dir, self.metrics_config) if self.hooks.is_main else None
        self.resumed_from: Path | None = None
        if self.hooks.is_main:
            self.checkpoints.clean_partial()
        resumed = self.checkpoints.resume(self.snapshot())
        if resumed is not None:
            self.resumed_from, self.state = resumed
            if self.logger is not None:
                self.logger.truncate_after(self.state.step)  # records past the checkpoint are redone
        elif self.logger is not None:
            self.logger.truncate_after(0)  # records of an earlier attempt that never checkpointed
        self.loss_module = self.hooks.wrap(LossModule(self.model, loss_fn or model_loss))
        self._stop_signal: int | None = None
        self._stop_request: str | None = None

    # ------------------------------------------------------------------ helpers
    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask the loop to stop after the current step (e.g. early stopping, from a callback).

        The run ends as at ``max_steps`` (a checkpoint is written) and :meth:`train` returns
        ``stop_reason=reason``. Under torch.distributed, a request on any rank stops all ranks.
        """
        self._stop_request = reason

    def autocast(self) -> ContextManager:
        """The precision context the forward passes (training and evaluation) run under."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def lr(self) -> float:
        """The learning rate of the next update (the first group's)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _follow_the_clock(self) -> None:
        """Under a time budget, set the next update's rate from the share of the budget used.

        The schedule's decay then ends when the time does (see megabert.train.engine.optim);
        the ranks average their clocks, so that all use one rate.
        """
        if self.config.max_seconds is None:
            return
        fraction = self.state.train_seconds / self.config.max_seconds
        fraction = float(self.hooks.all_reduce({"fraction": fraction}, op="mean")["fraction"])
        for schedule in self.scheduler.lr_lambdas:
            if hasattr(schedule, "time_fraction"):
                schedule.time_fraction = fraction
        last = self.scheduler.last_epoch
        for group, base_lr, schedule in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base_lr * schedule(last)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def signature(self) -> dict[str, Any]:
        """The run settings a resume must not change (grad_accum, world size, seed + run_signature)."""
        base = {
            "grad_accum": self.config.grad_accum,
            "world_size": self.hooks.world_size,
            "seed": self.config.seed,
        }
        base.update(self.run_signature)
        return json.loads(json.dumps(base, default=str))

    # -------------------------------------------------------------- checkpoints
    def snapshot(self) -> ckpt.TrainingSnapshot:
        """The run's state as a checkpoint saves and restores it (its live objects, not copies)."""
        micro = getattr(self.source, "global_batch", None)
        return ckpt.TrainingSnapshot(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            position=self.state,
            precision=self.config.precision,
            model_config=ckpt.model_config_record(self.model),
            signature=self.signature(),
            grad_accum=self.config.grad_accum,
            micro_batch_samples=int(micro) if micro is not None else None,
            save_extras=self.save_extras,
        )

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step (every rank calls it); returns the folder on the main rank."""
        folder = self.checkpoints.save(self.snapshot())
        for callback in self.callbacks:
            callback.on_save(self, folder)
        return folder

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore weights, optimizer, scheduler, scaler, RNG and data position from ``folder`` (every rank)."""
        self.state = self.checkpoints.load(folder, self.snapshot())

    # --------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` (eval mode, no grad, training precision, RNG untouched); log as ``valid``."""
        if self.eval_fn is None:
            return {}
        rng = ckpt.capture_rng_state()
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                results = {k: float(v) for k, v in dict(self.eval_fn(self.model)).items()}
        finally:
            self.model.train()
            ckpt.restore_rng_state(rng)
        if self.logger is not None:
            self.logger.log(self.state.step, "valid", results)
            if self.metrics_config.plot:
                self.logger.plot()
        for callback in self.callbacks:
            callback.on_evaluate(self, self.state.step, results)
        return results

    # --------------------------------------------------------------------- loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self._stop_signal = signum
        name = signal.Signals(signum).name
        print(
            f"\nreceived {name}: finishing this step, saving a checkpoint, then stopping "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        installed = {}
        if self.checkpoint_config.save_on_signal and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                installed[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in installed.items():
                signal.signal(sig, handler)

    def _next_batch(self, iterator: Iterator[Batch]) -> Batch:
        try:
            return next(iterator)
        except StopIteration:
            raise TrainingError(
                f"the training data ran out after {self.state.micro_batches} micro-batches (step "
                f"{self.state.step} of {self.config.max_steps}); the batch source must be endless "
                "(ResumableLoader cycles over epochs)"
            ) from None

    def _train_step(self, iterator: Iterator[Batch]) -> tuple[dict[str, float], int, int]:
        """One optimizer update over ``grad_accum`` micro-batches; returns (values, tokens, samples)."""
        accum = self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = samples = 0
        for index in range(accum):
            batch = self._next_batch(iterator)
            self.state.micro_batches += 1
            samples += _batch_size_of(batch)
            batch = move_to_device(batch, self.device)
            sync = self.hooks.no_sync(self.loss_module) if index < accum - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    out = self.loss_module(batch)
                loss = out.loss.float() / accum
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_sum += loss.detach()
            for key, value in out.metrics.items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                metric_sums[key] = metric_sums.get(key, 0) + value.to(self.device) / accum
            tokens += int(out.tokens) if out.tokens is not None else _token_count(batch)

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.clip_grad if self.config.clip_grad is not None else math.inf
        grad_norm = self.hooks.clip_grad_norm(self._params, max_norm)
        lr = self.lr
        loss_value = float(loss_sum)
        if self.scaler is None and not math.isfinite(loss_value):
            raise TrainingError(
                f"the loss is {loss_value} at step {self.state.step + 1}: training diverged. Lower the "
                f"learning rate, use warmup or gradient clipping, and resume from the last checkpoint"
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        values = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}
        values.update({k: float(v) for k, v in metric_sums.items()})
        return values, tokens, samples

    def train(self) -> TrainResult:
        """Run until ``max_steps`` (or a signal / the time limit); returns what happened."""
        from tqdm.auto import tqdm

        config = self.config
        losses: list[float] = []
        last_checkpoint = self.checkpoints.latest() if self.hooks.is_main else None
        eval_results: dict[str, float] = {}
        stop_reason = "max_steps"
        if self.state.step >= config.max_steps:
            return TrainResult(self.state.step, stop_reason, losses, last_checkpoint)

        self.model.train()
        iterator = iter(self.source.batches(self.state.micro_batches))
        show = self.metrics_config.progress and self.hooks.is_main
        bar = tqdm(
            total=config.max_steps if config.max_steps < UNTIL_TIME_LIMIT else None, initial=self.state.step, unit="step", desc="training",
            disable=not show, file=sys.stderr, dynamic_ncols=True,
        )
        window = _Window()
        session_start = time.perf_counter()
        base_seconds = self.state.train_seconds
        saved_at = evaluated_at = -1
        try:
            with self._signal_handlers():
                while self.state.step < config.max_steps:
                    t0 = time.perf_counter()
                    values, tokens, samples = self._train_step(iterator)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    seconds = time.perf_counter() - t0
                    self.state.step += 1
                    counts = self.hooks.all_reduce({"tokens": tokens, "samples": samples}, op="sum")
                    self.state.tokens += int(counts["tokens"])
                    self.state.samples += int(counts["samples"])
                    self.state.train_seconds = base_seconds + time.perf_counter() - session_start
                    self._follow_the_clock()
                    losses.append(values["loss"])
                    window.add(values, int(counts["tokens"]), int(counts["samples"]), seconds)
                    step = self.state.step
                    for callback in self.callbacks:
                        callback.on_step_end(self, step, values)

                    if step % self.metrics_config.log_every == 0 or step == config.max_steps:
                        self._log_window(window, bar)
                    if config.eval_every and step % config.eval_every == 0:
                        eval_results = self.evaluate()
                        evaluated_at = step
                    if self.checkpoint_config.save_every and step % self.checkpoint_config.save_every == 0:
                        last_checkpoint = self.save_checkpoint()
                        saved_at = step
                    bar.update(1)

                    timed_out = config.max_seconds is not None and self.state.train_seconds >= config.max_seconds
                    local = self._stop_signal is not None or self._stop_request is not None or timed_out
                    # One collective for every reason, so that all ranks leave the loop at the same step.
                    if self.hooks.any_rank(local) and self.state.step < config.max_steps:
                        # Whether a signal stopped the run decides the end-of-run evaluation and
                        # checkpoint, which are collectives: every rank must agree on it, so ask
                        # once more (only on the stopping step).
                        signalled = self.hooks.any_rank(self._stop_signal is not None)
                        if self._stop_signal is not None:
                            stop_reason = signal.Signals(self._stop_signal).name
                        elif signalled:
                            stop_reason = "SIGTERM"  # another rank was signalled
                        elif self._stop_request is not None:
                            stop_reason = self._stop_request
                        elif timed_out:
                            stop_reason = "time limit"
                        else:
                            stop_reason = "stop requested on another rank"  # its time limit or request_stop
                        break
        finally:
            bar.close()

        stopped_by_signal = stop_reason in ("SIGINT", "SIGTERM")
        if not stopped_by_signal and config.eval_at_end and evaluated_at != self.state.step:
            eval_results = self.evaluate()
        wanted = True if stopped_by_signal else self.checkpoint_config.save_at_end
        if saved_at != self.state.step and wanted:
            # The end of a run, a time limit and a signal all leave a checkpoint to resume from.
            last_checkpoint = self.save_checkpoint()
        if self.logger is not None and self.metrics_config.plot:
            self.logger.plot()
        return TrainResult(self.state.step, stop_reason, losses, last_checkpoint, eval_results)

    def _log_window(self, window: _Window, bar: Any) -> None:
        if window.steps == 0:
            return
        means = self.hooks.all_reduce(window.means(), op="mean")
        record = dict(means)
        record["lr"] = window.last_lr  # the rate of the record's step, not the window's mean
        record["tokens_per_s"] = window.tokens / max(window.seconds, 1e-9)
        record["samples_per_s"] = window.samples / max(window.seconds, 1e-9)
        record["step_time_s"] = window.seconds / window.steps
        record["tokens"] = self.state.tokens
        if self.logger is not None:
            self.logger.log(self.state.step, "train", record)
        bar.set_postfix(
            loss=f"{means['loss']:.4f}", lr=f"{window.last_lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False
        )
        window.reset()

    def close(self) -> None:
        """Close the metric writers (TensorBoard)."""
        if self.logger is not None:
            self.logger.close()
