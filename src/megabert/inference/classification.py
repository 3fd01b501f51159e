"""Sequence-level pipelines: text-classification, next-sentence and multiple-choice."""

from __future__ import annotations

from typing import Any

import torch

from megabert.inference.base import Encoded, InputError, Pipeline, TextPairPipeline, check_bool, check_choice, check_top_k

FUNCTIONS = ("softmax", "sigmoid", "none")


class TextClassificationPipeline(TextPairPipeline):
    """Labels and scores for texts or text pairs, from a sequence-classification model.

    Inputs: a str, a ``(text, text_pair)`` tuple, or ``{"text": ..., "text_pair": ...}``.
    Call parameters:

    - ``top_k``: 1 (default) gives ``{"label", "score"}`` of the best label; an int k gives the
      k best as a list of such dicts, best first; None gives every label, best first.
    - ``function_to_apply``: ``"softmax"`` (single-label), ``"sigmoid"`` (multi-label: each label
      scored on its own) or ``"none"`` (raw logits, for regression). Default from the config:
      ``problem_type`` when set, else ``"none"`` for one label (regression, as the training loss
      takes it) and ``"softmax"`` for several. (``transformers`` uses sigmoid for one label.)
    - ``truncation``: False (a too-long input is an error) or True (cut the longest text first).

    Label names come from ``config.id2label``.
    """

    task = "text-classification"
    call_defaults = {"top_k": 1, "function_to_apply": None, "truncation": False}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        check_top_k(params["top_k"], allow_none=True)
        check_bool("truncation", params["truncation"])
        function = params["function_to_apply"]
        if function is None:
            problem = self.config.problem_type
            if problem == "multi_label_classification":
                function = "sigmoid"
            elif problem == "regression" or (problem is None and self.config.num_labels == 1):
                function = "none"
            else:
                function = "softmax"
        params["function_to_apply"] = check_choice("function_to_apply", function, FUNCTIONS)
        return params

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        logits = self.model(**batch).logits.float()  # (rows, labels)
        function = params["function_to_apply"]
        if function == "softmax":
            scores = logits.softmax(dim=-1)
        elif function == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits
        return scores.cpu().tolist()

    def _postprocess(self, item: Any, encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        (scores,) = outputs
        id2label = self.config.id2label
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        top_k = params["top_k"]
        if top_k == 1:
            best = ranked[0]
            return {"label": id2label[best], "score": scores[best]}
        return [{"label": id2label[i], "score": scores[i]} for i in ranked[: top_k or len(ranked)]]


class NextSentencePipeline(TextPairPipeline):
    """The probability that text B follows text A, from the next-sentence (NSP) head.

    Inputs: ``(text_a, text_b)`` or ``{"text": a, "text_pair": b}``. Result:
    ``{"is_next": bool, "probability": P(B follows A)}`` (the softmax of the head's label 0,
    "B continues A"). ``truncation``: as for text-classification.
    """

    task = "next-sentence"
    call_defaults = {"truncation": False}
    allow_single_text = False

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        check_bool("truncation", params["truncation"])
        return params

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        out = self.model(**batch)
        # ForNextSentencePrediction names them `logits`, ForPreTraining `seq_relationship_logits`.
        logits = getattr(out, "seq_relationship_logits", None)
        logits = (out.logits if logits is None else logits).float()  # (rows, 2): label 0 = B continues A
        return logits.softmax(dim=-1)[:, 0].cpu().tolist()

    def _postprocess(self, item: Any, encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        (probability,) = outputs
        return {"is_next": probability >= 0.5, "probability": probability}


class MultipleChoicePipeline(Pipeline):
    """The best of several choices for a question (or context), from a multiple-choice model.

    Inputs: ``{"question": str, "choices": [str, ...]}`` (``"context"`` or ``"query"`` may name
    the question) or a ``(question, [choices])`` tuple. Each choice is scored as the pair
    ``(question, choice)``; the probabilities are the softmax over an input's choices.
    Result: ``{"label": index of the best choice, "choice": its text, "score": its probability,
    "scores": [probability of each choice]}``. ``truncation``: as for text-classification,
    cutting the longer text of each pair first.
    """

    task = "multiple-choice"
    call_defaults = {"truncation": False}
    question_keys = ("question", "context", "query")

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        check_bool("truncation", params["truncation"])
        return params

    def _is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, dict) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str)
            and isinstance(inputs[1], (list, tuple))
        )

    def _normalize(self, item: Any, index: int) -> tuple[str, list[str]]:
        if isinstance(item, dict):
            keys = [k for k in self.question_keys if k in item]
            if "choices" not in item or len(keys) != 1:
                raise InputError(index, f"a dict input needs 'question' and 'choices', got keys {sorted(item)}")
            question, choices = item[keys[0]], item["choices"]
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            question, choices = item
        else:
            raise InputError(index, f"expected (question, choices) or a dict, got {type(item).__name__}")
        if not isinstance(question, str):
            raise InputError(index, f"the question must be a str, got {type(question).__name__}")
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
            raise InputError(index, "choices must be a non-empty list of str")
        return question, list(choices)

    def _encode(self, items: list[tuple[str, list[str]]], first: int, params: dict[str, Any]) -> list[Encoded]:
        questions = [question for question, choices in items for _ in choices]
        choices = [choice for _, item_choices in items for choice in item_choices]
        owners = [first + i for i, (_, item_choices) in enumerate(items) for _ in item_choices]
        encoding = self._tokenize(questions, choices, owners, params["truncation"])
        rows = self._rows(encoding)
        encoded, start = [], 0
        for _, item_choices in items:
            encoded.append(Encoded(rows[start : start + len(item_choices)]))
            start += len(item_choices)
        return encoded

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        # Each row is one (question, choice) pair: give the model "1 choice per example" and
        # take the softmax over an input's rows in postprocessing.
        logits = self.model(**{k: v[:, None, :] for k, v in batch.items()}).logits  # (rows, 1)
        return logits[:, 0].float().cpu().tolist()

    def _postprocess(self, item: Any, encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        _, choices = item
        probs = torch.tensor(outputs, dtype=torch.float64).softmax(dim=0).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": best, "choice": choices[best], "score": probs[best], "scores": probs}


__all__ = ["MultipleChoicePipeline", "NextSentencePipeline", "TextClassificationPipeline"]
