"""Write a ``.safetensors`` file one tensor at a time, each tensor made only when it is written.

``safetensors.torch.save_file`` needs every tensor alive at once. Converting a tensor-parallel
checkpoint, each merged tensor is a new copy, so that would hold the memory-mapped shards and
a full merged model together (2x the checkpoint). The format is simple enough to stream: an
8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range (``data_offsets``, relative to the end of the header), then the raw little-endian bytes
back to back. Knowing every shape and dtype up front (the converter does, from the config),
we write the header first and then each tensor as it is produced, and let it go.
Files are read back with the safetensors library itself in the tests.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PendingTensor", "write_safetensors"]

# torch dtype -> safetensors dtype name
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_ALIGN = 8  # the header is padded so tensor data starts 8-byte aligned, as safetensors does


@dataclass
class PendingTensor:
    """A tensor to be written: its final shape and dtype, and how to make it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(
    path: str | Path,
    tensors: dict[str, PendingTensor],
    metadata: dict[str, str] | None = None,
    progress: Iterable | None = None,
) -> None:
    """Write ``tensors`` (in dict order) to ``path``; each ``make()`` is called once, then released.

    A made tensor whose shape or dtype differs from what was announced raises ValueError
    (the header is already written; the caller writes into a temporary folder).
    ``progress``: an optional tqdm bar, advanced by one per tensor.
    """
    if sys.byteorder != "little":  # safetensors stores little-endian bytes
        raise RuntimeError("writing safetensors on a big-endian machine is not supported")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, pending in tensors.items():
        if pending.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {pending.dtype} cannot be stored in safetensors")
        size = pending.nbytes
        header[name] = {"dtype": _DTYPE_NAMES[pending.dtype], "shape": list(pending.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, pending in tensors.items():
            tensor = pending.make()
            if tuple(tensor.shape) != tuple(pending.shape) or tensor.dtype != pending.dtype:
                raise ValueError(
                    f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, announced {pending.shape} {pending.dtype}"
                )
            # raw bytes of a contiguous CPU tensor, without another copy for the write
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            handle.write(memoryview(data))
            del tensor, data
            if progress is not None:
                progress.update(1)
