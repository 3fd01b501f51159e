"""Dropout with a cheaper random mask on CPU.

On CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element with a scalar
loop, a noticeable share of a pretraining step. Here the mask comes from 64-bit words of
numpy's SFC64 generator cut into four 16-bit lanes, about ten times cheaper an element (the
figures: docs/measurements.md): an element is kept
when its lane is at or above ``round(p * 65536)`` of the 65536 lane values, so the drop
probability is ``p`` rounded to a multiple of 1/65536 (0.1 becomes 0.1000061). Each mask's
SFC64 seed is drawn from torch's default CPU generator, so ``torch.manual_seed`` and the RNG
state a checkpoint saves make runs repeat exactly, as with ``F.dropout``.

Everywhere else -- CUDA (its kernel is fast), ``torch.compile`` (which traces its own RNG),
DTensor activations under tensor parallelism, p outside (0, 1) -- it is ``F.dropout``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_LANE_VALUES = 1 << 16  # a 16-bit lane takes 65536 values
_INT16_MIN = -(1 << 15)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool CPU tensor of ``shape``: True with probability ``1 - round(p * 65536) / 65536``."""
    count = 1
    for size in shape:
        count *= int(size)
    seed = int(torch.randint(0, (1 << 63) - 1, (), dtype=torch.int64))  # from torch's generator
    words = np.random.SFC64(seed).random_raw((count + 3) // 4)  # uint64, four 16-bit lanes each
    lanes = torch.from_numpy(words.view(np.int16))[:count]
    return (lanes >= _INT16_MIN + round(p * _LANE_VALUES)).view(shape)


class _MaskedScale(torch.autograd.Function):
    """x * keep / (1 - p); the gradient goes through the same mask (saved as bool, 1 byte an element)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the fast CPU mask described in the module docstring."""
    if not training or p == 0.0:
        return x
    if (
        not 0.0 < p < 1.0
        or x.device.type != "cpu"
        or hasattr(x, "placements")  # DTensor
        or torch.compiler.is_compiling()
    ):
        return F.dropout(x, p, training=True)
    keep = keep_mask(x.shape, p)
    if x.dtype in (torch.float32, torch.float64):
        # Multiplying by a bool tensor converts it to float first, every time; a float mask of
        # 0 / (1 / (1 - p)) is built once and serves the forward and the backward product.
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))
    # half precision keeps a bool mask: a bf16 copy of the scale would be rounded (1.109 for 1.111)
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same train/eval behaviour) using :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
