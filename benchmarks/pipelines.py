"""Pipeline throughput: megabert's pipeline vs `transformers`' on the same model and lines.

A random MegatronBERT (with the BERT uncased vocabulary) is saved by `transformers` into a temp
folder; both pipelines load that folder and run over the first N sentences of SST-2 (10k by
default) in one process, on the same device, with the same batch size. Ours streams the lines
(length-sorted batches, unpadded); `transformers` gets the list (its DataLoader batches them
in order). One JSON line is printed: lines/s of each, their ratio, and how well the outputs agree.

    python benchmarks/pipelines.py                          # base size (12 x 768), 10k lines
    python benchmarks/pipelines.py --quick                  # small model, 1k lines
    python benchmarks/pipelines.py --task fill-mask --size small --lines 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}
HF_CLASSES = {
    "text-classification": "MegatronBertForSequenceClassification",
    "token-classification": "MegatronBertForTokenClassification",
    "feature-extraction": "MegatronBertModel",
    "fill-mask": "MegatronBertForMaskedLM",
}


def read_sentences(path: Path, limit: int, task: str) -> list[str]:
    """The first ``limit`` SST-2 sentences (fill-mask: the middle word masked)."""
    lines = []
    with open(path, encoding="utf-8") as handle:
        next(handle)  # header
        for line in handle:
            sentence = line.split("\t")[0].strip()
            if not sentence:
                continue
            if task == "fill-mask":
                words = sentence.split()
                words[len(words) // 2] = "[MASK]"
                sentence = " ".join(words)
            lines.append(sentence)
            if len(lines) == limit:
                break
    return lines


def build_model(folder: Path, task: str, size: str, vocab: Path) -> None:
    import transformers

    tokenizer = transformers.BertTokenizerFast(str(vocab), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(folder)
    config = transformers.MegatronBertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, **SIZES[size])
    if task == "token-classification":
        config.id2label = {0: "O", 1: "B-MISC", 2: "I-MISC"}
        config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    getattr(transformers, HF_CLASSES[task])(config).eval().save_pretrained(folder)


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def agreement(task: str, ours: list, theirs: list) -> dict:
    """How closely the two pipelines' outputs agree (labels/tokens and the largest score gap)."""
    if task == "text-classification":
        same = sum(a["label"] == b["label"] for a, b in zip(ours, theirs))
        gap = max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs))
    elif task == "fill-mask":
        same = sum(a[0]["token"] == b[0]["token"] for a, b in zip(ours, theirs))
        gap = max(abs(a[0]["score"] - b[0]["score"]) for a, b in zip(ours, theirs))
    elif task == "token-classification":
        same = sum([e["entity"] for e in a] == [e["entity"] for e in b] for a, b in zip(ours, theirs))
        gap = max((abs(x["score"] - float(y["score"])) for a, b in zip(ours, theirs) for x, y in zip(a, b)), default=0.0)
    else:
        diffs = [(torch.tensor(a) - torch.tensor(b[0])).abs().max().item() for a, b in zip(ours, theirs)]
        same, gap = sum(d < 1e-3 for d in diffs), max(diffs)
    return {"agree": same / len(ours), "max_score_diff": gap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="text-classification", choices=sorted(HF_CLASSES))
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default base; small with --quick)")
    parser.add_argument("--lines", type=int, help="lines to run (default 10000; 1000 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="small model, 1000 lines")
    args = parser.parse_args()
    size = args.size or ("small" if args.quick else "base")
    n_lines = args.lines or (1000 if args.quick else 10000)
    if args.threads:
        torch.set_num_threads(args.threads)
    sst2, vocab = DATA / "glue" / "SST-2" / "train.tsv", DATA / "vocab" / "bert-uncased" / "vocab.txt"
    if not sst2.is_file() or not vocab.is_file():
        print(f"needs {sst2} and {vocab}", file=sys.stderr)
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import transformers

    from megabert.inference.pipelines import pipeline

    lines = read_sentences(sst2, n_lines, args.task)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder, args.task, size, vocab)
        options = {"aggregation_strategy": "none"} if args.task == "token-classification" else {}
        ours = pipeline(args.task, folder, device=args.device, batch_size=args.batch_size, **options)
        theirs = transformers.pipeline(
            args.task, model=str(folder), device=torch.device(args.device), batch_size=args.batch_size, **options
        )
        warm = lines[: 2 * args.batch_size]
        list(ours.stream(warm)), theirs(warm)
        ours_out, ours_s = timed(lambda: list(ours.stream(iter(lines))))
        theirs_out, theirs_s = timed(lambda: theirs(lines))
    record = {
        "benchmark": "pipelines",
        "task": args.task,
        "size": size,
        "lines": len(lines),
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "megabert_lines_per_s": round(len(lines) / ours_s, 1),
        "transformers_lines_per_s": round(len(lines) / theirs_s, 1),
        "speedup": round(theirs_s / ours_s, 2),
        **agreement(args.task, ours_out, theirs_out),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
