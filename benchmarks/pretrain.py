"""Pretraining step speed: our trainer step vs the `transformers` reference, same batches, same AdamW.

Both models run through the same :class:`megabert.train.engine.trainer.Trainer` loop (AdamW with the
BERT decay rule, warmup schedule, clipping at 1.0, metrics), so the difference is the model
and the objective:

* reference: ``transformers.MegatronBertForPreTraining`` (eager attention), its own loss, which
  computes vocabulary logits for every position (``batch x seq x 30592``);
* ours: ``megabert.MegatronBertForPreTraining`` with ``unpad_inputs`` (pad tokens skipped) and
  :class:`~megabert.train.jobs.pretrain.PretrainingObjective` (logits only at the masked ~15%),
  in fp32 or with bf16 autocast.

The batches imitate ``PretrainingDataset`` output: random word-pieces, 90% of samples at full
length and 10% shorter, 15% of tokens labelled, NSP labels. Vocabulary 30,592 (BERT's 30,522
padded to a multiple of 128). Dropout 0.1 in the timed runs.

Loss check: with dropout off, both models start from the same weights and take the first
steps on the same batches; the losses must agree within 1e-4 relative (fp32).

Timing: ``--rounds`` alternate runs of ours and the reference (each from the same initial
weights); a case reports the median step time over the timed steps of all rounds, which keeps a
burst of load from other processes on a shared machine from deciding the ratio.

Peak memory: what a run adds at its peak (model, optimizer state, activations): CUDA
``max_memory_allocated``; on CPU the bytes malloc has handed out (glibc ``mallinfo2``), sampled
every 5 ms, minus the amount before the run.

Prints one JSON line per case. Targets (speedup = our steps/s over the reference's):
tiny-fp32 >= 3.5, base-fp32 >= 1.4, base-bf16 (ours bf16 vs reference fp32) >= 3.0.

bf16 drift (``--drift-steps N``): ours at tiny size trained N steps in fp32 and with bf16
autocast, same weights, batches and dropout masks; the loss after N steps must be within 2%.

Usage:
    python benchmarks/pretrain.py                 # tiny-fp32, base-fp32, base-bf16
    python benchmarks/pretrain.py --cases tiny-fp32 --steps 5
    python benchmarks/pretrain.py --quick         # tiny size, small batch, 2 steps: checks the script
    python benchmarks/pretrain.py --cases tiny-fp32 --drift-steps 100   # + bf16 vs fp32 loss after 100 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from memory import PeakMemory  # benchmarks/memory.py (the script's folder is on sys.path)

VOCAB = 30592
SIZES = {
    "tiny": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
BATCHES = {"tiny": (64, 128), "base": (16, 128)}  # (batch, seq)
CASES = {  # name -> (size, our precision, target speedup over the fp32 reference)
    "tiny-fp32": ("tiny", "fp32", 3.5),
    "base-fp32": ("base", "fp32", 1.4),
    "base-bf16": ("base", "bf16", 3.0),
    "tiny-bf16": ("tiny", "bf16", None),
}
LOSS_RTOL = 1e-4


def make_batches(count: int, batch: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Pretraining-like batches: ids, token types, padding mask, 15% MLM labels, NSP labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        lengths = torch.where(torch.rand(batch, generator=g) < 0.1, torch.randint(seq // 4, seq, (batch,), generator=g), seq)
        positions = torch.arange(seq)[None, :]
        mask = (positions < lengths[:, None]).long()  # (B, T)
        ids = torch.randint(5, VOCAB - 128, (batch, seq), generator=g)
        ids[:, 0] = 2
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        types = (positions >= (lengths[:, None] // 2)).long() * mask
        chosen = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
        chosen[:, 0] = False
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        ids = torch.where(chosen, torch.full_like(ids, 4), ids)
        nsp = torch.randint(0, 2, (batch,), generator=g)
        out.append({"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels,
                    "next_sentence_label": nsp})
    return out




class StepClock:
    """Trainer callback recording when each step ends."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, trainer: Any, step: int, metrics: Any) -> None:
        self.times.append(time.perf_counter())

    def on_evaluate(self, *args: Any) -> None:
        pass

    def on_save(self, *args: Any) -> None:
        pass


def build_pair(size: str, dropout: float, folder: Path, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and the reference, with the same initial weights (ours saved, the reference loads it)."""
    import transformers

    from megabert.config import MegatronBertConfig
    from megabert.modeling.heads import MegatronBertForPreTraining

    config = MegatronBertConfig(
        vocab_size=VOCAB, max_position_embeddings=512, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, unpad_inputs=True, **SIZES[size],
    )
    torch.manual_seed(seed)
    ours = MegatronBertForPreTraining(config)
    ours.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.MegatronBertForPreTraining.from_pretrained(folder, attn_implementation="eager")
    return ours, reference


def train(model: torch.nn.Module, batches: list, ours: bool, precision: str, steps: int, device: torch.device,
          folder: Path, lr: float = 1e-4) -> dict[str, Any]:
    """Run ``steps`` trainer steps; returns losses, per-step times and peak memory."""
    from megabert.train.engine.checkpoint import CheckpointConfig
    from megabert.train.engine.logging import MetricsConfig
    from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig
    from megabert.train.jobs.pretrain import PretrainingObjective
    from megabert.train.engine.trainer import Trainer, TrainerConfig

    clock = StepClock()
    trainer = Trainer(
        model, batches,
        TrainerConfig(folder, max_steps=steps, precision=precision, device=str(device), clip_grad=1.0),
        optimizer=OptimizerConfig(lr=lr, weight_decay=0.01),
        schedule=ScheduleConfig("linear", warmup_steps=1),
        checkpoints=CheckpointConfig(save_at_end=False),
        metrics=MetricsConfig(log_every=10**9, progress=False, tensorboard=False, plot=False),
        loss_fn=PretrainingObjective("nsp") if ours else None,
        callbacks=[clock],
    )
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = trainer.train()
    trainer.close()
    ends = [start] + clock.times
    return {"losses": result.losses, "step_times": [b - a for a, b in zip(ends, ends[1:])], "peak_mem_bytes": memory.peak}


def summarize(runs: list[dict[str, Any]], warmup: int, precision: str) -> dict[str, Any]:
    """Median step time over the timed steps of all rounds (robust to a busy machine), peak memory."""
    timed = sorted(t for run in runs for t in (run["step_times"][warmup:] or run["step_times"]))
    median = timed[len(timed) // 2] if len(timed) % 2 else (timed[len(timed) // 2 - 1] + timed[len(timed) // 2]) / 2
    return {
        "precision": precision,
        "step_s": round(median, 4),
        "steps_per_s": round(1.0 / median, 4),
        "step_s_min_max": [round(timed[0], 4), round(timed[-1], 4)],
        "timed_steps": len(timed),
        "peak_mem_bytes": int(max(run["peak_mem_bytes"] for run in runs)),
    }


def loss_check(size: str, batches: list, steps: int, device: torch.device, folder: Path, seed: int) -> dict[str, Any]:
    """Dropout off, fp32, same init and data: the first steps' losses of both models."""
    ours, reference = build_pair(size, 0.0, folder / "init-check", seed)
    a = train(ours.to(device), batches[:steps], True, "fp32", steps, device, folder / "check-ours")["losses"]
    b = train(reference.to(device), batches[:steps], False, "fp32", steps, device, folder / "check-ref")["losses"]
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return {"ours": [round(x, 6) for x in a], "reference": [round(y, 6) for y in b],
            "max_rel_diff": float(f"{worst:.3g}"), "rtol": LOSS_RTOL, "ok": worst <= LOSS_RTOL}


def bf16_drift(steps: int, batch: int, device: torch.device, folder: Path) -> dict[str, Any]:
    """Ours at tiny size, fp32 and bf16 autocast from the same weights on the same batches (dropout
    on, the same masks: the RNG streams match): the losses after ``steps`` steps.

    Eight batches cycled at lr 1e-3, so that the model memorises them and the loss falls far
    (random tokens alone teach nothing: both runs would sit at the first loss)."""
    seq = BATCHES["tiny"][1]
    batches = make_batches(8, batch, seq, seed=3)
    losses = {}
    for precision in ("fp32", "bf16"):
        ours, _ = build_pair("tiny", 0.1, folder / f"drift-{precision}", seed=0)
        losses[precision] = train(ours.to(device), batches, True, precision, steps, device,
                                  folder / f"drift-run-{precision}", lr=1e-3)["losses"]
    last = {k: sum(v[-10:]) / len(v[-10:]) for k, v in losses.items()}
    at_end = abs(losses["bf16"][-1] - losses["fp32"][-1]) / abs(losses["fp32"][-1])
    return {
        "case": "bf16-drift", "model": "4x256", "batch": [batch, seq], "steps": steps,
        "fp32_loss": round(losses["fp32"][-1], 5), "bf16_loss": round(losses["bf16"][-1], 5),
        "rel_diff": round(at_end, 5), "last10_mean_rel_diff": round(abs(last["bf16"] - last["fp32"]) / last["fp32"], 5),
        "first_loss": round(losses["fp32"][0], 5), "target": 0.02, "meets_target": at_end <= 0.02,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny-fp32,base-fp32,base-bf16", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps of each run (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/reference runs (default 3)")
    parser.add_argument("--check-steps", type=int, default=3, help="steps of the loss check (0: skip)")
    parser.add_argument("--batch-size", type=int, help="override the case's batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny-fp32 with batch 8, 2 steps: checks the script")
    parser.add_argument("--drift-steps", type=int, default=0,
                        help="also train ours at tiny size N steps in fp32 and in bf16 and compare the losses (e.g. 100)")
    parser.add_argument("--drift-batch", type=int, default=16, help="batch size of the drift runs (default 16)")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.steps, args.warmup, args.check_steps, args.rounds = "tiny-fp32", 2, 1, 2, 1
        args.batch_size = args.batch_size or 8
    device = torch.device(args.device)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")

    reference_runs: dict[str, dict[str, Any]] = {}  # size -> summary of the fp32 reference (shared by cases)
    checks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="megabert-bench-") as tmp:
        folder = Path(tmp)
        for name in names:
            size, precision, target = CASES[name]
            batch, seq = BATCHES[size]
            batch = args.batch_size or batch
            batches = make_batches(args.warmup + args.steps, batch, seq)
            if args.check_steps and size not in checks:
                checks[size] = loss_check(size, batches, args.check_steps, device, folder / name, seed=0)
            # Rounds alternate ours and the reference, each from the same initial weights, so that a
            # burst of load from other processes hits both.
            ours_runs, ref_runs = [], []
            for round_number in range(args.rounds):
                base = folder / name / f"round{round_number}"
                ours, reference = build_pair(size, 0.1, base / "init", seed=0)
                steps = args.warmup + args.steps
                ours_runs.append(train(ours.to(device), batches, True, precision, steps, device, base / "ours"))
                del ours
                gc.collect()
                if size not in reference_runs:
                    ref_runs.append(train(reference.to(device), batches, False, "fp32", steps, device, base / "ref"))
                del reference
                gc.collect()
            ours_run = summarize(ours_runs, args.warmup, precision)
            if size not in reference_runs:
                reference_runs[size] = summarize(ref_runs, args.warmup, "fp32")
            ref_run = reference_runs[size]
            speedup = ours_run["steps_per_s"] / ref_run["steps_per_s"]
            print(json.dumps({
                "case": name,
                "model": f"{SIZES[size]['num_hidden_layers']}x{SIZES[size]['hidden_size']}",
                "batch": [batch, seq],
                "vocab": VOCAB,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "ours": ours_run,
                "reference": ref_run,
                "speedup": round(speedup, 3),
                "target": target,
                "meets_target": None if target is None else speedup >= target,
                "memory_ratio": round(ours_run["peak_mem_bytes"] / max(ref_run["peak_mem_bytes"], 1), 3),
                "loss_check": checks.get(size),
            }), flush=True)
        if args.drift_steps:
            print(json.dumps(bf16_drift(args.drift_steps, args.drift_batch, device, folder)), flush=True)


if __name__ == "__main__":
    main()
