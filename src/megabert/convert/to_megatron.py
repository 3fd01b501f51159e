"""Hugging Face model folder -> Megatron-LM legacy checkpoint, split over TP x PP ranks.

The output is what Megatron-LM's own BERT saves: ``latest_checkpointed_iteration.txt`` and
``release/`` (or ``iter_NNNNNNN/``) with one ``mp_rank_XX[_YYY]/model_optim_rng.pt`` per rank,
each a dict of ``model`` (nested as Megatron nests it), ``args``, ``checkpoint_version`` and
``iteration``. The key table (:mod:`keys`) is walked in reverse: each HF tensor is split the
way its Megatron layer is parallelised, Q/K/V are fused in the layout of the requested
``checkpoint_version`` (:mod:`qkv`), and layers are numbered locally per pipeline stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from megabert.config import MegatronBertConfig
from megabert.convert.keys import LEGACY_NESTING, LEGACY_RULES, Rule, Split, legacy_names
from megabert.convert.qkv import fuse_qkv
from megabert.errors import UserError

__all__ = ["check_hf_shapes", "megatron_shard", "normalise_hf_state", "pad_vocab", "stage_of"]

logger = logging.getLogger(__name__)

_WORD = "bert.embeddings.word_embeddings.weight"
_DECODER = "cls.predictions.decoder.weight"
_DECODER_BIAS = "cls.predictions.decoder.bias"
_BIAS = "cls.predictions.bias"
_TOKEN_TYPES = "bert.embeddings.token_type_embeddings.weight"


def normalise_hf_state(
    state: Mapping[str, torch.Tensor], where: str, *, keep_untied: bool = False
) -> tuple[dict[str, torch.Tensor], bool]:
    """The HF tensors the legacy layout holds, under ``bert.``/``cls.`` names; and whether there is a binary head.

    Drops aliases (the tied decoder weight and bias, position-id buffers). Refuses a model
    without the masked-LM head, and an output layer not tied to the embeddings unless
    ``keep_untied`` (legacy Megatron BERT always ties them; Megatron Core has
    ``--untie-embeddings-and-output-weights``): it is then kept as ``cls.predictions.decoder.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = "bert." + key  # a bare MegatronBertModel folder
        if key.endswith(".position_ids"):
            continue
        out[key] = tensor
    if _DECODER_BIAS in out:
        bias = out.pop(_DECODER_BIAS)
        if _BIAS in out and not torch.equal(bias, out[_BIAS]):
            raise UserError(f"{where}: {_DECODER_BIAS} differs from {_BIAS}; Megatron has one output bias")
        out.setdefault(_BIAS, bias)
    if _DECODER in out:
        decoder = out.pop(_DECODER)
        if _WORD in out and not torch.equal(decoder, out[_WORD]):
            if not keep_untied:
                raise UserError(
                    f"{where}: the output layer ({_DECODER}) is not tied to the word embeddings; the legacy "
                    "Megatron BERT layout ties them, so this model cannot be written there "
                    "(--format torch_dist can: Megatron Core has an untied output layer)"
                )
            out[_DECODER] = decoder
    return _drop_stray_pooler(out, where)


def _drop_stray_pooler(out: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Check the masked-LM head is there; drop a pooler without NSP head (or the reverse); say if both are."""
    if "cls.predictions.transform.dense.weight" not in out:
        raise UserError(
            f"{where} has no masked-LM head (cls.predictions.*): Megatron BERT checkpoints always have one"
        )
    has_pooler = "bert.pooler.dense.weight" in out
    has_nsp = "cls.seq_relationship.weight" in out
    if has_pooler != has_nsp:
        # A MaskedLM folder saved from a pretraining model may keep a stray pooler: drop it.
        dropped = [k for k in list(out) if k.startswith(("bert.pooler.", "cls.seq_relationship."))]
        logger.warning("%s: %s without %s; not writing %s", where,
                       "pooler" if has_pooler else "NSP head", "NSP head" if has_pooler else "pooler", ", ".join(dropped))
        for key in dropped:
            out.pop(key)
    return out, has_pooler and has_nsp


def pad_vocab(state: dict[str, torch.Tensor], tensor_parallel: int) -> int:
    """Pad the vocabulary rows (embeddings, output bias) with zeros to a multiple of ``tensor_parallel``.

    Megatron splits the vocabulary evenly over tensor-parallel ranks. Returns the row count.
    """
    rows = state[_WORD].shape[0]
    padded = -(-rows // tensor_parallel) * tensor_parallel
    if padded != rows:
        logger.warning("vocabulary padded from %d to %d rows to split over %d ranks", rows, padded, tensor_parallel)
        for key in (_WORD, _BIAS):
            tensor = state[key]
            filler = torch.zeros((padded - rows, *tensor.shape[1:]), dtype=tensor.dtype)
            state[key] = torch.cat([tensor, filler], dim=0)
    return padded


def stage_of(rule: Rule) -> str:
    """Which pipeline stage holds a legacy tensor: ``first`` (embeddings), ``layer``, or ``last``."""
    if rule.source.startswith("language_model.embedding."):
        return "first"
    if "{layer}" in rule.source:
        return "layer"
    return "last"


def _split_for_rank(tensor: torch.Tensor, split: Split, rank: int, ranks: int) -> torch.Tensor:
    if split is Split.REPLICATED or ranks == 1:
        return tensor.contiguous()
    dim = 0 if split is Split.ROWS else 1
    # clone: torch.save writes a view's whole storage, which would put every rank's slice in each file
    return tensor.chunk(ranks, dim=dim)[rank].clone()


def _nest(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Flat dotted keys -> the nested dicts Megatron-LM's legacy ``load_state_dict`` expects.

    Each key goes under the longest :data:`LEGACY_NESTING` level it starts with (every prefix
    of a level is a level too), the rest of the key staying flat:
    ``language_model.encoder.layers.0.mlp.dense_h_to_4h.weight`` ->
    ``["language_model"]["encoder"]["layers.0.mlp.dense_h_to_4h.weight"]``.
    """
    root: dict[str, Any] = {}
    levels = sorted(LEGACY_NESTING, key=len, reverse=True)
    for key, tensor in flat.items():
        level = next((lv for lv in levels if key.startswith(lv + ".")), "")
        node = root
        for part in level.split(".") if level else []:
            node = node.setdefault(part, {})
        node[key[len(level) + 1:] if level else key] = tensor
    return root


def check_hf_shapes(
    state: Mapping[str, torch.Tensor], config: MegatronBertConfig, binary_head: bool, where: str, *, untied: bool = False
) -> None:
    """Every tensor the layout needs is there with the shape ``config`` implies; nothing else is.

    ``untied``: the model has its own output layer (``cls.predictions.decoder.weight``).
    """
    dims = {
        "H": config.hidden_size, "F": config.intermediate_size, "V": config.vocab_size,
        "P": config.max_position_embeddings, "T": config.type_vocab_size, "2": 2,
    }  # fmt: skip
    wanted: set[str] = set()
    for rule in LEGACY_RULES:
        if (rule.group == "output_weight" and not untied) or (rule.group == "binary" and not binary_head):
            continue
        symbols = (("H", "H") if len(rule.shape) == 2 else ("H",)) if rule.transform == "qkv" else rule.shape
        expected = [dims[s] for s in symbols]
        for target in rule.targets:
            layers = range(config.num_hidden_layers) if "{layer}" in target else [None]
            for layer in layers:
                key = target.format(layer=layer) if layer is not None else target
                wanted.add(key)
                if key not in state:
                    if rule.group == "tokentype":
                        continue
                    raise UserError(f"{where} lacks tensor {key}")
                if list(state[key].shape) != expected:
                    raise UserError(
                        f"{where}: tensor {key} has shape {list(state[key].shape)}, but config.json implies {expected}"
                    )
    extra = sorted(k for k in state if k not in wanted)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise UserError(
            f"{where} has tensors with no place in a Megatron BERT checkpoint: {', '.join(extra[:5])}{more} "
            "(a fine-tuned task head? only pretraining and masked-LM models convert)"
        )


def megatron_shard(
    state: dict[str, torch.Tensor],
    config: MegatronBertConfig,
    *,
    binary_head: bool,
    write_token_types: bool,
    version: float,
    tensor_rank: int,
    tensor_parallel: int,
    pipeline_rank: int,
    pipeline_parallel: int,
) -> dict[str, Any]:
    """The nested ``model`` dict of one (tensor rank, pipeline rank) in the legacy layout."""
    names = legacy_names(version)
    per_stage = config.num_hidden_layers // pipeline_parallel
    first, last = pipeline_rank == 0, pipeline_rank == pipeline_parallel - 1
    heads_per_rank = config.num_attention_heads // tensor_parallel
    flat: dict[str, torch.Tensor] = {}
    for rule in LEGACY_RULES:
        where = stage_of(rule)
        if (where == "first" and not first) or (where == "last" and not last):
            continue
        if rule.group == "binary" and not binary_head:
            continue
        if rule.group == "tokentype" and not write_token_types:
            continue
        if rule.group == "output_weight" and (pipeline_parallel == 1 or not last):
            continue  # only the last of several stages keeps a copy of the tied embeddings
        layers = range(pipeline_rank * per_stage, (pipeline_rank + 1) * per_stage) if where == "layer" else [None]
        for layer in layers:
            local = None if layer is None else layer - pipeline_rank * per_stage
            source = rule.source.format(layer=local, **names)
            if rule.group == "output_weight":
                full = state[_WORD]
            elif rule.transform == "qkv":
                q, k, v = (state[t.format(layer=layer)] for t in rule.targets)
                rows = q.shape[0] // tensor_parallel
                sl = slice(tensor_rank * rows, (tensor_rank + 1) * rows)
                # this rank's heads of Q, K, V, fused: [3 * heads_per_rank * head_dim, ...]
                flat[source] = fuse_qkv(q[sl], k[sl], v[sl], heads_per_rank, version)
                continue
            else:
                full = state[rule.targets[0].format(layer=layer)]
            flat[source] = _split_for_rank(full, rule.split, tensor_rank, tensor_parallel)
    return _nest(flat)
