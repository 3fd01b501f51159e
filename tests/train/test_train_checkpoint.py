"""Checkpoints: exact resume after SIGTERM / SIGKILL, failed writes, pruning, mismatched resumes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainkit import SyntheticPretrainingData, tiny_config
from megabert import MegatronBertForPreTraining
from megabert.data.pretraining import collate_pretraining
from megabert.errors import UserError
from megabert.train.engine import checkpoint as ckpt
from megabert.train.engine.checkpoint import CheckpointConfig
from megabert.train.engine.logging import MetricsConfig, read_metrics
from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig
from megabert.train.jobs.pretrain import PretrainingObjective
from megabert.train.engine.trainer import ResumableLoader, Trainer, TrainerCallback, TrainerConfig

QUIET = MetricsConfig(log_every=1, progress=False, tensorboard=False, plot=False)


def make_trainer(out: Path, max_steps: int = 8, init_seed: int = 0, hidden: int = 32, batch: int = 4, **ckpt_options):
    """Tiny MLM+NSP model, dropout on, shuffled data crossing epochs (12 samples = 3 batches per epoch)."""
    torch.manual_seed(init_seed)
    model = MegatronBertForPreTraining(tiny_config(unpad_inputs=True, hidden_size=hidden))
    loader = ResumableLoader(SyntheticPretrainingData(12), batch, collate_pretraining, seed=3)
    return Trainer(
        model, loader,
        TrainerConfig(out, max_steps=max_steps, grad_accum=2, device="cpu", seed=11),
        optimizer=OptimizerConfig(lr=2e-3), schedule=ScheduleConfig("cosine", 2, 0.1),
        checkpoints=CheckpointConfig(**ckpt_options), loss_fn=PretrainingObjective("nsp"), metrics=QUIET,
        run_signature={"batch_size": batch},
    )


class SignalAt(TrainerCallback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, step, metrics) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_continues_exactly(tmp_path, signum):
    full = make_trainer(tmp_path / "full").train()

    trainer = make_trainer(tmp_path / "run")
    trainer.callbacks.append(SignalAt(3, signum))
    stopped = trainer.train()
    assert stopped.stop_reason == signal.Signals(signum).name and stopped.interrupted
    assert stopped.step == 3 and stopped.last_checkpoint.name == "step-00000003"
    assert signal.getsignal(signum) is not trainer._on_signal  # handlers restored

    # A fresh process would build a fresh model (another init): the checkpoint must override it all.
    resumed_trainer = make_trainer(tmp_path / "run", init_seed=99, resume="auto")
    assert resumed_trainer.state.step == 3 and resumed_trainer.state.micro_batches == 6
    resumed = resumed_trainer.train()
    assert stopped.losses + resumed.losses == full.losses
    assert train_losses(tmp_path / "run") == full.losses
    for a, b in zip(resumed_trainer.model.parameters(), make_trainer(tmp_path / "x", resume=str(full.last_checkpoint)).model.parameters()):
        assert torch.equal(a, b)


DRIVER = """
import sys, time
import torch
torch.set_num_threads(1)
from megabert.train.engine import trainer as T
delay = float(sys.argv[1])
original = T.Trainer._train_step
def slow_step(self, iterator):
    out = original(self, iterator)
    time.sleep(delay)
    return out
T.Trainer._train_step = slow_step
from megabert.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, tiny_corpus, tiny_model_file):
    """`megabert pretrain` killed with SIGKILL, resumed with --resume auto: the same losses and weights."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def command(out: Path, delay: float, *extra: str) -> list[str]:
        return [
            sys.executable, str(driver), str(delay), "pretrain",
            "--data", str(tiny_corpus["train"]), "--tokenizer", str(tiny_corpus["tokenizer"]),
            "--model-config", str(tiny_model_file), "--output", str(out), "--max-steps", "8",
            "--batch-size", "4", "--seq-length", "32", "--lr", "2e-3", "--warmup-steps", "2",
            "--save-every", "2", "--keep-last", "2", "--log-every", "1", "--quiet", *extra,
        ]

    full = subprocess.run(command(tmp_path / "full", 0.0), env=env, capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr

    victim = subprocess.Popen(command(tmp_path / "run", 0.3), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 90
    while ckpt.latest_checkpoint(checkpoints) is None or ckpt.latest_checkpoint(checkpoints).name < "step-00000004":
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim.stderr.close()
    latest = ckpt.latest_checkpoint(checkpoints)
    assert latest is not None and ckpt.is_complete(latest)

    resumed = subprocess.run(command(tmp_path / "run", 0.0, "--resume", "auto"), env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {latest}" in resumed.stderr
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "full")
    assert len(train_losses(tmp_path / "full")) == 8
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    full = make_trainer(tmp_path / "full", max_steps=6).train()

    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint dies half-way: its model files are already written
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    trainer = make_trainer(tmp_path / "run", max_steps=6, save_every=2)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no half-written folder left
    assert ckpt.resolve_resume("auto", tmp_path / "run") == root / "step-00000002"
    resumed = make_trainer(tmp_path / "run", max_steps=6, save_every=2, resume="auto").train()
    assert resumed.losses == full.losses[2:]


def test_incomplete_folders_are_ignored_and_cleaned(tmp_path):
    make_trainer(tmp_path, max_steps=2, save_every=2).train()
    root = tmp_path / "checkpoints"
    # What a SIGKILL during a save or a prune leaves behind, and a copy missing its last file.
    (root / ".step-00000004.abc123.partial" / "model").mkdir(parents=True)
    (root / ".step-00000001.deleting").mkdir()
    broken = root / "step-00000009"
    (broken / "model").mkdir(parents=True)
    (broken / "trainer_state.pt").write_bytes(b"")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-00000002"
    trainer = make_trainer(tmp_path, max_steps=3, resume="auto")
    assert trainer.state.step == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000009"]


def test_keep_last(tmp_path):
    make_trainer(tmp_path, max_steps=5, save_every=1, keep_last=2).train()
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004", "step-00000005"]


def test_checkpoint_contents(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    result = trainer.train()
    folder = result.last_checkpoint
    info = ckpt.read_info(folder)
    assert info["step"] == 2 and info["micro_batches"] == 4 and info["samples"] == 16
    assert info["model_config"]["hidden_size"] == 32 and info["signature"]["batch_size"] == 4
    state = ckpt.load_state(folder)
    assert set(state) == {"optimizer", "scheduler", "scaler", "rng", "position"}
    assert state["scheduler"]["last_epoch"] == 2
    loaded = MegatronBertForPreTraining.from_pretrained(folder / "model")
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_state_roundtrip():
    state = ckpt.capture_rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(5), torch.rand(7)
    ckpt.restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_resume_with_another_model_config_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    with pytest.raises(UserError) as info:
        make_trainer(tmp_path, max_steps=4, hidden=48, resume="auto")
    message = str(info.value)
    assert f"cannot resume from {tmp_path / 'checkpoints' / 'step-00000002'}: it was written for a different configuration" in message
    assert "hidden_size: 32 in the checkpoint, 48 now" in message


def _classifier_trainer(out: Path, max_steps: int, problem_type: str | None = None, **ckpt_options) -> Trainer:
    """A sequence classifier whose config.problem_type is unset until its first forward pass sets it."""
    from megabert import MegatronBertForSequenceClassification

    torch.manual_seed(0)
    model = MegatronBertForSequenceClassification(tiny_config(num_labels=3, problem_type=problem_type))
    batches = [{"input_ids": torch.randint(5, 128, (4, 8)), "labels": torch.tensor([0, 1, 2, 1])} for _ in range(2)]
    return Trainer(model, batches, TrainerConfig(out, max_steps=max_steps, device="cpu"),
                   checkpoints=CheckpointConfig(**ckpt_options), metrics=QUIET)


def test_resume_of_a_classifier_ignores_the_problem_type_set_by_its_first_forward(tmp_path):
    _classifier_trainer(tmp_path, max_steps=2).train()
    saved = ckpt.read_info(tmp_path / "checkpoints" / "step-00000002")["model_config"]
    assert saved["problem_type"] == "single_label_classification"  # set during training
    resumed = _classifier_trainer(tmp_path, max_steps=3, resume="auto")  # a fresh model: problem_type None
    assert resumed.state.step == 2 and resumed.train().step == 3
    # Two different settings are still a different model.
    with pytest.raises(UserError, match="problem_type: 'single_label_classification' in the checkpoint, 'regression' now"):
        _classifier_trainer(tmp_path, max_steps=4, problem_type="regression", resume="auto")


def test_resume_with_another_batch_size_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    with pytest.raises(UserError, match="batch_size: 4 in the checkpoint, 2 now"):
        make_trainer(tmp_path, max_steps=4, batch=2, resume="auto")


def test_resume_from_something_else(tmp_path):
    with pytest.raises(UserError, match=r"--resume .*nowhere: no such checkpoint folder"):
        make_trainer(tmp_path / "a", resume=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--resume .*empty: not a complete checkpoint \(expected model/, trainer_state.pt"):
        make_trainer(tmp_path / "b", resume=str(tmp_path / "empty"))
    # "auto" with nothing to resume starts fresh.
    assert make_trainer(tmp_path / "c", resume="auto").state.step == 0


def test_fresh_start_over_an_existing_run_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    with pytest.raises(UserError) as info:
        make_trainer(tmp_path, max_steps=4)
    assert "already holds checkpoints of a run (latest step-00000002): pass --resume auto to continue it" in str(info.value)


def test_raising_max_steps_on_resume_keeps_the_schedule(tmp_path):
    """The schedule is part of the checkpoint: a longer resumed run continues the original one."""
    first = make_trainer(tmp_path, max_steps=3)
    first.train()
    resumed = make_trainer(tmp_path, max_steps=6, resume="auto")
    rates = []
    resumed.callbacks.append(type("Rates", (TrainerCallback,), {"on_step_end": lambda self, t, s, m: rates.append(m["lr"])})())
    resumed.train()
    # cosine, 2 warmup, 3 updates in all, floor 0.1 x 2e-3: updates 4.. run at the floor.
    assert rates == pytest.approx([2e-4, 2e-4, 2e-4])
