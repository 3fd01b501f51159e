"""`megabert info MODEL`: what a model folder holds, read without loading the weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EPILOG = """\
example:
  megabert info my-model
  megabert info my-model --json | jq .parameters

Shows the config (architecture, sizes, labels), the parameter count (from the weight files'
headers, tied weights counted once), the heads whose weights the checkpoint holds, which
pipelines can run on it, the weight files and the tokenizer files present.
"""

# head in the checkpoint -> the prediction commands it serves
_HEAD_COMMANDS = {
    "masked-lm": ["fill-mask"],
    "next-sentence": ["next-sentence"],
    "question-answering": ["qa"],
}
_CLASSIFIER_COMMANDS = {
    "MegatronBertForSequenceClassification": "classify",
    "MegatronBertForTokenClassification": "tokens",
    "MegatronBertForMultipleChoice": "choices",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `info` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="summarise a model folder: config, parameters, heads, tokenizer files",
        description="Summarise a model folder written by megabert or transformers, without loading its weights.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="model folder (config.json + weights)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=run)


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor, from safetensors headers (other formats are loaded).

    Read by the same checked loader as every other command (a damaged file or a shard outside
    the folder is a one-line error naming the file).
    """
    from megabert.modeling.pretrained import read_tensor_shapes

    return read_tensor_shapes(folder)


def count_parameters(shapes: dict[str, tuple[int, ...]], tied: bool) -> int:
    """Parameters of the stored tensors, without aliases (the tied decoder, the duplicated MLM bias)."""
    keys = set(shapes)
    skip = set()
    if tied and any(k.endswith("embeddings.word_embeddings.weight") for k in keys):
        skip.add("cls.predictions.decoder.weight")
    if "cls.predictions.bias" in keys:
        skip.add("cls.predictions.decoder.bias")
    skip |= {k for k in keys if k.endswith(".position_ids")}  # a buffer older checkpoints carry
    total = 0
    for key, shape in shapes.items():
        if key in skip:
            continue
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def summarise(folder: Path) -> dict[str, Any]:
    """The facts `megabert info` shows, as a dict."""
    from megabert.inference.loading import WEIGHT_FILES, check_model_folder, read_config, tokenizer_files
    from megabert.modeling.heads import heads_in_checkpoint

    folder = check_model_folder(folder)
    config = read_config(folder)
    shapes = tensor_shapes(folder)
    heads = heads_in_checkpoint(set(shapes))
    commands = ["embed"]
    for head in heads:
        commands += _HEAD_COMMANDS.get(head, [])
    if "classifier" in heads:
        archs = [a for a in (config.architectures or []) if a in _CLASSIFIER_COMMANDS]
        commands += [_CLASSIFIER_COMMANDS[a] for a in archs] or ["classify", "tokens", "choices"]
    weight_files = sorted(
        p.name for p in folder.iterdir()
        if p.name in WEIGHT_FILES or (p.name.startswith("model-") and p.suffix == ".safetensors")
        or (p.name.startswith("pytorch_model-") and p.suffix == ".bin")
    )  # fmt: skip
    return {
        "folder": str(folder),
        "architectures": config.architectures or [],
        "config": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "max_position_embeddings": config.max_position_embeddings,
            "hidden_act": config.hidden_act,
            "position_embedding_type": config.position_embedding_type,
            "torch_dtype": config.torch_dtype,
            "num_labels": config.num_labels,
            "id2label": {str(k): v for k, v in sorted(config.id2label.items())},
            "problem_type": config.problem_type,
        },
        "parameters": count_parameters(shapes, config.tie_word_embeddings),
        "heads": heads,
        "commands": commands,
        "weight_files": weight_files,
        "weights_bytes": sum((folder / name).stat().st_size for name in weight_files),
        "tokenizer_files": tokenizer_files(folder),
    }


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def run(args: argparse.Namespace) -> int:
    """Print the summary of the folder."""
    info = summarise(Path(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    labels = ", ".join(info["config"]["id2label"].values())
    lines = [
        f"model folder     {info['folder']}",
        f"architecture     {', '.join(info['architectures']) or 'not recorded'}",
        f"size             {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
        f"MLP {c['intermediate_size']}, {c['hidden_act']}",
        f"vocabulary       {c['vocab_size']} tokens, {c['max_position_embeddings']} positions ({c['position_embedding_type']})",
        f"parameters       {info['parameters']:,} ({_human(info['parameters'])})",
        f"labels           {c['num_labels']}: {labels}" + (f" ({c['problem_type']})" if c["problem_type"] else ""),
        f"heads            {', '.join(info['heads']) or 'none (encoder only)'}",
        f"commands         {', '.join(info['commands'])}",
        f"weights          {', '.join(info['weight_files'])} ({_human(info['weights_bytes'], 'B')}, "
        f"stored as {c['torch_dtype'] or 'unrecorded dtype'})",
        f"tokenizer files  {', '.join(info['tokenizer_files']) or 'none: pass --tokenizer DIR to the prediction commands'}",
    ]
    print("\n".join(lines))
    return 0
