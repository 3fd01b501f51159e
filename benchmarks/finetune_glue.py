"""End-to-end fine-tuning on the real data in ../shared/data: pretrained vs random initialisation.

For each task it runs the documented ``megabert finetune`` command twice -- from a pretrained
model folder and from the same folder with ``--random-init`` (same config and tokenizer, fresh
weights) -- and collects the best validation metrics into a table (markdown and JSON).

Tasks (dev sets as validation; training sets subsampled to keep the runs short on 2 CPU cores):
SST-2, MRPC, STS-B, CoLA, CoNLL-2003 NER, XQuAD (SQuAD v1.1 format; split by article),
COPA and PIQA (multiple choice; split in file order).

Usage::

    python benchmarks/finetune_glue.py --pretrained runs/gutenberg-tiny/final --work runs/finetune-e2e
    python benchmarks/finetune_glue.py --work runs/finetune-e2e          # random init only
    python benchmarks/finetune_glue.py ... --reduced                     # a smaller, faster version

Without ``--pretrained``, a tiny model folder (4 layers x 256, the ``tiny`` preset of
``megabert pretrain``, BERT's uncased vocabulary) is written to WORK/init and only the
random-initialisation runs are made. Each run's log is in WORK/logs/, its outputs in WORK/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@dataclass
class Task:
    """One fine-tuning job: its files, head and the metrics worth reporting."""

    name: str
    task: str
    train: str
    validation: str
    metrics: tuple[str, ...]
    train_examples: int | None = None  # subsample of the training file (None: all)
    eval_examples: int | None = None
    extra: list[str] = field(default_factory=list)


def tasks(splits: Path, reduced: bool) -> list[Task]:
    n = 1500 if reduced else 4000
    glue = DATA / "glue"
    return [
        Task("SST-2", "sequence-classification", f"{glue}/SST-2/train.tsv", f"{glue}/SST-2/dev.tsv",
             ("accuracy",), n, 2000 if reduced else None),
        Task("MRPC", "sequence-classification", f"{glue}/MRPC/train.tsv", f"{glue}/MRPC/dev.tsv",
             ("f1", "accuracy"), n),
        Task("STS-B", "sequence-classification", f"{glue}/STS-B/train.tsv", f"{glue}/STS-B/dev.tsv",
             ("pearson", "spearman"), n),
        Task("CoLA", "sequence-classification", f"{glue}/CoLA/train.tsv", f"{glue}/CoLA/dev.tsv",
             ("mcc", "accuracy"), n),
        Task("CoNLL-2003", "token-classification", f"{DATA}/conll2003/train.txt", f"{DATA}/conll2003/dev.txt",
             ("f1", "precision", "recall", "accuracy"), n, 1000 if reduced else None),
        Task("XQuAD (en)", "question-answering", f"{splits}/xquad-train.json", f"{splits}/xquad-dev.json",
             ("exact_match", "f1"), 400 if reduced else 800, None, ["--doc-stride", "32"]),
        Task("COPA", "multiple-choice", f"{splits}/copa-train.jsonl", f"{splits}/copa-dev.jsonl", ("accuracy",)),
        Task("PIQA", "multiple-choice", f"{splits}/piqa-train.jsonl", f"{splits}/piqa-dev.jsonl",
             ("accuracy",), 600 if reduced else 1500),
    ]


# ----------------------------------------------------------------------------------- splits
def write_splits(folder: Path) -> None:
    """Train/dev splits of the single-file sets: XQuAD by article (the last 10 articles are dev),
    COPA 70/30 and PIQA 1500/338 in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    xquad = json.loads((DATA / "qa" / "xquad.en.json").read_text(encoding="utf-8"))
    for name, articles in (("train", xquad["data"][:-10]), ("dev", xquad["data"][-10:])):
        (folder / f"xquad-{name}.json").write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    for name, cut in (("copa", 70), ("piqa", 1500)):
        lines = (DATA / "multiple_choice" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / f"{name}-train.jsonl").write_text("".join(lines[:cut]), encoding="utf-8")
        (folder / f"{name}-dev.jsonl").write_text("".join(lines[cut:]), encoding="utf-8")


def write_init_folder(folder: Path) -> None:
    """A tiny (4 x 256) random MegatronBERT with BERT's uncased vocabulary: config + tokenizer + weights."""
    if (folder / "config.json").is_file():
        return
    import torch

    from megabert.modeling.heads import MegatronBertForPreTraining
    from megabert.tokenization import MegatronBertTokenizer
    from megabert.train.jobs.pretrain import build_model_config

    tokenizer = MegatronBertTokenizer.from_pretrained(DATA / "vocab" / "bert-uncased")
    torch.manual_seed(0)
    MegatronBertForPreTraining(build_model_config("tiny", len(tokenizer), 128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# -------------------------------------------------------------------------------------- runs
def command(task: Task, model: Path, out: Path, random_init: bool, args: argparse.Namespace) -> list[str]:
    cmd = ["megabert", "finetune", "--task", task.task, "--model", str(model), "--train", task.train,
           "--validation", task.validation, "--output", str(out), "--max-length", str(args.max_length),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--seed", str(args.seed), "--overwrite", "--quiet"]
    if task.train_examples:
        cmd += ["--max-train-examples", str(task.train_examples)]
    if task.eval_examples:
        cmd += ["--max-eval-examples", str(task.eval_examples)]
    if random_init:
        cmd.append("--random-init")
    if args.bf16:
        cmd.append("--bf16")
    return cmd + task.extra


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (``megabert`` as ``python -m megabert``), output to ``log``; returns seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, "-m", "megabert", *cmd[1:]], stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8").strip().splitlines()[-3:]
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return seconds


def wait_for_idle(limit_minutes: float, threshold: float = 2.0) -> float:
    """Wait (up to the limit) until the 1-minute load average is below ``threshold``; returns it."""
    deadline = time.time() + 60 * limit_minutes
    load = os.getloadavg()[0]
    while load >= threshold and time.time() < deadline:
        print(f"load average {load:.2f} >= {threshold}: waiting", file=sys.stderr, flush=True)
        time.sleep(30)
        load = os.getloadavg()[0]
    return load


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(rows: list[dict], inits: list[str]) -> str:
    head = "| task | metric | " + " | ".join(inits) + " | train examples | steps | minutes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        for i, metric in enumerate(row["metrics"]):
            values = " | ".join(fmt(row[init].get(metric)) if row.get(init) else "-" for init in inits)
            if i == 0:
                minutes = " / ".join(f"{row['seconds'][init] / 60:.1f}" for init in inits if init in row["seconds"])
                lines.append(f"| {row['name']} | {metric} | {values} | {row['train_examples']} | {row['steps']} |"
                             f" {minutes} |")
            else:
                lines.append(f"| | {metric} | {values} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, help="pretrained model folder (e.g. OUT/final of megabert pretrain)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "finetune-e2e", help="working folder")
    parser.add_argument("--only", help="comma-separated task names (e.g. SST-2,MRPC)")
    parser.add_argument("--reduced", action="store_true", help="smaller subsets (for a busy machine)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ folder")
    parser.add_argument("--wait-minutes", type=float, default=0.0, help="wait up to M minutes for load < 2 first")
    args = parser.parse_args(argv)

    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: this benchmark needs ../shared/data beside the checkout")
    load = wait_for_idle(args.wait_minutes) if args.wait_minutes else os.getloadavg()[0]
    print(f"load average at start: {load:.2f}", file=sys.stderr)
    write_splits(args.work / "splits")
    inits: list[tuple[str, Path, bool]] = []
    if args.pretrained is not None:
        inits = [("pretrained", args.pretrained, False), ("random init", args.pretrained, True)]
    else:
        write_init_folder(args.work / "init")
        inits = [("random init", args.work / "init", True)]
    selected = tasks(args.work / "splits", args.reduced)
    if args.only:
        wanted = {name.strip().lower() for name in args.only.split(",")}
        selected = [t for t in selected if t.name.lower() in wanted]

    rows = []
    total = time.perf_counter()
    for task in selected:
        row: dict = {"name": task.name, "metrics": list(task.metrics), "seconds": {}}
        for label, model, random_init in inits:
            slug = f"{task.name.split()[0].lower()}-{'random' if random_init else 'pretrained'}"
            out = args.work / "runs" / slug
            row["seconds"][label] = run(command(task, model, out, random_init, args), args.work / "logs" / f"{slug}.log")
            results = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
            row[label] = results["metrics"]
            row["train_examples"] = results["data"]["train"]["examples"]
            row["steps"] = results["max_steps"]
            row["commands"] = row.get("commands", []) + [shlex.join(command(task, model, out, random_init, args))]
            if not args.keep_checkpoints:  # the resumable training state; best/ is the result
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
            print(f"  {task.name} {label}: " + ", ".join(f"{m} {results['metrics'].get(m)}" for m in task.metrics),
                  flush=True)
        rows.append(row)
    labels = [label for label, _, _ in inits]
    text = table(rows, labels)
    minutes = (time.perf_counter() - total) / 60
    summary = f"{text}\n\nTotal {minutes:.1f} minutes; load average at start {load:.2f}.\n"
    (args.work / "results.md").write_text(summary, encoding="utf-8")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
