"""Checks of the model's inputs, done once at the boundary before any work.

Each error names the argument, the offending value and where it is, and the limit, in the
user's terms (e.g. "input_ids: token id 30600 at [0, 17] is outside the vocabulary [0, 30592)").
"""

from __future__ import annotations

import torch

from megabert.config import MegatronBertConfig


def _first_bad_index(bad: torch.Tensor) -> list[int]:
    return [int(i) for i in bad.nonzero()[0].tolist()]


def check_id_range(name: str, ids: torch.Tensor, low: int, high: int, what: str, domain: str) -> None:
    """Raise ValueError if any value of ``ids`` is outside [low, high) (``domain`` names that range)."""
    if ids.numel() == 0:
        return
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    bad = (ids < low) | (ids >= high)
    if bool(bad.any()):
        index = _first_bad_index(bad)
        value = int(ids[tuple(index)])
        raise ValueError(f"{name}: {what} {value} at {index} is outside {domain} [{low}, {high})")


def check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int = -100) -> None:
    """Class labels must be in [0, num_classes) or ``ignore_index``."""
    if labels.numel() == 0:
        return
    if labels.dtype.is_floating_point:
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if torch.compiler.is_compiling():
        return  # a value check would break the graph (as for the inputs, see check_model_inputs)
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        index = _first_bad_index(bad)
        value = int(labels[tuple(index)])
        raise ValueError(
            f"{name}: label {value} at {index} is outside [0, {num_classes}) (use {ignore_index} to ignore a position)"
        )


def check_model_inputs(
    config: MegatronBertConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_len: int = 0,
) -> tuple[int, int]:
    """Validate the encoder's inputs; return (batch, seq_len)."""
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("pass either input_ids or inputs_embeds, not both")
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
    else:
        assert inputs_embeds is not None
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, seq, {config.hidden_size}), got shape {tuple(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    batch, seq_len = shape
    if seq_len == 0:
        raise ValueError("the input sequence is empty (seq length 0)")

    compiling = torch.compiler.is_compiling()
    if past_len + seq_len > config.max_position_embeddings and config.position_embedding_type == "absolute":
        raise ValueError(
            f"sequence length {past_len + seq_len} is longer than max_position_embeddings "
            f"({config.max_position_embeddings}); truncate the input"
        )
    expected_mask = (batch, past_len + seq_len)
    if attention_mask is not None and tuple(attention_mask.shape) != expected_mask:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected_mask} to match the input"
        )
    for name, tensor in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if tensor is not None and tuple(tensor.shape) != shape and not (
            name == "position_ids" and tensor.dim() == 2 and tensor.shape[0] == 1 and tensor.shape[1] == seq_len
        ):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} to match the input")
    if compiling:
        return batch, seq_len
    if input_ids is not None:
        check_id_range("input_ids", input_ids, 0, config.vocab_size, "token id", "the vocabulary")
    if token_type_ids is not None:
        check_id_range(
            "token_type_ids", token_type_ids, 0, config.type_vocab_size, "token type", "the token types"
        )
    if position_ids is not None and config.position_embedding_type == "absolute":
        check_id_range(
            "position_ids", position_ids, 0, config.max_position_embeddings, "position", "the position embeddings"
        )
    return batch, seq_len
