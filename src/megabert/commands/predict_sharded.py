"""The file commands under torchrun: each rank predicts a contiguous share, rank 0 writes the one output.

``torchrun --nproc-per-node N -m megabert embed MODEL --input corpus.txt -o vectors.jsonl``

**Shares.** Every rank counts the inputs (non-blank lines, the progress bar's count) and rank
``r`` of ``N`` takes inputs ``ceil(r T / N)`` to ``ceil((r + 1) T / N)``; the last rank takes
everything from its start to the end of the file, so an inexact count (a CSV field spanning
lines) makes the shares uneven but never loses or repeats an input. Every rank reads the file
from the top (line numbers and the file's own errors stay those of the whole file) but
converts and runs only its share, and stops reading at its end. A rank with an empty share
(fewer inputs than ranks) loads no model.

**Output.** Rank 0 writes its share straight into the output (the atomic temp of ``--output``,
or stdout); every other rank writes its share into a part file beside ``--output`` (in the
temp folder when the output is stdout), named like the atomic writers' temps, and removed
however the run ends. When all ranks are done, rank 0 receives the parts one after another over
the process group (4 MiB messages over gloo) and appends them: the output is in input order,
written once, renamed into place only when complete, and no shared file system is needed.
Memory stays flat; the disk holds up to twice the output while the run lasts.

**Waiting.** Ranks coordinate through the rendezvous store (keys ``megabert/predict/...``),
polled: a rank that finishes early waits for the others without a timeout, while the
heartbeat of :mod:`megabert.train.distributed.parallel` watches for a rank that dies or freezes (the others
stop within its 60 s with a line naming it; torchrun's agent stops them at once when a rank
exits with an error).

**Errors.** An error a user can fix (a bad line, an input too long, an output that cannot be
written) is not printed by the rank that hits it: it is posted to the store, every rank stops
at its next input, and rank 0 prints the error of the lowest rank that had one -- the earliest
in the file, the line one process would print -- as the single-process command prints it, with
the same exit status; the other ranks exit with 0 silently (so that torchrun names rank 0, the one
that printed, as the failure, and does not stop it while it prints). "No inputs" is decided
by rank 0 from every rank's count. A bug (an exception with a traceback) fails its rank, and
the others stop with a line naming it (the training commands' fault guard).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from megabert.errors import RunError, UserError

PREFIX = "megabert/predict/"
CHUNK_BYTES = 4 * 2**20  # one message of a part sent to rank 0
POLL_S = 0.05  # store polling interval while waiting
ABORT_CHECK_S = 0.5  # how often a working rank asks whether another one failed


class Aborted(Exception):
    """Another rank failed: this one stops its share."""


@dataclass
class Failure:
    """How the job fails: the one-line message (None: say nothing) and the exit status."""

    message: str | None
    code: int
    broken_pipe: bool = False  # rank 0's stdout reader went away (`... | head`): exit 0, quietly


@dataclass
class Outcome:
    """One rank's result: inputs written, or the error it hit, or stopped because another rank failed."""

    count: int = 0
    error: Failure | None = None
    stopped: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error.message, "code": self.error.code, "broken_pipe": self.error.broken_pipe}
        return {"count": self.count, "stopped": self.stopped}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "Outcome":
        if "error" in value:
            return cls(error=Failure(value["error"], int(value["code"]), bool(value.get("broken_pipe"))))
        return cls(count=int(value["count"]), stopped=bool(value["stopped"]))


def shard_bounds(total: int | None, rank: int, world: int) -> tuple[int, int | None]:
    """Inputs ``[start, stop)`` of ``rank`` (stop None: to the end) for ``total`` inputs over ``world`` ranks."""
    total = total or 0
    start = -(-rank * total // world)
    stop = None if rank == world - 1 else -(-(rank + 1) * total // world)
    return start, stop


class Coordinator:
    """The ranks' messages to each other, through the rendezvous store (see the module docstring)."""

    def __init__(self, store: Any, rank: int, world: int) -> None:
        self.store = store
        self.rank = rank
        self.world = world
        self._next_check = 0.0

    def post(self, key: str, value: dict[str, Any]) -> None:
        self.store.set(PREFIX + key, json.dumps(value))

    def wait(self, *keys: str) -> tuple[str, dict[str, Any]]:
        """The first of ``keys`` to be posted, and its value (waits without a timeout)."""
        while True:
            for key in keys:
                if self.store.check([PREFIX + key]):
                    return key, json.loads(self.store.get(PREFIX + key))
            time.sleep(POLL_S)

    def abort(self) -> None:
        """Tell every rank to stop its share (this one failed)."""
        self.store.set(PREFIX + "abort", str(self.rank))

    def check_abort(self) -> None:
        """Raise :class:`Aborted` when a rank has failed (asks the store at most every 0.5 s)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + ABORT_CHECK_S
        if self.store.check([PREFIX + "abort"]):
            raise Aborted()


def _failure(exc: BaseException, output: str | None) -> Failure:
    """The exception as a one-line failure, or re-raised when it is a bug (or MEGABERT_DEBUG is set).

    A disk/permission failure names ``output`` (this rank's part lies beside it), as the
    atomic writer of one process would.
    """
    from megabert.cli import one_line_error
    from megabert.utils import write_error

    if isinstance(exc, BrokenPipeError):
        return Failure(None, 0, broken_pipe=True)
    if output is not None and output != "-" and isinstance(exc, OSError):
        exc = write_error(exc, output) or exc
    found = one_line_error(exc)
    if found is None or os.environ.get("MEGABERT_DEBUG"):
        raise exc
    return Failure(*found)


@dataclass(frozen=True)
class FileCommand:
    """The single-process command's steps, which every rank runs on its share (given by the caller,
    :func:`megabert.commands.predict.run`, so that this module does not import it back)."""

    prepare_job: Callable[[argparse.Namespace], Any]  # args -> the checked job (inputs, format, options)
    load_pipeline: Callable[..., Any]  # (job, args, device) -> the pipeline
    predict_rows: Callable[..., int]  # (job, pipeline, out, ...) -> inputs written


def _prepare(args: argparse.Namespace, steps: FileCommand) -> Any:
    job = steps.prepare_job(args)
    if job.input == "-":
        raise UserError(
            "--input - (stdin) cannot be split between torchrun's processes: give a file, or run one process"
        )
    return job


@contextlib.contextmanager
def _part_path(output: str | None) -> Iterator[Path]:
    """A scratch file for this rank's part: beside ``output``, or in the temp folder for stdout."""
    from megabert.utils import scratch_path

    if output is not None and output != "-" and not Path(output).is_dir():
        with scratch_path(output) as path:
            yield path
        return
    fd, name = tempfile.mkstemp(prefix=f"megabert-part-{os.getpid()}-", suffix=".jsonl")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _send(path: Path | None) -> None:
    """This rank's part to rank 0: (size, bytes) messages, then a size 0."""
    import torch
    import torch.distributed as dist

    if path is not None:
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(CHUNK_BYTES)
                if not chunk:
                    break
                dist.send(torch.tensor([len(chunk)], dtype=torch.int64), dst=0)
                dist.send(torch.frombuffer(bytearray(chunk), dtype=torch.uint8), dst=0)
    dist.send(torch.tensor([0], dtype=torch.int64), dst=0)


def _receive(src: int, out: Any) -> None:
    """Append rank ``src``'s part to ``out``; a failed write still drains the sender, then is raised."""
    import torch
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64)
    decoder = codecs.getincrementaldecoder("utf-8")()
    error: BaseException | None = None
    while True:
        dist.recv(size, src=src)
        count = int(size.item())
        if count == 0:
            break
        buffer = torch.empty(count, dtype=torch.uint8)
        dist.recv(buffer, src=src)
        if error is None:
            try:
                out.write(decoder.decode(buffer.numpy().tobytes()))
            except Exception as exc:  # noqa: BLE001 - raised once the sender is drained
                error = exc
    if error is not None:
        raise error
    out.write(decoder.decode(b"", final=True))


class _Discard(Exception):
    """Leave the output unwritten (raised inside open_output, so its temp is removed)."""


def _run_rank0(args: argparse.Namespace, steps: FileCommand, device: Any, coord: Coordinator) -> Failure | None:
    from megabert.inference.io import open_output

    world = coord.world
    own = Outcome()
    failure: Failure | None = None
    try:
        with contextlib.ExitStack() as stack:
            try:
                job = _prepare(args, steps)
                start, stop = shard_bounds(job.total, 0, world)
                out = stack.enter_context(open_output(args.output))
                if stop is None or stop > start:
                    pipe = steps.load_pipeline(job, args, device)
                    desc = f"rank 0 of {world}" if not job.quiet else None
                    own.count = steps.predict_rows(job, pipe, out, start, stop, desc=desc, interrupt=coord.check_abort)
            except Aborted:
                own.stopped = True
            except Exception as exc:  # noqa: BLE001 - a bug is re-raised by _failure
                own.error = _failure(exc, args.output)
                coord.abort()
            outcomes = [own] + [Outcome.from_json(coord.wait(f"state/{r}")[1]) for r in range(1, world)]
            failure = next((o.error for o in outcomes if o.error is not None), None)
            if failure is None and sum(o.count for o in outcomes) == 0:
                failure = Failure(str(job.no_inputs()), 2)
            if failure is not None:
                coord.post("verdict", {"code": failure.code})
                raise _Discard()
            coord.post("verdict", {"merge": True})
            for rank in range(1, world):
                coord.post(f"send/{rank}", {})
                _receive(rank, out)
    except _Discard:
        return failure
    except Exception as exc:  # noqa: BLE001 - writing the output failed (a bug is re-raised)
        failure = _failure(exc, None)
        coord.post("finished", {"code": failure.code})
        return failure
    coord.post("finished", {"code": 0})
    return None


def _run_other(args: argparse.Namespace, steps: FileCommand, device: Any, coord: Coordinator) -> Failure | None:

    rank = coord.rank
    own = Outcome()
    with contextlib.ExitStack() as stack:
        part: Path | None = None
        try:
            job = _prepare(args, steps)
            start, stop = shard_bounds(job.total, rank, coord.world)
            if stop is None or stop > start:
                pipe = steps.load_pipeline(job, args, device)
                part = stack.enter_context(_part_path(args.output))
                with open(part, "w", encoding="utf-8") as out:
                    own.count = steps.predict_rows(job, pipe, out, start, stop, quiet=True, interrupt=coord.check_abort)
        except Aborted:
            own.stopped = True
        except Exception as exc:  # noqa: BLE001 - a bug is re-raised by _failure
            own.error = _failure(exc, args.output)
            coord.abort()
        coord.post(f"state/{rank}", own.to_json())
        _, verdict = coord.wait("verdict")
        if "code" not in verdict:
            key, _ = coord.wait(f"send/{rank}", "finished")
            if key != "finished":
                _send(part)
                coord.wait("finished")
    return None  # a failure is rank 0's to report (see run_sharded)


def run_sharded(args: argparse.Namespace, steps: FileCommand) -> int:
    """Run the file command ``args`` (its ``steps``) as this rank of a torchrun job; returns the exit status."""
    import torch.distributed as dist

    from megabert.train.distributed.parallel import ParallelConfig, setup_parallel

    ctx = setup_parallel(ParallelConfig(device=args.device or "auto"))
    coord = Coordinator(dist.distributed_c10d._get_default_store(), ctx.rank, ctx.world_size)
    try:
        with ctx.guard():
            runner = _run_rank0 if ctx.is_main else _run_other
            failure = runner(args, steps, ctx.device, coord)
    except BaseException:
        with contextlib.suppress(Exception):
            ctx.close()
        raise
    ctx.close()
    # The other ranks end with 0 even when the job fails: rank 0 prints the error and exits
    # with its status, so torchrun names rank 0 as the failure -- and does not stop rank 0
    # (SIGTERM) while it prints, as it would on another rank's non-zero exit.
    if failure is None:
        return 0
    if failure.broken_pipe:
        raise BrokenPipeError()  # the CLI's quiet `| head` exit
    if failure.message is not None:
        raise (UserError if failure.code == 2 else RunError)(failure.message)
    return failure.code


__all__ = ["Coordinator", "FileCommand", "run_sharded", "shard_bounds"]
