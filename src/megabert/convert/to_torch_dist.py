"""Hugging Face model folder -> Megatron Core ``torch_dist`` checkpoint, written in one process.

The output is what Megatron-LM's ``--ckpt-format torch_dist`` saves for a megatron-core
``BertModel`` (local layer spec), so that ``megatron.core.dist_checkpointing.load`` fills that
model and Megatron-LM's ``--load`` accepts the folder::

    OUT/
        latest_checkpointed_iteration.txt   # "release", or the iteration
        release/ (or iter_NNNNNNN/)
            metadata.json   # {"sharded_backend": "torch_dist", ...}: megatron-core's CheckpointingConfig
            common.pt       # torch.save({"args": Namespace, "iteration", "checkpoint_version": 3.0, ...})
            .metadata       # torch.distributed.checkpoint Metadata: every tensor's global shape and chunks
            __0_0.distcp    # the chunks, one torch.save record each

Key layout (megatron-core's ``BertModel.sharded_state_dict()``): the layers' tensors are one
global tensor per name with a leading ``num_layers`` axis
(``encoder.layers.self_attention.linear_qkv.weight`` of shape ``(layers, 3H, H)``), saved as one
chunk per layer as megatron-core does. The local spec's separate LayerNorms are saved under
the Transformer Engine names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``),
as megatron-core maps them, so one checkpoint serves both specs. The ``_extra_state`` entries
megatron-core asks for when loading (one per Linear and layer, and the output layer's) are
written too, holding ``None`` as a local-spec model saves them; without them
``dist_checkpointing.load`` stops on missing keys.

A torch_dist checkpoint is not split by rank: Megatron-LM loads it at any TP x PP layout.
It is written with ``torch.distributed.checkpoint`` directly (no process group, no Megatron
import): a planner lists the chunks and makes each tensor only when the writer asks for it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megabert.config import MegatronBertConfig
from megabert.convert.keys import CORE_RULES, Rule
from megabert.convert.qkv import fuse_qkv
from megabert.convert.sources import TRACKER_NAME

__all__ = [
    "EXTRA_STATE_LINEARS", "TORCH_DIST_CONFIG", "TorchDistTensor", "core_tensors", "extra_state_keys", "write_torch_dist",
]

logger = logging.getLogger(__name__)

# megatron-core's CheckpointingConfig, as `dist_checkpointing.save` writes it to metadata.json.
TORCH_DIST_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# The Linear modules of a local-spec layer with an `_extra_state` (a ShardedObject per layer).
EXTRA_STATE_LINEARS = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
# The local spec's norm modules: megatron-core saves them under the TE names (the rules'
# `linear_qkv.layer_norm_*` / `linear_fc1.layer_norm_*`), so these spellings are not written.
_LOCAL_NORM_NAMES = (".input_layernorm.", ".pre_mlp_layernorm.")
_LAYER = "layers.{layer}."


@dataclass(frozen=True)
class TorchDistTensor:
    """One global tensor of the checkpoint; ``make(layer)`` builds one layer's slice (or the whole, layer None).

    ``layers``: for a tensor stacked over layers, their count (``shape`` is then one layer's).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[int | None], torch.Tensor]
    layers: int | None = None

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.shape if self.layers is None else (self.layers, *self.shape)


def _wanted(rule: Rule, binary_head: bool, write_token_types: bool, untied: bool) -> bool:
    if any(name in rule.source for name in _LOCAL_NORM_NAMES):
        return False
    return {
        "binary": binary_head, "tokentype": write_token_types, "output_weight": untied,
    }.get(rule.group, True)  # fmt: skip


def core_tensors(
    state: dict[str, torch.Tensor],
    config: MegatronBertConfig,
    *,
    binary_head: bool,
    write_token_types: bool,
    untied: bool,
) -> list[TorchDistTensor]:
    """The megatron-core BertModel tensors of ``state`` (checked HF tensors under ``bert.``/``cls.`` names).

    The key table is :data:`keys.CORE_RULES` read backwards, the per-layer ``{layer}`` dropped
    from the key (the layer is the leading axis instead).
    """
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    out: list[TorchDistTensor] = []
    for rule in CORE_RULES:
        if not _wanted(rule, binary_head, write_token_types, untied):
            continue
        stacked = "{layer}" in rule.source
        key = rule.source.replace(_LAYER, "layers.") if stacked else rule.source

        def make(layer: int | None, rule: Rule = rule) -> torch.Tensor:
            names = [t.format(layer=layer) if layer is not None else t for t in rule.targets]
            if rule.transform == "qkv":
                # megatron-core's fused layout: [heads, (q, k, v), head_dim] rows, checkpoint version 3
                return fuse_qkv(*(state[n] for n in names), heads, 3.0)
            return state[names[0]]

        first = [t.format(layer=0) for t in rule.targets]
        shape = tuple(state[first[0]].shape)
        if rule.transform == "qkv":
            shape = (3 * shape[0], *shape[1:])
        out.append(TorchDistTensor(key, shape, state[first[0]].dtype, make, layers if stacked else None))
    return out


def extra_state_keys(num_layers: int) -> list[str]:
    """The ``_extra_state`` ShardedObject keys megatron-core's local-spec BertModel loads (its unique keys)."""
    keys = [
        f"encoder.layers.{linear}._extra_state/shard_{layer}_{num_layers}"
        for layer in range(num_layers) for linear in EXTRA_STATE_LINEARS
    ]  # fmt: skip
    keys.append("output_layer._extra_state/shard_0_1")
    return keys


def _planner_and_writer(tensors: list[TorchDistTensor], objects: list[str], folder: Path):
    """A save planner listing every chunk of ``tensors`` (one per layer) and the byte ``objects``; its writer."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    by_key = {t.key: t for t in tensors}
    # torch.save([obj.data for the rank's objects]) is how megatron-core stores a ShardedObject.
    empty = io.BytesIO()
    torch.save([None], empty)
    none_record = empty.getvalue()

    class Planner(DefaultSavePlanner):
        """Chunks from the table, not from a state dict; each tensor made when the writer asks."""

        def create_local_plan(self) -> SavePlan:
            items = []
            for tensor in tensors:
                size = torch.Size(tensor.global_shape)
                properties = TensorProperties(dtype=tensor.dtype)
                zeros = (0,) * len(tensor.shape)
                starts = [()] if tensor.layers is None else [(layer,) for layer in range(tensor.layers)]
                for start in starts:
                    offsets = torch.Size(start + zeros)
                    sizes = torch.Size(((1,) if start else ()) + tensor.shape)
                    items.append(WriteItem(
                        index=MetadataIndex(tensor.key, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, sizes), properties, size),
                    ))  # fmt: skip
            items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(none_record)
            tensor = by_key[write_item.index.fqn]
            if tensor.layers is None:
                return tensor.make(None)
            return tensor.make(int(write_item.index.offset[0])).unsqueeze(0)

    class Writer(FileSystemWriter):
        def storage_meta(self):
            return None  # it would record the temp folder's path as the checkpoint id

    # thread_count=1, one file: the chunks are made and written one at a time, in this thread.
    writer = Writer(folder, single_file_per_rank=True, thread_count=1)
    planner = Planner(flatten_state_dict=False, flatten_sharded_tensors=False)
    return planner, writer


def write_torch_dist(
    root: Path,
    tensors: list[TorchDistTensor],
    *,
    args: argparse.Namespace,
    iteration: int | None,
    num_layers: int,
) -> Path:
    """Write a Megatron-LM run folder at ``root`` (which must exist): tracker file and the iteration folder.

    ``iteration`` None: a ``release`` checkpoint (Megatron-LM then starts at iteration 0 and
    loads neither optimizer nor RNG state, which this checkpoint does not have). Returns the
    iteration folder.
    """
    import torch.distributed.checkpoint as dcp

    folder = root / ("release" if iteration is None else f"iter_{iteration:07d}")
    folder.mkdir()
    planner, writer = _planner_and_writer(tensors, extra_state_keys(num_layers), folder)
    with warnings.catch_warnings():
        # dcp.save warns on every single-process save, even when asked for one (no_dist)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration or 0,
        "num_floating_point_operations_so_far": 0,
    }
    torch.save(common, folder / "common.pt")
    (folder / "metadata.json").write_text(json.dumps(TORCH_DIST_CONFIG), encoding="utf-8")
    (root / TRACKER_NAME).write_text("release" if iteration is None else str(iteration), encoding="utf-8")
    logger.info("%s: torch_dist checkpoint, %d tensors, %d layers", folder, len(tensors), num_layers)
    return folder
