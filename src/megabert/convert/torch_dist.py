"""Read a Megatron ``torch_dist`` checkpoint (``torch.distributed.checkpoint`` folder) in one process.

Megatron-LM's default save format since megatron-core 0.7 writes, per iteration folder::

    iter_0000010/
        metadata.json      # {"sharded_backend": "torch_dist", ...}
        common.pt          # torch.save of the non-tensor state: args, iteration, checkpoint_version
        .metadata          # pickled torch.distributed.checkpoint Metadata: every tensor's global
                           # shape and dtype, its chunks, and where each chunk's bytes are
        __0_0.distcp ...   # the chunk bytes: each chunk one torch.save record at (offset, length)

Tensors are saved with their *global* shapes (tensor-parallel shards are chunks of one global
tensor), and megatron-core stacks the layers' tensors along a leading ``num_layers`` axis
(``encoder.layers.self_attention.linear_qkv.weight`` of shape ``(layers, 3H, H)``).

Nothing here imports megatron-core or runs a process group: the ``.metadata`` pickle is read
with an allow-list unpickler (:func:`safe_pickle.safe_load_dcp_metadata`), ``common.pt`` with
:func:`safe_pickle.safe_load`, and each chunk's record with the weights-only loader. Tensors are
:class:`SourceTensor` placeholders: shape and dtype from the metadata, the bytes read only when
the writer asks for that tensor (one layer of a stacked tensor at a time), so memory stays at
about one tensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megabert.convert.qkv import check_version
from megabert.convert.reader import CORE, LEGACY, LoadedCheckpoint, _layout_of
from megabert.safe_pickle import safe_load, safe_load_dcp_metadata, safe_load_tensor_bytes
from megabert.convert.sources import TRACKER_NAME
from megabert.errors import UserError

__all__ = ["SourceTensor", "find_torch_dist", "is_torch_dist", "load_torch_dist"]

logger = logging.getLogger(__name__)

METADATA_NAME = ".metadata"
COMMON_NAME = "common.pt"
CONFIG_NAME = "metadata.json"
_STACKED_LAYERS = re.compile(r"^(.*\.layers)\.(?!\d+\.)(.+)$")


class SourceTensor:
    """A tensor of a torch_dist checkpoint, read when :meth:`load` is called.

    ``layer``: for a tensor stacked over layers, the index along the leading axis this stands
    for (``shape`` is then the shape of one layer).
    """

    def __init__(self, reader: _ChunkReader, key: str, full_shape: tuple[int, ...], dtype: torch.dtype,
                 layer: int | None = None) -> None:  # fmt: skip
        self.reader, self.key, self.full_shape, self.dtype, self.layer = reader, key, full_shape, dtype, layer
        self.shape = torch.Size(full_shape[1:] if layer is not None else full_shape)

    def load(self) -> torch.Tensor:
        return self.reader.read(self.key, self.full_shape, self.dtype, self.layer)

    def __repr__(self) -> str:
        where = f"[{self.layer}]" if self.layer is not None else ""
        return f"SourceTensor({self.key}{where}, {list(self.shape)}, {self.dtype})"


def materialise(value: Any) -> Any:
    """``value`` itself, or the tensor a :class:`SourceTensor` stands for."""
    return value.load() if isinstance(value, SourceTensor) else value


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


class _ChunkReader:
    """Reads tensors chunk by chunk from a torch_dist folder."""

    def __init__(self, folder: Path, chunks: dict[str, list[_Chunk]]) -> None:
        self.folder, self.chunks = folder, chunks

    def read(self, key: str, full_shape: tuple[int, ...], dtype: torch.dtype, layer: int | None) -> torch.Tensor:
        if layer is None:
            out = torch.empty(full_shape, dtype=dtype)
            lo, hi = 0, full_shape[0] if full_shape else 0
        else:
            out = torch.empty((1, *full_shape[1:]), dtype=dtype)
            lo, hi = layer, layer + 1
        covered = 0
        for chunk in self.chunks[key]:
            if full_shape and (chunk.offsets[0] >= hi or chunk.offsets[0] + chunk.sizes[0] <= lo):
                continue  # not part of the wanted layer
            where = f"{self.folder / chunk.file} (bytes {chunk.start}-{chunk.start + chunk.length}, tensor {key})"
            with open(self.folder / chunk.file, "rb") as handle:
                handle.seek(chunk.start)
                data = handle.read(chunk.length)
            if len(data) != chunk.length:
                raise UserError(f"{where}: the file ends early (truncated?)")
            tensor = safe_load_tensor_bytes(data, where)
            if tuple(tensor.shape) != chunk.sizes or tensor.dtype != dtype:
                raise UserError(
                    f"{where}: holds {list(tensor.shape)} {tensor.dtype}, but .metadata says "
                    f"{list(chunk.sizes)} {dtype}"
                )
            if full_shape:
                # The part of the chunk inside [lo, hi) along dim 0, and where it goes in `out`.
                first, last = max(lo, chunk.offsets[0]), min(hi, chunk.offsets[0] + chunk.sizes[0])
                piece = tensor.narrow(0, first - chunk.offsets[0], last - first)
                index = [slice(first - lo, last - lo)]
                index += [slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:])]
                out[tuple(index)] = piece
                covered += piece.numel()
            else:
                out.copy_(tensor)
                covered += 1
            del tensor, data
        if covered != out.numel():
            raise UserError(f"{self.folder / METADATA_NAME}: the chunks of {key} do not cover the whole tensor")
        return out[0] if layer is not None else out


def is_torch_dist(folder: Path) -> bool:
    """Whether ``folder`` is a distributed-checkpoint iteration folder (any sharded backend)."""
    return folder.is_dir() and (
        (folder / METADATA_NAME).exists() or (folder / CONFIG_NAME).is_file() or any(folder.glob("*.distcp"))
    )


def find_torch_dist(src: Path) -> Path | None:
    """The torch_dist iteration folder ``src`` is or points at (via its tracker file), else None."""
    if not src.is_dir():
        return None
    if is_torch_dist(src):
        return src
    tracker = src / TRACKER_NAME
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8", errors="replace").strip()
        chosen = src / ("release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else text)
        if is_torch_dist(chosen):
            return chosen
    return None


def _backend(folder: Path) -> None:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{folder} has no {CONFIG_NAME}: it is not a complete distributed checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    backend = config.get("sharded_backend") if isinstance(config, Mapping) else None
    if backend != "torch_dist":
        raise UserError(
            f"{config_path}: sharded_backend {backend!r} is not supported (only 'torch_dist'; "
            "re-save with Megatron-LM's --ckpt-format torch_dist or torch)"
        )


def _common(folder: Path) -> Mapping:
    path = folder / COMMON_NAME
    if not path.is_file():
        return {}
    common = safe_load(path)
    if not isinstance(common, Mapping):
        raise UserError(f"{path} holds a {type(common).__name__}, not a dict")
    return common


def load_torch_dist(folder: Path, where: str, key_prefix: str = "") -> LoadedCheckpoint:
    """All tensors of the torch_dist checkpoint in ``folder`` as one (merged) stage, read lazily.

    ``key_prefix``: a prefix every model key carries (NeMo's ``model.``), dropped; keys without
    it (optimizer state, RNG) are ignored then.
    """
    _backend(folder)
    meta_path = folder / METADATA_NAME
    if not meta_path.is_file():
        raise UserError(f"{folder} has no {METADATA_NAME}: the distributed checkpoint is incomplete")
    metadata = safe_load_dcp_metadata(meta_path)
    state = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(state, Mapping) or not isinstance(storage, Mapping):
        raise UserError(f"{meta_path} is not a torch.distributed.checkpoint Metadata")
    places: dict[tuple[str, tuple[int, ...]], Any] = {}
    for index, info in storage.items():
        offset = tuple(index.offset) if getattr(index, "offset", None) is not None else ()
        places[(index.fqn, offset)] = info
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise UserError(f"{meta_path} names shard file {name!r}, which is not a file name inside {folder}")
    missing_files = sorted({info.relative_path for info in storage.values()} - {p.name for p in folder.iterdir()})
    if missing_files:
        raise UserError(
            f"{meta_path} names shard file(s) {', '.join(missing_files[:4])} that are missing from {folder} "
            "(incomplete copy?)"
        )

    common = _common(folder)
    args = common.get("args")
    version = check_version(common.get("checkpoint_version", 3.0) or 3.0, str(folder / COMMON_NAME))
    chunks: dict[str, list[_Chunk]] = {}
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for fqn, entry in state.items():
        if not hasattr(entry, "chunks") or not hasattr(entry, "size"):
            continue  # bytes (e.g. `_extra_state`, optimizer/RNG objects): not weights
        if key_prefix:
            if not fqn.startswith(key_prefix):
                continue
        if fqn.endswith("_extra_state") or fqn.startswith(("optimizer.", "rng_state")):
            continue
        size = tuple(int(s) for s in entry.size)
        dtype = entry.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{meta_path}: tensor {fqn} has no dtype")
        parts = []
        for chunk in entry.chunks:
            offsets = tuple(int(o) for o in chunk.offsets)
            info = places.get((fqn, offsets))
            if info is None:
                raise UserError(f"{meta_path}: chunk {list(offsets)} of {fqn} has no storage entry")
            if getattr(info, "transform_descriptors", None):
                raise UserError(f"{meta_path}: {fqn} is stored with transforms {info.transform_descriptors} (not supported)")
            parts.append(_Chunk(offsets, tuple(int(s) for s in chunk.sizes), info.relative_path, int(info.offset), int(info.length)))
        if sum(math.prod(p.sizes) for p in parts) != math.prod(size):
            raise UserError(f"{meta_path}: the chunks of {fqn} do not add up to its shape {list(size)}")
        chunks[fqn] = parts
        shapes[fqn] = (size, dtype)

    reader = _ChunkReader(folder, chunks)
    gpt = sorted(k for k in shapes if k[len(key_prefix):].startswith(("decoder.", "language_model.output_layer")))
    if gpt:
        raise UserError(
            f"{where} is a GPT (decoder) checkpoint, not a BERT: found {gpt[0]}"
            + (f" and {len(gpt) - 1} more decoder.* tensors" if len(gpt) > 1 else "")
        )
    num_layers = common_layers = args_num_layers(args)
    flat: dict[str, Any] = {}
    for fqn, (size, dtype) in shapes.items():
        key = fqn[len(key_prefix):]
        stacked = _STACKED_LAYERS.match(key)
        if stacked and ".layers." in key and not re.search(r"\.layers\.\d+\.", key):
            layers = size[0] if size else 0
            if common_layers is not None and layers != common_layers:
                raise UserError(
                    f"{meta_path}: tensor {fqn} has shape {list(size)}, stacked over {layers} layers, but "
                    f"{folder / COMMON_NAME}'s args say num_layers={common_layers}"
                )
            num_layers = layers
            for layer in range(layers):
                flat[f"{stacked.group(1)}.{layer}.{stacked.group(2)}"] = SourceTensor(reader, fqn, size, dtype, layer)
        else:
            flat[key] = SourceTensor(reader, fqn, size, dtype)
    if not flat:
        raise UserError(f"{where}: no model tensors in {meta_path}")
    layout = _layout_of(sorted(flat), where)
    logger.info("%s: torch_dist checkpoint, %d tensors, %s layers, layout %s", where, len(flat), num_layers, layout)
    return LoadedCheckpoint(
        stages=[[flat]],
        files=[[str(meta_path)]],
        tensor_parallel=1,  # tensors are saved whole (global shapes)
        args=args,
        version=version,
        iteration=common.get("iteration"),
        layout=layout if layout in (CORE, LEGACY) else CORE,
        where=where,
    )


def args_num_layers(args: Any) -> int | None:
    from megabert.convert.megatron_args import arg

    value = arg(args, "num_layers")
    return int(value) if isinstance(value, int) else None
