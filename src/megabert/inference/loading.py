"""Loading a pipeline's model and tokenizer from a folder, with the checks a user needs.

Everything that can be wrong with a model folder is reported here as one clear
:class:`~megabert.errors.UserError` before any weights are read: the folder is missing, it has
no ``config.json`` or no weights, no tokenizer files, or no weights for the head the task needs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from megabert.errors import UserError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Models whose `classifier` weights mean different things: a checkpoint of one is no use to another.
CLASSIFIER_MODELS = {
    "MegatronBertForSequenceClassification": ("text-classification", "megabert classify"),
    "MegatronBertForTokenClassification": ("token-classification", "megabert tokens"),
    "MegatronBertForMultipleChoice": ("multiple-choice", "megabert choices"),
}


def resolve_device(device: str | int | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; an int is a CUDA index."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}" if device >= 0 else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available here (use --device cpu)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A floating-point torch dtype, ``"auto"`` (the dtype the folder records) or None (float32)."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise UserError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype).replace("torch.", ""))
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UserError(f"dtype {dtype!r} is not one of float32, bfloat16, float16, auto")
    return resolved


def check_model_folder(path: str | os.PathLike) -> Path:
    """The folder, if it looks like a model folder; else a UserError saying what is wrong."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"model path {folder} is not a folder (expected a folder with config.json and weights)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise UserError(f"model folder {folder} is not readable")
    if not (folder / "config.json").is_file():
        raise UserError(f"model folder {folder} has no config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"model folder {folder} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return folder


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files present in ``folder``."""
    return [name for name in TOKENIZER_FILES if (folder / name).is_file()]


def load_tokenizer(tokenizer: Any, folder: Path | None) -> Any:
    """A tokenizer object: given as is, loaded from a path, or found in the model folder."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from megabert.tokenization import MegatronBertTokenizer

    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise UserError(f"tokenizer {path} does not exist (expected a folder with tokenizer.json or vocab.txt)")
    elif folder is not None:
        path = folder
        if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
            raise UserError(
                f"model folder {folder} has no tokenizer files (tokenizer.json or vocab.txt); "
                "save the tokenizer into it or pass a tokenizer (--tokenizer DIR)"
            )
    else:
        raise UserError("a model object was given without a tokenizer: pass tokenizer=...")
    try:
        return MegatronBertTokenizer.from_pretrained(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the tokenizer in {path}: {exc}") from None


def checkpoint_keys(folder: Path) -> set[str]:
    """The weight names stored in a model folder, read from file headers where possible.

    Through the checked loader every command uses (:func:`megabert.modeling.pretrained.read_tensor_shapes`).
    """
    from megabert.modeling.pretrained import read_tensor_shapes

    return set(read_tensor_shapes(folder))


def read_config(folder: Path) -> Any:
    """The folder's MegatronBertConfig, with read errors as UserError."""
    from megabert.config import MegatronBertConfig

    try:
        return MegatronBertConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config in {folder}: {exc}") from None


def check_head(folder: Path, config: Any, keys: set[str], task: str, head: str | None) -> list[str]:
    """Raise a UserError when the checkpoint lacks the weights of ``head``; return the heads present."""
    from megabert.modeling.heads import heads_in_checkpoint

    heads = heads_in_checkpoint(keys)
    if head is not None and head not in heads:
        raise UserError(
            f"model folder {folder} has no {head} head, which the {task} pipeline needs "
            f"(heads in the checkpoint: {', '.join(heads) if heads else 'none'})"
        )
    if head == "classifier":
        for arch in config.architectures or ():
            other = CLASSIFIER_MODELS.get(arch)
            if other is not None and other[0] != task:
                raise UserError(
                    f"the model in {folder} is a {arch}; use the {other[0]} pipeline ({other[1]}) instead of {task}"
                )
    return heads


def load_model(
    folder: Path,
    model_task: str,
    *,
    task: str,
    head: str | None,
    dtype: Any = None,
    device: torch.device | None = None,
    unpad_inputs: bool = True,
) -> tuple[Any, list[str]]:
    """Load the folder's weights into the model class of ``model_task``, in eval mode; also the heads present.

    Warnings about checkpoint weights the class does not use (another head's) are dropped:
    a pipeline only needs its own head, checked above. Warnings about missing weights pass on.
    """
    from megabert.modeling.heads import model_class_for

    config = read_config(folder)
    keys = checkpoint_keys(folder)
    heads = check_head(folder, config, keys, task, head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = model_class_for(model_task).from_pretrained(
                folder, dtype=resolve_dtype(dtype), device=device, unpad_inputs=unpad_inputs
            )
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the model in {folder}: {exc}") from None
    for warning in caught:
        text = str(warning.message)
        if "were not used" in text:
            logger.debug("%s", text)
        elif "pooler" not in heads and _only_pooler_missing(text):
            logger.debug("%s", text)  # a base model without a pooler: only pooling="pooler" needs it
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    model.eval()
    return model, heads


def _only_pooler_missing(warning_text: str) -> bool:
    """Whether a "newly initialised" warning names pooler weights only."""
    match = re.search(r"newly initialised: (.*?)(?: \(\+\d+ more\))?\. ", warning_text)
    return bool(match) and all("pooler." in name for name in match.group(1).split(", "))
