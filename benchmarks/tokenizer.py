"""Tokenizer throughput: megabert's MegatronBertTokenizer vs transformers.BertTokenizerFast.

Both wrap the same Rust library, so the difference is the Python work around each batch.
Same texts, same process, alternating runs; the best of ``--repeats`` runs counts. Prints one
JSON line per case:

    {"case": ..., "texts": N, "tokens": T, "ours_texts_per_s": ..., "ref_texts_per_s": ...,
     "ours_tokens_per_s": ..., "ref_tokens_per_s": ..., "speedup": ours/ref}

Usage:
    python benchmarks/tokenizer.py                # SST-2 train sentences, batches of 1000
    python benchmarks/tokenizer.py --quick        # fewer texts and repeats
    python benchmarks/tokenizer.py --threads 1    # pin the Rust thread pool (set before import)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_texts(n: int) -> tuple[list[str], list[tuple[str, str]], str]:
    """SST-2 train sentences and MRPC train pairs from the shared data (Python's own docs text if absent)."""
    sst = DATA / "glue" / "SST-2" / "train.tsv"
    mrpc = DATA / "glue" / "MRPC" / "train.tsv"
    if sst.is_file() and mrpc.is_file():
        sentences = [line.split("\t")[0] for line in sst.read_text(encoding="utf-8").splitlines()[1:]]
        fields = [line.split("\t") for line in mrpc.read_text(encoding="utf-8-sig").splitlines()[1:]]
        pairs = [(f[3], f[4]) for f in fields]
        source = "SST-2 / MRPC train"
    else:
        from pydoc_data.topics import topics

        sentences = [line for text in topics.values() for line in text.splitlines() if line.strip()]
        pairs = list(zip(sentences[::2], sentences[1::2]))
        source = "pydoc_data.topics lines"
    return sentences[:n], pairs[:n], source


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_case(name: str, ours_fn: Callable[[], object], ref_fn: Callable[[], object], n_texts: int, n_tokens: int, repeats: int) -> dict:
    ours_fn(), ref_fn()  # warm-up (thread pool, caches)
    ours_s, ref_s = float("inf"), float("inf")
    for _ in range(repeats):  # interleave so that load from other processes hits both alike
        ours_s = min(ours_s, best_time(ours_fn, 1))
        ref_s = min(ref_s, best_time(ref_fn, 1))
    return {
        "case": name,
        "texts": n_texts,
        "tokens": n_tokens,
        "ours_texts_per_s": round(n_texts / ours_s, 1),
        "ref_texts_per_s": round(n_texts / ref_s, 1),
        "ours_tokens_per_s": round(n_tokens / ours_s, 1),
        "ref_tokens_per_s": round(n_tokens / ref_s, 1),
        "speedup": round(ref_s / ours_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=10000, help="number of texts (default 10000)")
    parser.add_argument("--batch", type=int, default=1000, help="texts per call (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the best counts (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="Rust thread pool size (default: the library's)")
    parser.add_argument("--quick", action="store_true", help="4000 texts, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.repeats = min(args.texts, 4000), min(args.repeats, 2)
    if args.threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read when the pool starts, i.e. first use

    from transformers import BertTokenizerFast
    from transformers.utils import logging as hf_logging

    from megabert.tokenization import MegatronBertTokenizer

    hf_logging.set_verbosity_error()
    vocab = DATA / "vocab" / "bert-uncased" / "vocab.txt"
    if not vocab.is_file():
        print(f"no vocabulary at {vocab}: this benchmark needs the shared data", file=sys.stderr)
        return 2
    ours = MegatronBertTokenizer.from_pretrained(vocab, lowercase=True)
    ref = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)

    sentences, pairs, source = load_texts(args.texts)
    batches = [sentences[i : i + args.batch] for i in range(0, len(sentences), args.batch)]
    firsts = [[a for a, _ in pairs[i : i + args.batch]] for i in range(0, len(pairs), args.batch)]
    seconds = [[b for _, b in pairs[i : i + args.batch]] for i in range(0, len(pairs), args.batch)]
    n_tokens = sum(len(ids) for ids in ours(sentences)["input_ids"])
    n_pair_tokens = sum(len(ids) for ids in ours([a for a, _ in pairs], [b for _, b in pairs])["input_ids"])
    n_plain = n_tokens - 2 * len(sentences)
    print(json.dumps({"source": source, "texts": len(sentences), "pairs": len(pairs), "batch": args.batch,
                      "repeats": args.repeats, "threads": args.threads, "cpus": os.cpu_count()}))  # fmt: skip

    pad = {"padding": True, "truncation": True, "max_length": 128}
    singles = sentences[: min(len(sentences), 2000)]
    n_single_tokens = sum(len(ids) for ids in ours(singles)["input_ids"])
    cases = [
        ("batch_lists", lambda tok: [tok(b) for b in batches], len(sentences), n_tokens),
        ("batch_padded_pt", lambda tok: [tok(b, return_tensors="pt", **pad) for b in batches], len(sentences), n_tokens),
        ("batch_offsets_pt", lambda tok: [tok(b, return_tensors="pt", return_offsets_mapping=True, **pad) for b in batches],
         len(sentences), n_tokens),  # fmt: skip
        ("pairs_padded_pt", lambda tok: [tok(a, b, return_tensors="pt", **pad) for a, b in zip(firsts, seconds)],
         len(pairs), n_pair_tokens),  # fmt: skip
        ("one_text_per_call", lambda tok: [tok(t) for t in singles], len(singles), n_single_tokens),
    ]
    for name, call, n, t in cases:
        print(json.dumps(run_case(name, lambda: call(ours), lambda: call(ref), n, t, args.repeats)), flush=True)
    # Corpus preprocessing: word-pieces only (ours: encode_plain; reference: no special tokens).
    plain = run_case(
        "plain_word_pieces",
        lambda: [ours.encode_plain(b) for b in batches],
        lambda: [ref(b, add_special_tokens=False)["input_ids"] for b in batches],
        len(sentences), n_plain, args.repeats,
    )  # fmt: skip
    print(json.dumps(plain), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
