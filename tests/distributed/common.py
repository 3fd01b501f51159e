"""What the distributed tests and their worker processes share: tiny models, data, one training run.

The same :func:`train` runs in a worker under torchrun-style environment variables (a
``(dp, tp)`` mesh) and in the test process as the single-process reference, so the two can
only differ by how the work is split.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megabert.config import MegatronBertConfig
from megabert.train.engine.checkpoint import CheckpointConfig
from megabert.train.engine.logging import MetricsConfig
from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig
from megabert.train.distributed.parallel import ParallelContext
from megabert.train.jobs.pretrain import PretrainingObjective
from megabert.train.engine.trainer import ResumableLoader, Trainer, TrainerCallback, TrainerConfig

VOCAB = 128  # divisible by 2 and 4: the vocabulary can be sharded
SEQ = 16
DATASET_SIZE = 64
TASKS = ("pretrain", "classify")


def tiny_config(task: str) -> MegatronBertConfig:
    """hidden 32, 2 layers, 4 heads, no dropout (exact comparisons)."""
    config = MegatronBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    config.unpad_inputs = task == "pretrain"  # pretraining runs on real tokens only, as the job does
    return config


def build_model(task: str, seed: int = 11) -> torch.nn.Module:
    from megabert.modeling.heads import MegatronBertForPreTraining, MegatronBertForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(task)
    if task == "pretrain":
        return MegatronBertForPreTraining(config)
    return MegatronBertForSequenceClassification(config)


class SyntheticData(torch.utils.data.Dataset):
    """Samples fixed by their index: random lengths (so batches have padding), ~20% MLM labels."""

    def __init__(self, task: str, size: int = DATASET_SIZE) -> None:
        self.task = task
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([5, index])
        length = int(rng.integers(SEQ // 2, SEQ + 1))
        ids = rng.integers(5, VOCAB, length)
        ids[0], ids[-1] = 2, 3
        types = np.zeros(length, dtype=np.int64)
        types[length // 2 :] = 1
        sample: dict[str, Any] = {"input_ids": ids, "token_type_ids": types}
        if self.task == "pretrain":
            labels = np.full(length, -100)
            chosen = rng.random(length) < 0.2
            chosen[0] = chosen[-1] = False
            chosen[1] = True
            labels[chosen] = ids[chosen]
            ids[chosen] = 4
            sample["labels"] = labels
            sample["next_sentence_label"] = int(rng.integers(0, 2))
        else:
            sample["label"] = int(rng.integers(0, 3))
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    out = {
        "input_ids": torch.zeros(batch, width, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, width, dtype=torch.long),
        "attention_mask": torch.zeros(batch, width, dtype=torch.long),
    }
    if "labels" in samples[0]:
        out["labels"] = torch.full((batch, width), -100, dtype=torch.long)
        out["next_sentence_label"] = torch.tensor([s["next_sentence_label"] for s in samples])
    else:
        out["labels"] = torch.tensor([s["label"] for s in samples])
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        out["input_ids"][row, :n] = torch.as_tensor(sample["input_ids"])
        out["token_type_ids"][row, :n] = torch.as_tensor(sample["token_type_ids"])
        out["attention_mask"][row, :n] = 1
        if out["labels"].dim() == 2:
            out["labels"][row, :n] = torch.as_tensor(sample["labels"])
    return out


def probe_batch(task: str) -> dict[str, torch.Tensor]:
    """A fixed batch for comparing forward outputs (no labels)."""
    batch = collate([SyntheticData(task)[i] for i in (60, 61, 62)])
    return {k: v for k, v in batch.items() if k not in ("labels", "next_sentence_label")}


class LossRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer: Any, step: int, metrics: Any) -> None:
        self.losses.append(float(metrics["loss"]))
        action = os.environ.get("MEGABERT_TEST_FAULT")
        if action and step == 2 and int(os.environ.get("RANK", "0")) == 1:
            if action == "die":
                os._exit(1)  # a crash: the process is gone, its sockets closed
            if action == "freeze":
                import signal

                os.kill(os.getpid(), signal.SIGSTOP)  # alive but frozen: no heartbeat, no collectives


def forward_outputs(model: torch.nn.Module, task: str) -> dict[str, list]:
    model.eval()
    with torch.no_grad():
        out = model(**probe_batch(task))
    model.train()
    if task == "pretrain":
        return {"prediction_logits": out.prediction_logits.tolist(), "seq_relationship_logits": out.seq_relationship_logits.tolist()}
    return {"logits": out.logits.tolist()}


def train(
    ctx: ParallelContext,
    task: str,
    output_dir: str | os.PathLike,
    *,
    steps: int = 5,
    grad_accum: int = 1,
    batch_size: int = 4,
    save_every: int = 0,
    resume: str | None = None,
    model: torch.nn.Module | None = None,
    final_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``steps`` optimizer steps; returns the forward outputs before training and the global losses.

    ``final_dir``: also export the trained model there (every rank calls it; rank 0 writes).
    """
    model = ctx.wrap_model(model if model is not None else build_model(task))
    forward = forward_outputs(model, task)
    loader = ctx.shard_batches(ResumableLoader(SyntheticData(task), batch_size, collate, shuffle=True, seed=3))
    recorder = LossRecorder()
    trainer = Trainer(
        model, loader,
        TrainerConfig(output_dir=output_dir, max_steps=steps, grad_accum=grad_accum, clip_grad=0.5, seed=9, device="cpu",
                      eval_at_end=False),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.01),
        schedule=ScheduleConfig(kind="linear", warmup_steps=2),
        checkpoints=CheckpointConfig(save_every=save_every, keep_last=10, resume=resume),
        metrics=MetricsConfig(log_every=1, tensorboard=False, plot=False, progress=False),
        loss_fn=PretrainingObjective("nsp") if task == "pretrain" else None,
        distributed=ctx.hooks,
        callbacks=[recorder],
        run_signature={"batch_size": batch_size},
    )
    result = trainer.train()
    trainer.close()
    if final_dir is not None:
        ctx.save_pretrained(model, final_dir)
    # Each DP rank logged its own micro-batches' loss: the run's loss is their mean.
    reduced = ctx.hooks.all_reduce({f"{i:03d}": v for i, v in enumerate(recorder.losses)}, op="mean")
    return {
        "forward": forward,
        "losses": [reduced[k] for k in sorted(reduced)],
        "steps": result.step,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
    }


def count_all_reduces(model: torch.nn.Module, task: str) -> dict[str, int]:
    """All-reduces issued by one forward and by one backward of ``model`` (torch profiler, gloo)."""
    from torch.profiler import ProfilerActivity, profile

    batch = {**probe_batch(task), "labels": torch.tensor([0, 1, 2])}
    counts = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = model(**batch).loss
    counts["forward"] = sum(e.count for e in prof.key_averages() if e.key == "gloo:all_reduce")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    counts["backward"] = sum(e.count for e in prof.key_averages() if e.key == "gloo:all_reduce")
    model.zero_grad(set_to_none=True)
    return counts


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


if __name__ == "__main__":  # pragma: no cover - imported only
    sys.exit("import this module")
