"""AdamW with BERT's weight-decay rule, and the warmup-then-decay learning-rate schedule.

Weight decay applies to weight matrices and embeddings only: every bias (including the MLM
head's output bias) and every LayerNorm weight is left undecayed, as in BERT and Megatron-LM.

The schedule, with peak learning rate ``lr``, ``W`` warmup updates, ``T`` updates in all and a
floor ratio ``r`` (``min_lr_ratio``), gives update number ``t`` (1-based) the rate::

    t <= W:        lr * t / W                                   (linear warmup, peak at t = W)
    W < t <= T:    lr * f(p),   p = (t - W) / (T - W)           (0 < p <= 1)
                   linear:  f(p) = 1 - (1 - r) * p
                   cosine:  f(p) = r + (1 - r) * (1 + cos(pi * p)) / 2
                   constant: f(p) = 1
    t > T:         lr * r   (lr for "constant")

so the first update already moves the weights (no wasted step at rate 0) and the last one
runs at the floor.

Under a time budget (the trainer's ``max_seconds``, ``--max-minutes``) the decay follows the
clock as well: ``p = max((t - W) / (T - W), elapsed / budget)``, so a run that the time limit
ends has finished its decay when the time is up, whatever ``T`` says. A short budget gains
most from ending at a low rate (the last stretch of a decay to zero is where the loss drops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from megabert.errors import UserError

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # torch's fused AdamW kernel: one pass per parameter instead of a dozen (on CPU the foreach
    # implementation loops over the parameters; docs/measurements.md has the figures).
    # None: fused when every parameter is a plain CPU/CUDA float tensor, else foreach (DTensor
    # shards of tensor parallelism / FSDP). The fused kernel leaves the weights' version counters
    # alone; the Trainer has the model's cached fused-QKV weights dropped after every step
    # (megabert.fast_paths.watch_optimizer).
    fused: bool | None = None

    def validate(self) -> None:
        """Raise UserError naming the bad field and its allowed range."""
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise UserError(f"weight decay must be >= 0, got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"AdamW {name} must be in [0, 1), got {value!r}")
        if not self.eps > 0:
            raise UserError(f"AdamW eps must be positive, got {self.eps!r}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: warmup, then decay to ``min_lr_ratio * lr`` at ``total_steps``.

    ``total_steps`` None means "the trainer's max_steps".
    """

    kind: str = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int | None = None

    def validate(self, total_steps: int) -> None:
        """Raise UserError for an unknown kind, a negative warmup or a floor outside [0, 1]."""
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise UserError(f"warmup steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min lr ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if total_steps < 1:
            raise UserError(f"the schedule needs total steps >= 1, got {total_steps}")


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: biases and LayerNorm weights."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or param_name == "bias" or param_name.endswith("_bias"):
                names.add(full)
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases + LayerNorm weights at decay 0.

    Tied parameters (the MLM decoder shares the word embeddings; the decoder bias is the head's
    ``bias``) appear once, under the first name ``named_parameters`` gives them. Frozen
    parameters (``requires_grad=False``) are left out.
    """
    no_decay = no_decay_parameter_names(model)
    decay_params: list[nn.Parameter] = []
    plain_params: list[nn.Parameter] = []
    seen: set[int] = set()
    # Any alias of a no-decay parameter makes it no-decay (the decoder bias is also `cls...bias`).
    aliases_no_decay = {
        id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in no_decay
    }
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (plain_params if id(param) in aliases_no_decay else decay_params).append(param)
    groups = [{"params": decay_params, "weight_decay": weight_decay, "name": "decay"}]
    groups.append({"params": plain_params, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` of ``model``."""
    config.validate()
    groups = parameter_groups(model, config.weight_decay)
    if not groups:
        raise UserError("the model has no trainable parameters (all have requires_grad=False)")
    fused = config.fused
    if fused is None:
        fused = all(_fused_kernel_takes(p) for group in groups for p in group["params"])
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=fused or None
    )


def _fused_kernel_takes(param: torch.Tensor) -> bool:
    """Whether torch's fused AdamW handles ``param`` (a plain floating-point tensor on CPU or CUDA)."""
    return (
        param.device.type in ("cpu", "cuda")
        and param.dtype.is_floating_point
        and not hasattr(param, "placements")  # DTensor shards go through foreach
    )


class WarmupDecay:
    """The schedule's multiplier of the peak rate, as a function of finished updates.

    ``WarmupDecay(...)(s)`` is the factor for update number ``s + 1`` (``s`` updates done), the
    convention of ``torch.optim.lr_scheduler.LambdaLR``. A plain class, so it pickles and its
    settings appear in the scheduler's state dict.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        # Share of the time budget used so far (0 to 1), set by the trainer when it has one; a
        # plain float, so that it is saved and restored with the scheduler's state.
        self.time_fraction = 0.0

    def factor(self, t: int) -> float:
        """Multiplier for update ``t`` (1-based); see the module docstring."""
        w, total, r = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if w > 0 and t <= w:
            return t / w
        if self.kind == "constant":
            return 1.0
        p = max((t - w) / max(total - w, 1), min(self.time_fraction, 1.0))
        if p >= 1.0:
            return r
        if self.kind == "linear":
            return 1.0 - (1.0 - r) * p
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))

    def __call__(self, finished_updates: int) -> float:
        return self.factor(finished_updates + 1)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :class:`WarmupDecay`; call ``.step()`` after each optimizer update."""
    total = config.total_steps if config.total_steps is not None else total_steps
    config.validate(total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(config.kind, config.warmup_steps, total, config.min_lr_ratio)
    )


def learning_rates(config: ScheduleConfig, peak_lr: float, steps: Iterable[int], total_steps: int) -> list[float]:
    """The rate of each update number in ``steps`` (1-based): for plots and checks."""
    total = config.total_steps if config.total_steps is not None else total_steps
    schedule = WarmupDecay(config.kind, config.warmup_steps, total, config.min_lr_ratio)
    return [peak_lr * schedule.factor(t) for t in steps]
