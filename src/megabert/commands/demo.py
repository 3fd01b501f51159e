"""`megabert demo`: pretrain a tiny MegatronBERT on a built-in corpus and show what it predicts."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="the quickstart: pretrain a tiny model on a built-in corpus (a few minutes) and show its predictions",
        description="Pretrain a tiny MegatronBERT on the Python language reference and show its predictions.",
    )
    parser.add_argument("--output", default="demo-output", help="output folder (default demo-output/)")
    parser.add_argument("--max-steps", type=int, help="training steps (default: as many as fit in --max-minutes)")
    parser.add_argument("--max-minutes", type=float, default=4.0, help="training time limit (default 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--vocab-size", type=int, default=4000, help="WordPiece vocabulary trained on the corpus (default 4000)")
    parser.add_argument("--model-config", default="tiny", help="tiny | base | large | a config.json")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate, decayed to 0 by the end (default 5e-4)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32",
                        help="fp32 (default: at the demo's small shapes bf16 steps were not faster, even with AMX), "
                             "bf16, or auto (bf16 where this CPU's bf16 products are not slower than fp32 ones)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of init, data and masking (default 1234)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed options (its report goes to stdout)."""
    from megabert.demo import run_demo

    run_demo(
        args.output, model_config=args.model_config, vocab_size=args.vocab_size, max_steps=args.max_steps,
        max_minutes=args.max_minutes, batch_size=args.batch_size, seq_length=args.seq_length, seed=args.seed,
        lr=args.lr, precision=args.precision,
    )
    return 0
