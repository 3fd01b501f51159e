"""``pipeline(task, model)``: ready-to-run inference for every MegatronBERT head.

>>> from megabert.inference.pipelines import pipeline
>>> fill = pipeline("fill-mask", "path/to/model")            # a folder: config, weights, tokenizer
>>> fill("The capital of France is [MASK].", top_k=3)
>>> qa = pipeline("question-answering", "path/to/squad-model", device="cuda", dtype="bfloat16")
>>> qa({"question": "Who wrote it?", "context": "..."})
>>> for result in pipeline("text-classification", "sst2-model").stream(open("lines.txt")):
...     print(result)                                           # streams: flat memory, input order

Tasks (and aliases): fill-mask; next-sentence (nsp); text-classification (sentiment-analysis,
classify); token-classification (ner, tokens); question-answering (qa); multiple-choice
(choices); feature-extraction (embed). Each pipeline's class documents its inputs, call
parameters and results.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megabert import task_table
from megabert.errors import UserError
from megabert.inference.base import InputError, Pipeline
from megabert.inference.classification import MultipleChoicePipeline, NextSentencePipeline, TextClassificationPipeline
from megabert.inference.feature_extraction import FeatureExtractionPipeline
from megabert.inference.fill_mask import FillMaskPipeline
from megabert.devices import resolve_device, resolve_dtype
from megabert.inference.loading import check_model_folder, load_model
from megabert.tokenization import load_tokenizer
from megabert.inference.question_answering import QuestionAnsweringPipeline
from megabert.inference.token_classification import TokenClassificationPipeline

# The pipeline class of each task that has a pipeline, by canonical task name (checked against the table).
PIPELINE_CLASSES: dict[str, type[Pipeline]] = {
    "base": FeatureExtractionPipeline,
    "masked-lm": FillMaskPipeline,
    "next-sentence": NextSentencePipeline,
    "sequence-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "multiple-choice": MultipleChoicePipeline,
}
task_table.check_covers(PIPELINE_CLASSES, task_table.PIPELINE, "megabert.inference.pipelines.PIPELINE_CLASSES")
# Views of megabert.task_table, by pipeline name: (pipeline class, model task, head its checkpoint
# must have); and alias -> pipeline name.
TASKS: dict[str, tuple[type[Pipeline], str, str | None]] = {
    task.primary(task_table.PIPELINE): (PIPELINE_CLASSES[task.name], task.name, task.head)
    for task in task_table.tasks(task_table.PIPELINE)
}
ALIASES: dict[str, str] = task_table.aliases(task_table.PIPELINE)


def canonical_task(task: str) -> str:
    """The task's pipeline name, from the name or an alias."""
    return resolve_pipeline_task(task).primary(task_table.PIPELINE)


def resolve_pipeline_task(task: str) -> task_table.Task:
    """The table's task of a pipeline name or alias (a UserError listing the names otherwise)."""
    return task_table.resolve_task(task, task_table.PIPELINE)


def pipeline(
    task: str,
    model: str | os.PathLike | torch.nn.Module,
    tokenizer: Any = None,
    *,
    device: str | int | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
    unpad_inputs: bool = True,
    **kwargs: Any,
) -> Pipeline:
    """Build the pipeline of ``task`` on a model folder or a loaded model.

    Args:
        task: a task name or alias (see the module docstring).
        model: a model folder (``config.json`` + weights, as written by megabert or
            ``transformers``) or a megabert model object of the task's class.
        tokenizer: a tokenizer object or folder; default: the tokenizer files of the model folder.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, an index, or None/``"auto"`` (CUDA when available).
        dtype: ``"float32"`` (default for a folder), ``"bfloat16"``, ``"float16"``, ``"auto"``
            (the dtype the folder records) or a torch dtype.
        batch_size: model rows per forward pass.
        unpad_inputs: load a folder so that padded batches run on their real tokens only
            (outputs at pad positions, which no pipeline reads, become zeros).
        **kwargs: ``lookahead``, ``max_length``, and default values of the task's call
            parameters (e.g. ``top_k=3``, ``aggregation_strategy="simple"``).
    """
    spec = resolve_pipeline_task(task)
    task = spec.primary(task_table.PIPELINE)  # the name messages use
    embeddings = spec.name == "base"  # feature-extraction runs on the encoder of any model
    extra: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        folder = check_model_folder(model)
        tok = load_tokenizer(tokenizer, model_folder=folder)
        loaded, heads = load_model(
            folder, spec.name, task=task, head=spec.head, dtype=dtype, device=resolve_device(device),
            unpad_inputs=unpad_inputs,
        )
        if embeddings:
            extra["has_pooler"] = "pooler" in heads
    elif isinstance(model, torch.nn.Module):
        accepted = (spec.model_class, *(task_table.get_task(other).model_class for other in spec.also_runs_on))
        if type(model).__name__ not in accepted and not (embeddings and hasattr(model, "bert")):
            raise UserError(f"the {task} pipeline needs a {' or '.join(accepted)}, got a {type(model).__name__}")
        tok = load_tokenizer(tokenizer, None)
        loaded = model
        if device is not None:
            loaded = loaded.to(resolve_device(device))
        resolved = resolve_dtype(dtype)
        if isinstance(resolved, torch.dtype):
            loaded = loaded.to(resolved)
        if embeddings and hasattr(loaded, "bert"):
            loaded = loaded.bert
    else:
        raise UserError(f"model must be a model folder or a megabert model, got {type(model).__name__}")
    pipeline_class = PIPELINE_CLASSES[spec.name]
    return pipeline_class(loaded, tok, batch_size=batch_size, **extra, **kwargs)


__all__ = [
    "ALIASES",
    "PIPELINE_CLASSES",
    "TASKS",
    "FeatureExtractionPipeline",
    "FillMaskPipeline",
    "InputError",
    "MultipleChoicePipeline",
    "NextSentencePipeline",
    "Pipeline",
    "QuestionAnsweringPipeline",
    "TextClassificationPipeline",
    "TokenClassificationPipeline",
    "canonical_task",
    "pipeline",
    "resolve_pipeline_task",
]
