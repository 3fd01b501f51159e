"""Tensor and data parallel training on torch.distributed (launched by torchrun).

The world is a 2-D device mesh ``(dp, tp)``: ``world_size = data_parallel x tensor_parallel``,
and ranks ``dp_rank * tp + tp_rank`` with the same ``dp_rank`` form one tensor-parallel group
(so a TP group sits on one node when ``tp`` <= GPUs per node).

Tensor parallelism (Megatron-LM's layout) is applied from outside the model with
``torch.distributed.tensor.parallel.parallelize_module``:

* ``attention.self.query/key/value`` and ``intermediate.dense``: ColwiseParallel -- each rank
  holds ``heads / tp`` attention heads and ``intermediate / tp`` MLP columns;
* ``attention.output.dense`` and ``output.dense``: RowwiseParallel -- partial sums all-reduced,
  so every layer costs two all-reduces of ``(tokens, hidden)`` forward and two backward;
* the word embeddings (RowwiseParallel: vocabulary rows split, lookups all-reduced) and the
  tied MLM decoder (ColwiseParallel on the same shards, logits all-gathered) share one
  vocabulary-sharded weight; ``replicate_vocab`` keeps both whole instead;
* everything else (LayerNorms, position/type embeddings, pooler, task heads) is replicated:
  its inputs are identical on the ranks of a TP group, and so are its gradients.

Data parallelism: ``ddp`` -- torch's DistributedDataParallel when ``tp == 1``; with ``tp > 1``
gradients are all-reduced over the DP group (bucketed) at the end of each backward that is not
inside ``no_sync``, which gives DDP's semantics for DTensor parameters. ``fsdp`` -- FSDP2
(``fully_shard``) on each transformer layer: its parameters, gradients and optimizer state
are sharded over DP; the small rest (embeddings, heads) is replicated and synced as with DDP.

Faults: the process group has a timeout (``--dist-timeout``), and a heartbeat thread per rank
(through the rendezvous store) notices a rank that died or froze and stops the others with a
message naming it, within ``--heartbeat-timeout`` seconds, even while they wait in a
collective (see :class:`Heartbeat`).

The model code needs nothing from this module: the plan is applied to a built model from
outside (``parallelize_module``, ``fully_shard``), and the attention blocks take their local head
count from the width of their sharded projections.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from megabert.devices import resolve_device
from megabert.errors import RunError, UserError
from megabert.train.distributed.distributed_checkpoint import AnyLayoutFormat, DCPFormat, full_weights
from megabert.train.engine.checkpoint import CheckpointFormat
from megabert.train.engine.trainer import Batch, DistributedHooks, ResumableLoader, as_batch_source

T = TypeVar("T")

DATA_PARALLEL_MODES = ("ddp", "fsdp")
# Exit status of a rank stopped because another rank failed (EX_SOFTWARE of sysexits.h).
EXIT_PEER_FAILURE = 70
_HEARTBEAT_PREFIX = "megabert/heartbeat/"
_BUCKET_BYTES = 25 * 2**20  # gradient all-reduce bucket (as DDP's default)


class PeerFailure(RunError):
    """Another rank died, froze or failed: this rank cannot go on."""


# ------------------------------------------------------------------------------ settings
@dataclass
class ParallelConfig:
    """How the run is split over processes (the training commands' ``distributed`` options)."""

    tensor_parallel: int = 1  # ranks sharing one model replica (heads, MLP columns, vocabulary)
    data_parallel: str = "ddp"  # ddp | fsdp (how the data-parallel replicas sync)
    replicate_vocab: bool = False  # keep word embeddings and MLM decoder whole on every TP rank
    timeout_s: float = 600.0  # a collective that takes longer fails (process-group timeout)
    heartbeat_timeout_s: float = 60.0  # a rank silent this long is declared dead (0: no heartbeat)
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> None:
        """Raise UserError naming the first bad setting."""
        tp = self.tensor_parallel
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise UserError(f"--tensor-parallel must be an integer >= 1, got {tp!r}")
        if self.data_parallel not in DATA_PARALLEL_MODES:
            raise UserError(
                f"--data-parallel must be one of {', '.join(DATA_PARALLEL_MODES)}, got {self.data_parallel!r}"
            )
        if not self.timeout_s > 0:
            raise UserError(f"--dist-timeout must be a positive number of seconds, got {self.timeout_s!r}")
        if not self.heartbeat_timeout_s >= 0:
            raise UserError(f"--heartbeat-timeout must be >= 0 seconds (0: off), got {self.heartbeat_timeout_s!r}")


# --------------------------------------------------------------------------- layout checks
def check_tensor_parallel(config: Any, tensor_parallel: int, shard_vocab: bool = True) -> None:
    """Refuse a TP degree the model cannot be split by (before any work is done).

    Heads, the MLP width and (when sharded) the vocabulary must divide evenly: each rank holds
    whole heads, and Megatron-style vocabulary shards are equal blocks of rows.
    """
    tp = tensor_parallel
    if tp == 1:
        return
    heads = config.num_attention_heads
    if heads % tp:
        fits = [d for d in range(1, heads + 1) if heads % d == 0]
        raise UserError(
            f"--tensor-parallel {tp} does not divide the model's {heads} attention heads: each rank must "
            f"hold whole heads (degrees that fit: {', '.join(map(str, fits))})"
        )
    if config.intermediate_size % tp:
        raise UserError(
            f"--tensor-parallel {tp} does not divide the MLP width intermediate_size={config.intermediate_size}"
        )
    if shard_vocab and config.vocab_size % tp:
        padded = -(-config.vocab_size // (128 * tp)) * 128 * tp
        raise UserError(
            f"--tensor-parallel {tp} does not divide the vocabulary ({config.vocab_size} rows, after "
            f"padding): pad vocab_size to a multiple of 128 x {tp} (e.g. {padded}, as Megatron-LM does) "
            "or pass --replicate-vocab"
        )


def mesh_shape(world_size: int, tensor_parallel: int) -> tuple[int, int]:
    """``(data_parallel, tensor_parallel)`` for a world; UserError when TP does not divide it."""
    if world_size % tensor_parallel:
        if world_size == 1:
            raise UserError(
                f"--tensor-parallel {tensor_parallel} needs {tensor_parallel} processes, but this is a single "
                f"process: launch with `torchrun --nproc-per-node {tensor_parallel} -m megabert ...`"
            )
        raise UserError(
            f"--tensor-parallel {tensor_parallel} does not divide the world size {world_size} "
            "(world size = tensor parallel x data parallel)"
        )
    return world_size // tensor_parallel, tensor_parallel


# ----------------------------------------------------------------------------- heartbeat
class Heartbeat:
    """A daemon thread that proves this rank alive and watches the others, through the store.

    Every ``interval`` seconds the rank bumps its counter under ``megabert/heartbeat/<rank>``
    and reads everyone's. A peer whose counter has not moved for ``timeout`` seconds (measured
    on this host's clock, so clocks need not agree) died or froze; a peer that wrote
    ``failed: ...`` raised an error. Either way this rank prints who and why, and exits with
    :data:`EXIT_PEER_FAILURE` -- from this thread, because the main thread may be blocked in a
    collective that would otherwise wait for the full process-group timeout. A rank that
    finishes normally writes ``done`` and is no longer watched. An unreachable store means rank
    0's host (or the launcher) is gone.
    """

    def __init__(self, store: Any, rank: int, world_size: int, timeout: float, exit_on_failure: bool = True) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.interval = max(0.05, min(1.0, timeout / 5))
        self.exit_on_failure = exit_on_failure
        self.failure: str | None = None
        self._stop = threading.Event()
        self._count = 0
        self._seen: dict[int, tuple[bytes, float]] = {}  # peer -> (last value, when it changed)
        self._thread = threading.Thread(target=self._run, name="megabert-heartbeat", daemon=True)

    def _key(self, rank: int) -> str:
        return f"{_HEARTBEAT_PREFIX}{rank}"

    def start(self) -> None:
        """Write the first beat (peers can read every key once all have started) and start the thread."""
        self.store.set(self._key(self.rank), "0")
        self._thread.start()

    def _fail(self, message: str) -> None:
        self.failure = message
        print(f"megabert: rank {self.rank}: {message}", file=sys.stderr, flush=True)
        if self.exit_on_failure:
            os._exit(EXIT_PEER_FAILURE)

    def _run(self) -> None:
        keys = [self._key(r) for r in range(self.world_size)]
        seen = self._seen
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self._count += 1
                self.store.set(self._key(self.rank), str(self._count))
                values = self.store.multi_get(keys)
            except Exception as exc:  # noqa: BLE001 - any store error means the store host is gone
                if self._stop.is_set():
                    return
                self._fail(
                    f"lost the rendezvous store ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                    "rank 0's host or the launcher is gone; stopping"
                )
                return
            for peer, value in enumerate(values):
                if peer == self.rank:
                    continue
                if value == b"done":
                    seen[peer] = (value, now)
                    continue
                if value.startswith(b"failed"):
                    self._fail(f"rank {peer} {value.decode(errors='replace')}; stopping this rank too")
                    return
                previous = seen.get(peer)
                if previous is None or previous[0] != value:
                    seen[peer] = (value, now)
                elif now - previous[1] > self.timeout:
                    self._fail(
                        f"rank {peer} has sent no heartbeat for {now - previous[1]:.1f} s (limit "
                        f"--heartbeat-timeout {self.timeout:g} s): it died, froze or lost its network; "
                        "stopping this rank too"
                    )
                    return

    def silent_peers(self, wait: float | None = None) -> list[tuple[int, float]]:
        """(rank, seconds since its last beat) of peers silent for over 1.5 beats, after ``wait`` seconds.

        Used after a collective failed, to name the rank that went away.
        """
        time.sleep(2.5 * self.interval if wait is None else wait)
        now = time.monotonic()
        return [
            (peer, now - when) for peer, (value, when) in sorted(self._seen.items())
            if value != b"done" and now - when > 1.5 * self.interval
        ]

    def mark_failed(self, message: str) -> None:
        """Tell the other ranks this one is stopping because of ``message``."""
        with contextlib.suppress(Exception):
            self.store.set(self._key(self.rank), f"failed: {message}"[:500])

    def stop(self) -> None:
        """Stop beating; peers stop watching this rank."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self.store.set(self._key(self.rank), "done")


# ------------------------------------------------------------------------------ gradients
def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of (possibly sharded) parameters; returns the norm.

    A DTensor gradient contributes the squares of its local shard, summed over the mesh
    dimensions it is sharded on; a replicated (plain or Replicate) gradient counts once. So
    every rank gets the norm of the whole model's gradient, as one process would.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # (id(mesh), sharded mesh dims) -> [mesh, sum of squares of the local shards]
    sums: dict[tuple[int, tuple[int, ...]], list[Any]] = {}
    for grad in grads:
        mesh, dims = None, ()
        if hasattr(grad, "placements"):
            if any(p.is_partial() for p in grad.placements):
                raise RuntimeError("a gradient is still a partial sum (unreduced DTensor); cannot take its norm")
            mesh = grad.device_mesh
            dims = tuple(i for i, p in enumerate(grad.placements) if p.is_shard())
        local = _local(grad).detach()
        entry = sums.setdefault((id(mesh), dims), [mesh, torch.zeros((), dtype=torch.float64, device=local.device)])
        entry[1] = entry[1] + local.double().pow(2).sum()
    total = 0.0
    for (_, dims), (mesh, value) in sums.items():
        for d in dims:  # sum the shards: one all-reduce per sharded mesh dimension
            dist.all_reduce(value, group=mesh.get_group(d))
        total += float(value)
    norm = torch.tensor(math.sqrt(total))
    if math.isfinite(max_norm):
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            for grad in grads:
                _local(grad).mul_(coef)
    return norm


class GradientSync(nn.Module):
    """DDP's contract for modules with DTensor (tensor-parallel) parameters.

    At the end of every backward that ran outside :meth:`no_sync`, the gradients are averaged
    over the data-parallel group: the local shards, flattened into ~25 MB buckets, one
    all-reduce each. Gradients accumulated under ``no_sync`` are included in the next sync,
    as with DDP. A parameter without a gradient on some ranks (unused there) gets zeros on
    those, as DDP's ``find_unused_parameters`` does; one unused everywhere keeps ``None``.
    """

    def __init__(self, module: nn.Module, group: Any, group_size: int) -> None:
        super().__init__()
        self.module = module
        self.group = group
        self.group_size = group_size
        self.require_sync = True
        # FSDP units reduce-scatter their own gradients: leave their parameters (and syncing) to them.
        self._fsdp = _fsdp_modules(module)
        skip = {id(p) for m in self._fsdp for p in m.parameters()}
        # Distinct trainable parameters, in a fixed order (the same on every rank).
        seen: set[int] = set(skip)
        self._params: list[nn.Parameter] = []
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                self._params.append(param)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        if self.require_sync and torch.is_grad_enabled():
            # A hook on the output runs when backward reaches it; the callback it queues runs
            # once the whole backward pass has finished, when every gradient is accumulated.
            for tensor in _tensors_in(out):
                if tensor.requires_grad:
                    tensor.register_hook(self._queue_sync)
                    break
        return out

    def _queue_sync(self, grad: torch.Tensor) -> torch.Tensor:
        torch.autograd.Variable._execution_engine.queue_callback(self.sync_gradients)
        return grad

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average the gradients over the data-parallel group (now)."""
        params = self._params
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=self.group)
        locals_: list[torch.Tensor] = []
        for param, any_grad in zip(params, has_grad.tolist()):
            if not any_grad:
                continue
            if param.grad is None:  # unused here, used elsewhere: contribute zeros
                param.grad = torch.zeros_like(param)
            locals_.append(_local(param.grad))
        for bucket in _buckets(locals_, _BUCKET_BYTES):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.group_size)
            for grad, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                grad.copy_(synced)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no all-reduce, no FSDP reduce-scatter) inside the context."""
        previous, self.require_sync = self.require_sync, False
        for unit in self._fsdp:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            self.require_sync = previous
            for unit in self._fsdp:
                unit.set_requires_gradient_sync(True, recurse=False)


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors inside a (nested) output: tensor, dataclass, dict, list or tuple."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors_in(getattr(obj, name))


def _buckets(tensors: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of same-dtype/device tensors of about ``limit`` bytes."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > limit or tensor.dtype != bucket[0].dtype or tensor.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


# ---------------------------------------------------------------------- tensor parallel plan
def _alias_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every parameter registered under more than one (module, name): the tied weights."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    return [group for group in owners.values() if len(group) > 1]


def tensor_parallel_plan(model: nn.Module, shard_vocab: bool = True) -> dict[str, Any]:
    """The ``parallelize_module`` plan of a MegatronBERT model (module name -> parallel style)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from megabert.modeling.layers import MegatronBertIntermediate, MegatronBertSelfAttention, ResidualProjection

    plan: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, MegatronBertSelfAttention):
            for projection in ("query", "key", "value"):
                plan[f"{name}.{projection}"] = ColwiseParallel()  # (.., hidden) -> (.., local heads * dim)
        elif isinstance(module, MegatronBertIntermediate):
            plan[f"{name}.dense"] = ColwiseParallel()  # (.., hidden) -> (.., intermediate / tp)
        elif isinstance(module, ResidualProjection):
            plan[f"{name}.dense"] = RowwiseParallel()  # local partial sums, all-reduced -> (.., hidden)
    if shard_vocab:
        names = {id(m): n for n, m in model.named_modules()}
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None and id(embeddings) in names:
            # ids are replicated; each rank looks up its rows, zeros elsewhere; all-reduced.
            plan[names[id(embeddings)]] = RowwiseParallel(input_layouts=Replicate())
        decoder = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if decoder is not None and id(decoder) in names:
            # Each rank's logits for its vocabulary rows, all-gathered into (.., vocab).
            plan[names[id(decoder)]] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _refuse_per_head_outputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("head_mask") is not None or (len(args) > 4 and args[4] is not None):
        raise UserError("head_mask is not supported under tensor parallelism (each rank holds only some heads)")
    if kwargs.get("output_attentions"):
        raise UserError("output_attentions is not supported under tensor parallelism (each rank holds only some heads)")


def _replicated_input(tp_mesh: Any) -> Callable[[nn.Module, tuple], tuple]:
    """Forward pre-hook: the block's input as one Replicate DTensor (no communication).

    Q, K and V are three ColwiseParallel Linears on the same input; without this each would
    all-reduce its own input gradient in backward (3 all-reduces). With one DTensor input the
    three partial gradients are summed locally and reduced once, as with Megatron's fused QKV.
    """
    from torch.distributed.tensor import DTensor, Replicate

    def hook(module: nn.Module, args: tuple) -> tuple:
        if args and isinstance(args[0], torch.Tensor) and not isinstance(args[0], DTensor):
            return (DTensor.from_local(args[0], tp_mesh, [Replicate()], run_check=False), *args[1:])
        return args

    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, shard_vocab: bool = True) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` (see the module docstring); returns it.

    Tied parameters (the MLM decoder and the word embeddings; the decoder bias and
    ``cls.predictions.bias``) stay tied: the plan shards both users of a tied weight the same
    way (rows), and the first sharded copy is registered under every name afterwards.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    from megabert.modeling.layers import MegatronBertSelfAttention

    tp = tp_mesh.size()
    config = getattr(model, "config", None)
    if config is not None:
        check_tensor_parallel(config, tp, shard_vocab)
    aliases = _alias_groups(model)
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model, shard_vocab))
    for group in aliases:
        current = [module._parameters[name] for module, name in group]
        # The sharded copy, when the plan sharded any user of the weight; else it stays plain.
        shared = next((p for p in current if hasattr(p, "placements")), current[0])
        for module, name in group:
            module._parameters[name] = shared
    for module in model.modules():
        if isinstance(module, MegatronBertSelfAttention):
            # (check_tensor_parallel made sure the heads divide; the block's reshapes take the
            # local head count from the sharded projections' width.)
            module.register_forward_pre_hook(_replicated_input(tp_mesh))
    base = getattr(model, getattr(model, "base_model_prefix", "bert"), model)
    if isinstance(base, nn.Module):
        base.register_forward_pre_hook(_refuse_per_head_outputs, with_kwargs=True)
    return model


def apply_fsdp(model: nn.Module, dp_mesh: Any) -> nn.Module:
    """FSDP2 on every transformer layer over ``dp_mesh`` (parameters, gradients, optimizer state sharded).

    Only the layers: jobs call ``model.bert`` and ``model.cls`` directly (the pretraining
    objective, evaluators), which would bypass a root unit's forward hooks -- and the word
    embeddings are tied to the MLM decoder across those calls. The rest (embeddings, pooler,
    heads: a small share of a large model) stays replicated and is synced like DDP.
    """
    from torch.distributed.fsdp import fully_shard

    from megabert.modeling.layers import MegatronBertLayer

    for module in model.modules():
        if isinstance(module, MegatronBertLayer):
            fully_shard(module, mesh=dp_mesh)
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]


# ------------------------------------------------------------------------------ the data
class DataParallelSource:
    """Rank ``r`` of ``n`` data-parallel ranks takes micro-batches ``r, r + n, r + 2n, ...`` of ``source``.

    So the ``n`` ranks together see exactly the batches one process would, none twice, and
    ``batches(start)`` on every rank resumes at global micro-batch ``start * n``. (For a
    :class:`ResumableLoader`, :meth:`ParallelContext.shard_batches` re-slices the loader
    instead, so that each rank reads only its own samples.)
    """

    def __init__(self, source: Any, rank: int, size: int) -> None:
        self.source = as_batch_source(source)
        self.rank = rank
        self.size = size
        inner = getattr(self.source, "global_batch", None)
        self.global_batch = inner * size if inner is not None else None  # samples per micro-batch, all ranks

    def batches(self, start: int) -> Iterator[Batch]:
        for index, batch in enumerate(self.source.batches(start * self.size)):
            if index % self.size == self.rank:
                yield batch


# ------------------------------------------------------------------------------ the hooks
class ParallelHooks(DistributedHooks):
    """The Trainer's :class:`DistributedHooks` for a ``(dp, tp)`` mesh.

    ``rank`` / ``world_size`` are the *data-parallel* rank and size: what data loaders shard
    by (TP ranks read the same batches) and what seeds dropout (TP ranks draw the same masks,
    as their replicated activations must stay identical). ``global_rank`` is the process's
    rank; only global rank 0 writes files (``is_main``). Metric reductions run over the whole
    world and divide out the TP copies.
    """

    def __init__(self, context: "ParallelContext") -> None:
        self.context = context
        self.rank = context.dp_rank
        self.world_size = context.dp
        self.global_rank = context.rank
        self.device = context.device

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def seed_offset(self) -> int:
        return self.context.dp_rank

    def wrap(self, module: nn.Module) -> nn.Module:
        ctx = self.context
        model = getattr(module, "model", module)
        needs_sharding = ctx.tp > 1 or (ctx.config.data_parallel == "fsdp" and ctx.dp > 1)
        if needs_sharding and getattr(model, "_megabert_parallel", None) is None:
            raise UserError(
                f"the model was not sharded for tensor parallel {ctx.tp} / {ctx.config.data_parallel}: the job must "
                "pass it through ParallelContext.wrap_model (or the Trainer through hooks.prepare_model) before "
                "the Trainer builds its optimizer"
            )
        if ctx.dp == 1:
            return module
        if ctx.tp == 1 and ctx.config.data_parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # find_unused_parameters: e.g. the pooler of an MLM-only model gets no gradient.
            return DistributedDataParallel(
                module, process_group=ctx.dp_group, device_ids=device_ids, find_unused_parameters=True
            )
        return GradientSync(module, ctx.dp_group, ctx.dp)

    def no_sync(self, wrapped: nn.Module) -> ContextManager:
        if hasattr(wrapped, "no_sync"):  # DDP or GradientSync
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return clip_grad_norm(parameters, max_norm)

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        if not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.context.comm_device)
        dist.all_reduce(tensor)
        # Every TP copy of a value was added: divide by tp (sum) or by the world (mean).
        tensor /= self.context.world_size if op == "mean" else self.context.tp
        return dict(zip(keys, tensor.tolist()))

    def any_rank(self, flag: bool) -> bool:
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.context.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in global rank order (on every rank)."""
        gathered: list[Any] = [None] * self.context.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()

    def checkpoint_format(self) -> CheckpointFormat:
        """Every rank writes its part (torch.distributed.checkpoint); loads any layout's checkpoint."""
        return DCPFormat(self, self.context)

    def full_weights(self, model: nn.Module) -> ContextManager:
        return full_weights(model)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Shard the model for this mesh (:meth:`ParallelContext.wrap_model`; idempotent)."""
        return self.context.wrap_model(model)


class SingleProcessHooks(DistributedHooks):
    """One process: the Trainer's defaults, plus loading checkpoints written by a parallel run."""

    def checkpoint_format(self) -> CheckpointFormat:
        return AnyLayoutFormat(self)

    def full_weights(self, model: nn.Module) -> ContextManager:
        return contextlib.nullcontext(model)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model


# ---------------------------------------------------------------------------- the context
def _is_communication_error(exc: BaseException) -> bool:
    """A collective failed because of a peer or the network (not this rank's own bug)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timed out")
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class ParallelContext:
    """Everything a job needs to run on a ``(dp, tp)`` mesh; from :func:`setup_parallel`.

    A job calls, in order: :meth:`wrap_model` on the freshly built (or loaded) model, passes
    :attr:`hooks` to the Trainer as ``distributed=``, builds its data with ``rank=hooks.rank,
    world_size=hooks.world_size`` or through :meth:`shard_batches`, runs inside :meth:`guard`,
    saves the final model with :meth:`save_pretrained` (every rank calls it), and ends with
    :meth:`close`. In a single process all of these are no-ops around the plain Trainer.
    """

    def __init__(
        self,
        config: ParallelConfig,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device,
        mesh: Any = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.mesh = mesh
        self.heartbeat = heartbeat
        self.dp, self.tp = mesh_shape(world_size, config.tensor_parallel)
        self.dp_rank, self.tp_rank = divmod(rank, self.tp)
        self.hooks: DistributedHooks = ParallelHooks(self) if self.is_distributed else SingleProcessHooks()

    # ----------------------------------------------------------------- layout
    @property
    def is_distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that writes files and prints."""
        return self.rank == 0

    @property
    def data_parallel(self) -> str:
        """"ddp" or "fsdp": how the data-parallel ranks hold the model."""
        return self.config.data_parallel

    @property
    def tp_mesh(self) -> Any:
        return self.mesh["tp"] if self.mesh is not None else None

    @property
    def dp_mesh(self) -> Any:
        return self.mesh["dp"] if self.mesh is not None else None

    @property
    def dp_group(self) -> Any:
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def comm_device(self) -> torch.device:
        """Where small tensors for collectives live (NCCL needs CUDA tensors)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def describe(self) -> str:
        """One line for the log: world, mesh, device, DP mode."""
        if not self.is_distributed:
            return f"single process on {self.device}"
        return (
            f"{self.world_size} processes: data parallel {self.dp} ({self.config.data_parallel}) x tensor "
            f"parallel {self.tp}{' (vocabulary replicated)' if self.config.replicate_vocab else ''}, on "
            f"{self.device.type}"
        )

    # ------------------------------------------------------------------ model
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this rank's device and shard it (TP, then FSDP); returns it.

        Call it before building the optimizer (the Trainer does that), on the same initial
        weights on every rank (same seed, or loaded from the same checkpoint). A layout the
        model cannot take (TP not dividing the heads, the MLP or the vocabulary) is refused
        before anything is changed.
        """
        if getattr(model, "_megabert_parallel", None) is not None:
            return model  # already wrapped (by the job, or by the Trainer's prepare_model hook)
        config = getattr(model, "config", None)
        if config is not None:
            check_tensor_parallel(config, self.tp, not self.config.replicate_vocab)
        model = model.to(self.device)
        if not self.is_distributed:
            return model
        model._megabert_parallel = (self.dp, self.tp, self.config.data_parallel)
        if self.tp > 1:
            apply_tensor_parallel(model, self.tp_mesh, shard_vocab=not self.config.replicate_vocab)
        if self.config.data_parallel == "fsdp" and self.dp > 1:
            apply_fsdp(model, self.dp_mesh)
        return model

    def shard_batches(self, source: Any) -> Any:
        """This rank's share of ``source``: DP ranks disjoint, TP ranks of a group the same.

        A :class:`ResumableLoader` built for one process is rebuilt with this rank's slice (one
        built with ``world_size`` = the DP size is returned as is); any other source is wrapped
        in :class:`DataParallelSource`.
        """
        if self.dp == 1:
            return source
        if isinstance(source, ResumableLoader):
            if source.world_size == self.dp and source.rank == self.dp_rank:
                return source
            if source.world_size != 1:
                raise UserError(
                    f"the data loader is already split {source.world_size} ways, but there are {self.dp} "
                    "data-parallel ranks"
                )
            return ResumableLoader(
                source.dataset, source.batch_size, source.collate_fn, shuffle=source.shuffle, seed=source.seed,
                num_workers=source.num_workers, rank=self.dp_rank, world_size=self.dp, pin_memory=source.pin_memory,
            )
        return DataParallelSource(source, self.dp_rank, self.dp)

    def save_pretrained(
        self, model: nn.Module, folder: str | os.PathLike, save_extras: Callable[[Any], None] | None = None
    ) -> None:
        """Write the whole model as a Hugging Face folder, from any layout (call on every rank).

        The shards are gathered on every rank (collectives), global rank 0 writes ``folder``
        atomically (plus ``save_extras(folder)``, e.g. the tokenizer files).
        """
        from pathlib import Path

        from megabert.utils import atomic_folder

        with full_weights(model):
            if self.is_main:
                with atomic_folder(Path(folder), overwrite=True) as tmp:
                    model.save_pretrained(tmp)
                    if save_extras is not None:
                        save_extras(tmp)
        if self.is_distributed:
            dist.barrier()

    # ----------------------------------------------------------------- faults
    @contextlib.contextmanager
    def guard(self, exit_on_peer_failure: bool = True) -> Iterator[None]:
        """Run the job; turn a failure into a clear stop of every rank.

        An error raised on this rank is announced to the others (they stop at once, naming
        this rank and the error) and re-raised here. A failed collective -- a peer died, hung
        past ``--dist-timeout`` or lost its network -- prints one line naming what is known and
        exits with :data:`EXIT_PEER_FAILURE` (``exit_on_peer_failure=False``: raises
        :class:`PeerFailure` instead).
        """
        try:
            yield
        except BaseException as exc:
            if not self.is_distributed or isinstance(exc, SystemExit):
                raise
            if isinstance(exc, PeerFailure) or _is_communication_error(exc):
                message = f"rank {self.rank}: distributed training stopped: a collective failed ({_first_line(exc)})"
                culprit = "; another rank probably died (see its log)"
                if self.heartbeat is not None:
                    silent = self.heartbeat.silent_peers()
                    if silent:
                        named = ", ".join(f"rank {peer} (no heartbeat for {age:.1f} s)" for peer, age in silent)
                        culprit = f"; gone: {named}"
                    self.heartbeat.mark_failed(f"stopped: {_first_line(exc)}")
                if not exit_on_peer_failure:
                    raise PeerFailure(message + culprit) from exc
                print(f"megabert: {message}{culprit}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(EXIT_PEER_FAILURE)  # no clean shutdown: collectives with dead peers would hang
            if self.heartbeat is not None:
                self.heartbeat.mark_failed(f"failed: {_first_line(exc)}")
            raise

    def close(self) -> None:
        """Stop the heartbeat and leave the process group (after the last collective)."""
        if self.heartbeat is not None:
            dist.barrier()  # nobody stops beating while another rank still waits for it
            self.heartbeat.stop()
            self.heartbeat = None
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()
        self.mesh = None


def run_on_every_rank(
    config: ParallelConfig, job: Callable[[Any], T], report: Callable[[T], int], release_memory: bool = False
) -> int:
    """Run ``job(hooks)`` on this rank (one process without torchrun), then ``report`` on rank 0.

    The shared body of the training jobs: keep freed memory for reuse (unless
    ``release_memory``), set up the process group, run under the fault guard, and leave the
    group. When the job fails, leaving must not replace the error the user needs to see (the
    peers may already be gone).
    """
    if not release_memory:
        from megabert.train.engine.allocator import keep_freed_memory

        keep_freed_memory()  # no page faults re-mapping each step's large tensors (see there)
    ctx = setup_parallel(config)  # a single process without torchrun; a (dp, tp) mesh under it
    try:
        with ctx.guard():
            result = job(ctx.hooks)
    except BaseException:
        with contextlib.suppress(Exception):
            ctx.close()
        raise
    ctx.close()
    return report(result) if ctx.is_main else 0  # rank 0 prints the summary


def setup_parallel(config: ParallelConfig) -> ParallelContext:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Builds the ``(dp, tp)`` device mesh and starts the heartbeat. Without torchrun (no
    WORLD_SIZE, or 1) it returns a single-process context. Bad settings (TP not dividing the
    world, a missing GPU, missing env variables) raise UserError before any collective.
    """
    config.validate()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        mesh_shape(1, config.tensor_parallel)
        return ParallelContext(config, 0, 1, 0, resolve_device(config.device, local_rank=0))
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise UserError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not: launch with torchrun "
            "(it sets them), or set them all"
        )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp, tp = mesh_shape(world_size, config.tensor_parallel)
    device = resolve_device(config.device, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo for CPU tensors (object collectives, CPU runs), NCCL for CUDA tensors.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    heartbeat = None
    if config.heartbeat_timeout_s > 0:
        store = dist.distributed_c10d._get_default_store()
        heartbeat = Heartbeat(store, rank, world_size, config.heartbeat_timeout_s)
        heartbeat.start()
    dist.barrier()  # every heartbeat key exists before anyone reads them
    return ParallelContext(config, rank, world_size, local_rank, device, mesh, heartbeat)
