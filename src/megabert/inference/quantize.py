"""Int8 dynamic quantization of a model's Linear layers, for CPU inference.

Every ``nn.Linear`` (Q/K/V, attention output, MLP, pooler, heads) gets its weight stored as
int8, one scale per output channel; activations are quantized per batch at run time and the
GEMMs run in int8 (fbgemm/x86 kernels). Embeddings, LayerNorms, softmax and the residual
stream stay in float32. On a CPU with VNNI this is several times faster than float32 for a
base-sized model, at a small cost in accuracy (see ``benchmarks/quantization.py`` and
``docs/inference.md``).

The quantized model is for inference only: its Linears have no float weights, so it cannot
be trained, saved with ``save_pretrained`` or moved to a GPU. Keep the float model for that.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from megabert.errors import UserError
from megabert.fast_paths import apply_cpu_fast_paths

# The MLM/causal-LM vocabulary projection (tied to the word embeddings in float32).
OUTPUT_LAYER_NAMES = ("cls.predictions.decoder",)


def _ensure_quantized_engine() -> None:
    """Make sure an int8 CPU backend is selected; a UserError when this torch build has none.

    The engine is global: quantized Linears pack their weights for it and run with it, so it
    is set once (only when none is selected yet) and not switched back.
    """
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        raise UserError("this torch build has no int8 CPU kernels (no quantized engine is available)")
    if torch.backends.quantized.engine == "none":
        preferred = [e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines]
        torch.backends.quantized.engine = (preferred or engines)[0]


def quantize_dynamic_int8(
    model: nn.Module,
    *,
    quantize_output_layer: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with every ``nn.Linear`` replaced by an int8 dynamically quantized Linear.

    ``model`` must be a float32 model on the CPU. ``quantize_output_layer=False`` keeps the MLM
    vocabulary projection (``cls.predictions.decoder``) in float32: slower, but the logits over
    the vocabulary stay closer to the float model's. ``inplace=False`` (default) leaves
    ``model`` untouched and quantizes a copy. The result is in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise UserError("the model has no parameters to quantize")
    devices = {p.device.type for p in params}
    if devices != {"cpu"}:
        raise UserError(
            f"int8 dynamic quantization runs on the CPU only; the model is on {', '.join(sorted(devices))} "
            "(load it with device='cpu')"
        )
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if dtypes != {torch.float32}:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        raise UserError(f"int8 quantization needs a float32 model, got {names} weights (load it with dtype='float32')")

    _ensure_quantized_engine()
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    target = model if inplace else copy.deepcopy(model)
    # torch's quantizer swaps modules of exactly nn.Linear: the CPU fast paths' Linear subclass
    # goes back to the plain class first (the int8 kernels are the fast path here).
    apply_cpu_fast_paths(target, "off")
    skip = set() if quantize_output_layer else set(OUTPUT_LAYER_NAMES)
    # Name -> qconfig: one entry per Linear to quantize (names let us leave the output layer out).
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in target.named_modules()
        if isinstance(module, nn.Linear) and name not in skip
    }
    if not spec:
        raise UserError("the model has no Linear layers to quantize")
    target.eval()
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call; the API still works.
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return quantize_dynamic(target, qconfig_spec=spec, dtype=torch.qint8, inplace=True)


def count_quantized_linears(model: nn.Module) -> tuple[int, int]:
    """(int8 Linears, float Linears) in ``model``: what :func:`quantize_dynamic_int8` changed."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    quantized = sum(isinstance(m, DynamicQuantizedLinear) for m in model.modules())
    floating = sum(isinstance(m, nn.Linear) for m in model.modules())  # plain or CpuLinear
    return quantized, floating
