"""Issue 13, the run side: a fault during `megabert pretrain` / `finetune` ends in one clear line, never a
wrong run.

Each test is one case of the issue and checks the message the user gets now: two runs into one
--output (the run lock), a damaged latest checkpoint under --resume auto, a resume on other data,
a diverging run, a disk that fills up (or a folder that cannot be written) during a checkpoint,
and a run SIGKILLed at random moments that resumes to the very losses and weights of an
uninterrupted one. The runs are tiny (hidden 32, 2 layers, a few steps) and mostly go through
``megabert.cli.main`` in this process; a subprocess where the process boundary is the point (a
lock holder, the real entry point's stderr, kills, resource limits).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_finetune import MAX_LENGTH, write_mrpc, write_tiny_model
from test_train_checkpoint import DRIVER, train_losses

from megabert.cli import main as cli_main
from megabert.train.engine import checkpoint as ckpt
from megabert.train.engine.logging import read_metrics
from megabert.train.jobs.pretrain import data_fingerprint
from megabert.train.engine.trainer import TrainingError
from megabert.utils import LOCK_FILE

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
# Lines a run may print on stderr before its error (environment notes, a resume, a damaged checkpoint).
NOTE_PREFIXES = ("note: ", "warning: ", "resuming from ", "tensorboard is not installed", "matplotlib is not installed")
DISK_FULL = "No space left on device (the disk is full: free some space or write elsewhere)"


@pytest.fixture(autouse=True)
def _no_curves(monkeypatch):
    """No curves.png in the in-process runs (matplotlib takes a second a run; nothing here looks at it)."""
    from megabert.train.engine.logging import MetricsLogger

    monkeypatch.setattr(MetricsLogger, "plot", lambda self: None)


def pretrain_argv(corpus: dict, model_file: Path, out: Path, *extra: str, steps: int = 4, data: Path | None = None,
                  lr: str = "2e-3") -> list[str]:
    """`megabert pretrain` of the tiny model (hidden 32, 2 layers) on the tiny corpus, into ``out``."""
    return [
        "pretrain", "--data", str(data or corpus["train"]), "--tokenizer", str(corpus["tokenizer"]),
        "--model-config", str(model_file), "--output", str(out), "--max-steps", str(steps),
        "--batch-size", "4", "--seq-length", "32", "--lr", lr, "--warmup-steps", "1", "--log-every", "1",
        "--quiet", *extra,
    ]  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of one in-process `megabert` call."""
    code = cli_main(list(argv))
    return code, capsys.readouterr().err


def error_line(err: str, command: str = "pretrain") -> str:
    """The run's one error line: the last line of stderr, no traceback, nothing but known notes before it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"megabert {command}: error: "), err
    assert all(line.startswith(NOTE_PREFIXES) for line in lines[:-1]), err
    return lines[-1]


def truncate(path: Path, size: int) -> int:
    """Cut ``path`` to ``size`` bytes (what a copy interrupted by a full disk leaves); returns the old size."""
    old = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size)
    return old


def leftovers(folder: Path) -> list[Path]:
    """Temp files / folders of atomic writes anywhere under ``folder``."""
    return sorted(p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".partial", ".deleting")))


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


# ===================================================================== two runs, one output folder
HOLDER = """
import sys, time
from megabert.utils import lock_output_folder
lock = lock_output_folder(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def lock_holder():
    """Start a process that holds the run lock of a folder (flock is per process: it must be another one)."""
    started: list[subprocess.Popen] = []

    def start(folder: Path, command: str = "pretrain") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), command], stdout=subprocess.PIPE,
                                text=True, env=ENV)  # fmt: skip
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_a_second_run_into_a_locked_output_stops_at_once_until_the_holder_dies(
    tmp_path, capsys, tiny_corpus, tiny_model_file, lock_holder
):
    out = tmp_path / "run"
    holder = lock_holder(out)
    lock_file = out / LOCK_FILE
    in_use = (f"--output {out} is in use by another run (pid {holder.pid}, `megabert pretrain`; lock file "
              f"{lock_file}): wait for it to end, or choose another --output")  # fmt: skip

    code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, out, steps=2))
    assert (code, err.strip()) == (2, f"megabert pretrain: error: {in_use}")
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # stopped before writing anything

    model = write_tiny_model(tmp_path / "model")
    write_mrpc(tmp_path / "train.tsv", 8, seed=1)
    finetune = ["finetune", "--task", "sequence-classification", "--model", str(model), "--train",
                str(tmp_path / "train.tsv"), "--validation", str(tmp_path / "train.tsv"), "--output", str(out),
                "--max-length", str(MAX_LENGTH), "--max-steps", "2", "--batch-size", "4", "--quiet"]  # fmt: skip
    code, err = run_cli(capsys, finetune)
    assert (code, err.strip()) == (2, f"megabert finetune: error: {in_use}")
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]

    # SIGKILL: no chance to clean up, the lock file stays -- but the kernel dropped the flock.
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_file.is_file() and f"pid={holder.pid} " in lock_file.read_text()
    code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, out, steps=2))
    assert code == 0, err
    assert (out / "final" / "model.safetensors").is_file()
    assert not lock_file.exists()  # released (and removed) at the end of the run


# ============================================================================= damaged checkpoints
def test_resume_auto_passes_over_damaged_checkpoints_to_the_last_intact_one(
    tmp_path, capsys, tiny_corpus, tiny_model_file
):
    out = tmp_path / "run"
    argv = pretrain_argv(tiny_corpus, tiny_model_file, out, "--save-every", "1", "--keep-last", "3", steps=3)
    code, err = run_cli(capsys, argv)
    assert code == 0, err
    losses = train_losses(out)
    weights = load_file(str(out / "final" / "model.safetensors"))
    step1, step2, step3 = (out / "checkpoints" / ckpt.checkpoint_name(s) for s in (1, 2, 3))
    # Copies cut short by a full disk: step 3's weights, and step 2's trainer state.
    size3 = truncate(step3 / "model" / "model.safetensors", 1000)
    size2 = truncate(step2 / "trainer_state.pt", 5000)
    why3 = f"model/model.safetensors is 1,000 bytes, {size3:,} when it was saved"
    why2 = f"trainer_state.pt is 5,000 bytes, {size2:,} when it was saved"

    # Naming a damaged checkpoint: an error that names it and offers the previous intact one.
    code, err = run_cli(capsys, argv + ["--resume", str(step3)])
    assert code == 2, err
    assert error_line(err) == (f"megabert pretrain: error: --resume {step3}: checkpoint {step3} is damaged ({why3}); "
                               f"the previous intact one is {step1}: pass --resume {step1}")  # fmt: skip

    # --resume auto: says which checkpoints are damaged and why, and resumes from step 1.
    records = read_metrics(out / "metrics.jsonl")
    (out / "metrics.jsonl").write_text("".join(json.dumps({**r, "attempt": 1}) + "\n" for r in records))
    code, err = run_cli(capsys, argv + ["--resume", "auto"])
    assert code == 0, err
    instead = f"resuming from the previous intact one, {step1}, instead (the steps after it are trained again)"
    assert f"warning: checkpoint {step3} is damaged ({why3}); {instead}" in err
    assert f"warning: checkpoint {step2} is damaged ({why2}); {instead}" in err
    assert f"resuming from {step1} (step 1)" in err
    kept = [(r["step"], r.get("attempt")) for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert kept == [(1, 1), (2, None), (3, None)]  # steps 2 and 3 trained again...
    # ... exactly as the first time, and the damaged checkpoints were written anew.
    assert train_losses(out) == losses
    again = load_file(str(out / "final" / "model.safetensors"))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert [ckpt.checkpoint_damage(folder) for folder in (step1, step2, step3)] == [None, None, None]


def test_resume_auto_when_the_only_checkpoint_is_damaged(tmp_path, capsys, tiny_corpus, tiny_model_file):
    out = tmp_path / "run"
    argv = pretrain_argv(tiny_corpus, tiny_model_file, out, steps=2)
    code, err = run_cli(capsys, argv)
    assert code == 0, err
    step2 = out / "checkpoints" / ckpt.checkpoint_name(2)
    size = truncate(step2 / "trainer_state.pt", 100)
    code, err = run_cli(capsys, argv + ["--resume", "auto"])
    assert code == 2, err
    assert error_line(err) == (
        f"megabert pretrain: error: --resume auto: the latest checkpoint {step2} is damaged (trainer_state.pt "
        f"is 100 bytes, {size:,} when it was saved), and so there is no earlier one: nothing to resume from; "
        "start a new run in another output folder"
    )


# ====================================================================================== other data
def test_resume_on_other_data_is_refused_and_a_copy_of_the_same_data_resumes(
    tmp_path, capsys, tiny_corpus, tiny_model_file
):
    out = tmp_path / "run"
    train, valid = tiny_corpus["train"], tiny_corpus["valid"]
    code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, out, steps=2))
    assert code == 0, err
    step2 = out / "checkpoints" / ckpt.checkpoint_name(2)

    code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, out, "--resume", "auto", steps=4, data=valid))
    assert code == 2, err
    saved, now = data_fingerprint(train)["content"], data_fingerprint(valid)["content"]
    assert saved != now
    assert error_line(err) == (
        f"megabert pretrain: error: cannot resume from {step2}: it was written for a different configuration "
        f"(data: {train} ({saved}) in the checkpoint, {valid} ({now}) now). Resume with the same settings, "
        "or start a new run in another output folder."
    )
    assert train_steps(out) == [1, 2]  # nothing trained

    # The same files under another prefix (a node-local copy): the run continues.
    copy = tmp_path / "local" / "copied"
    copy.parent.mkdir()
    for suffix in (".bin", ".idx"):
        Path(f"{copy}{suffix}").write_bytes(Path(f"{train}{suffix}").read_bytes())
    code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, out, "--resume", "auto", steps=4, data=copy))
    assert code == 0, err
    assert f"resuming from {step2} (step 2)" in err
    assert train_steps(out) == [1, 2, 3, 4]


# ====================================================================================== divergence
DIVERGED = re.compile(
    r"megabert pretrain: error: the loss is (nan|inf|-inf) at step \d+: training diverged\. Lower the learning "
    r"rate, use warmup or gradient clipping, and resume from the last checkpoint"
)


def test_a_diverging_run_ends_in_one_line_and_debug_shows_the_traceback(
    tmp_path, capsys, monkeypatch, tiny_corpus, tiny_model_file
):
    argv = pretrain_argv(tiny_corpus, tiny_model_file, tmp_path / "run", "--clip-grad", "0", steps=8, lr="1e8")
    # The real entry point: its whole stderr.
    result = subprocess.run([sys.executable, "-m", "megabert", *argv], env=ENV, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert DIVERGED.fullmatch(error_line(result.stderr)), result.stderr
    # MEGABERT_DEBUG=1: the exception escapes main() (Python prints the traceback).
    monkeypatch.setenv("MEGABERT_DEBUG", "1")
    with pytest.raises(TrainingError, match=r"the loss is (nan|inf|-inf) at step \d+: training diverged"):
        cli_main(pretrain_argv(tiny_corpus, tiny_model_file, tmp_path / "debug", "--clip-grad", "0", steps=8, lr="1e8"))


# ============================================================================= a full disk, read-only
def _fails_in_checkpoints(real, make_error):
    """A writer that writes part of a file and fails with ``make_error(path)`` when writing into checkpoints/."""

    def write(obj, path, *args, **kwargs):
        if ckpt.CHECKPOINTS_DIR in Path(path).parts:
            Path(path).write_bytes(b"\0" * 100)  # what made it to the disk before it filled up
            raise make_error(str(path))
        return real(obj, path, *args, **kwargs)

    return write


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_during_a_checkpoint_is_one_line_naming_the_file(
    tmp_path, capsys, monkeypatch, tiny_corpus, tiny_model_file, writer
):
    import megabert.modeling.pretrained as pretrained

    out = tmp_path / "run"
    if writer == "safetensors":  # the Rust writer's own error: the OS error is in its text only
        name = "model/model.safetensors"
        monkeypatch.setattr(pretrained, "save_safetensors", _fails_in_checkpoints(
            pretrained.save_safetensors,
            lambda path: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        ))  # fmt: skip
    else:
        name = "trainer_state.pt"
        monkeypatch.setattr(ckpt.torch, "save", _fails_in_checkpoints(
            torch.save, lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        ))  # fmt: skip
    code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, out, "--save-every", "2", steps=2))
    assert code == 1, err
    target = out / "checkpoints" / ckpt.checkpoint_name(2) / name
    assert error_line(err) == f"megabert pretrain: error: cannot write {target}: {DISK_FULL}"
    assert leftovers(out) == [] and list((out / "checkpoints").iterdir()) == []
    assert not (out / LOCK_FILE).exists()


FSIZE_DRIVER = """
import resource, signal, sys
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from megabert.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_real_failed_write_of_a_checkpoint_is_one_line(tmp_path, tiny_corpus, tiny_model_file):
    """No mock: a file-size limit makes the real safetensors write of the first checkpoint fail (EFBIG)."""
    driver = tmp_path / "fsize.py"
    driver.write_text(FSIZE_DRIVER)
    out = tmp_path / "run"
    argv = pretrain_argv(tiny_corpus, tiny_model_file, out, "--save-every", "2", steps=2)
    result = subprocess.run([sys.executable, str(driver), "50000", *argv], env=dict(ENV, PYTHONDONTWRITEBYTECODE="1"),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr
    target = out / "checkpoints" / ckpt.checkpoint_name(2) / "model" / "model.safetensors"
    assert error_line(result.stderr) == f"megabert pretrain: error: cannot write {target}: File too large"
    assert leftovers(out) == [] and list((out / "checkpoints").iterdir()) == []


def test_a_read_only_output_is_one_line(tmp_path, capsys, monkeypatch, tiny_corpus, tiny_model_file):
    """EROFS (simulated: os.open into the folder fails as on a read-only mount) names the file it could not create."""
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == out and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, out, steps=2))
    assert (code, err.strip()) == (1, f"megabert pretrain: error: cannot write {out / LOCK_FILE}: Read-only file "
                                      "system (the file system is read-only: write elsewhere)")  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_an_output_folder_without_write_permission_is_one_line(tmp_path, capsys, tiny_corpus, tiny_model_file):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, err = run_cli(capsys, pretrain_argv(tiny_corpus, tiny_model_file, parent / "run", steps=2))
    finally:
        parent.chmod(0o755)
    assert (code, err.strip()) == (1, f"megabert pretrain: error: cannot write {parent / 'run'}: Permission denied")


# ======================================================================= SIGKILL at random moments
@pytest.mark.slow
def test_sigkill_at_seeded_random_moments_resumes_to_the_uninterrupted_run(tmp_path, tiny_corpus, tiny_model_file):
    """Three SIGKILLs, each at a moment drawn by random.Random(13) after a new checkpoint; --resume auto each time.

    The final per-step losses (metrics.jsonl) and weights equal those of a run never stopped, and
    every kill leaves an intact latest checkpoint (and a lock the next attempt can take).
    """
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def command(out: Path, delay: float, *extra: str) -> list[str]:
        argv = pretrain_argv(tiny_corpus, tiny_model_file, out, "--save-every", "2", "--keep-last", "2", *extra,
                             steps=16)  # fmt: skip
        return [sys.executable, str(driver), str(delay), *argv]

    full = subprocess.run(command(tmp_path / "full", 0.0), env=ENV, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    assert len(train_losses(tmp_path / "full")) == 16

    rng = random.Random(13)
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    resumed_step = 0
    for attempt in range(3):
        extra = ("--resume", "auto") if attempt else ()
        victim = subprocess.Popen(command(run, 0.25, *extra), env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)  # fmt: skip
        try:
            deadline = time.time() + 120
            while True:  # a checkpoint newer than the one this attempt started from
                found = ckpt.list_checkpoints(checkpoints)
                if found and found[-1][0] > resumed_step:
                    break
                assert victim.poll() is None, victim.stderr.read().decode()
                assert time.time() < deadline, "no new checkpoint appeared"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
            assert victim.poll() is None, "the run ended before the kill"
            victim.send_signal(signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
            victim.stderr.close()
        latest = ckpt.latest_checkpoint(checkpoints)
        assert latest is not None and ckpt.checkpoint_damage(latest) is None
        assert ckpt.read_info(latest)["step"] > resumed_step
        resumed_step = ckpt.read_info(latest)["step"]

    resumed = subprocess.run(command(run, 0.0, "--resume", "auto"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {latest} (step {resumed_step})" in resumed.stderr
    assert train_steps(run) == list(range(1, 17))
    assert train_losses(run) == train_losses(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert leftovers(run) == []
