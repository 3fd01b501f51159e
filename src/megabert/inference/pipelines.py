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

from megabert.errors import UserError
from megabert.inference.base import InputError, Pipeline
from megabert.inference.classification import MultipleChoicePipeline, NextSentencePipeline, TextClassificationPipeline
from megabert.inference.feature_extraction import FeatureExtractionPipeline
from megabert.inference.fill_mask import FillMaskPipeline
from megabert.inference.loading import check_model_folder, load_model, load_tokenizer, resolve_device, resolve_dtype
from megabert.inference.question_answering import QuestionAnsweringPipeline
from megabert.inference.token_classification import TokenClassificationPipeline

# task -> (pipeline class, model class name for model_class_for, head its checkpoint must have)
TASKS: dict[str, tuple[type[Pipeline], str, str | None]] = {
    "fill-mask": (FillMaskPipeline, "masked-lm", "masked-lm"),
    "next-sentence": (NextSentencePipeline, "next-sentence", "next-sentence"),
    "text-classification": (TextClassificationPipeline, "sequence-classification", "classifier"),
    "token-classification": (TokenClassificationPipeline, "token-classification", "classifier"),
    "question-answering": (QuestionAnsweringPipeline, "question-answering", "question-answering"),
    "multiple-choice": (MultipleChoicePipeline, "multiple-choice", "classifier"),
    "feature-extraction": (FeatureExtractionPipeline, "base", None),
}
ALIASES = {
    "nsp": "next-sentence",
    "sentiment-analysis": "text-classification",
    "classify": "text-classification",
    "sequence-classification": "text-classification",
    "ner": "token-classification",
    "tokens": "token-classification",
    "qa": "question-answering",
    "choices": "multiple-choice",
    "embed": "feature-extraction",
    "embeddings": "feature-extraction",
}
# Model classes each task accepts when given a model object (besides its own).
_ALSO_ACCEPTED = {
    "fill-mask": ("MegatronBertForPreTraining",),
    "next-sentence": ("MegatronBertForPreTraining",),
}


def canonical_task(task: str) -> str:
    """The task's canonical name, from the name or an alias."""
    if not isinstance(task, str) or (task not in TASKS and task not in ALIASES):
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} (aliases: {', '.join(ALIASES)})")
    return ALIASES.get(task, task)


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
    task = canonical_task(task)
    pipeline_class, model_task, head = TASKS[task]
    extra: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        folder = check_model_folder(model)
        tok = load_tokenizer(tokenizer, folder)
        loaded, heads = load_model(
            folder, model_task, task=task, head=head, dtype=dtype, device=resolve_device(device),
            unpad_inputs=unpad_inputs,
        )
        if task == "feature-extraction":
            extra["has_pooler"] = "pooler" in heads
    elif isinstance(model, torch.nn.Module):
        from megabert.modeling.heads import model_class_for

        expected = model_class_for(model_task)
        accepted = (expected.__name__, *_ALSO_ACCEPTED.get(task, ()))
        if type(model).__name__ not in accepted and not (task == "feature-extraction" and hasattr(model, "bert")):
            raise UserError(f"the {task} pipeline needs a {' or '.join(accepted)}, got a {type(model).__name__}")
        tok = load_tokenizer(tokenizer, None)
        loaded = model
        if device is not None:
            loaded = loaded.to(resolve_device(device))
        resolved = resolve_dtype(dtype)
        if isinstance(resolved, torch.dtype):
            loaded = loaded.to(resolved)
        if task == "feature-extraction" and hasattr(loaded, "bert"):
            loaded = loaded.bert
    else:
        raise UserError(f"model must be a model folder or a megabert model, got {type(model).__name__}")
    return pipeline_class(loaded, tok, batch_size=batch_size, **extra, **kwargs)


__all__ = [
    "ALIASES",
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
]
