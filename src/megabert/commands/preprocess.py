"""`megabert preprocess`: tokenize a text / JSONL corpus into a Megatron indexed dataset."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Tokenize a corpus into a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx), the input
of `megabert pretrain` (and of Megatron-LM itself).

Inputs: plain text files (one sentence per line; a blank line or the end of a file starts a
new document) and JSONL files (.jsonl/.json: one {"text": ...} object per line, one document
each). With --valid-fraction, documents are split at random (by --seed) into PREFIX_train and
PREFIX_valid."""

EPILOG = """\
example:
  megabert preprocess books/*.txt wiki.jsonl --output data/corpus \\
      --tokenizer my-tokenizer/ --split-sentences --workers 4 --valid-fraction 0.01"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``preprocess`` subcommand."""
    parser = subparsers.add_parser(
        "preprocess",
        help="tokenize text/JSONL files into a Megatron indexed dataset (.bin/.idx)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="text or JSONL files, read in order")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="output prefix (writes PREFIX.bin/.idx)")
    parser.add_argument(
        "--tokenizer", required=True, metavar="DIR", help="tokenizer folder (tokenizer.json or vocab.txt) or a vocab.txt"
    )
    parser.add_argument(
        "--split-sentences",
        action="store_true",
        help="cut lines / JSON texts into sentences (rule-based; needed for NSP/SOP on JSONL)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default 1)")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of documents for PREFIX_valid (default 0: one dataset PREFIX)",
    )
    parser.add_argument("--seed", type=int, default=1234, metavar="S", help="seed of the train/valid split")
    parser.add_argument("--json-key", default="text", metavar="KEY", help='JSONL field with the text (default "text")')
    parser.add_argument(
        "--format",
        dest="input_format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="input format (default auto: .jsonl/.json are JSONL, anything else text)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the preprocessing and print the summary."""
    from megabert.data.preprocess import preprocess_corpus

    summary = preprocess_corpus(
        args.inputs,
        args.output,
        args.tokenizer,
        split_sentences=args.split_sentences,
        workers=args.workers,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
        json_key=args.json_key,
        input_format=args.input_format,
        progress=not args.quiet,
    )
    print(summary.format(), file=sys.stdout)
    return 0
