"""Time to accuracy: pretrain T minutes with a recipe, fine-tune SST-2 by a fixed protocol, score held-back sentences.

For each T in ``--minutes`` (0 means a random initialisation of the same shape) it runs what a
user runs: ``megabert pretrain`` on ``../shared/data/gutenberg`` for T minutes with the recipe's
settings, then ``megabert finetune`` on SST-2 (the protocol: 20,000 rows of
``../shared/data/glue/SST-2/train.tsv``, 2 epochs, max length 64; the recipe's fine-tuning
settings), then ``megabert evaluate`` on a held-back set of full sentences. With ``--baseline``
the same curve is drawn for a hand-written loop over ``transformers``' MegatronBertForPreTraining
(masked positions only, the issue's settings: batch 64 x 128, lr 1e-3, 300 warmup steps then
constant, NSP, fp32) and a plain fine-tuning loop (constant lr 1e-4, batch 32, no clipping).

The held-back set: SST-2's GLUE training file holds phrases as well as sentences, and the phrases
of one sentence share its label. So ``--heldout`` (default 2,000) rows of 10+ words are drawn
(seeded) as the test set, and every other row that is a span of one of them, or that holds one of
them, is removed before the 20,000 fine-tuning rows (and 1,000 validation sentences, which pick
the best epoch) are drawn from what is left.

Prints one JSON line per run (``{"recipe", "minutes", "accuracy", "pretrain_steps", ...}``) and a
summary line; writes WORK/time_to_accuracy.json and WORK/time_to_accuracy.png (with matplotlib).

    python benchmarks/time_to_accuracy.py --minutes 0,10,20,40 --baseline      # the full run (~3 h)
    python benchmarks/time_to_accuracy.py --minutes 0,5 --finetune-rows 5000    # a quick proxy
    python benchmarks/time_to_accuracy.py --recipe issue-defaults --minutes 10  # the settings the issue measured
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SST2 = DATA / "glue" / "SST-2" / "train.tsv"
CORPUS = DATA / "gutenberg"
BERT_VOCAB = DATA / "vocab" / "bert-uncased"

# A recipe: how to pretrain (megabert pretrain options, the vocabulary) and how to fine-tune.
# "vocab": "bert-uncased" (BERT's 30,522 word-pieces) or an int (a WordPiece vocabulary of that
# size trained on the pretraining corpus by megabert train-tokenizer).
RECIPES: dict[str, dict] = {
    # What the issue measured: megabert pretrain's settings then, and megabert finetune's defaults at lr 1e-4.
    "issue-defaults": {
        "vocab": "bert-uncased",
        "pretrain": ["--model-config", "tiny", "--batch-size", "64", "--seq-length", "128", "--lr", "1e-3",
                     "--warmup-steps", "300", "--schedule", "constant", "--binary-task", "nsp"],
        "finetune": ["--lr", "1e-4"],
    },
    # The short-budget recipe (docs/pretraining.md, "Time to accuracy"): the recipe `megabert
    # pretrain --recipe short-budget` applies.
    "short-budget": {
        "vocab": "bert-uncased",
        "pretrain": ["--recipe", "short-budget"],
        "finetune": [],  # megabert finetune's defaults (lr by the model's width: 3e-4 for tiny)
    },
}


def cpu_name() -> str:
    """The `lscpu` model name (figures are only comparable on one CPU)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def run(cmd: list[str], log: Path) -> float:
    """Run ``megabert ...`` (as ``python -m megabert``) with its output in ``log``; returns seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(" ".join(cmd) + "\n")
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "megabert", *cmd[1:]], stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------ data
def read_sst2(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:2] != ["sentence", "label"]:
            raise SystemExit(f"{path}: expected the header sentence<TAB>label, got {header}")
        return [(row[0].strip(), row[1].strip()) for row in reader if len(row) >= 2 and row[0].strip()]


def split_sst2(rows: list[tuple[str, str]], heldout: int, train_rows: int, valid_rows: int, seed: int = 0):
    """(train, valid, heldout) rows: heldout and valid are 10+ word sentences; no train row overlaps them."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    long_rows = [i for i in order if len(rows[i][0].split()) >= 10]
    test_ids = long_rows[:heldout]
    valid_ids = long_rows[heldout : heldout + valid_rows]
    protected = [rows[i][0] for i in test_ids + valid_ids]
    spans = set()  # every contiguous word span of a protected sentence
    for text in protected:
        words = text.split()
        spans.update(" ".join(words[a:b]) for a in range(len(words)) for b in range(a + 1, len(words) + 1))
    protected_set = set(protected)
    taken = set(test_ids + valid_ids)

    def overlaps(text: str) -> bool:
        if text in spans:
            return True
        words = text.split()  # a longer row that holds a protected sentence
        return any(" ".join(words[a:b]) in protected_set
                   for a in range(len(words)) for b in range(a + 10, len(words) + 1))

    train = [rows[i] for i in order if i not in taken and not overlaps(rows[i][0])]
    if len(train) < train_rows:
        raise SystemExit(f"only {len(train)} SST-2 rows left after holding back; asked for {train_rows}")
    return train[:train_rows], [rows[i] for i in valid_ids], [rows[i] for i in test_ids]


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("sentence\tlabel\n")
        handle.writelines(f"{text}\t{label}\n" for text, label in rows)


def gutenberg_documents(path: Path, lines_per_document: int = 40) -> Path:
    """The 16 books (one sentence per line, one book per file) as documents of 40 sentences.

    A book is one document to ``megabert preprocess``; cut into passages, the documents can be
    split into training and held-back validation ones, and NSP's random second segments come
    from other passages (as they come from other articles in BERT's corpus).
    """
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        passages = []
        for book in sorted(CORPUS.glob("*.txt")):
            lines = [line.strip() for line in book.read_text(encoding="utf-8").splitlines() if line.strip()]
            passages += ["\n".join(lines[i : i + lines_per_document]) for i in range(0, len(lines), lines_per_document)]
        path.write_text("\n\n".join(passages) + "\n", encoding="utf-8")
    return path


def prepare_corpus(work: Path, recipe: dict) -> tuple[Path, Path]:
    """(tokenizer folder, data prefix) for the recipe's vocabulary, preprocessed once per vocabulary."""
    vocab = recipe["vocab"]
    name = "bert-uncased" if vocab == "bert-uncased" else f"wordpiece-{vocab}"
    folder = work / "corpus" / name
    tokenizer = BERT_VOCAB if vocab == "bert-uncased" else folder / "tokenizer"
    prefix = folder / "gutenberg"
    books = [str(gutenberg_documents(work / "corpus" / "gutenberg-documents.txt"))]
    if vocab != "bert-uncased" and not (tokenizer / "vocab.txt").is_file():
        run(["megabert", "train-tokenizer", *books, "--vocab-size", str(vocab), "--output", str(tokenizer)],
            folder / "train-tokenizer.log")
    if not Path(f"{prefix}_train.idx").is_file():
        run(["megabert", "preprocess", *books, "--tokenizer", str(tokenizer), "--output", str(prefix),
             "--valid-fraction", "0.02", "--quiet"], folder / "preprocess.log")
    return tokenizer, prefix


# ------------------------------------------------------------------------------ megabert side
def random_init_folder(folder: Path, tokenizer: Path, preset: str = "tiny") -> Path:
    """A model folder of the recipe's shape with fresh weights (T = 0)."""
    from megabert.modeling.heads import MegatronBertForPreTraining
    from megabert.tokenization import MegatronBertTokenizer
    from megabert.train.jobs.pretrain import build_model_config

    tok = MegatronBertTokenizer.from_pretrained(tokenizer)
    model = MegatronBertForPreTraining(build_model_config(preset, len(tok), 128))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def megabert_point(work: Path, name: str, recipe: dict, minutes: float, splits: dict[str, Path]) -> dict:
    """Pretrain (T > 0) and fine-tune with megabert; the held-back accuracy and what it took."""
    tokenizer, prefix = prepare_corpus(work, recipe)
    run_dir = work / "runs" / f"{name}-{minutes:g}min"
    shutil.rmtree(run_dir, ignore_errors=True)
    record: dict = {"recipe": name, "minutes": minutes}
    if minutes > 0:
        seconds = run(["megabert", "pretrain", "--data", f"{prefix}_train", "--valid-data", f"{prefix}_valid",
                       "--tokenizer", str(tokenizer), "--output", str(run_dir / "pretrain"), "--max-minutes",
                       str(minutes), "--eval-batches", "20", "--quiet", *recipe["pretrain"]],
                      run_dir / "pretrain.log")
        model = run_dir / "pretrain" / "final"
        metrics = [json.loads(line) for line in open(run_dir / "pretrain" / "metrics.jsonl")]
        train = [m for m in metrics if m.get("split") == "train"]
        valid = [m for m in metrics if m.get("split") == "valid"]
        record.update(pretrain_seconds=round(seconds, 1), pretrain_steps=train[-1]["step"] if train else 0)
        if valid:
            record.update({k: round(v, 4) for k, v in valid[-1].items() if k.endswith(("accuracy", "loss"))})
        init = []
    else:
        model = random_init_folder(run_dir / "init", tokenizer)
        init = ["--random-init"]
    run(["megabert", "finetune", "--task", "sequence-classification", "--model", str(model), "--train",
         str(splits["train"]), "--validation", str(splits["valid"]), "--output", str(run_dir / "finetune"),
         "--epochs", "2", "--max-length", "64", "--batch-size", "32", "--quiet", *init, *recipe["finetune"]],
        run_dir / "finetune.log")
    run(["megabert", "evaluate", str(run_dir / "finetune" / "best"), "--data", str(splits["test"]),
         "--max-length", "64", "--output", str(run_dir / "evaluate"), "--quiet"], run_dir / "evaluate.log")
    scores = json.loads((run_dir / "evaluate" / "eval_results.json").read_text())
    record["accuracy"] = round(float(scores["metrics"]["accuracy"]), 4)
    return record


# ------------------------------------------------------------------------------ the baseline
def baseline_point(work: Path, minutes: float, splits: dict[str, Path], seed: int = 1234) -> dict:
    """The issue's hand-written loops over transformers (pretraining on masked positions only, then fine-tuning)."""
    import torch
    import transformers

    from megabert.data.pretraining import PretrainingCollator, PretrainingDataset
    from megabert.tokenization import MegatronBertTokenizer
    from megabert.train.jobs.pretrain import build_model_config

    tokenizer, prefix = prepare_corpus(work, RECIPES["issue-defaults"])
    tok = MegatronBertTokenizer.from_pretrained(tokenizer)
    shape = build_model_config("tiny", len(tok), 128).to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")
    config = transformers.MegatronBertConfig(**{k: shape[k] for k in keep})
    torch.manual_seed(seed)
    model = transformers.MegatronBertForPreTraining(config)
    steps = 0
    if minutes > 0:
        data = PretrainingDataset(f"{prefix}_train", tok, 128, binary_task="nsp", num_samples=10**7, seed=seed)
        collate = PretrainingCollator(pad_token_id=tok.pad_token_id)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 300))
        model.train()
        end = time.perf_counter() + minutes * 60
        while time.perf_counter() < end:
            batch = collate([data[steps * 64 + i] for i in range(64)])
            hidden, pooled = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        token_type_ids=batch["token_type_ids"])[:2]
            masked = batch["labels"] != -100
            logits = model.cls.predictions(hidden[masked])
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"][masked])
            loss = loss + torch.nn.functional.cross_entropy(model.cls.seq_relationship(pooled),
                                                            batch["next_sentence_label"])
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    folder = work / "runs" / f"baseline-{minutes:g}min"
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder / "pretrained")
    classifier = transformers.MegatronBertForSequenceClassification.from_pretrained(folder / "pretrained", num_labels=2)
    if minutes == 0:
        torch.manual_seed(seed)
        classifier = transformers.MegatronBertForSequenceClassification(
            transformers.MegatronBertConfig(**{k: shape[k] for k in keep}, num_labels=2))
    train = read_sst2(splits["train"])
    test = read_sst2(splits["test"])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-4, weight_decay=0.01)
    rng = random.Random(seed)
    classifier.train()
    for _ in range(2):
        rng.shuffle(train)
        for start in range(0, len(train), 32):
            chunk = train[start : start + 32]
            enc = tok([t for t, _ in chunk], max_length=64, truncation=True, padding=True, return_tensors="pt")
            out = classifier(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             token_type_ids=enc["token_type_ids"], labels=torch.tensor([int(y) for _, y in chunk]))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    classifier.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            chunk = test[start : start + 64]
            enc = tok([t for t, _ in chunk], max_length=64, truncation=True, padding=True, return_tensors="pt")
            logits = classifier(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                token_type_ids=enc["token_type_ids"]).logits
            correct += sum(int(p) == int(y) for p, (_, y) in zip(logits.argmax(-1).tolist(), chunk))
    return {"recipe": "transformers-loop", "minutes": minutes, "pretrain_steps": steps,
            "accuracy": round(correct / len(test), 4)}


# ------------------------------------------------------------------------------------ main
def plot(records: list[dict], path: Path, cpu: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: the PNG is not drawn (pip install matplotlib)", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe in dict.fromkeys(r["recipe"] for r in records):
        points = sorted((r["minutes"], 100 * r["accuracy"]) for r in records if r["recipe"] == recipe)
        ax.plot([m for m, _ in points], [a for _, a in points], marker="o", label=recipe)
    ax.set_xlabel("pretraining minutes (0 = random initialisation)")
    ax.set_ylabel("SST-2 accuracy, held-back sentences (%)")
    ax.set_title(f"time to accuracy, tiny model, 2 cores\n{cpu}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="short-budget", choices=sorted(RECIPES), help="default short-budget")
    parser.add_argument("--minutes", default="0,10,20,40", help="pretraining budgets, comma-separated (0: random init)")
    parser.add_argument("--baseline", action="store_true", help="also the transformers loops, at the same budgets")
    parser.add_argument("--finetune-rows", type=int, default=20000, help="SST-2 training rows (the protocol: 20000)")
    parser.add_argument("--heldout", type=int, default=2000, help="held-back full sentences scored (default 2000)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "time-to-accuracy", help="work folder")
    args = parser.parse_args()
    if not SST2.is_file() or not CORPUS.is_dir():
        raise SystemExit(f"needs {SST2} and {CORPUS} (../shared/data beside the checkout)")
    minutes = [float(m) for m in args.minutes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    train, valid, test = split_sst2(read_sst2(SST2), args.heldout, args.finetune_rows, 1000)
    splits = {"train": args.work / "sst2" / "train.tsv", "valid": args.work / "sst2" / "valid.tsv",
              "test": args.work / "sst2" / "heldout.tsv"}
    for key, rows in (("train", train), ("valid", valid), ("test", test)):
        write_tsv(splits[key], rows)
    cpu = cpu_name()
    records = []
    for m in minutes:
        record = megabert_point(args.work, args.recipe, RECIPES[args.recipe], m, splits) | {"cpu": cpu, "threads": os.cpu_count()}
        print(json.dumps(record), flush=True)
        records.append(record)
        if args.baseline:
            record = baseline_point(args.work, m, splits) | {"cpu": cpu}
            print(json.dumps(record), flush=True)
            records.append(record)
    ours = {r["minutes"]: r["accuracy"] for r in records if r["recipe"] == args.recipe}
    summary = {"recipe": args.recipe, "cpu": cpu, "curve": ours, "finetune_rows": args.finetune_rows,
               "heldout": len(test)}
    if 0.0 in ours:
        summary["gain_over_random_init"] = {m: round(a - ours[0.0], 4) for m, a in ours.items() if m > 0}
    base = {r["minutes"]: r["accuracy"] for r in records if r["recipe"] == "transformers-loop"}
    if base:
        summary["baseline_curve"] = base
    print(json.dumps(summary), flush=True)
    (args.work / "time_to_accuracy.json").write_text(json.dumps({"summary": summary, "runs": records}, indent=1))
    png = plot(records, args.work / "time_to_accuracy.png", cpu)
    if png:
        print(f"plot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
