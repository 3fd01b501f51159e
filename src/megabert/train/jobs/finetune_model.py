"""Model folders for fine-tuning: the tokenizer, the config checks, the task model to train, the fine-tuned one to evaluate.

- :func:`build_model` -- ``MegatronBertFor<Task>`` for training: the encoder from a folder
  (pretraining heads left out), a fresh head (or the folder's own when it is this task's head
  with the same labels), or everything fresh with ``random_init``.
- :func:`load_finetuned` -- a fine-tuned folder for evaluation; an error when it lacks the
  task's head or holds another task's model.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megabert import task_table
from megabert.config import MegatronBertConfig
from megabert.data.tasks import canonical_task
from megabert.errors import UserError
from megabert.train.jobs.finetune_data import CHOICE, QA, LabelScheme

logger = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"  # inside best/: how the model was fine-tuned (read by evaluate)
# The weights a task head adds on top of the encoder, by fine-tuning task (a view of megabert.task_table).
HEAD_PREFIXES: dict[str, str] = {
    task.name: task_table.HEADS[task.head][0] for task in task_table.tasks(task_table.FINETUNE) if task.head
}
task_table.check_covers(HEAD_PREFIXES, task_table.FINETUNE, "megabert.train.jobs.finetune_model.HEAD_PREFIXES")


def read_model_config(model_dir: str | os.PathLike) -> MegatronBertConfig:
    """The config.json of a model folder, with a one-line error when there is none."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    try:
        return MegatronBertConfig.from_pretrained(folder)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise UserError(f"{folder}: {exc}") from None


def check_model_fits(config: MegatronBertConfig, tokenizer: Any, max_length: int, source: str) -> None:
    """Raise UserError when the tokenizer's ids or ``max_length`` exceed what the model has."""
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} ids but {source} has vocab_size {config.vocab_size}: "
            "use the tokenizer the model was trained with"
        )
    if max_length > config.max_position_embeddings:
        raise UserError(
            f"max length {max_length} is above the model's max_position_embeddings "
            f"({config.max_position_embeddings}, {source}): lower --max-length"
        )


def build_model(
    task: str,
    model_dir: str | os.PathLike,
    scheme: LabelScheme,
    *,
    random_init: bool = False,
    unpad_training: bool = True,
) -> nn.Module:
    """``MegatronBertFor<Task>`` with the scheme's labels, from a model folder.

    The encoder weights come from the folder (any head it has that is not this task's is left
    out). The folder's own head is kept when it is this task's head with the same labels
    (fine-tuning again); otherwise the head starts fresh. ``random_init`` takes only the config.
    ``unpad_training``: train on real tokens only (fast; the QA loss then leaves pad positions
    out of its softmax, see the README's "Differences from transformers"); False trains padded,
    on the reference's loss. Evaluation runs unpadded either way.
    """
    from megabert.modeling.heads import model_class_for
    from megabert.modeling.pretrained import read_state_dict

    task = canonical_task(task)
    folder = Path(model_dir)
    old = read_model_config(folder)
    config = old.copy(**scheme.config_overrides(), unpad_inputs=True if unpad_training else None)
    model = model_class_for(task)(config)
    if random_init:
        return model
    state = read_state_dict(folder)
    # Encoder weights are stored with the "bert." prefix of a head model, or bare by a base model.
    stored = {k[len("bert."):] if k.startswith("bert.") else k for k in state}
    missing = sorted(k for k in model.bert.state_dict() if k not in stored)
    with warnings.catch_warnings():
        # Unused pretraining heads are expected here; missing weights are reported below instead.
        warnings.simplefilter("ignore")
        model.bert.load_checkpoint_state(state, source=str(folder))
    fresh_pooler = [k for k in missing if k.startswith("pooler.")]
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing:
        logger.warning("%s lacks %d encoder weights, which start random: %s", folder, len(missing),
                       ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if fresh_pooler:
        logger.info("%s has no pooler weights: the pooler starts random", folder)
    prefix = HEAD_PREFIXES[task]
    own = model.state_dict()
    head = {k: v for k, v in state.items() if k.startswith(prefix)}
    same_labels = task in (QA, CHOICE) or (
        old.id2label == config.id2label and old.problem_type in (None, config.problem_type)
    )
    wanted = [k for k in own if k.startswith(prefix)]
    if same_labels and wanted and all(k in head and tuple(head[k].shape) == tuple(own[k].shape) for k in wanted):
        model.load_state_dict({k: head[k] for k in wanted}, strict=False)
        logger.info("%s: kept its %s head", folder, task)
    return model


def task_of_folder(folder: Path, config: MegatronBertConfig) -> str | None:
    """The task a fine-tuned folder was trained for: from finetune.json, else its architecture."""
    info = read_finetune_info(folder)
    if info.get("task"):
        return str(info["task"])
    for name in config.architectures or []:
        task = task_table.task_of_class(name)
        if task is not None and task.finetune:
            return task.name
    return None


def read_finetune_info(folder: Path) -> dict[str, Any]:
    path = folder / FINETUNE_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None
    return info if isinstance(info, dict) else {}


def load_finetuned(task: str, model_dir: str | os.PathLike, *, device: torch.device | None = None) -> nn.Module:
    """A fine-tuned ``MegatronBertFor<Task>`` in eval mode, unpadded; an error if it lacks the task's head."""
    from megabert.modeling.heads import model_class_for
    from megabert.modeling.pretrained import read_state_dict

    task = canonical_task(task)
    folder = Path(model_dir)
    config = read_model_config(folder).copy(unpad_inputs=True)
    cls = model_class_for(task)
    if config.architectures and cls.__name__ not in config.architectures:
        raise UserError(
            f"{folder} holds a {', '.join(config.architectures)}, not a {cls.__name__}: "
            f"evaluate it with its own task, or fine-tune it for {task} first"
        )
    state = read_state_dict(folder)
    prefix = HEAD_PREFIXES[task]
    if not any(k.startswith(prefix) for k in state):
        raise UserError(f"{folder} has no trained {task} head (no {prefix}* weights): fine-tune it first")
    model = cls(config)
    model.load_checkpoint_state(state, source=str(folder))
    if device is not None:
        model = model.to(device)
    return model.eval()
