"""Load every shard of a Megatron-LM checkpoint (safely, memory-mapped) and check they belong together.

The result lists the model's pipeline *stages* in layer order, each as one flat state dict
per tensor-parallel rank (nested dicts joined with dots: ``language_model.embedding.
word_embeddings.weight``). With interleaved (virtual) pipeline parallelism a rank's file
holds ``model0``, ``model1``, …; chunk ``v`` of pipeline rank ``p`` is stage ``v * P + p``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from megabert.convert.megatron_args import arg
from megabert.convert.qkv import check_version
from megabert.safe_pickle import safe_load
from megabert.convert.sources import ShardSet
from megabert.errors import UserError

__all__ = ["LEGACY", "CORE", "LoadedCheckpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

LEGACY = "legacy"  # language_model.* names (Megatron-LM's own BERT, NGC checkpoints)
CORE = "core"  # Megatron Core names (embedding.*, encoder.layers.*, output_layer.*)


@dataclass
class LoadedCheckpoint:
    """All shards of one checkpoint, flattened, with the metadata they agree on."""

    # stages[s][tp] -> flat state dict of pipeline stage s on tensor rank tp
    stages: list[list[dict[str, Any]]]
    # files[s][tp] -> where that state dict came from (for messages)
    files: list[list[str]]
    tensor_parallel: int
    args: Any
    version: float
    iteration: Any
    layout: str
    where: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline_stages(self) -> int:
        return len(self.stages)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one dict with dotted keys (Megatron nests by module; leaves are tensors)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _strip_module_prefix(flat: dict[str, Any]) -> dict[str, Any]:
    # Some wrappers save `module.` in front of every key; the tables do not expect it.
    while flat and all(k.startswith("module.") for k in flat):
        flat = {k[len("module."):]: v for k, v in flat.items()}
    return flat


def _model_chunks(obj: Mapping, path: Path) -> list[Mapping]:
    if "model" in obj:
        chunks = [obj["model"]]
    else:
        count = 0
        while f"model{count}" in obj:
            count += 1
        if count == 0:
            keys = ", ".join(sorted(str(k) for k in obj)[:8])
            raise UserError(f"{path} holds no model state (no 'model' entry; its entries: {keys})")
        chunks = [obj[f"model{i}"] for i in range(count)]
    for chunk in chunks:
        if not isinstance(chunk, Mapping):
            raise UserError(f"{path}: the 'model' entry is a {type(chunk).__name__}, not a state dict")
    return chunks


def _layout_of(keys: list[str], where: str) -> str:
    legacy = any(k.startswith("language_model.") or k.startswith("word_embeddings_for_head.") for k in keys)
    core = any(k.startswith(("embedding.", "encoder.", "output_layer.", "pooler.", "decoder.")) for k in keys)
    if legacy and core:
        raise UserError(f"{where} mixes legacy (language_model.*) and Megatron Core (embedding.*, encoder.*) names")
    if not legacy and not core:
        sample = ", ".join(keys[:5])
        raise UserError(f"{where} does not look like a Megatron BERT state dict (keys: {sample})")
    return LEGACY if legacy else CORE


def _agree(values: dict[str, Any], what: str, where: str) -> Any:
    """The one value all shards hold for ``what``, or a UserError listing who holds what."""
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        shown = ", ".join(f"{name}: {value!r}" for name, value in list(values.items())[:6])
        raise UserError(f"the shards of {where} disagree on the {what} ({shown}); they are not one checkpoint")
    return next(iter(values.values()))


def load_checkpoint(shards: ShardSet) -> LoadedCheckpoint:
    """Load and cross-check every shard in ``shards`` (see the module docstring for the result)."""
    raw: dict[tuple[int, int], Mapping] = {}
    names: dict[tuple[int, int], str] = {}
    items = sorted(shards.files.items())
    for (pp, tp), path in tqdm(items, desc="reading shards", unit="file", disable=len(items) < 2 or None):
        obj = safe_load(path)
        if not isinstance(obj, Mapping):
            raise UserError(f"{path} holds a {type(obj).__name__}, not a Megatron checkpoint dict")
        raw[(pp, tp)] = obj
        names[(pp, tp)] = shards.rank_name(pp, tp) if len(items) > 1 else str(path)

    where = shards.where
    iteration = _agree({names[k]: o.get("iteration") for k, o in raw.items()}, "iteration", where)
    version_raw = _agree({names[k]: o.get("checkpoint_version", 0) for k, o in raw.items()}, "checkpoint_version", where)
    version = check_version(version_raw if version_raw is not None else 0, str(shards.files[(0, 0)]))
    args = raw[(0, 0)].get("args")

    tp_size, pp_size = shards.tensor_parallel, shards.pipeline_parallel
    args_tp = arg(args, "tensor_model_parallel_size", arg(args, "model_parallel_size"))
    args_pp = arg(args, "pipeline_model_parallel_size")
    for label, from_args, found in (("tensor", args_tp, tp_size), ("pipeline", args_pp, pp_size)):
        if isinstance(from_args, int) and from_args != found:
            if shards.single_file:
                raise UserError(
                    f"{shards.files[(0, 0)]} is one shard of a checkpoint with {label}_model_parallel_size="
                    f"{from_args} (its args say so): point SRC at the whole save folder"
                )
            raise UserError(
                f"{where}: the checkpoint's args say {label}_model_parallel_size={from_args}, but "
                f"{found} {label}-parallel rank(s) were found: rank folders are missing or extra"
            )

    # chunks[(pp, tp)] -> list of virtual stages held by that rank
    chunks = {k: _model_chunks(o, shards.files[k]) for k, o in raw.items()}
    virtual = _agree({names[k]: len(c) for k, c in chunks.items()}, "number of model chunks", where)
    stages: list[list[dict[str, Any]]] = []
    files: list[list[str]] = []
    for v in range(virtual):
        for pp in range(pp_size):
            stage, stage_files = [], []
            for tp in range(tp_size):
                flat = _strip_module_prefix(_flatten(chunks[(pp, tp)][v]))
                label = str(shards.files[(pp, tp)]) + (f" (model{v})" if virtual > 1 else "")
                stage.append(flat)
                stage_files.append(label)
            stages.append(stage)
            files.append(stage_files)

    all_keys = [k for stage in stages for k in stage[0]]
    layout = _layout_of(all_keys, where)
    tensors = sum(isinstance(v, torch.Tensor) for stage in stages for flat in stage for v in flat.values())
    logger.info("%s: %d file(s), %d tensors, layout %s, checkpoint_version %g", where, len(items), tensors, layout, version)
    return LoadedCheckpoint(
        stages=stages,
        files=files,
        tensor_parallel=tp_size,
        args=args,
        version=version,
        iteration=iteration,
        layout=layout,
        where=where,
    )
