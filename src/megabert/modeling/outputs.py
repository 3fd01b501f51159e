"""Output containers of the models, with the field names `transformers` documents.

Each output is a dataclass that also behaves like the reference's ``ModelOutput``: attribute
access (``out.logits``), key access (``out["logits"]``), integer indexing and iteration over the
fields that are set (``out[0]``), and :meth:`ModelOutput.to_tuple`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

Tensor = torch.Tensor
TensorTuple = tuple[torch.Tensor, ...]


class ModelOutput:
    """Base class: dataclass fields, where ``None`` fields are skipped by indexing and to_tuple."""

    # The reference's tuple order (return_dict=False) when it differs from the field order.
    _tuple_order: tuple[str, ...] | None = None

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        """The set fields as a tuple, in the order the reference returns with return_dict=False."""
        order = self._tuple_order or tuple(f.name for f in fields(self))  # type: ignore[arg-type]
        return tuple(getattr(self, name) for name in order if getattr(self, name) is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            value = getattr(self, key, None)
            if value is None:
                raise KeyError(key)
            return value
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and getattr(self, key, None) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: TensorTuple | None = None
    past_key_values: tuple[TensorTuple, ...] | None = None
    attentions: TensorTuple | None = None
    cross_attentions: TensorTuple | None = None

    _tuple_order = (
        "last_hidden_state",
        "pooler_output",
        "past_key_values",
        "hidden_states",
        "attentions",
        "cross_attentions",
    )


@dataclass
class MegatronBertForPreTrainingOutput(ModelOutput):
    loss: Tensor | None = None
    prediction_logits: Tensor | None = None
    seq_relationship_logits: Tensor | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None


@dataclass
class PreTrainingLossOutput:
    """What :meth:`MegatronBertForPreTraining.pretraining_loss` returns: the losses and the counts behind their metrics."""

    loss: Tensor  # () MLM loss (+ the binary loss when next_sentence_label was given), differentiable
    mlm_loss: Tensor  # () mean cross-entropy over the predicted positions
    mlm_correct: Tensor  # () int64: predicted positions whose argmax is the label
    mlm_count: int  # predicted positions (labels != -100)
    binary_loss: Tensor | None = None  # () NSP/SOP cross-entropy
    binary_logits: Tensor | None = None  # (batch, 2) fp32


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: tuple[TensorTuple, ...] | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None
    cross_attentions: TensorTuple | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None


@dataclass
class NextSentencePredictorOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None


@dataclass
class MultipleChoiceModelOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    hidden_states: TensorTuple | None = None
    attentions: TensorTuple | None = None
