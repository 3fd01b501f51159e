"""The eight task models, each a small class over MegatronBertModel, with the reference's losses.

Loss rules (as documented for `transformers` 4.37):
- PreTraining: MLM cross-entropy + NSP cross-entropy (NSP label 0 = B continues A, 1 = B is random);
  without the binary head, the MLM loss alone.
- SequenceClassification: ``problem_type`` regression (MSE), single-label (cross-entropy) or
  multi-label (BCE with logits), chosen from num_labels and the label dtype when unset.
- QuestionAnswering: mean of start and end cross-entropy; positions outside the sequence are
  clamped to its length and ignored.
- CausalLM: next-token cross-entropy (labels shifted left by one).
Labels of -100 are ignored by every cross-entropy.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megabert import task_table
from megabert.config import MegatronBertConfig
from megabert.errors import UserError
from megabert.modeling.inputs import check_id_range, check_label_shape, check_labels, check_tensor
from megabert.modeling.layers import ACTIVATIONS
from megabert.modeling.linear_cross_entropy import SharedWeightGradient, embedding_lookup, linear_cross_entropy
from megabert.modeling.model import MegatronBertModel
from megabert.modeling.outputs import (
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MegatronBertForPreTrainingOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    PreTrainingLossOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from megabert.modeling.pretrained import MegatronBertPreTrainedModel


# ---------------------------------------------------------------------- head modules
class MegatronBertPredictionHeadTransform(nn.Module):
    """dense -> activation -> LayerNorm, before the vocabulary projection."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden_states)))


class MegatronBertLMPredictionHead(nn.Module):
    """The MLM head: transform, then a decoder tied to the word embeddings with its own bias."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.transform = MegatronBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # The same Parameter under both names, as in the reference's state dict.
        self.decoder.bias = self.bias

    def set_decoder(self, decoder: nn.Linear) -> None:
        """Use ``decoder`` as the vocabulary projection; its bias becomes ``self.bias`` too.

        A decoder without a bias gets a zero one: the checkpoint layout has
        ``cls.predictions.bias``.
        """
        if not isinstance(decoder, nn.Linear):
            raise TypeError(f"the MLM decoder must be an nn.Linear, got {type(decoder).__name__}")
        if decoder.bias is None:
            decoder.bias = nn.Parameter(decoder.weight.new_zeros(decoder.out_features))
        self.decoder = decoder
        self.bias = decoder.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))  # (..., vocab)


class MegatronBertOnlyMLMHead(nn.Module):
    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.predictions = MegatronBertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class MegatronBertOnlyNSPHead(nn.Module):
    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_output: torch.Tensor) -> torch.Tensor:
        return self.seq_relationship(pooled_output)


class MegatronBertPreTrainingHeads(nn.Module):
    """MLM head and (when the model has a binary head) the NSP/SOP classifier."""

    def __init__(self, config: MegatronBertConfig, add_binary_head: bool = True) -> None:
        super().__init__()
        self.predictions = MegatronBertLMPredictionHead(config)
        if add_binary_head:
            self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(
        self, sequence_output: torch.Tensor, pooled_output: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = self.predictions(sequence_output)
        relationship = None
        if hasattr(self, "seq_relationship") and pooled_output is not None:
            relationship = self.seq_relationship(pooled_output)
        return scores, relationship


# ------------------------------------------------------------------------- helpers
def _finish(output_cls: type, return_dict: bool, loss: torch.Tensor | None, main: tuple, outputs: Any) -> Any:
    """Build the output dataclass, or the reference's tuple for return_dict=False."""
    hidden_states = outputs.hidden_states
    attentions = outputs.attentions
    if return_dict:
        names = [f for f in output_cls.__dataclass_fields__ if f not in ("loss", "hidden_states", "attentions")]
        values = dict(zip(names, main))
        return output_cls(loss=loss, hidden_states=hidden_states, attentions=attentions, **values)
    extras = tuple(v for v in (hidden_states, attentions) if v is not None)
    head = tuple(v for v in main if v is not None)
    return ((loss,) if loss is not None else ()) + head + extras


# What one label is, for the shape errors.
_PER_TOKEN = "one token id (or -100 to ignore it) per input position (batch, seq)"
_PER_EXAMPLE = "one class id per example of the batch"


def _mlm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    labels = check_labels("labels", labels, vocab_size, shape=tuple(logits.shape[:-1]), what=_PER_TOKEN)
    return F.cross_entropy(logits.reshape(-1, vocab_size).float(), labels.reshape(-1))


def _whole_weight(module: nn.Module, kind: type) -> bool:
    """A module of ``kind`` whose weight can be used directly (not sharded, no tensor-parallel hooks)."""
    return (
        isinstance(module, kind)
        and not hasattr(module.weight, "placements")
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


# -------------------------------------------------------------------------- models
class MegatronBertForPreTraining(MegatronBertPreTrainedModel):
    """MLM + NSP heads, as in pretraining. ``add_binary_head=False``: MLM head only."""

    def __init__(self, config: MegatronBertConfig, add_binary_head: bool = True) -> None:
        super().__init__(config)
        self.add_binary_head = add_binary_head
        self.bert = MegatronBertModel(config)
        self.cls = MegatronBertPreTrainingHeads(config, add_binary_head)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        """The MLM decoder (hidden -> vocabulary), tied to the word embeddings unless config says not."""
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the MLM decoder; ``cls.predictions.bias`` becomes its bias (one Parameter)."""
        self.cls.predictions.set_decoder(new_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MegatronBertForPreTrainingOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        prediction_scores, relationship = self.cls(outputs.last_hidden_state, outputs.pooler_output)
        loss = None
        if labels is not None and (next_sentence_label is not None or not self.add_binary_head):
            loss = _mlm_loss(prediction_scores, labels, self.config.vocab_size)
            if self.add_binary_head:
                next_sentence_label = check_labels(
                    "next_sentence_label", next_sentence_label, 2, shape=tuple(relationship.shape[:1]),
                    what="one label per example (0: B continues A, 1: B is random)",
                )  # fmt: skip
                loss = loss + F.cross_entropy(relationship.reshape(-1, 2).float(), next_sentence_label.reshape(-1))
        return _finish(MegatronBertForPreTrainingOutput, return_dict, loss, (prediction_scores, relationship), outputs)

    def pretraining_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
    ) -> PreTrainingLossOutput:
        """The loss of :meth:`forward` with labels, computed only where there are labels.

        ``forward`` builds the vocabulary logits of every position (batch x seq x vocab) and
        then ignores all but the masked ~15%. Here the MLM head runs on the labelled positions
        only, and with a plain decoder the cross-entropy goes through
        :func:`~megabert.modeling.linear_cross_entropy.linear_cross_entropy`, which never holds
        all their logits at once; when the decoder is tied to the word embeddings, the lookup
        and the loss share one gradient tensor. A sharded decoder (tensor parallel) runs as a
        module. ``next_sentence_label`` adds the NSP/SOP loss (the model needs its binary head).
        The loss equals ``forward(...).loss`` up to float rounding; with nothing labelled the
        MLM loss is a zero that keeps the graph connected.
        """
        if next_sentence_label is not None and not self.add_binary_head:
            raise UserError("next_sentence_label was given but the model has no binary (NSP/SOP) head")
        decoder = self.cls.predictions.decoder
        embedding = self.bert.get_input_embeddings()
        fused = _whole_weight(decoder, nn.Linear)
        shared = inputs_embeds = None
        if (
            fused
            and torch.is_grad_enabled()
            and decoder.weight.requires_grad
            and decoder.weight is embedding.weight
            and _whole_weight(embedding, nn.Embedding)
        ):
            check_id_range("input_ids", input_ids, 0, embedding.num_embeddings, "token id", "the vocabulary")
            shared = SharedWeightGradient()
            inputs_embeds = embedding_lookup(input_ids, embedding.weight, embedding.padding_idx, shared)  # (B, T, H)
        out = self.bert(
            input_ids=input_ids if inputs_embeds is None else None, attention_mask=attention_mask,
            token_type_ids=token_type_ids, inputs_embeds=inputs_embeds, return_dict=True,
        )
        where = labels != -100  # (B, T)
        hidden = self.cls.predictions.transform(out.last_hidden_state[where])  # (M, H): the predicted positions
        targets = labels[where]  # (M,)
        count = targets.numel()
        if count == 0:  # a zero that keeps the head's parameters in the graph
            mlm_loss, correct = decoder(hidden).sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
        elif fused:
            result = linear_cross_entropy(hidden, decoder.weight, decoder.bias, targets, shared=shared)
            mlm_loss, correct = result.loss, result.correct
        else:
            logits = decoder(hidden).float()  # (M, V); the loss needs fp32 anyway
            mlm_loss, correct = F.cross_entropy(logits, targets), (logits.detach().argmax(-1) == targets).sum()
        result = PreTrainingLossOutput(loss=mlm_loss, mlm_loss=mlm_loss, mlm_correct=correct, mlm_count=count)
        if next_sentence_label is not None:
            result.binary_logits = self.cls.seq_relationship(out.pooler_output).float()  # (B, 2)
            result.binary_loss = F.cross_entropy(result.binary_logits, next_sentence_label)
            result.loss = mlm_loss + result.binary_loss
        return result


class MegatronBertForMaskedLM(MegatronBertPreTrainedModel):
    """The encoder with the MLM head (no pooler)."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__(config)
        if config.is_decoder:
            warnings.warn("MegatronBertForMaskedLM expects config.is_decoder=False (bi-directional attention)")
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.cls = MegatronBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        """The MLM decoder (hidden -> vocabulary), tied to the word embeddings unless config says not."""
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the MLM decoder; ``cls.predictions.bias`` becomes its bias (one Parameter)."""
        self.cls.predictions.set_decoder(new_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            encoder_hidden_states, encoder_attention_mask,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.cls(outputs.last_hidden_state)
        loss = _mlm_loss(logits, labels, self.config.vocab_size) if labels is not None else None
        return _finish(MaskedLMOutput, return_dict, loss, (logits,), outputs)


class MegatronBertForCausalLM(MegatronBertPreTrainedModel):
    """Left-to-right language model (config.is_decoder=True), with a KV cache for decoding."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__(config)
        if not config.is_decoder:
            warnings.warn("MegatronBertForCausalLM is meant to be used with config.is_decoder=True")
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.cls = MegatronBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        """The MLM decoder (hidden -> vocabulary), tied to the word embeddings unless config says not."""
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the MLM decoder; ``cls.predictions.bias`` becomes its bias (one Parameter)."""
        self.cls.predictions.set_decoder(new_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: tuple[tuple[torch.Tensor, ...], ...] | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithCrossAttentions | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            use_cache = False
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            encoder_hidden_states, encoder_attention_mask, past_key_values, use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.cls(outputs.last_hidden_state)  # (batch, seq, vocab)
        loss = None
        if labels is not None:
            # Checked before the shift, so the error shows the shapes the caller passed.
            check_label_shape("labels", labels, tuple(logits.shape[:-1]), _PER_TOKEN)
            # Position t predicts token t + 1.
            loss = _mlm_loss(logits[:, :-1, :], labels[:, 1:], self.config.vocab_size)
        if not return_dict:
            extras = tuple(
                v for v in (outputs.past_key_values, outputs.hidden_states, outputs.attentions, outputs.cross_attentions)
                if v is not None
            )
            return ((loss,) if loss is not None else ()) + (logits,) + extras
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, past_key_values: Any = None, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> dict[str, Any]:
        """Inputs for the next decoding step: only the new tokens once a cache exists."""
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values[0][0].shape[2]:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values}


class MegatronBertForNextSentencePrediction(MegatronBertPreTrainedModel):
    """The NSP head: logits (batch, 2); label 0 = B continues A, 1 = B is a random sentence."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__(config)
        self.bert = MegatronBertModel(config)
        self.cls = MegatronBertOnlyNSPHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> NextSentencePredictorOutput | tuple:
        if "next_sentence_label" in kwargs:
            # The reference's deprecated spelling of `labels`.
            labels = kwargs.pop("next_sentence_label")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.cls(outputs.pooler_output)
        loss = None
        if labels is not None:
            labels = check_labels(
                "labels", labels, 2, shape=tuple(logits.shape[:1]),
                what="one label per example (0: B continues A, 1: B is random)",
            )  # fmt: skip
            loss = F.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1))
        return _finish(NextSentencePredictorOutput, return_dict, loss, (logits,), outputs)


class MegatronBertForSequenceClassification(MegatronBertPreTrainedModel):
    """Pooled output -> dropout -> linear (num_labels): classification or regression."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MegatronBertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))  # (batch, num_labels)
        loss = sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        return _finish(SequenceClassifierOutput, return_dict, loss, (logits,), outputs)


def sequence_classification_loss(
    config: MegatronBertConfig, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The reference's problem_type rule; sets config.problem_type on first use, as it does."""
    num_labels = config.num_labels
    batch = logits.shape[0]
    check_tensor("labels", labels)
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            check_label_shape("labels", labels, (batch,), "one target value per example")
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().to(torch.float32))
        check_label_shape("labels", labels, (batch, num_labels), f"{num_labels} target values per example")
        return F.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        labels = check_labels("labels", labels, num_labels, shape=(batch,), what=_PER_EXAMPLE)
        return F.cross_entropy(logits.reshape(-1, num_labels).float(), labels.reshape(-1))
    check_label_shape(
        "labels", labels, (batch, num_labels), f"multi-label targets: a row of {num_labels} 0/1 values per example "
        "(for single-label classification pass integer class ids)",
    )
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class MegatronBertForMultipleChoice(MegatronBertPreTrainedModel):
    """Scores each (context, choice) pair; inputs are (batch, num_choices, seq)."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__(config)
        self.bert = MegatronBertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultipleChoiceModelOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        main = input_ids if input_ids is not None else inputs_embeds
        expected = 3 if input_ids is not None else 4
        if main is None or main.dim() != expected:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            shape = None if main is None else tuple(main.shape)
            raise ValueError(
                f"multiple choice {name} must be {expected}-D (batch, num_choices, seq{', hidden' if expected == 4 else ''}), "
                f"got shape {shape}"
            )
        num_choices = main.shape[1]

        def flat(t: torch.Tensor | None, dims: int = 2) -> torch.Tensor | None:
            # (batch, choices, seq[, hidden]) -> (batch * choices, seq[, hidden])
            if t is None:
                return None
            if t.dim() != dims + 1:
                raise ValueError(f"multiple choice inputs must all be (batch, num_choices, ...), got shape {tuple(t.shape)}")
            return t.reshape(-1, *t.shape[2:])

        outputs = self.bert(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids), head_mask,
            flat(inputs_embeds, 3),
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)  # (batch, choices)
        loss = None
        if labels is not None:
            labels = check_labels(
                "labels", labels, num_choices, shape=tuple(logits.shape[:1]),
                what="the index of the right choice, one per example",
            )  # fmt: skip
            loss = F.cross_entropy(logits.float(), labels.reshape(-1))
        return _finish(MultipleChoiceModelOutput, return_dict, loss, (logits,), outputs)


class MegatronBertForTokenClassification(MegatronBertPreTrainedModel):
    """A label per token (NER, POS): sequence output -> dropout -> linear (num_labels)."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TokenClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # (batch, seq, num_labels)
        loss = None
        if labels is not None:
            labels = check_labels(
                "labels", labels, self.num_labels, shape=tuple(logits.shape[:2]),
                what="one label id (or -100 to ignore it) per token (batch, seq)",
            )  # fmt: skip
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.reshape(-1))
        return _finish(TokenClassifierOutput, return_dict, loss, (logits,), outputs)


class MegatronBertForQuestionAnswering(MegatronBertPreTrainedModel):
    """Extractive QA: start and end logits per token."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MegatronBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> QuestionAnsweringModelOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)  # (batch, seq, 2)
        if logits.shape[-1] != 2:
            raise UserError(
                f"{type(self).__name__} needs config.num_labels == 2 (start and end scores), got {logits.shape[-1]}"
            )
        start_logits, end_logits = logits.split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()  # (batch, seq)
        end_logits = end_logits.squeeze(-1).contiguous()
        if self.config.unpads(self.training) and attention_mask is not None:
            # Unpadded runs have no real values at pad positions: keep them out of the softmax.
            # (The padded path, like the reference, lets pads take part.)
            pads = attention_mask == 0
            start_logits = start_logits.masked_fill(pads, torch.finfo(start_logits.dtype).min)
            end_logits = end_logits.masked_fill(pads, torch.finfo(end_logits.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
                check_label_shape(name, positions, tuple(start_logits.shape[:1]), "one token position per example")
                if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
                    raise UserError(f"{name} must hold integer token positions, got dtype {positions.dtype}")
            start_positions, end_positions = start_positions.long(), end_positions.long()
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            # Positions outside the sequence are clamped to its length, an index the loss ignores.
            ignored = start_logits.shape[1]
            start_positions = start_positions.clamp(0, ignored)
            end_positions = end_positions.clamp(0, ignored)
            start_loss = F.cross_entropy(start_logits.float(), start_positions, ignore_index=ignored)
            end_loss = F.cross_entropy(end_logits.float(), end_positions, ignore_index=ignored)
            loss = (start_loss + end_loss) / 2
        return _finish(QuestionAnsweringModelOutput, return_dict, loss, (start_logits, end_logits), outputs)


# ------------------------------------------------------------------ by task name
# The model classes of megabert.task_table's tasks, keyed by canonical task name (a view of the table).
_CLASSES: dict[str, type[MegatronBertPreTrainedModel]] = {
    cls.__name__: cls
    for cls in (
        MegatronBertModel,
        MegatronBertForPreTraining,
        MegatronBertForMaskedLM,
        MegatronBertForCausalLM,
        MegatronBertForNextSentencePrediction,
        MegatronBertForSequenceClassification,
        MegatronBertForMultipleChoice,
        MegatronBertForTokenClassification,
        MegatronBertForQuestionAnswering,
    )
}
if set(_CLASSES) != {task.model_class for task in task_table.TASKS}:
    raise RuntimeError("megabert.task_table names other model classes than megabert.modeling.heads defines")
MODEL_CLASSES: dict[str, type[MegatronBertPreTrainedModel]] = {
    task.name: _CLASSES[task.model_class] for task in task_table.TASKS
}


def model_class_for(name: str) -> type[MegatronBertPreTrainedModel]:
    """A model class by task name ("masked-lm", ...) or class name ("MegatronBertForMaskedLM").

    An unknown name is a UserError (a ValueError) listing the task names.
    """
    task = task_table.task_of_class(name) if isinstance(name, str) else None
    if task is None:
        task = task_table.resolve_task(name, task_table.MODEL)
    return MODEL_CLASSES[task.name]


def heads_in_checkpoint(keys: set[str]) -> list[str]:
    """Which heads a checkpoint's weight names carry (for `megabert info`): names of task_table.HEADS."""
    return [head for head, prefixes in task_table.HEADS.items() if any(k.startswith(prefixes) for k in keys)]
