"""Faster attention blocks on CPU: one fused Q/K/V product, and dropout-aware attention math.

Applied by :func:`~megabert.fast_paths.apply_cpu_fast_paths` to every attention block of a
built model (a module with ``query``/``key``/``value`` Linears and the ``_project_qkv`` and
``_sdpa`` methods MegatronBERT's self-attention has), by giving it a subclass of its own class
that overrides those two methods:

- ``_project_qkv``: Q, K and V stacked into one (3 * inner, hidden) weight, one GEMM instead of
  three. With autograd the concatenation is part of the graph; in eval mode without autograd
  the stacked weight is cached and rebuilt when any of the six tensors changes (pointer,
  version, dtype, device, shape), when the block switches between train and eval mode, or when
  :func:`forget_cached_weights` is called (the trainer calls it after each optimizer step:
  fused optimizer kernels update weights in place without bumping their version counters).
- ``_sdpa`` with dropout on CPU: torch's SDPA falls back to its unfused math there and draws
  the dropout mask one element at a time; the block's eager math, whose dropout module is the
  fast one of :mod:`megabert.fast_paths.dropout`, runs instead.

Left alone: DTensor shards (their concatenation would gather them, and a tensor-parallel
plan's hooks live on the three Linears), int8-quantized Linears (their packed weight is a
method), and everything under torch.compile (which fuses by itself).
"""

from __future__ import annotations

import torch
from torch import nn

from megabert.fast_paths.half_matmul import linear

_QKV = ("query", "key", "value")
_CACHE = "_qkv_cache"  # instance-dict key of the cached (stamp, (weight, bias))


def is_attention_block(module: nn.Module) -> bool:
    """Whether ``module`` is a self-attention block this fast path knows how to fuse."""
    return (
        all(isinstance(getattr(module, name, None), nn.Linear) for name in _QKV)
        and callable(getattr(module, "_project_qkv", None))
        and callable(getattr(module, "_sdpa", None))
    )


class FastCpuAttention:
    """Mixin placed before an attention block's own class (see :func:`fast_attention_class`)."""

    fused_qkv: bool = True
    fast_attention_dropout: bool = True

    def _fused_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (3 * inner, hidden) weight and (3 * inner,) bias, or None where fusing does not apply."""
        weights = tuple(getattr(self, name).weight for name in _QKV)
        biases = tuple(getattr(self, name).bias for name in _QKV)
        if any(not isinstance(t, torch.Tensor) or hasattr(t, "placements") for t in weights + biases):
            return None  # int8 packed weights, DTensor shards, no bias
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or self.training:
            return torch.cat(weights), torch.cat(biases)
        stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in weights + biases)
        cached = self.__dict__.get(_CACHE)
        if cached is None or cached[0] != stamp:
            # Built outside inference mode so the cache stays usable by later no_grad calls.
            with torch.inference_mode(False), torch.no_grad():
                fused = (torch.cat(weights), torch.cat(biases))
            self.__dict__[_CACHE] = cached = (stamp, fused)
        return cached[1]

    def _project_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = self._fused_weights() if self.fused_qkv else None
        if fused is None:
            return super()._project_qkv(hidden_states)  # type: ignore[misc]
        qkv = linear(hidden_states, *fused, getattr(self.query, "half_matmul", None))  # (..., 3 * inner)
        return qkv.view(*qkv.shape[:-1], 3, -1, self.head_dim)  # type: ignore[attr-defined]

    def _sdpa(self, query, key, value, additive_mask, dropout_p):  # type: ignore[no-untyped-def]
        if (
            self.fast_attention_dropout
            and dropout_p > 0
            and query.device.type == "cpu"
            and not hasattr(query, "placements")
            and not torch.compiler.is_compiling()
        ):
            return self._eager(query, key, value, additive_mask)[0]  # type: ignore[attr-defined]
        return super()._sdpa(query, key, value, additive_mask, dropout_p)  # type: ignore[misc]

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        self.__dict__.pop(_CACHE, None)
        return super().train(mode)  # type: ignore[misc]


_classes: dict[type, type] = {}


def fast_attention_class(base: type) -> type:
    """``base`` with :class:`FastCpuAttention` in front (one class per base, made once)."""
    if issubclass(base, FastCpuAttention):
        return base
    if base not in _classes:
        name = f"FastCpu{base.__name__}"
        cls = type(name, (FastCpuAttention, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _classes[base] = cls  # found by name, so that a model pickled here unpickles here
    return _classes[base]


def plain_attention_class(cls: type) -> type:
    """The block's own class again (undoes :func:`fast_attention_class`)."""
    if issubclass(cls, FastCpuAttention):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, FastCpuAttention))
    return cls


def forget_cached_weights(model: nn.Module) -> None:
    """Drop every cached fused Q/K/V weight of ``model`` (after weights changed behind autograd's back)."""
    for module in model.modules():
        module.__dict__.pop(_CACHE, None)
