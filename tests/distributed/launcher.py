"""Start N worker processes the way torchrun does (RANK, WORLD_SIZE, ... in the environment).

Plain subprocesses rather than torchrun's agent: the agent would kill the surviving ranks
itself when one dies, and the fault tests must see *our* watchdog stop them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "worker.py"


@dataclass
class RankResult:
    returncode: int | None  # None: still running when the launch timed out (then killed)
    stdout: str
    stderr: str
    seconds: float  # from the launch to this rank's exit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    world_size: int,
    args: list[str],
    timeout: float = 90.0,
    env: dict[str, str] | None = None,
    until: list[int] | None = None,
) -> list[RankResult]:
    """Run ``worker.py ARGS`` as ``world_size`` ranks; wait (at most ``timeout`` s) for the ranks
    in ``until`` (default: all) to exit; kill leftovers."""
    until = list(range(world_size)) if until is None else until
    port = free_port()
    procs = []
    logs = []
    start = time.monotonic()
    for rank in range(world_size):
        rank_env = dict(os.environ)
        rank_env.update(env or {})
        rank_env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
        )
        out = Path(args[0]) / f"rank{rank}.out"
        err = Path(args[0]) / f"rank{rank}.err"
        Path(args[0]).mkdir(parents=True, exist_ok=True)
        logs.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), *args], env=rank_env, stdout=out.open("w"), stderr=err.open("w"),
        ))
    ended: list[float | None] = [None] * world_size
    while time.monotonic() - start < timeout and any(ended[i] is None for i in until):
        for i, proc in enumerate(procs):
            if ended[i] is None and proc.poll() is not None:
                ended[i] = time.monotonic() - start
        time.sleep(0.05)
    results = []
    for i, proc in enumerate(procs):
        code = proc.poll()
        if code is None:
            proc.kill()
            proc.wait()
        out, err = logs[i]
        results.append(RankResult(code, out.read_text(), err.read_text(), ended[i] if ended[i] is not None else timeout))
    return results


def check_ok(results: list[RankResult]) -> None:
    """AssertionError with every failed rank's stderr tail."""
    bad = [(i, r) for i, r in enumerate(results) if r.returncode != 0]
    if bad:
        details = "\n".join(f"--- rank {i} (exit {r.returncode}):\n{r.stderr[-3000:]}" for i, r in bad)
        raise AssertionError(f"worker ranks failed:\n{details}")
