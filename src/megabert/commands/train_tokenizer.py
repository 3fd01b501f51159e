"""`megabert train-tokenizer`: train a WordPiece vocabulary (see megabert.tokenization.train_tokenizer)."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
example:
  megabert train-tokenizer corpus/*.txt --vocab-size 30522 --output my-tokenizer
  megabert train-tokenizer books.txt --vocab-size 8000 --cased --output my-cased-tokenizer

The folder gets vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json;
load it with MegatronBertTokenizer.from_pretrained(DIR) (or transformers.AutoTokenizer).
[PAD] [UNK] [CLS] [SEP] [MASK] take ids 0-4, and the vocabulary is padded with [unusedN]
entries to a multiple of --pad-to-multiple-of (128, as Megatron-LM pads its embedding).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-tokenizer` subcommand."""
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train a BERT WordPiece vocabulary from text files",
        description="Train a BERT WordPiece vocabulary from UTF-8 text files with the `tokenizers` library.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files to learn the vocabulary from")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N", help="largest learned vocabulary (before padding)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write the tokenizer to (must not exist)")
    parser.add_argument("--cased", action="store_true", help="keep case and accents (default: lower-case and strip accents)")
    parser.add_argument("--min-frequency", type=int, default=2, metavar="N", help="merge only pieces seen at least N times (default 2)")
    parser.add_argument(
        "--pad-to-multiple-of", type=int, default=128, metavar="M",
        help="pad the vocabulary size to a multiple of M with [unusedN] entries; 1 for none (default 128)",
    )  # fmt: skip
    parser.add_argument("--model-max-length", type=int, default=512, metavar="N", help="longest input the model takes (default 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train, then write the folder atomically (a failed run leaves no half-written folder)."""
    from megabert.tokenization import train_tokenizer
    from megabert.utils import atomic_folder

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"output {output} already exists (pass --overwrite to replace it)")
    tokenizer = train_tokenizer(
        args.files,
        args.vocab_size,
        lowercase=not args.cased,
        min_frequency=args.min_frequency,
        pad_to_multiple_of=args.pad_to_multiple_of,
        show_progress=not args.quiet,
        model_max_length=args.model_max_length,
    )
    with atomic_folder(output, overwrite=args.overwrite) as folder:
        tokenizer.save_pretrained(folder)
    unused = sum(1 for token in tokenizer.get_vocab() if token.startswith("[unused"))
    print(
        f"wrote {'a cased' if args.cased else 'an uncased'} WordPiece vocabulary of {len(tokenizer)} entries "
        f"({len(tokenizer) - unused} trained, {unused} [unusedN] padding) to {output}"
    )
    return 0
