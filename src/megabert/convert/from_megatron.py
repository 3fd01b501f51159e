"""Megatron-LM BERT checkpoint (any layout, any TP x PP split) -> Hugging Face model folder.

Steps: find the shards (:mod:`sources`), load them safely and memory-mapped (:mod:`reader`),
work out the config (``args`` when saved, shapes otherwise; :mod:`megatron_args`), then walk
every source tensor through the key table (:mod:`keys`): merge its tensor-parallel shards,
undo the fused QKV (:mod:`qkv`), renumber pipeline-stage layers. Every source tensor must be
used and every target tensor made, or the conversion stops with the names. The result is a
plan (shape, dtype, how to make it) per HF tensor, so the writer holds one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megabert.config import MegatronBertConfig
from megabert.convert.keys import CORE_RULES, LEGACY_RULES, Rule, Split, expected_hf_keys, source_table, template_of
from megabert.convert.megatron_args import MEGATRON_DEFAULT_EPS, activation_from_args, arg, check_supported
from megabert.convert.qkv import split_qkv
from megabert.convert.reader import CORE, LEGACY, LoadedCheckpoint
from megabert.convert.stream_safetensors import PendingTensor
from megabert.errors import UserError

__all__ = ["Dims", "check_checkpoint", "checkpoint_dims", "config_from_checkpoint", "plan_state"]

logger = logging.getLogger(__name__)

WORD_EMBEDDINGS = {LEGACY: "language_model.embedding.word_embeddings.weight", CORE: "embedding.word_embeddings.weight"}
POSITION_EMBEDDINGS = {LEGACY: "language_model.embedding.position_embeddings.weight", CORE: "embedding.position_embeddings.weight"}
TOKENTYPE_EMBEDDINGS = {LEGACY: "language_model.embedding.tokentype_embeddings.weight", CORE: "embedding.tokentype_embeddings.weight"}
_MLP_IN_TEMPLATES = ("mlp.dense_h_to_4h.weight", "mlp.linear_fc1.weight")
# BERT's head size; used to guess the head count of a checkpoint saved without its args.
_USUAL_HEAD_DIM = 64


@dataclass(frozen=True)
class Dims:
    """Model sizes, as the symbols of :attr:`Rule.shape` use them."""

    hidden: int
    heads: int
    layers: int
    ffn: int
    vocab: int  # padded vocabulary: the embedding's rows, all ranks together
    positions: int
    tokentypes: int

    def size(self, symbol: str) -> int:
        table = {
            "H": self.hidden, "3H": 3 * self.hidden, "F": self.ffn, "V": self.vocab,
            "P": self.positions, "T": self.tokentypes, "2": 2,
        }  # fmt: skip
        return table[symbol]

    def explain(self, symbols: tuple[str, ...]) -> str:
        names = {
            "H": f"hidden_size={self.hidden}", "3H": f"hidden_size={self.hidden}", "F": f"ffn_hidden_size={self.ffn}",
            "V": f"padded vocab={self.vocab}", "P": f"max_position_embeddings={self.positions}",
            "T": f"token types={self.tokentypes}", "2": "2 NSP classes",
        }  # fmt: skip
        return ", ".join(dict.fromkeys(names[s] for s in symbols))


def _is_tensor(value: Any) -> bool:
    """A tensor, or a torch_dist tensor not read yet (:class:`torch_dist.SourceTensor`)."""
    from megabert.convert.torch_dist import SourceTensor

    return isinstance(value, (torch.Tensor, SourceTensor))


def _real(value: Any) -> torch.Tensor:
    from megabert.convert.torch_dist import materialise

    return materialise(value)


def _first(ckpt: LoadedCheckpoint, key: str) -> tuple[int, list[torch.Tensor]] | None:
    """(stage, per-rank tensors) of the first stage holding ``key``."""
    for index, stage in enumerate(ckpt.stages):
        if _is_tensor(stage[0].get(key)):
            return index, [flat[key] for flat in stage if _is_tensor(flat.get(key))]
    return None


def _stage_layers(stage: dict[str, Any]) -> list[int]:
    """The layer indices a stage's keys use, sorted (empty for a stage without layers)."""
    return sorted({layer for layer in (template_of(k)[1] for k in stage) if layer is not None})


def _layer_offsets(ckpt: LoadedCheckpoint) -> tuple[list[int], int]:
    """What to add to each stage's layer indices to number the layers globally; and the layer count.

    Megatron numbers each stage's layers from 0; a stage whose indices instead start where the
    previous stage ended is already numbered globally. Anything else is an error.
    """
    offsets, total = [], 0
    for index, stage in enumerate(ckpt.stages):
        layers = _stage_layers(stage[0])
        if not layers:
            offsets.append(0)
            continue
        if layers[0] == 0:
            offsets.append(total)
        elif layers[0] == total:
            offsets.append(0)  # global numbering
        else:
            raise UserError(
                f"{ckpt.files[index][0]}: this pipeline stage's layers start at index {layers[0]}, "
                f"expected 0 (or {total}, after the {total} layers of the stages before it)"
            )
        total = offsets[-1] + layers[-1] + 1
    return offsets, total


def checkpoint_dims(ckpt: LoadedCheckpoint, num_attention_heads: int | None = None) -> Dims:
    """The model's sizes: from ``args`` where saved, else from tensor shapes.

    The head count cannot be read off shapes: without args (NGC checkpoints) it is
    ``num_attention_heads`` if given, else ``hidden_size / 64`` (BERT's head size), with a
    warning.
    """
    args, where = ckpt.args, ckpt.where
    words = _first(ckpt, WORD_EMBEDDINGS[ckpt.layout])
    if words is None:
        raise UserError(f"{where}: no word embeddings ({WORD_EMBEDDINGS[ckpt.layout]}) in any shard")
    _, word_shards = words
    vocab_rows = sum(int(t.shape[0]) for t in word_shards)
    hidden = int(arg(args, "hidden_size", word_shards[0].shape[1]))

    _, counted = _layer_offsets(ckpt)
    layers = int(arg(args, "num_layers", counted))
    if layers != counted:
        raise UserError(
            f"{where}: the args say num_layers={layers}, but the shards hold {counted} layer(s) "
            "(is a pipeline stage missing?)"
        )

    if num_attention_heads is not None:
        heads = int(num_attention_heads)
        saved = arg(args, "num_attention_heads")
        if saved is not None and saved != heads:
            logger.warning("%s: using num_attention_heads=%d instead of the saved %d", where, heads, saved)
    elif arg(args, "num_attention_heads") is not None:
        heads = int(arg(args, "num_attention_heads"))
    elif hidden % _USUAL_HEAD_DIM == 0:
        heads = hidden // _USUAL_HEAD_DIM
        logger.warning(
            "%s saves no args: assuming %d attention heads (head size %d); pass --num-attention-heads if that is wrong",
            where, heads, _USUAL_HEAD_DIM,
        )  # fmt: skip
    else:
        raise UserError(
            f"{where} saves no args and hidden_size={hidden} is not a multiple of {_USUAL_HEAD_DIM}: "
            "give the head count (--num-attention-heads)"
        )
    if heads <= 0 or hidden % heads != 0:
        raise UserError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % ckpt.tensor_parallel != 0:
        raise UserError(
            f"{where}: num_attention_heads={heads} is not divisible by the {ckpt.tensor_parallel} tensor-parallel ranks"
        )

    ffn = arg(args, "ffn_hidden_size")
    if ffn is None:
        ffn = 4 * hidden
        for stage in ckpt.stages:
            found = [k for k in stage[0] if template_of(k)[0].endswith(_MLP_IN_TEMPLATES)]
            if found:
                ffn = sum(int(flat[found[0]].shape[0]) for flat in stage)
                break
    positions = _first(ckpt, POSITION_EMBEDDINGS[ckpt.layout])
    max_positions = arg(args, "max_position_embeddings", positions[1][0].shape[0] if positions else 512)
    tokentypes = _first(ckpt, TOKENTYPE_EMBEDDINGS[ckpt.layout])
    return Dims(
        hidden=hidden,
        heads=heads,
        layers=layers,
        ffn=int(ffn),
        vocab=int(arg(args, "padded_vocab_size", vocab_rows)),
        positions=int(max_positions),
        tokentypes=int(tokentypes[1][0].shape[0]) if tokentypes else 2,
    )


def _check_shapes(rule: Rule, key: str, shards: list[torch.Tensor], files: list[str], dims: Dims) -> None:
    """Each rank's tensor must have the merged shape the config implies, split over the ranks."""
    tp = len(shards)
    expected = [dims.size(symbol) for symbol in rule.shape]
    split_dim = {Split.ROWS: 0, Split.COLUMNS: 1}.get(rule.split)
    if split_dim is not None and tp > 1:
        if expected[split_dim] % tp != 0:
            raise UserError(
                f"{key}: dimension {split_dim} of the merged tensor ({expected[split_dim]}, from "
                f"{dims.explain(rule.shape)}) does not split over {tp} tensor-parallel ranks"
            )
        expected[split_dim] //= tp
    for rank, tensor in enumerate(shards):
        if list(tensor.shape) != expected:
            per_rank = f" per tensor-parallel rank (of {tp})" if split_dim is not None and tp > 1 else ""
            raise UserError(
                f"{files[rank]}: tensor {key} has shape {list(tensor.shape)}, but the config "
                f"({dims.explain(rule.shape)}) implies {expected}{per_rank}"
            )


def _merged_shape(rule: Rule, dims: Dims) -> tuple[int, ...]:
    """The HF shape of each of ``rule``'s targets (Q, K and V each take a third of the fused rows)."""
    shape = tuple(dims.size(symbol) for symbol in rule.shape)
    if rule.transform == "qkv":
        return (dims.hidden, *shape[1:])
    return shape


def _makers(rule: Rule, shards: list[torch.Tensor], dims: Dims, version: float) -> list[Callable[[], torch.Tensor]]:
    """One function per rule target that builds the HF tensor from the tensor-parallel shards.

    Nothing is computed until a function is called, so a writer can make, write and release
    one tensor at a time. Q, K and V of one fused tensor share a one-layer cache: the split
    runs once and is dropped after the third is taken.
    """
    if rule.transform == "qkv":
        heads_per_rank = dims.heads // len(shards)
        cache: dict[str, Any] = {}

        def part(index: int) -> torch.Tensor:
            if "parts" not in cache:
                per_rank = [split_qkv(_real(t), heads_per_rank, version) for t in shards]  # each: (q, k, v)
                # rank r holds heads [r * heads_per_rank, (r + 1) * heads_per_rank): stack in order
                cache["parts"] = [
                    torch.cat([parts[i] for parts in per_rank], dim=0) if len(per_rank) > 1 else per_rank[0][i]
                    for i in range(3)
                ]
                cache["taken"] = set()
            result = cache["parts"][index]
            cache["taken"].add(index)
            if len(cache["taken"]) == 3:
                cache.clear()
            return result

        return [lambda i=i: part(i) for i in range(3)]
    if len(shards) == 1 or rule.split is Split.REPLICATED:
        return [lambda: _real(shards[0])]
    dim = 0 if rule.split is Split.ROWS else 1
    return [lambda: torch.cat([_real(s) for s in shards], dim=dim)]


def plan_state(ckpt: LoadedCheckpoint, dims: Dims) -> tuple[dict[str, PendingTensor], bool, bool]:
    """How to make each tensor of the HF state dict of ``ckpt``; whether it has the binary head and an untied output.

    Every source tensor is matched to a rule and its shards' shapes checked now; the tensors
    themselves are made later, one at a time (:class:`PendingTensor`). Raises UserError for an
    unknown tensor, a tensor missing on some ranks, a shape that disagrees with ``dims``, or an
    HF tensor that no source tensor makes.
    """
    table = source_table(LEGACY_RULES if ckpt.layout == LEGACY else CORE_RULES)
    plan: dict[str, PendingTensor] = {}
    made_by: dict[str, str] = {}
    output_weight: PendingTensor | None = None
    unknown: list[str] = []
    offsets, _ = _layer_offsets(ckpt)
    for index, stage in enumerate(ckpt.stages):
        files = ckpt.files[index]
        reference = set(stage[0])
        for rank, flat in enumerate(stage[1:], start=1):
            if set(flat) != reference:
                differing = sorted(reference ^ set(flat))[0]
                raise UserError(
                    f"{files[rank]} and {files[0]} hold different tensors (e.g. {differing}): "
                    "the tensor-parallel shards are not from one checkpoint"
                )
        for key, value in stage[0].items():
            if key.endswith("_extra_state") or not _is_tensor(value):
                continue  # Transformer Engine / fp8 bookkeeping, not weights
            template, local_layer = template_of(key)
            rule = table.get(template)
            if rule is None:
                unknown.append(f"{key} (in {files[0]})")
                continue
            shards = [flat[key] for flat in stage]
            _check_shapes(rule, key, shards, files, dims)
            layer = None if local_layer is None else offsets[index] + local_layer
            shape = _merged_shape(rule, dims)
            for target, make in zip(rule.targets, _makers(rule, shards, dims, ckpt.version)):
                pending = PendingTensor(shape, value.dtype, make)
                if rule.group == "output_weight":
                    output_weight = pending
                    continue
                name = target.format(layer=layer) if layer is not None else target
                if name in plan:
                    raise UserError(f"{ckpt.where}: both {made_by[name]} and {key} convert to {name}")
                plan[name] = pending
                made_by[name] = key
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UserError(
            f"{ckpt.where}: tensor(s) that are not part of a Megatron BERT: {', '.join(unknown[:5])}{more}"
        )

    binary_head = "cls.seq_relationship.weight" in plan
    word_key = "bert.embeddings.word_embeddings.weight"
    untied = False
    if output_weight is not None and word_key in plan:
        # The output layer has its own weight: a separate (untied) layer when the args say so or
        # when it differs from the embeddings; otherwise it is Megatron's copy for the last stage.
        untied = bool(arg(ckpt.args, "untie_embeddings_and_output_weights", False)) or not torch.equal(
            output_weight.make(), plan[word_key].make()
        )
        if untied:
            plan["cls.predictions.decoder.weight"] = output_weight
    token_key = "bert.embeddings.token_type_embeddings.weight"
    if token_key not in plan and word_key in plan:
        # Trained without token types: a zero table adds nothing, as Megatron does.
        dtype = plan[word_key].dtype
        plan[token_key] = PendingTensor((2, dims.hidden), dtype, lambda: torch.zeros(2, dims.hidden, dtype=dtype))

    expected = expected_hf_keys(dims.layers, binary_head, untied)
    missing = [k for k in expected if k not in plan]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(
            f"{ckpt.where} is incomplete: nothing converts to {', '.join(missing[:5])}{more} "
            "(a pipeline stage or part of the model is missing)"
        )
    extra = [k for k in plan if k not in set(expected)]
    if extra:
        raise UserError(f"{ckpt.where}: unexpected tensors {', '.join(extra[:5])} (e.g. a pooler without a binary head)")
    # Write in the source's order (stage by stage), which keeps a layer's Q, K, V together.
    return plan, binary_head, untied


def config_from_checkpoint(ckpt: LoadedCheckpoint, dims: Dims, binary_head: bool, untied: bool, dtype: torch.dtype) -> MegatronBertConfig:
    """The HF config: sizes from ``dims``, epsilon/activation/dropouts from ``args`` (Megatron defaults)."""
    args = ckpt.args
    eps = arg(args, "layernorm_epsilon")
    if eps is None:
        eps = MEGATRON_DEFAULT_EPS
        logger.info("%s: no layernorm_epsilon saved; using Megatron's default %g", ckpt.where, eps)
    try:
        return MegatronBertConfig(
            vocab_size=dims.vocab,
            hidden_size=dims.hidden,
            num_hidden_layers=dims.layers,
            num_attention_heads=dims.heads,
            intermediate_size=dims.ffn,
            hidden_act=activation_from_args(args),
            max_position_embeddings=dims.positions,
            type_vocab_size=dims.tokentypes,
            layer_norm_eps=float(eps),
            hidden_dropout_prob=float(arg(args, "hidden_dropout", 0.1)),
            attention_probs_dropout_prob=float(arg(args, "attention_dropout", 0.1)),
            initializer_range=float(arg(args, "init_method_std", 0.02)),
            tie_word_embeddings=not untied,
            architectures=["MegatronBertForPreTraining" if binary_head else "MegatronBertForMaskedLM"],
            torch_dtype=str(dtype).replace("torch.", ""),
        )
    except ValueError as exc:
        raise UserError(f"{ckpt.where}: the checkpoint's sizes make no valid config: {exc}") from None


def check_checkpoint(ckpt: LoadedCheckpoint) -> None:
    """Refuse models MegatronBERT cannot express (see :func:`megatron_args.check_supported`)."""
    check_supported(ckpt.args, ckpt.where)
