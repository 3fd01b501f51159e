"""One rank of a distributed test: launched N times by the tests with torchrun's environment variables.

    RANK=.. WORLD_SIZE=.. LOCAL_RANK=.. MASTER_ADDR=.. MASTER_PORT=.. python worker.py OUT --tp 2 [...]

Runs :func:`common.train` for each task under the requested layout and (rank 0) writes
``OUT/<task>.json`` with the forward outputs and the run's losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from megabert.convert.load import load_megatron_model  # noqa: E402
from megabert.train.distributed.parallel import ParallelConfig, setup_parallel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp-mode", default="ddp")
    parser.add_argument("--tasks", default="pretrain,classify")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--megatron", help="forward a Megatron-LM checkpoint instead of training")
    parser.add_argument("--resume-from", metavar="PATTERN",
                        help="also resume the step-3 checkpoint of the output folder PATTERN.format(task=...)")
    parser.add_argument("--count-collectives", action="store_true",
                        help="also count the all-reduces of one classification step (OUT/collectives.json)")
    parser.add_argument("--heartbeat", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    ctx = setup_parallel(ParallelConfig(
        tensor_parallel=args.tp, data_parallel=args.dp_mode, device="cpu",
        heartbeat_timeout_s=args.heartbeat, timeout_s=args.timeout,
    ))
    with ctx.guard():
        if args.megatron:
            model = ctx.wrap_model(load_megatron_model(args.megatron))
            result = {"forward": common.forward_outputs(model, "pretrain")}
            if ctx.is_main:
                common.write_json(args.out / "megatron.json", result)
        if args.count_collectives:
            counts = common.count_all_reduces(ctx.wrap_model(common.build_model("classify")), "classify")
            if ctx.is_main:
                common.write_json(args.out / "collectives.json", counts)
        for task in filter(None, args.tasks.split(",")):
            if args.megatron:
                break
            result = common.train(
                ctx, task, args.out / task, batch_size=args.batch_size, save_every=args.save_every,
                final_dir=args.out / task / "final",
            )
            if ctx.is_main:
                common.write_json(args.out / f"{task}.json", result)
            if args.resume_from:
                step3 = Path(args.resume_from.format(task=task)) / "checkpoints" / "step-00000003"
                resumed = common.train(ctx, task, args.out / f"resumed-{task}", resume=str(step3))
                if ctx.is_main:
                    common.write_json(args.out / f"resumed-{task}.json", resumed)
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
