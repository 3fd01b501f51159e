"""Checks of the model's inputs, done once at the boundary before any work.

Each error names the argument, the offending value and where it is, and the limit, in the
user's terms (e.g. "input_ids: token id 30600 at [0, 17] is outside the vocabulary [0, 30592)").
Every error is a :class:`~megabert.errors.UserError` (a ValueError).

The checks run on every forward pass, so they are cheap: shape checks cost nothing, value
checks (id ranges, labels, finite embeddings) are one vectorised pass over the tensor. Value
checks read tensor data, which a tracer cannot do without breaking the graph, so they are
skipped while torch.compile, torch.export, ONNX export or torch.jit.trace traces the model
(see :func:`tracing`); shape checks still run then.
"""

from __future__ import annotations

from typing import Any

import torch

from megabert.config import MegatronBertConfig
from megabert.errors import UserError


def tracing() -> bool:
    """Whether the model is being traced (torch.compile / torch.export, ONNX export, jit.trace)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _first_bad_index(bad: torch.Tensor) -> list[int]:
    return [int(i) for i in bad.nonzero()[0].tolist()]


def check_tensor(name: str, value: Any) -> None:
    """``value`` must be a torch.Tensor (or None): a list or array gets a clear error, not torch's."""
    if value is not None and not isinstance(value, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_id_range(name: str, ids: torch.Tensor, low: int, high: int, what: str, domain: str) -> None:
    """Raise UserError if any value of ``ids`` is outside [low, high) (``domain`` names that range)."""
    if ids.numel() == 0:
        return
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise UserError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    bad = (ids < low) | (ids >= high)
    if bool(bad.any()):
        index = _first_bad_index(bad)
        value = int(ids[tuple(index)])
        raise UserError(f"{name}: {what} {value} at {index} is outside {domain} [{low}, {high})")


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise UserError naming the first NaN or infinite value of ``values`` and where it is."""
    if tracing() or values.numel() == 0 or not (values.is_floating_point() or values.is_complex()):
        return
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        index = _first_bad_index(~finite)
        value = values[tuple(index)].item()
        raise UserError(f"{name}: value {value} at {index} is not a finite number (NaN and inf are not inputs)")


def check_label_shape(name: str, labels: Any, expected: tuple[int, ...], what: str) -> None:
    """``labels`` must be a tensor of shape ``expected``; ``what`` says what one entry is.

    A one-entry-per-example shape ``(batch,)`` also accepts ``(batch, 1)``, which the
    reference's ``labels.view(-1)`` takes too.
    """
    check_tensor(name, labels)
    shape = tuple(labels.shape)
    if shape == expected or (len(expected) == 1 and shape == (*expected, 1)):
        return
    raise UserError(f"{name} has shape {shape}, expected {expected}: {what}")


def check_labels(
    name: str,
    labels: Any,
    num_classes: int,
    ignore_index: int = -100,
    shape: tuple[int, ...] | None = None,
    what: str = "",
) -> torch.Tensor:
    """Class labels must be in [0, num_classes) or ``ignore_index``; with ``shape``, of that shape.

    ``what`` says what one entry is, for the shape error (e.g. "one class id per example").
    Returns the labels as int64, the dtype the cross-entropy takes (int32 or uint8 ids are fine).
    """
    if shape is not None:
        check_label_shape(name, labels, shape, what)
    check_tensor(name, labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise UserError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() == 0 or tracing():
        return labels  # while tracing, a value check would break the graph (see check_model_inputs)
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        index = _first_bad_index(bad)
        value = int(labels[tuple(index)])
        raise UserError(
            f"{name}: label {value} at {index} is outside [0, {num_classes}) (use {ignore_index} to ignore a position)"
        )
    return labels


def check_head_mask(config: MegatronBertConfig, head_mask: Any, batch: int, seq_len: int, key_len: int) -> None:
    """``head_mask`` must have one of the shapes `transformers` 4.37's ``get_head_mask`` takes.

    - ``(heads,)``: the same mask for every layer;
    - ``(layers, heads)``: one mask per layer;
    - ``(layers, 1 or batch, heads, 1 or seq, 1 or keys)``: already expanded (what
      ``get_head_mask`` makes of the two above), broadcast onto the attention weights.

    Any other shape (e.g. ``(5, heads)`` for a 2-layer model, whose extra rows would be
    silently ignored) is an error naming both shapes.
    """
    if head_mask is None:
        return
    check_tensor("head_mask", head_mask)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    shape = tuple(head_mask.shape)
    ok = shape in ((heads,), (layers, heads)) or (
        len(shape) == 5
        and shape[0] == layers
        and shape[2] == heads
        and shape[1] in (1, batch)
        and shape[3] in (1, seq_len)
        and shape[4] in (1, key_len)
    )
    if not ok:
        raise UserError(
            f"head_mask has shape {shape}, but the model has {layers} layers of {heads} heads: expected "
            f"({heads},) (one value per head, for every layer), ({layers}, {heads}) (per layer and head) or "
            f"({layers}, 1 or {batch}, {heads}, 1 or {seq_len}, 1 or {key_len}) (already expanded)"
        )
    if head_mask.dtype.is_complex:
        raise UserError(f"head_mask must hold real numbers, got dtype {head_mask.dtype}")
    check_finite("head_mask", head_mask)


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
    for name, value in (
        ("input_ids", input_ids), ("inputs_embeds", inputs_embeds), ("attention_mask", attention_mask),
        ("token_type_ids", token_type_ids), ("position_ids", position_ids),
    ):  # fmt: skip
        check_tensor(name, value)
    if input_ids is not None and inputs_embeds is not None:
        raise UserError("pass either input_ids or inputs_embeds, not both")
    if input_ids is None and inputs_embeds is None:
        raise UserError("pass input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
        main = "input_ids"
    else:
        assert inputs_embeds is not None
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise UserError(
                f"inputs_embeds must be (batch, seq, {config.hidden_size}), got shape {tuple(inputs_embeds.shape)}"
            )
        if not inputs_embeds.is_floating_point():
            raise UserError(f"inputs_embeds must hold floating-point numbers, got dtype {inputs_embeds.dtype}")
        shape = tuple(inputs_embeds.shape[:2])
        main = "inputs_embeds"
    batch, seq_len = shape
    if batch == 0:
        full = tuple((input_ids if input_ids is not None else inputs_embeds).shape)  # type: ignore[union-attr]
        raise UserError(f"{main} is an empty batch (shape {full}): pass at least one sequence")
    if seq_len == 0:
        raise UserError("the input sequence is empty (seq length 0)")

    compiling = tracing()
    if past_len + seq_len > config.max_position_embeddings and config.position_embedding_type == "absolute":
        raise UserError(
            f"sequence length {past_len + seq_len} is longer than max_position_embeddings "
            f"({config.max_position_embeddings}); truncate the input"
        )
    expected_mask = (batch, past_len + seq_len)
    if attention_mask is not None and tuple(attention_mask.shape) != expected_mask:
        raise UserError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected_mask} to match the input"
        )
    if attention_mask is not None and attention_mask.dtype.is_complex:
        raise UserError(f"attention_mask must hold 0/1 (or booleans), got dtype {attention_mask.dtype}")
    for name, tensor in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if tensor is not None and tuple(tensor.shape) != shape and not (
            name == "position_ids" and tensor.dim() == 2 and tensor.shape[0] == 1 and tensor.shape[1] == seq_len
        ):
            raise UserError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} to match the input")
    if compiling:
        return batch, seq_len
    if inputs_embeds is not None:
        check_finite("inputs_embeds", inputs_embeds)
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
