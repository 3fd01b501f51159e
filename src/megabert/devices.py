"""The one place where a user's device and dtype words become torch objects (with clear errors)."""

from __future__ import annotations

import torch

from megabert.errors import UserError

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def resolve_device(spec: str | int | torch.device | None, local_rank: int | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else the CPU; an int is a CUDA index.

    ``local_rank`` (a torchrun rank on this node): ``auto`` and a bare ``cuda`` mean this rank's
    GPU, ``cuda:LOCAL_RANK``. A device this machine does not have is a UserError naming it.
    """
    if spec is None or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = f"cuda:{spec}" if spec >= 0 else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"device {spec!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"device {spec!r} was asked for, but this torch has no CUDA device available (use --device cpu)")
    count = torch.cuda.device_count()
    if device.index is None and local_rank is not None:
        if local_rank >= count:
            raise UserError(f"local rank {local_rank} has no GPU: this node has {count}; lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
    if device.index is not None and device.index >= count:
        raise UserError(f"device {spec!r}: this machine has {count} CUDA device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, recorded: str | None = None) -> torch.dtype | str | None:
    """A floating-point torch dtype from a name (``float32``, ``bf16``, ``torch.float16``...) or a dtype.

    ``None`` stays None (the caller's default). ``"auto"`` is the dtype a model folder records:
    ``recorded`` (e.g. ``config.torch_dtype``) when given, else float32 when ``recorded`` is
    the empty string, else ``"auto"`` is returned for the loader to decide.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise UserError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if dtype == "auto":
        if recorded is None:
            return "auto"
        dtype = recorded or "float32"
    name = DTYPE_ALIASES.get(str(dtype), str(dtype).replace("torch.", ""))
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UserError(f"dtype {dtype!r} is not one of float32, bfloat16, float16, auto: it is not a floating-point torch dtype")
    return resolved
