"""CPU fast paths, applied to a built model from outside: ``apply_cpu_fast_paths(model, policy)``.

The model code in :mod:`megabert.modeling` is plain PyTorch (``self.dense(x)``,
``nn.Dropout``, three Q/K/V Linears). This package makes the same model faster on the CPU
without changing its parameters, its state dict or (beyond float rounding) its results:

- ``half_matmul`` (:mod:`.half_matmul`): every ``nn.Linear`` becomes a :class:`CpuLinear`,
  which runs large bf16/fp16 products in fp32 on CPUs whose half-precision GEMMs are slower
  than fp32 ones. ``"auto"`` measures once per process (``MEGABERT_CPU_HALF_MATMUL`` can force
  it), ``"native"`` never upcasts, ``"fp32"`` always does.
- ``fast_dropout`` (:mod:`.dropout`): every ``nn.Dropout`` draws its mask from 16-bit slices of
  64-bit random words (a tenth of the cost of torch's CPU mask); attention dropout on CPU uses
  the same mask through the eager attention math instead of SDPA's unfused fallback.
- ``fused_qkv`` (:mod:`.attention`): each self-attention block projects Q, K and V with one GEMM
  on their stacked weights, cached in eval mode.

Each fast path keeps its own guard (CPU tensors only; not DTensor shards, not under
torch.compile or ONNX export), so a model with fast paths applied can still be sharded,
compiled, exported or moved to a GPU. ``apply_cpu_fast_paths(model, "off")`` gives the plain
modules back (int8 quantization needs them).

MegatronBERT models apply ``config.cpu_fast_paths`` themselves when built or loaded (default
``"auto"``: all three on); a training loop that steps a fused optimizer should call
:func:`watch_optimizer` (megabert's Trainer does).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from megabert.errors import UserError
from megabert.fast_paths.attention import (
    fast_attention_class,
    forget_cached_weights,
    is_attention_block,
    plain_attention_class,
)
from megabert.fast_paths.dropout import Dropout as CpuDropout
from megabert.fast_paths.half_matmul import POLICIES as HALF_MATMUL_POLICIES
from megabert.fast_paths.half_matmul import CpuLinear, upcast_is_faster

__all__ = [
    "CpuFastPaths",
    "apply_cpu_fast_paths",
    "forget_cached_weights",
    "upcast_is_faster",
    "watch_optimizer",
]


@dataclass(frozen=True)
class CpuFastPaths:
    """Which CPU fast paths a model gets. ``CpuFastPaths.parse`` reads the forms users write."""

    half_matmul: str = "auto"  # "auto" | "native" | "fp32"
    fast_dropout: bool = True
    fused_qkv: bool = True

    @classmethod
    def parse(cls, value: "CpuFastPaths | str | Mapping[str, Any] | None") -> "CpuFastPaths":
        """None or "auto": all on; "off": all off; a mapping: those fields (others at their default)."""
        if isinstance(value, CpuFastPaths):
            return value
        if value is None or value == "auto":
            return cls()
        if value == "off":
            return cls(half_matmul="native", fast_dropout=False, fused_qkv=False)
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise UserError(f"cpu_fast_paths: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
            policy = cls(**value)
            if policy.half_matmul not in HALF_MATMUL_POLICIES:
                raise UserError(
                    f"cpu_fast_paths half_matmul={policy.half_matmul!r}: choose one of {', '.join(HALF_MATMUL_POLICIES)}"
                )
            for name in ("fast_dropout", "fused_qkv"):
                if not isinstance(getattr(policy, name), bool):
                    raise UserError(f"cpu_fast_paths {name} must be true or false, got {getattr(policy, name)!r}")
            return policy
        raise UserError(f"cpu_fast_paths must be 'auto', 'off' or a mapping of options, got {value!r}")

    @property
    def is_off(self) -> bool:
        return self.half_matmul == "native" and not self.fast_dropout and not self.fused_qkv


def apply_cpu_fast_paths(model: nn.Module, policy: "CpuFastPaths | str | Mapping[str, Any] | None" = "auto") -> nn.Module:
    """Give ``model``'s modules the fast paths ``policy`` names, in place; returns ``model``.

    Idempotent, and reversible: applying a policy with a path off gives those modules their
    plain classes back. Parameters, buffers and hooks are untouched (the modules change class,
    not identity), so it can run before or after loading weights, ``.to()``, or sharding.
    """
    policy = CpuFastPaths.parse(policy)
    for module in model.modules():
        if type(module) in (nn.Linear, CpuLinear):
            module.__class__ = nn.Linear if policy.half_matmul == "native" else CpuLinear
            if isinstance(module, CpuLinear):
                module.half_matmul = policy.half_matmul
        elif type(module) in (nn.Dropout, CpuDropout):
            module.__class__ = CpuDropout if policy.fast_dropout else nn.Dropout
        if is_attention_block(module):
            fast = policy.fused_qkv or policy.fast_dropout
            module.__class__ = (fast_attention_class if fast else plain_attention_class)(plain_attention_class(type(module)))
            if fast:
                module.fused_qkv = policy.fused_qkv
                module.fast_attention_dropout = policy.fast_dropout
            forget_cached_weights(module)
    return model


def watch_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Forget ``model``'s cached fused weights after every step of ``optimizer``.

    A hook on this one optimizer (not a process-wide one): fused optimizer kernels update
    weights in place without bumping their version counters, which the cache otherwise keys on.
    """
    optimizer.register_step_post_hook(lambda *_: forget_cached_weights(model))
