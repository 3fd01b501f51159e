"""The options every training command shares (distributed layout, memory), and the run on every rank.

The training jobs in :mod:`megabert.train` take configs (:class:`ParallelConfig`), never parsed
arguments: this module turns the one into the other.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, TypeVar

from megabert.train.distributed.parallel import DATA_PARALLEL_MODES, ParallelConfig, run_on_every_rank

T = TypeVar("T")


def add_memory_argument(parser) -> None:  # type: ignore[no-untyped-def]
    """Add ``--release-memory`` (opt out of :func:`~megabert.train.engine.allocator.keep_freed_memory`) to a training command."""
    parser.add_argument(
        "--release-memory", action="store_true",
        help="give freed memory back to the OS at once (glibc's default). By default a training run "
             "keeps it for the next step, which saves the page faults of re-mapping large tensors "
             "(see docs/measurements.md) but holds the resident memory at its peak",
    )


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``distributed`` option group (--tensor-parallel, --data-parallel, timeouts)."""
    group = parser.add_argument_group(
        "distributed (launch with torchrun; world size = tensor parallel x data parallel)"
    )
    group.add_argument("--tensor-parallel", type=int, default=1, metavar="T",
                       help="ranks that split each layer (attention heads, MLP, vocabulary) (default 1)")
    group.add_argument("--data-parallel", choices=DATA_PARALLEL_MODES, default="ddp",
                       help="ddp: full replicas, gradients all-reduced; fsdp: parameters, gradients and "
                            "optimizer state sharded over the data-parallel ranks (default ddp)")
    group.add_argument("--replicate-vocab", action="store_true",
                       help="keep the word embeddings / MLM decoder whole on every tensor-parallel rank")
    group.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="fail a collective that waits longer than this (default 600)")
    group.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="stop all ranks when one is silent this long (died or frozen; 0: off; default 60)")


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    """The :class:`ParallelConfig` of parsed arguments (missing options take their defaults)."""
    return ParallelConfig(
        tensor_parallel=getattr(args, "tensor_parallel", 1),
        data_parallel=getattr(args, "data_parallel", "ddp"),
        replicate_vocab=getattr(args, "replicate_vocab", False),
        timeout_s=getattr(args, "dist_timeout", 600.0),
        heartbeat_timeout_s=getattr(args, "heartbeat_timeout", 60.0),
        device=getattr(args, "device", "auto") or "auto",
    )


def add_training_run_arguments(parser: argparse.ArgumentParser, run_group: Any) -> None:
    """``--release-memory`` in ``run_group`` and the ``distributed`` option group on ``parser``."""
    add_memory_argument(run_group)
    add_parallel_arguments(parser)


def run_training_command(args: argparse.Namespace, job: Callable[[Any], T], report: Callable[[T], int]) -> int:
    """:func:`run_on_every_rank` with the layout and memory options of parsed arguments."""
    return run_on_every_rank(
        parallel_config_from_args(args), job, report, release_memory=getattr(args, "release_memory", False)
    )
