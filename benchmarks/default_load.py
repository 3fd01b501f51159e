"""A user's plain call: `MegatronBertModel.from_pretrained(folder)` then `model(**batch)`, vs transformers.

Both load the same folder (saved by transformers) with no options, and run the same padded
batch of 16 rows with lengths uniform in 16..128 (base size, 12 x 768 unless --config), in eval
mode under inference_mode. Prints one JSON line per dtype: real tokens/s for each, their ratio,
and the largest difference on real tokens.

    python benchmarks/default_load.py                  # base config, fp32
    python benchmarks/default_load.py --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import warnings

import torch

from inference import CONFIGS, time_fn  # benchmarks/inference.py (the script's folder is on sys.path)

warnings.filterwarnings("ignore")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def padded_batch(vocab: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 129, (rows,), generator=g)
    ids = torch.randint(1000, vocab, (rows, 128), generator=g)
    mask = (torch.arange(128)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import transformers

    import megabert

    cfg = dict(CONFIGS[args.config], vocab_size=30592, max_position_embeddings=512)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        transformers.MegatronBertModel(transformers.MegatronBertConfig(**cfg)).save_pretrained(folder)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            ref = transformers.MegatronBertModel.from_pretrained(folder).to(dtype).eval()
            ours = megabert.MegatronBertModel.from_pretrained(folder).to(dtype).eval()
            ids, mask = padded_batch(cfg["vocab_size"], args.rows)
            real = int(mask.sum())
            run_ref = lambda: ref(input_ids=ids, attention_mask=mask)  # noqa: E731
            run_ours = lambda: ours(input_ids=ids, attention_mask=mask)  # noqa: E731
            time_fn(run_ref, torch.device("cpu"), repeats=0), time_fn(run_ours, torch.device("cpu"), repeats=0)
            # Alternate the two round by round, so that a change in machine load hits both alike.
            rounds = [(time_fn(run_ref, torch.device("cpu"), 1, 0), time_fn(run_ours, torch.device("cpu"), 1, 0))
                      for _ in range(args.repeats)]
            t_ref = statistics.median(r[0] for r in rounds)
            t_ours = statistics.median(r[1] for r in rounds)
            with torch.inference_mode():
                keep = mask.bool()
                diff = (run_ref().last_hidden_state.float()[keep] - run_ours().last_hidden_state.float()[keep]).abs().max()
            print(json.dumps({
                "benchmark": "default_load",
                "cpu": cpu_name(),
                "config": args.config,
                "dtype": dtype_name,
                "rows": args.rows,
                "real_tokens": real,
                "padded_tokens": ids.numel(),
                # When both sides run at the CPU's GEMM rate, skipping the pads gains about this much.
                "padding_share": round(ids.numel() / real, 3),
                "transformers": transformers.__version__,
                "ours_tokens_per_s": round(real / t_ours, 1),
                "ref_tokens_per_s": round(real / t_ref, 1),
                "ratio": round(t_ref / t_ours, 3),
                "max_abs_diff_real_tokens": float(diff),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
