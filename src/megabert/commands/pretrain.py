"""`megabert pretrain`: pretrain a MegatronBERT (MLM + NSP/SOP) on an indexed dataset."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from megabert.train.jobs.recipes import RECIPES, SETTINGS, get_recipe

DESCRIPTION = """\
Pretrain a MegatronBERT from scratch on a Megatron indexed dataset (from `megabert preprocess`):
masked-LM plus next-sentence (nsp) or sentence-order (sop) prediction, AdamW with warmup and
linear/cosine decay, gradient clipping and accumulation, bf16 autocast.

Outputs in --output: final/ (the model as a Hugging Face folder with the tokenizer: loads with
megabert and transformers), checkpoints/step-N/ (the last --keep-last), metrics.jsonl,
curves.png (with matplotlib), tensorboard/ (with tensorboard), run_config.json.

Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and stops; run the same
command with --resume auto to continue exactly where it stopped.

Several processes (GPUs, or CPU processes with --device cpu): launch the same command with
torchrun. The world is split into --tensor-parallel T ranks per model replica (each holds
heads/T attention heads, intermediate/T MLP columns and vocab/T embedding rows) times
world/T data-parallel replicas (--data-parallel ddp or fsdp). --batch-size is per data-parallel
rank. Checkpoints resume under another layout; final/ is always one whole model. Only rank 0
writes files and prints. See docs/distributed.md."""

EPILOG = """\
example:
  megabert train-tokenizer books/*.txt --vocab-size 30000 --output tok/
  megabert preprocess books/*.txt --tokenizer tok/ --output data/books --valid-fraction 0.02
  megabert pretrain --data data/books_train --valid-data data/books_valid --tokenizer tok/ \\
      --model-config tiny --output runs/tiny --max-steps 2000 --batch-size 32 --seq-length 128 \\
      --lr 5e-4 --warmup-steps 200 --schedule linear --bf16 --eval-every 200 --save-every 500
  megabert pretrain ... --output runs/tiny --resume auto      # continue after a stop
  # 4 GPUs: tensor parallel 2 x data parallel 2 (batch 32 per data-parallel rank)
  torchrun --nproc-per-node 4 -m megabert pretrain --tensor-parallel 2 \\
      --data data/books_train --valid-data data/books_valid --tokenizer tok/ \\
      --model-config large --output runs/large --max-steps 100000 --batch-size 32 --bf16
  # 2 CPU processes, data parallel only
  torchrun --nproc-per-node 2 -m megabert pretrain --device cpu ... --output runs/dp2"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` subcommand."""
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a MegatronBERT (MLM + NSP/SOP) on an indexed dataset",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data and model")
    data.add_argument("--data", required=True, metavar="PREFIX", help="training data prefix (PREFIX.bin/.idx)")
    data.add_argument("--valid-data", metavar="PREFIX", help="validation data prefix (evaluated every --eval-every)")
    data.add_argument("--tokenizer", required=True, metavar="DIR", help="the tokenizer the data was preprocessed with")
    data.add_argument(
        "--model-config", default="tiny", metavar="SPEC",
        help="tiny (4x256), base (12x768), large (24x1024, the 345M shape), or a config.json / model folder",
    )
    data.add_argument("--output", required=True, metavar="DIR", help="output folder")
    data.add_argument(
        "--recipe", default="default", choices=tuple(RECIPES),
        help="the settings below that the command line does not give: "
        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()).replace("%", "%%") + " (default: default)",
    )
    data.add_argument("--seq-length", type=int, metavar="L", help=f"tokens per sample {_default('seq_length')}")
    data.add_argument("--batch-size", type=int, metavar="B", help=f"samples per micro-batch {_default('batch_size')}")
    data.add_argument("--binary-task", choices=("nsp", "sop", "none"),
                      help=f"sentence-pair task next to MLM {_default('binary_task')}")
    data.add_argument("--masked-lm-prob", type=float, metavar="P", help=f"fraction of tokens masked {_default('masked_lm_prob')}")
    data.add_argument("--num-workers", type=int, default=0, metavar="N", help="data loader processes (default 0)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--max-steps", type=int, metavar="N",
                     help="optimizer steps in all (optional with --max-minutes: then the time ends the run)")
    opt.add_argument("--lr", type=float, help=f"peak learning rate {_default('lr')}")
    opt.add_argument("--min-lr-ratio", type=float, metavar="R", help=f"final lr / peak lr {_default('min_lr_ratio')}")
    opt.add_argument("--warmup-steps", type=int, metavar="N", help=f"linear warmup steps {_default('warmup_steps')}")
    opt.add_argument("--schedule", choices=("linear", "cosine", "constant"),
                     help=f"decay after warmup {_default('schedule')}")
    opt.add_argument("--weight-decay", type=float, help=f"AdamW weight decay {_default('weight_decay')}")
    opt.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    opt.add_argument("--clip-grad", type=float, metavar="NORM",
                     help=f"max gradient norm, 0 = no clipping {_default('clip_grad')}")
    precision = opt.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="bf16 autocast (CPU and CUDA)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 autocast with a grad scaler (CUDA)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                           help=f"fp32 throughout {_default('precision')}; auto = bf16 where this machine's bf16 "
                                "products are not slower than fp32 ones")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    opt.add_argument("--seed", type=int, default=1234, help="seed of init, data order, masking, dropout")
    opt.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")

    run_group = p.add_argument_group("evaluation, checkpoints, logging")
    run_group.add_argument("--eval-every", type=int, default=0, metavar="N", help="steps between evaluations (0: at the end)")
    run_group.add_argument("--eval-batches", type=int, default=50, metavar="N", help="validation batches per evaluation")
    run_group.add_argument("--save-every", type=int, default=0, metavar="N", help="steps between checkpoints (0: at the end)")
    run_group.add_argument("--keep-last", type=int, default=3, metavar="K", help="checkpoints kept (default 3)")
    run_group.add_argument("--resume", metavar="CKPT", help="a checkpoint folder, or 'auto' (the latest in --output)")
    run_group.add_argument("--log-every", type=int, default=10, metavar="N", help="steps between metric records")
    run_group.add_argument(
        "--max-minutes", type=float, metavar="M",
        help="stop (with a checkpoint) after M minutes of training; the schedule's decay follows the clock "
             "and ends when the time does (or at --max-steps, whichever comes first)",
    )
    run_group.add_argument("--quiet", action="store_true", help="no progress bar")
    from megabert.commands.training_options import add_training_run_arguments

    # --release-memory; --tensor-parallel, --data-parallel, --replicate-vocab, timeouts
    add_training_run_arguments(p, run_group)
    p.set_defaults(run=run)


def _default(setting: str) -> str:
    """The help text's "(default ...)" of a recipe setting: each recipe's value."""
    values = {r.name: getattr(r, setting) for r in RECIPES.values()}
    return "(" + ", ".join(f"{name} {value}" for name, value in values.items()) + ")"


def recipe_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Each recipe setting: from the command line where given, else from --recipe."""
    recipe = get_recipe(args.recipe)
    return {name: getattr(recipe, name) if getattr(args, name) is None else getattr(args, name) for name in SETTINGS}


def run(args: argparse.Namespace) -> int:
    """Build the configs from the arguments, run the job (on every rank under torchrun), print where the outputs are."""
    from megabert.commands.training_options import run_training_command

    return run_training_command(args, lambda hooks: _pretrain(args, hooks), _report)


def _pretrain(args: argparse.Namespace, hooks: Any) -> Any:
    """run_pretraining with the settings of the parsed arguments, on this rank (``hooks``)."""
    from megabert.train.engine.checkpoint import CheckpointConfig
    from megabert.train.engine.logging import MetricsConfig
    from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig
    from megabert.train.jobs.pretrain import PretrainDataConfig, run_pretraining
    from megabert.train.engine.trainer import TrainerConfig

    from megabert.devices import resolve_device
    from megabert.errors import UserError
    from megabert.train.engine.trainer import UNTIL_TIME_LIMIT
    from megabert.train.jobs.recipes import resolve_precision

    if args.max_steps is None and not args.max_minutes:
        raise UserError("give --max-steps N, --max-minutes M, or both (the run ends at the first reached)")
    settings = recipe_settings(args)
    binary = None if settings["binary_task"] == "none" else settings["binary_task"]
    precision = resolve_precision(settings["precision"], resolve_device(args.device).type)
    return run_pretraining(
        args.model_config,
        args.tokenizer,
        PretrainDataConfig(
            data=args.data, valid_data=args.valid_data, seq_length=settings["seq_length"],
            batch_size=settings["batch_size"], binary_task=binary, masked_lm_prob=settings["masked_lm_prob"],
            eval_batches=args.eval_batches, num_workers=args.num_workers,
        ),
        TrainerConfig(
            output_dir=args.output, max_steps=UNTIL_TIME_LIMIT if args.max_steps is None else args.max_steps,
            grad_accum=args.grad_accum, clip_grad=settings["clip_grad"] if settings["clip_grad"] > 0 else None,
            precision=precision, gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
            seed=args.seed, device=args.device, max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        ),
        optimizer=OptimizerConfig(lr=settings["lr"], weight_decay=settings["weight_decay"]),
        schedule=ScheduleConfig(
            kind=settings["schedule"], warmup_steps=settings["warmup_steps"], min_lr_ratio=settings["min_lr_ratio"]
        ),
        checkpoints=CheckpointConfig(save_every=args.save_every, keep_last=args.keep_last, resume=args.resume),
        metrics=MetricsConfig(log_every=args.log_every, progress=not args.quiet),
        distributed=hooks,
    )


def _report(result: Any) -> int:
    """Print what the run left (main rank); the exit status."""
    train = result.train
    ckpt = train.last_checkpoint
    if train.interrupted:
        print(f"stopped by {train.stop_reason} at step {train.step}; checkpoint: {ckpt}", file=sys.stderr)
        print(f"continue with the same command plus --resume auto (or --resume {ckpt})", file=sys.stderr)
        return 128 + int(getattr(signal, train.stop_reason))
    if result.eval_results:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.eval_results.items()))
        print(f"valid: {shown}")
    if train.stop_reason == "time limit":
        print(f"stopped at the time limit after step {train.step}; --resume auto continues")
    print(f"model: {result.final_dir}")
    print(f"checkpoint: {ckpt}")
    print(f"metrics: {result.metrics_file}" + (f"  curves: {result.curves_file}" if result.curves_file else ""))
    return 0
