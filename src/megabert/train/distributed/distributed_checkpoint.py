"""Checkpoints of sharded runs (torch.distributed.checkpoint), resumable under another layout.

A parallel checkpoint keeps the layout of :mod:`megabert.train.engine.checkpoint` and adds one folder::

    step-00000100/
      dcp/                 model + optimizer state, one file per rank plus .metadata (DCP): each
                           tensor is stored as the shards the ranks held, with their offsets
      model/               the whole model as a Hugging Face folder (gathered from the shards),
                           so every checkpoint loads with from_pretrained from any layout
      trainer_state.pt     scheduler, grad scaler, every rank's RNG state, the data position,
                           the layout it was written under
      trainer_state.json   readable position, model config, run signature; written last

Every rank writes its own shards into ``.step-N.partial`` (the name the CheckpointManager's
cleanup removes), global rank 0 writes the rest and renames the folder into place when all is there.

Loading asks DCP for the tensors in the *current* layout (TP=2 shards resume as TP=1 whole
tensors, DP=2 as DP=1, FSDP as DDP...): DCP reads the overlapping pieces of the saved shards.
A single-process checkpoint (no ``dcp/``) loads too: the full weights from ``model/`` and the
optimizer's plain state dict, sharded on the way in. A resume may change the data-parallel
size, the gradient accumulation and the per-rank batch as long as the samples per optimizer
step stay the same; the data position is then converted through the samples consumed.

Both are checkpoint formats of :class:`megabert.train.engine.checkpoint.CheckpointManager`,
handed to it by the layout's hooks (``checkpoint_format()``): :class:`DCPFormat` for a run of
several processes, :class:`AnyLayoutFormat` (the single-process format, loading any layout's
checkpoint) for a job's single process. They see a ``TrainingSnapshot``, never the Trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from megabert.errors import UserError
from megabert.train.engine import checkpoint as ckpt
from megabert.train.engine.checkpoint import TrainingSnapshot, TrainState

if TYPE_CHECKING:
    from megabert.train.engine.trainer import DistributedHooks


class ProcessLayout(Protocol):
    """What a checkpoint needs to know of the process layout (a ParallelContext has it)."""

    rank: int
    world_size: int
    tp: int
    is_main: bool
    data_parallel: str  # "ddp" | "fsdp"

DCP_DIR = "dcp"
FORMAT = "dcp"
# Signature entries a resume may change (the samples per optimizer step are checked instead).
LAYOUT_KEYS = ("grad_accum", "world_size", "batch_size")
# Optimizer param-group entries that say how it runs, not where it is.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


# ---------------------------------------------------------------------------- full weights
def _is_dtensor(tensor: Any) -> bool:
    return hasattr(tensor, "placements") and hasattr(tensor, "full_tensor")


@contextlib.contextmanager
def full_weights(model: nn.Module, writeback: bool = False) -> Iterator[nn.Module]:
    """Inside the context ``model`` holds whole (unsharded) parameters on every rank.

    Each sharded (DTensor) parameter is gathered -- a collective, so every rank must enter --
    and registered in its place under all its names (tied weights stay tied); plain parameters
    are left as they are. On exit the sharded parameters come back; with ``writeback`` the
    whole tensors' values (e.g. a loaded checkpoint) are first copied into the local shards.
    A model without DTensor parameters is untouched (no collectives).
    """
    owners: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and _is_dtensor(param):
                owners.append((module, name, param))
    if not owners:
        yield model
        return
    whole: dict[int, nn.Parameter] = {}
    for _, _, param in owners:  # the same order on every rank: the collectives line up
        if id(param) not in whole:
            whole[id(param)] = nn.Parameter(param.full_tensor().detach().clone(), requires_grad=param.requires_grad)
    for module, name, param in owners:
        module._parameters[name] = whole[id(param)]
    try:
        yield model
    finally:
        for module, name, param in owners:
            module._parameters[name] = param
    if writeback:
        from torch.distributed.tensor import distribute_tensor

        done: set[int] = set()
        with torch.no_grad():
            for _, _, param in owners:
                if id(param) in done:
                    continue
                done.add(id(param))
                # Every rank holds the same whole tensor: each keeps its own slice (src_data_rank=None).
                shard = distribute_tensor(
                    whole[id(param)].data.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                )
                param.to_local().copy_(shard.to_local())


# ----------------------------------------------------------------------------- the layout
def layout_record(snapshot: TrainingSnapshot, context: "ProcessLayout | None", data_parallel: int) -> dict[str, Any]:
    """How the run is split (stored with the checkpoint, compared on resume)."""
    micro = snapshot.micro_batch_samples
    return {
        "world_size": context.world_size if context is not None else 1,
        "data_parallel": data_parallel,
        "tensor_parallel": context.tp if context is not None else 1,
        "data_parallel_mode": context.data_parallel if context is not None else "ddp",
        "grad_accum": snapshot.grad_accum,
        "micro_batch_samples": micro,
        "global_batch": micro * snapshot.grad_accum if micro is not None else None,
    }


def _saved_layout(info: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The layout of a checkpoint, also for one written by the single-process Trainer."""
    layout = state.get("layout") or info.get("layout")
    if layout:
        return dict(layout)
    signature = info.get("signature") or {}
    accum = int(signature.get("grad_accum", 1))
    micro_batches = int(info.get("micro_batches", 0))
    micro = int(info.get("samples", 0)) // micro_batches if micro_batches else None
    return {
        "world_size": int(signature.get("world_size", 1)),
        "data_parallel": int(signature.get("world_size", 1)),
        "tensor_parallel": 1,
        "grad_accum": accum,
        "micro_batch_samples": micro,
        "global_batch": micro * accum if micro is not None else None,
    }


def _check_resumable(folder: Path, info: dict[str, Any], snapshot: TrainingSnapshot) -> None:
    """UserError when the checkpoint is of another model or run (layout changes are allowed)."""
    problems = []
    model_config = snapshot.model_config
    if model_config is not None and info.get("model_config") is not None:
        saved_config = dict(info["model_config"])
        if model_config.get("problem_type") is None:
            # Set by the first forward pass from the labels (classification heads): not a setting.
            saved_config["problem_type"] = None
        problems += ckpt.describe_differences(saved_config, model_config)
    saved = {k: v for k, v in (info.get("signature") or {}).items() if k not in LAYOUT_KEYS}
    now = {k: v for k, v in snapshot.signature.items() if k not in LAYOUT_KEYS}
    problems += ckpt.describe_differences(saved, now, ckpt.ADDED_SIGNATURE_KEYS)
    if problems:
        shown = "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        raise ckpt.IncompatibleCheckpoint(
            f"cannot resume from {folder}: it was written for a different configuration ({shown}). "
            "Resume with the same settings, or start a new run in another output folder."
        )


def _resume_position(folder: Path, saved: dict[str, Any], now: dict[str, Any], position: dict[str, Any]) -> int:
    """The micro-batch to continue from under the current layout."""
    micro_batches = int(position["micro_batches"])
    same = all(saved.get(k) == now.get(k) for k in ("data_parallel", "grad_accum", "micro_batch_samples"))
    if same:
        return micro_batches
    if saved.get("global_batch") is None or now.get("global_batch") is None:
        raise ckpt.IncompatibleCheckpoint(
            f"cannot resume {folder} under another data layout (it was written with data parallel "
            f"{saved.get('data_parallel')}, grad accum {saved.get('grad_accum')}; now {now.get('data_parallel')}, "
            f"{now.get('grad_accum')}): the batch source does not say its batch size. Resume with the same layout."
        )
    if saved["global_batch"] != now["global_batch"]:
        raise ckpt.IncompatibleCheckpoint(
            f"cannot resume {folder}: it took {saved['global_batch']} samples per optimizer step "
            f"(batch x grad accum x data parallel), this run takes {now['global_batch']}. Keep "
            "batch size x grad accum x data-parallel ranks the same when changing the layout."
        )
    samples = int(position["samples"])
    return samples // int(now["micro_batch_samples"])


# ----------------------------------------------------------------------------------- save
def _publish(partial: Path, target: Path) -> None:
    """Rename the finished folder into place (replacing an older one of the same step)."""
    hidden = None
    if target.exists():
        hidden = target.with_name(f".{target.name}.deleting")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(target, hidden)
    os.replace(partial, target)
    if hidden is not None:
        shutil.rmtree(hidden, ignore_errors=True)


def save_distributed_checkpoint(
    snapshot: TrainingSnapshot, target: Path, context: "ProcessLayout", hooks: "DistributedHooks"
) -> Path | None:
    """Write checkpoint folder ``target`` from every rank; returns it on global rank 0, else None.

    Must be called on every rank (collectives). See the module docstring for the layout; the
    CheckpointManager prunes and waits for all ranks afterwards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = context.is_main
    root = target.parent
    partial = root / f".{target.name}.partial"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    dist.barrier()  # the folder exists before anyone writes into it

    model_state, optimizer_state = get_state_dict(snapshot.model, snapshot.optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(partial / DCP_DIR))
    rng_states = hooks.gather_object(ckpt.capture_rng_state())
    layout = layout_record(snapshot, context, hooks.world_size)
    with full_weights(snapshot.model):
        if main:
            ckpt.save_model(snapshot.model, partial / ckpt.MODEL_DIR)
            if snapshot.save_extras is not None:
                snapshot.save_extras(partial / ckpt.MODEL_DIR)
    if not main:
        return None
    position = snapshot.position
    torch.save(
        {
            "scheduler": snapshot.scheduler.state_dict(),
            "scaler": snapshot.scaler.state_dict() if snapshot.scaler is not None else None,
            "rng": rng_states,
            "position": ckpt.position_record(position),
            "layout": layout,
        },
        partial / ckpt.STATE_FILE,
    )
    record = {
        "format_version": ckpt.FORMAT_VERSION,
        "format": FORMAT,
        "step": position.step,
        "saved_at": time.time(),
        **ckpt.snapshot_info(snapshot),
        "layout": layout,
        # Every rank's shards are written (dcp.save returned on all of them): sizes for resume checks.
        "files": ckpt.file_sizes(partial),
    }
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    (partial / ckpt.INFO_FILE).write_text(text, encoding="utf-8")  # last: marks the folder complete
    _publish(partial, target)
    return target


# ----------------------------------------------------------------------------------- load
def _optimizer_state_by_name(plain: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A plain optimizer state dict (parameters numbered) keyed by parameter names instead."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in plain["param_groups"]):
        raise UserError("the checkpoint's optimizer state does not match the model's parameters")
    state = {order[int(index)]: value for index, value in plain["state"].items()}
    groups = [{**group, "params": [order[int(i)] for i in group["params"]]} for group in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_any_checkpoint(
    folder: str | os.PathLike, snapshot: TrainingSnapshot, context: "ProcessLayout | None", data_parallel: int = 1
) -> TrainState:
    """Restore ``snapshot`` from a parallel or single-process checkpoint, in the current layout.

    Weights and optimizer state are re-sharded for this run's mesh; the scheduler, grad scaler,
    RNG state (this rank's when the world size is unchanged, else rank 0's) are restored and
    the data position returned (converted through the samples consumed when the layout changed).
    Every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict, set_state_dict

    folder = Path(folder)
    info = ckpt.read_info(folder)
    _check_resumable(folder, info, snapshot)
    state = ckpt.load_state(folder)
    model, optimizer = snapshot.model, snapshot.optimizer
    implementation = [{k: g[k] for k in _IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    if (folder / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = get_state_dict(model, optimizer)
        wanted = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(wanted, checkpoint_id=str(folder / DCP_DIR))
        except Exception as exc:  # noqa: BLE001 - DCP raises CheckpointException and others
            text = str(exc).strip()
            raise UserError(f"checkpoint {folder}: cannot read {DCP_DIR}/ ({text.splitlines()[0] if text else type(exc).__name__})") from None
        set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optimizer"])
    else:
        with full_weights(model, writeback=True):
            ckpt.load_model_weights(model, folder / ckpt.MODEL_DIR)
        by_name = _optimizer_state_by_name(state["optimizer"], model, optimizer)
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    # How the optimizer runs (fused kernel or not...) is this run's choice, not the checkpoint's:
    # a fused single-process optimizer's groups must not switch a DTensor run to the fused kernel.
    for group, flags in zip(optimizer.param_groups, implementation):
        group.update(flags)
    snapshot.scheduler.load_state_dict(state["scheduler"])
    if snapshot.scaler is not None and state.get("scaler"):
        snapshot.scaler.load_state_dict(state["scaler"])

    world = context.world_size if context is not None else 1
    rank = context.rank if context is not None else 0
    rng_states = state["rng"]
    ckpt.restore_rng_state(rng_states[rank] if len(rng_states) == world else rng_states[0])

    now = layout_record(snapshot, context, data_parallel)
    micro_batches = _resume_position(folder, _saved_layout(info, state), now, state["position"])
    return ckpt.saved_position(state["position"], info, micro_batches)


# -------------------------------------------------------------------------------- formats
class AnyLayoutFormat(ckpt.SingleProcessFormat):
    """The single-process format, which loads a checkpoint of any layout (a parallel run's too)."""

    def __init__(self, hooks: "DistributedHooks", context: "ProcessLayout | None" = None) -> None:
        super().__init__(hooks)
        self.context = context

    def load(self, folder: Path, snapshot: TrainingSnapshot) -> TrainState:
        return load_any_checkpoint(folder, snapshot, self.context, self.hooks.world_size)


class DCPFormat(AnyLayoutFormat):
    """Every rank writes its shards (torch.distributed.checkpoint); see the module docstring."""

    def __init__(self, hooks: "DistributedHooks", context: "ProcessLayout") -> None:
        super().__init__(hooks, context)

    def save(self, snapshot: TrainingSnapshot, target: Path) -> Path | None:
        return save_distributed_checkpoint(snapshot, target, self.context, self.hooks)
