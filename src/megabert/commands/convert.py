"""`megabert convert`: Megatron-LM BERT checkpoints -> Hugging Face model folders, and back."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DESCRIPTION = """\
Convert checkpoints between Megatron-LM and the Hugging Face layout (config.json +
model.safetensors), without Megatron-LM installed. Pickled checkpoints are read without
running any code from them; the output folder appears only when complete.

  megatron     Megatron-LM -> HF: an NGC zip (megatron_bert_345m_v0_1_*.zip), one
               model_optim_rng.pt, a save folder with tensor/pipeline-parallel shards
               (legacy or Megatron Core names, checkpoint versions 0 to 3), or a
               torch_dist save (*.distcp + .metadata; its iteration or run folder).
               A .nemo SRC is handed to `nemo`.
  nemo         NeMo MegatronBERT .nemo archive (tar or tar.gz) -> HF, with the
               tokenizer from the archive.
  to-megatron  HF -> Megatron-LM checkpoint, to go on training in Megatron-LM: legacy
               (split over TP x PP ranks; the default) or --format torch_dist (one
               distributed checkpoint that loads at any TP x PP).

See docs/conversion.md."""

EPILOG = """\
examples:
  megabert convert megatron megatron_bert_345m_v0_1_uncased.zip bert-345m-uncased \\
      --vocab-file vocab.txt --lowercase
  megabert convert megatron checkpoints/bert-run bert-hf      # torch_dist or legacy save folder
  megabert convert nemo megatron_bert.nemo bert-hf
  megabert convert to-megatron bert-345m-uncased megatron-ckpt --tensor-parallel 2
  megabert convert to-megatron bert-345m-uncased megatron-ckpt --format torch_dist"""

MEGATRON_EPILOG = """\
example:
  megabert convert megatron megatron_bert_345m_v0_1_uncased.zip bert-345m-uncased \\
      --vocab-file vocab.txt --lowercase
  megabert fill-mask bert-345m-uncased "The capital of France is [MASK]." """

TO_MEGATRON_EPILOG = """\
examples:
  megabert convert to-megatron bert-345m-uncased megatron-ckpt --tensor-parallel 2 --pipeline-parallel 2
  megabert convert to-megatron bert-345m-uncased megatron-ckpt --format torch_dist
  # then in Megatron-LM: --load megatron-ckpt (a "release" checkpoint: iteration 0, no optimizer state;
  # torch_dist: with --ckpt-format torch_dist, at any --tensor/--pipeline-model-parallel-size)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand with its ``megatron``, ``nemo`` and ``to-megatron`` directions."""
    parser = subparsers.add_parser(
        "convert",
        help="convert Megatron-LM (legacy, torch_dist) and NeMo BERT checkpoints to HF model folders, and back",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    directions = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_hf = directions.add_parser(
        "megatron",
        help="Megatron-LM checkpoint (zip, .pt or save folder) -> HF model folder",
        description="Convert a Megatron-LM BERT checkpoint into a Hugging Face model folder.",
        epilog=MEGATRON_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    to_hf.add_argument(
        "src", metavar="SRC",
        help="NGC zip, model_optim_rng.pt, Megatron-LM save folder (legacy or torch_dist), or a .nemo archive",
    )  # fmt: skip
    to_hf.add_argument("out", metavar="OUT", help="output model folder (must not exist, see --overwrite)")
    to_hf.add_argument(
        "--vocab-file", metavar="F", help="the model's vocab.txt: also write the tokenizer files into OUT"
    )
    casing = to_hf.add_mutually_exclusive_group()
    casing.add_argument(
        "--lowercase", dest="lowercase", action="store_const", const=True, default=None,
        help="the vocabulary is uncased (default: the checkpoint's tokenizer_type, else guessed from the vocabulary)",
    )  # fmt: skip
    casing.add_argument("--cased", dest="lowercase", action="store_const", const=False, help="the vocabulary is cased")
    to_hf.add_argument(
        "--num-attention-heads", type=int, metavar="N",
        help="head count, for checkpoints saved without args (default: hidden size / 64)",
    )  # fmt: skip
    to_hf.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once complete)")
    to_hf.set_defaults(run=run_megatron_to_hf)

    nemo = directions.add_parser(
        "nemo",
        help="NeMo MegatronBERT .nemo archive -> HF model folder (with its tokenizer)",
        description=(
            "Convert a NeMo MegatronBERT .nemo archive (a tar, plain or gzip, of model_config.yaml and "
            "model_weights.ckpt, mp_rank_XX/model_weights.ckpt or a torch_dist model_weights/ folder) into a "
            "Hugging Face model folder; the archive's vocabulary becomes the tokenizer."
        ),
        epilog="example:\n  megabert convert nemo bert_base_uncased.nemo bert-base-hf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nemo.add_argument("src", metavar="MODEL.nemo", help="the .nemo archive")
    nemo.add_argument("out", metavar="OUT", help="output model folder (must not exist, see --overwrite)")
    nemo.add_argument("--vocab-file", metavar="F", help="use this vocab.txt instead of the archive's")
    nemo_casing = nemo.add_mutually_exclusive_group()
    nemo_casing.add_argument(
        "--lowercase", dest="lowercase", action="store_const", const=True, default=None,
        help="the vocabulary is uncased (default: the archive's tokenizer config)",
    )  # fmt: skip
    nemo_casing.add_argument("--cased", dest="lowercase", action="store_const", const=False, help="the vocabulary is cased")
    nemo.add_argument("--num-attention-heads", type=int, metavar="N", help=argparse.SUPPRESS)
    nemo.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once complete)")
    nemo.set_defaults(run=run_nemo_to_hf)

    to_mlm = directions.add_parser(
        "to-megatron",
        help="HF model folder -> Megatron-LM checkpoint (legacy TP x PP shards, or torch_dist)",
        description=(
            "Write a Hugging Face MegatronBERT folder as a Megatron-LM checkpoint: "
            "latest_checkpointed_iteration.txt and release/ (or iter_N/) holding, with --format legacy, "
            "one mp_rank_XX[_YYY]/model_optim_rng.pt per rank, or with --format torch_dist, a "
            "distributed checkpoint (__0_0.distcp, .metadata, common.pt, metadata.json) in Megatron Core's "
            "BertModel layout, which Megatron-LM loads at any TP x PP."
        ),
        epilog=TO_MEGATRON_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    to_mlm.add_argument("hf_dir", metavar="HF_DIR", help="model folder (config.json + weights)")
    to_mlm.add_argument("out", metavar="OUT", help="output save folder (must not exist, see --overwrite)")
    to_mlm.add_argument(
        "--format", dest="ckpt_format", choices=("legacy", "torch_dist"), default="legacy",
        help="legacy (default): Megatron-LM's --ckpt-format torch, one file per TP x PP rank; torch_dist: "
        "--ckpt-format torch_dist in Megatron Core's BertModel layout, one checkpoint for any TP x PP "
        "(so no --tensor-parallel/--pipeline-parallel/--checkpoint-version), an untied output layer kept",
    )  # fmt: skip
    to_mlm.add_argument(
        "--tensor-parallel", type=int, metavar="T", help="tensor-parallel degree (required with --format legacy)"
    )
    to_mlm.add_argument(
        "--pipeline-parallel", type=int, metavar="P", help="pipeline-parallel degree (--format legacy; default 1)"
    )
    to_mlm.add_argument(
        "--checkpoint-version", type=float, default=3.0, metavar="V",
        help="0, 1, 2 or 3 (default 3): the fused-QKV layout and names (transformer/attention below 3); "
        "--format legacy only",
    )  # fmt: skip
    to_mlm.add_argument(
        "--iteration", type=int, metavar="N",
        help="write iter_NNNNNNN with this iteration (default: a 'release' checkpoint)",
    )  # fmt: skip
    to_mlm.add_argument(
        "--tokenizer-type", metavar="NAME",
        help="args.tokenizer_type (default: from HF_DIR/tokenizer_config.json: BertWordPieceLowerCase or BertWordPieceCase)",
    )  # fmt: skip
    to_mlm.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once complete)")
    to_mlm.set_defaults(run=run_hf_to_megatron)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _show_notes() -> None:
    """Print the converter's notes (assumed head count, padding, ...) on stderr."""
    logger = logging.getLogger("megabert.convert")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("megabert convert: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _refuse_existing(out: str, overwrite: bool) -> None:
    if not overwrite and Path(out).exists():
        raise FileExistsError(f"output {out} already exists (pass --overwrite to replace it)")


def run_megatron_to_hf(args: argparse.Namespace) -> int:
    """Megatron-LM -> HF."""
    from megabert.convert.megatron_lm import convert_megatron_to_hf

    _refuse_existing(args.out, args.overwrite)
    _show_notes()
    out = convert_megatron_to_hf(
        args.src,
        args.out,
        vocab_file=args.vocab_file,
        lowercase=args.lowercase,
        num_attention_heads=args.num_attention_heads,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def run_nemo_to_hf(args: argparse.Namespace) -> int:
    """NeMo -> HF."""
    from megabert.convert.nemo import convert_nemo_to_hf

    _refuse_existing(args.out, args.overwrite)
    _show_notes()
    out = convert_nemo_to_hf(
        args.src, args.out, vocab_file=args.vocab_file, lowercase=args.lowercase,
        num_attention_heads=args.num_attention_heads, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


def run_hf_to_megatron(args: argparse.Namespace) -> int:
    """HF -> Megatron-LM."""
    from megabert.convert.megatron_lm import convert_hf_to_megatron
    from megabert.errors import UserError

    ckpt_format = getattr(args, "ckpt_format", "legacy")
    if ckpt_format == "legacy" and args.tensor_parallel is None:
        raise UserError("--tensor-parallel T is required with --format legacy (the checkpoint is split over T ranks)")
    if ckpt_format == "torch_dist" and (args.tensor_parallel, args.pipeline_parallel) != (None, None):
        raise UserError(
            "--format torch_dist takes no --tensor-parallel/--pipeline-parallel: a torch_dist checkpoint is not "
            "split by rank, Megatron-LM loads it at any TP x PP"
        )
    if ckpt_format == "torch_dist" and args.checkpoint_version != 3.0:
        raise UserError("--format torch_dist takes no --checkpoint-version: it is always Megatron Core's layout (3)")
    _refuse_existing(args.out, args.overwrite)
    _show_notes()
    out = convert_hf_to_megatron(
        args.hf_dir,
        args.out,
        ckpt_format=ckpt_format,
        tensor_parallel=1 if args.tensor_parallel is None else args.tensor_parallel,
        pipeline_parallel=1 if args.pipeline_parallel is None else args.pipeline_parallel,
        checkpoint_version=args.checkpoint_version,
        iteration=args.iteration,
        tokenizer_type=args.tokenizer_type,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen direction (each direction's parser also sets its own ``run``)."""
    if args.direction == "nemo":
        return run_nemo_to_hf(args)
    return run_megatron_to_hf(args) if args.direction == "megatron" else run_hf_to_megatron(args)
