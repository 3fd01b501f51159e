"""Int8 dynamic quantization on the CPU: speed against float32 (and bf16), and how much outputs move.

One process, one model (MegatronBertForMaskedLM, random weights unless --model is given), one
batch of ``--batch`` x ``--seq`` tokens without padding. Variants:

- ``fp32``: the float model (inference mode, fused QKV GEMM);
- ``int8``: every Linear int8 (``quantize_dynamic_int8``), the vocabulary projection included;
- ``int8_keep_output``: the same with the vocabulary projection kept in float32;
- ``bf16``: the float model cast to bfloat16 (for comparison; fast only on CPUs with bf16 units).

Prints one JSON line: seconds per forward (median of ``--repeats`` rounds in which the variants
take turns, so that load changes on a shared machine hit them alike) and the speedup over fp32
of each variant, then for each its change against fp32: the largest absolute difference and
the mean per-token cosine similarity of the final hidden states and of the MLM logits, and the
MLM top-1 agreement (the fraction of positions whose arg-max token is unchanged).

With random weights the MLM logits are nearly flat (the median fp32 gap between the best and
second-best token is printed as ``fp32_top1_margin_median``), so top-1 agreement is a
pessimistic figure there: ``*_top1_agreement_clear`` counts only the positions where fp32's
top-1 logit leads by more than ``--clear-margin`` (their share is ``fp32_clear_fraction``).
Run with ``--model DIR`` on a trained checkpoint for real figures.
The machine may be shared: compare ratios from one run, not seconds across runs.

    python benchmarks/quantization.py                    # base config (12 x 768), 8 x 128
    python benchmarks/quantization.py --config tiny --repeats 2
    python benchmarks/quantization.py --model path/to/megatron-bert --threads 4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

CONFIGS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The float32 MLM model: from --model, or random weights in the --config shape."""
    from megabert import MegatronBertConfig, MegatronBertForMaskedLM

    if args.model:
        return MegatronBertForMaskedLM.from_pretrained(args.model, dtype=torch.float32, device="cpu").eval()
    torch.manual_seed(args.seed)
    config = MegatronBertConfig(vocab_size=30592, max_position_embeddings=512, **CONFIGS[args.config])
    return MegatronBertForMaskedLM(config).eval()


def seconds_per_call(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds per call of each function, after one warm-up call each.

    The functions take turns (one call each per round), so a change in the machine's load
    during the run affects them alike and their ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states, MLM logits) in float32: (batch, seq, hidden), (batch, seq, vocab)."""
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float()


def drift(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference and mean per-token cosine similarity."""
    cosine = F.cosine_similarity(reference.flatten(0, -2), other.flatten(0, -2), dim=-1)
    return {"max_abs_diff": float((reference - other).abs().max()), "cosine_mean": float(cosine.mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base", help="model shape (default base)")
    parser.add_argument("--model", metavar="DIR", help="a trained MLM checkpoint folder instead of random weights")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clear-margin", type=float, default=0.1, metavar="M",
        help="positions whose fp32 top-1 logit leads the second by more than M count as clear (default 0.1)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from megabert.inference.quantize import quantize_dynamic_int8

    model = build_model(args)
    vocab = model.config.vocab_size
    if args.seq > model.config.max_position_embeddings:
        parser.error(f"--seq {args.seq} is longer than the model's {model.config.max_position_embeddings} positions")
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(min(1000, vocab - 1), vocab, (args.batch, args.seq), generator=generator)

    variants = {
        "fp32": model,
        "int8": quantize_dynamic_int8(model),
        "int8_keep_output": quantize_dynamic_int8(model, quantize_output_layer=False),
    }
    if not args.no_bf16:
        variants["bf16"] = copy.deepcopy(model).to(torch.bfloat16)

    record: dict[str, object] = {
        "model": args.model or args.config,
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
    }
    seconds = seconds_per_call({name: (lambda v=variant: v(ids)) for name, variant in variants.items()}, args.repeats)
    for name in variants:
        record[f"{name}_s"] = round(seconds[name], 4)
        print(f"{name}: {seconds[name]:.3f} s per forward", file=sys.stderr)
    for name in variants:
        if name != "fp32":
            record[f"speedup_{name}"] = round(seconds["fp32"] / seconds[name], 3)

    hidden_ref, logits_ref = outputs(model, ids)
    top2 = logits_ref.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]  # (batch, seq): how clearly fp32 prefers its top-1 token
    clear = margin > args.clear_margin
    record["fp32_top1_margin_median"] = round(float(margin.median()), 6)
    record["fp32_clear_fraction"] = round(float(clear.float().mean()), 4)
    for name, variant in variants.items():
        if name == "fp32":
            continue
        hidden, logits = outputs(variant, ids)
        for what, ref, got in (("hidden", hidden_ref, hidden), ("logits", logits_ref, logits)):
            for key, value in drift(ref, got).items():
                record[f"{name}_{what}_{key}"] = round(value, 6)
        record[f"{name}_logits_mean_abs_diff"] = round(float((logits_ref - logits).abs().mean()), 6)
        same = logits_ref.argmax(-1) == logits.argmax(-1)
        record[f"{name}_top1_agreement"] = round(float(same.float().mean()), 4)
        if bool(clear.any()):
            record[f"{name}_top1_agreement_clear"] = round(float(same[clear].float().mean()), 4)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
