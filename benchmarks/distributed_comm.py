"""Tensor-parallel communication against compute: measured here (CPU, gloo), predicted for NVLink GPUs.

    python benchmarks/distributed_comm.py                    # TP=2, a 4 x 512 model, 8 x 128 tokens
    python benchmarks/distributed_comm.py --tp 2 --hidden 256 --layers 2 --steps 3 --json out.json

What it does:

1. one process (as many threads as one rank gets): the time of a training step
   (forward + backward) of MegatronBertForSequenceClassification;
2. ``--tp`` processes (gloo, TP over all of them): the same step with the layers split,
   the number of all-reduces in one step (counted by the profiler: Megatron's layout needs 2
   per layer forward and 2 backward, plus 1 for the vocabulary-sharded embeddings), and the
   time of one all-reduce of the activation size ``(batch x seq, hidden)`` on its own;
3. the per-step communication time (all-reduces x time of one) against the rest (compute);
4. a prediction for BERT-large on H100s with NVLink from the same counts: message sizes and
   FLOPs are exact, the bandwidth and the achieved FLOP rate are the stated assumptions.

Runs in about a minute on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megabert.config import MegatronBertConfig  # noqa: E402


def build_config(args: argparse.Namespace) -> MegatronBertConfig:
    return MegatronBertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=max(512, args.seq),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }


def time_steps(model: torch.nn.Module, batch: dict, steps: int, barrier: bool = False) -> tuple[float, float]:
    """Median (wall, CPU) seconds of a forward + backward (after one warm-up step).

    CPU time well below wall time means the process waited: for a core (a busy machine) or
    in a collective.
    """
    walls, cpus = [], []
    for i in range(steps + 1):
        if barrier:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        model(**batch).loss.backward()
        if barrier:
            dist.barrier()
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        model.zero_grad(set_to_none=True)
    return statistics.median(walls), statistics.median(cpus)


def count_collectives(model: torch.nn.Module, batch: dict) -> tuple[int, int]:
    """(all-reduces in the forward, in the backward) of one step, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for phase in ("forward", "backward"):
        loss = model(**batch).loss if phase == "backward" else None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if phase == "forward":
                model(**batch)
            else:
                loss.backward()
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "gloo:all_reduce"))
        model.zero_grad(set_to_none=True)
    return counts[0], counts[1]


def single_process(args: argparse.Namespace) -> tuple[float, float]:
    from megabert.modeling.heads import MegatronBertForSequenceClassification

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MegatronBertForSequenceClassification(build_config(args))
    return time_steps(model, make_batch(args), args.steps)


def rank_main(rank: int, args: argparse.Namespace, port: int, result_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.tp),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    from megabert.modeling.heads import MegatronBertForSequenceClassification
    from megabert.train.distributed.parallel import ParallelConfig, setup_parallel

    ctx = setup_parallel(ParallelConfig(tensor_parallel=args.tp, device="cpu", heartbeat_timeout_s=0))
    torch.manual_seed(0)
    model = ctx.wrap_model(MegatronBertForSequenceClassification(build_config(args)))
    batch = make_batch(args)
    step, cpu = time_steps(model, batch, args.steps, barrier=True)
    forward, backward = count_collectives(model, batch)
    # One all-reduce of the activation size on its own: the pure cost of a TP collective here.
    activation = torch.randn(args.batch * args.seq, args.hidden)
    times = []
    for i in range(args.comm_repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(activation)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if ctx.is_main:
        Path(result_file).write_text(json.dumps({
            "tp_step_s": step, "tp_step_cpu_s": cpu, "allreduce_forward": forward, "allreduce_backward": backward,
            "allreduce_s": statistics.median(times),
        }))
    ctx.close()


def predict_nvlink(args: argparse.Namespace) -> list[dict[str, float]]:
    """BERT-large (24 x 1024, 16 heads), seq 512, 32 sequences per data-parallel replica, bf16."""
    hidden, layers, seq, batch = 1024, 24, 512, 32
    tokens = seq * batch
    message = tokens * hidden * 2  # bf16 activations, bytes
    # Per layer forward: 24 h^2 per token for the Linears, 4 s h for the attention scores and mix.
    flops_layer = tokens * (24 * hidden**2 + 4 * seq * hidden)
    rows = []
    for tp in (2, 4, 8):
        compute = 3 * flops_layer * layers / tp / (args.gpu_tflops * 1e12)  # forward + 2x backward
        # Ring all-reduce moves 2 (T-1)/T of the message through each GPU's link.
        per_allreduce = 2 * (tp - 1) / tp * message / (args.nvlink_gbps * 1e9) + args.nccl_latency_us * 1e-6
        comm = 4 * layers * per_allreduce
        rows.append({"tp": tp, "message_mib": message / 2**20, "allreduce_ms": per_allreduce * 1e3,
                     "comm_ms": comm * 1e3, "compute_ms": compute * 1e3, "comm_over_compute": comm / compute})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel processes (default 2)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--comm-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    parser.add_argument("--nvlink-gbps", type=float, default=360.0,
                        help="assumed NCCL all-reduce bus bandwidth, GB/s (H100 NVLink 4: ~360 achieved of 450 per direction)")
    parser.add_argument("--gpu-tflops", type=float, default=400.0, help="assumed achieved bf16 TFLOP/s per GPU")
    parser.add_argument("--nccl-latency-us", type=float, default=15.0, help="assumed per-all-reduce latency")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.hidden % args.heads or args.heads % args.tp or args.vocab % args.tp:
        parser.error("--tp must divide --heads and --vocab, and --heads must divide --hidden")

    single, single_cpu = single_process(args)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"megabert-comm-{os.getpid()}.json"
    mp.spawn(rank_main, args=(args, port, str(result_file)), nprocs=args.tp, join=True)
    measured = json.loads(result_file.read_text())
    result_file.unlink()

    count = measured["allreduce_forward"] + measured["allreduce_backward"]
    comm = count * measured["allreduce_s"]
    step = measured["tp_step_s"]
    message = args.batch * args.seq * args.hidden * 4
    print(f"model: {args.layers} layers x hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
          f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens, fp32, {args.threads} thread(s)/process")
    print(f"single process step (fwd+bwd):           {single * 1e3:9.1f} ms   (CPU time {single_cpu * 1e3:.1f} ms)")
    print(f"TP={args.tp} step (fwd+bwd):                    {step * 1e3:9.1f} ms   (speed-up {single / step:.2f}x; "
          f"rank 0 CPU time {measured['tp_step_cpu_s'] * 1e3:.1f} ms)")
    print(f"all-reduces per step: forward {measured['allreduce_forward']}, backward {measured['allreduce_backward']} "
          f"(expected {1 + 2 * args.layers} and {2 * args.layers}: 2 per layer each way + 1 embedding lookup)")
    print(f"one all-reduce of {message / 2**20:.2f} MiB (tokens x hidden fp32): {measured['allreduce_s'] * 1e3:7.2f} ms "
          f"({message / measured['allreduce_s'] / 1e9:.2f} GB/s algorithm bandwidth)")
    print(f"communication per step: {count} x {measured['allreduce_s'] * 1e3:.2f} ms = {comm * 1e3:.1f} ms "
          f"= {100 * comm / step:.0f}% of the TP step; compute {max(step - comm, 0) * 1e3:.1f} ms")
    print()
    print(f"prediction, BERT-large (24 x 1024) on H100 + NVLink, 32 x 512 tokens/replica, bf16, "
          f"{args.nvlink_gbps:g} GB/s bus bandwidth, {args.gpu_tflops:g} TFLOP/s:")
    rows = predict_nvlink(args)
    for row in rows:
        print(f"  TP={row['tp']}: {4 * 24} all-reduces of {row['message_mib']:.0f} MiB, {row['allreduce_ms']:.3f} ms each: "
              f"comm {row['comm_ms']:.1f} ms vs compute {row['compute_ms']:.1f} ms per step "
              f"(comm/compute {row['comm_over_compute']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"single_step_s": single, "single_step_cpu_s": single_cpu, **measured, "comm_per_step_s": comm,
                                         "nvlink_prediction": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
