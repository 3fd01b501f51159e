"""Inference speed and memory: megabert vs `transformers` MegatronBertModel (eager), one process.

Cases (same random weights, same batches for both):
- ``varlen``: a batch of 32 texts with lengths uniform in 16..128 (about 60% real tokens);
- ``full128`` / ``full512``: full batches (no padding) of 128 and 512 tokens.

For each case and dtype it prints one JSON line: real tokens/s for ours and the reference and
their ratio, ours in bf16 against the reference in fp32, our fraction of the same-dtype GEMM
peak on real tokens (a matmul of shape (real tokens x hidden) @ (hidden x 4*hidden) timed in
every round, between the model runs), peak memory of each (heap in use on CPU, allocator peak
on CUDA) and the largest output difference on real tokens. For bf16 it also gives the fp32
GEMM peak, whether ours runs its large products in fp32 (a CPU whose bf16 GEMMs are slower,
see megabert/fast_paths/half_matmul.py), and our fraction of the faster of the two peaks.

    python benchmarks/inference.py                 # 345M config (the acceptance run)
    python benchmarks/inference.py --config base   # 12 x 768, quicker
    python benchmarks/inference.py --quick         # base config, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from memory import PeakMemory  # benchmarks/memory.py (the script's folder is on sys.path)

warnings.filterwarnings("ignore")

CONFIGS = {
    "345m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}


def make_batch(case: str, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if case == "varlen":
        batch, max_len = 32, 128
        lengths = torch.randint(16, 129, (batch,), generator=g)
    else:
        batch, max_len = (32, 128) if case == "full128" else (8, 512)
        lengths = torch.full((batch,), max_len)
    ids = torch.randint(1000, vocab, (batch, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) if times else 0.0


def gemm_timer(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device):
    """A function timing (tokens x hidden) @ (hidden x 4 hidden) in ``dtype``; returns FLOP/s (best of 3)."""
    a = torch.randn(tokens, hidden, device=device).to(dtype)
    b = torch.randn(hidden, 4 * hidden, device=device).to(dtype)
    flops = 2 * tokens * hidden * 4 * hidden
    time_fn(lambda: a @ b, device, repeats=0, warmup=2)
    return lambda: flops / min(time_fn(lambda: a @ b, device, 1, 0) for _ in range(3))


def flops_per_token(cfg: dict, avg_len: float) -> float:
    """Dense FLOPs per real token of the encoder (matmuls + attention), the usual 2*params rule."""
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_layer = 2 * (4 * h * h + 2 * h * f) + 4 * avg_len * h
    return layers * per_layer


def peak_memory(fn, device: torch.device) -> float:
    """Extra memory (MiB) one call needs: CUDA allocator peak, or on CPU the peak heap in use."""
    with torch.inference_mode(), PeakMemory(device) as memory:
        fn()
    return memory.peak / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="345m")
    parser.add_argument("--cases", default="varlen,full128,full512")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="base config, 1 repeat")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    if args.quick:
        args.config, args.repeats = "base", 1

    import transformers

    import megabert
    from megabert.fast_paths import half_matmul as cpu_matmul

    device = torch.device(args.device)
    cfg = dict(CONFIGS[args.config], vocab_size=30592, max_position_embeddings=512)
    torch.manual_seed(0)
    ref = transformers.MegatronBertModel(transformers.MegatronBertConfig(**cfg), add_pooling_layer=True).eval()
    ours = megabert.MegatronBertModel(megabert.MegatronBertConfig(**cfg, unpad_inputs=True)).eval()
    ours.load_checkpoint_state(ref.state_dict())
    ref_fp32_tps: dict[str, float] = {}

    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ref.to(device=device, dtype=dtype)
        ours.to(device=device, dtype=dtype)
        for case in args.cases.split(","):
            ids, mask = make_batch(case, cfg["vocab_size"])
            ids, mask = ids.to(device), mask.to(device)
            real = int(mask.sum())
            run_ref = lambda: ref(input_ids=ids, attention_mask=mask)  # noqa: E731
            run_ours = lambda: ours(input_ids=ids, attention_mask=mask)  # noqa: E731
            peak_same = gemm_timer(real, cfg["hidden_size"], dtype, device)
            peak_fp32 = gemm_timer(real, cfg["hidden_size"], torch.float32, device)
            # Alternate the reference, ours and the GEMM probes round by round so that a change in
            # machine load hits all of them alike; medians over the rounds.
            time_fn(run_ref, device, repeats=0), time_fn(run_ours, device, repeats=0)  # warm-up calls
            rounds = []
            for _ in range(args.repeats):
                rounds.append((time_fn(run_ref, device, 1, 0), time_fn(run_ours, device, 1, 0), peak_same(),
                               peak_fp32() if dtype != torch.float32 else None))
            t_ref = statistics.median(r[0] for r in rounds)
            t_ours = statistics.median(r[1] for r in rounds)
            peak = statistics.median(r[2] for r in rounds)
            with torch.inference_mode():
                a = run_ref().last_hidden_state.float()
                b = run_ours().last_hidden_state.float()
            keep = mask.bool()
            diff = (a[keep] - b[keep]).abs().max().item()
            avg_len = real / ids.shape[0]
            ours_tps, ref_tps = real / t_ours, real / t_ref
            if dtype == torch.float32:
                ref_fp32_tps[case] = ref_tps
            record = {
                "case": case,
                "config": args.config,
                "dtype": dtype_name,
                "device": str(device),
                "real_tokens": real,
                "padded_tokens": ids.numel(),
                "ours_tokens_per_s": round(ours_tps, 1),
                "ref_tokens_per_s": round(ref_tps, 1),
                "ratio": round(ours_tps / ref_tps, 3),
                "gemm_peak_gflops": round(peak / 1e9, 1),
                "ours_fraction_of_gemm_peak": round(ours_tps * flops_per_token(cfg, avg_len) / peak, 3),
                "ref_fraction_of_gemm_peak": round(ref_tps * flops_per_token(cfg, avg_len) / peak, 3),
                "max_abs_diff_real_tokens": diff,
            }
            if dtype != torch.float32:
                # On a CPU whose half-precision GEMMs are slower than fp32 ones, ours runs its large
                # products in fp32 (megabert.fast_paths.half_matmul): the fastest GEMM it can use is then
                # the fp32 one, and its fraction of the same-dtype peak can exceed 1.
                fp32_peak = statistics.median(r[3] for r in rounds)
                upcast = device.type == "cpu" and cpu_matmul.upcast_is_faster(dtype)
                best = max(peak, fp32_peak) if upcast else peak
                record["fp32_gemm_peak_gflops"] = round(fp32_peak / 1e9, 1)
                record["ours_products_in_fp32"] = upcast
                record["ours_fraction_of_best_gemm_peak"] = round(ours_tps * flops_per_token(cfg, avg_len) / best, 3)
                if case in ref_fp32_tps:
                    record["ours_vs_ref_fp32_ratio"] = round(ours_tps / ref_fp32_tps[case], 3)
            if not args.no_memory:
                record["ours_peak_mib"] = round(peak_memory(run_ours, device), 1)
                record["ref_peak_mib"] = round(peak_memory(run_ref, device), 1)
                record["memory_ratio"] = round(record["ours_peak_mib"] / max(record["ref_peak_mib"], 1e-9), 3)
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
