"""Loading a pipeline's model and tokenizer from a folder, with the checks a user needs.

Everything that can be wrong with a model folder is reported here as one clear
:class:`~megabert.errors.UserError` before any weights are read: the folder is missing, it has
no ``config.json`` or no weights, no tokenizer files, or no weights for the head the task needs.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from megabert import task_table
from megabert.devices import resolve_device, resolve_dtype  # noqa: F401 - re-exported for the pipelines
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
# model class -> (its pipeline, its command); a view of megabert.task_table.
CLASSIFIER_MODELS: dict[str, tuple[str, str]] = {
    task.model_class: (task.primary(task_table.PIPELINE), f"megabert {task.command}")
    for task in task_table.tasks_with_head("classifier")
}


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

    Checkpoint weights the class does not use (another head's) are not worth a warning: a
    pipeline only needs its own head, checked above. Missing weights are warned about (but not
    a base model's pooler when the pipeline does not pool with it).
    """
    from megabert.modeling.heads import model_class_for
    from megabert.modeling.pretrained import LoadReport

    config = read_config(folder)
    keys = checkpoint_keys(folder)
    heads = check_head(folder, config, keys, task, head)
    try:
        model, info = model_class_for(model_task).from_pretrained(
            folder, dtype=resolve_dtype(dtype), device=device, unpad_inputs=unpad_inputs, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model in {folder}: {exc}") from None
    report = LoadReport(type(model).__name__, str(folder), info["missing_keys"], info["unexpected_keys"])
    if report.unexpected_keys:
        logger.debug("%s", report.unexpected_message())
    if report.missing_keys:
        if "pooler" not in heads and all("pooler." in key for key in report.missing_keys):
            logger.debug("%s", report.missing_message())  # only pooling="pooler" needs a base model's pooler
        else:
            warnings.warn(report.missing_message(), stacklevel=2)
    model.eval()
    return model, heads
