"""Megatron-LM training ``args`` <-> :class:`MegatronBertConfig`.

Megatron saves its command-line arguments (an ``argparse.Namespace``) in every checkpoint.
Reading, they give the model's sizes and the facts shapes cannot tell: the LayerNorm epsilon
(Megatron's default is 1e-5, not the 1e-12 of BERT configs), the GELU flavour, the head count,
the tokenizer's casing. Writing, we fill the arguments Megatron-LM compares or reads back when
it loads a checkpoint (``check_checkpoint_args`` and ``--use-checkpoint-args``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

import torch

from megabert.config import MegatronBertConfig
from megabert.errors import UserError

__all__ = ["MEGATRON_DEFAULT_EPS", "arg", "check_supported", "config_to_args", "lowercase_from_args"]

logger = logging.getLogger(__name__)

# Megatron-LM's --layernorm-epsilon default; BERT's (and HF MegatronBertConfig's) is 1e-12.
MEGATRON_DEFAULT_EPS = 1e-5
# Tanh-approximated GELU (Megatron's --openai-gelu); HF spells it "gelu_new".
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def arg(args: Any, name: str, default: Any = None) -> Any:
    """``args.name`` for a Namespace or a dict of arguments; ``default`` when absent or None."""
    if args is None:
        return default
    value = args.get(name) if isinstance(args, Mapping) else getattr(args, name, None)
    return default if value is None else value


def check_supported(args: Any, where: str) -> None:
    """Refuse (UserError) training options the MegatronBERT architecture cannot express."""
    problems = []
    if arg(args, "apply_residual_connection_post_layernorm", False):
        problems.append("apply_residual_connection_post_layernorm=True (residual taken after the LayerNorm)")
    normalization = arg(args, "normalization", "LayerNorm")
    if normalization != "LayerNorm":
        problems.append(f"normalization={normalization!r}")
    if arg(args, "apply_layernorm_1p", False) or arg(args, "layernorm_zero_centered_gamma", False):
        problems.append("apply_layernorm_1p / zero-centred LayerNorm weights")
    if arg(args, "add_bias_linear", True) is False:
        problems.append("add_bias_linear=False (Linear layers without biases)")
    if arg(args, "swiglu", False) or arg(args, "gated_linear_unit", False):
        problems.append("swiglu / gated linear units")
    position = arg(args, "position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "absolute"):
        problems.append(f"position_embedding_type={position!r}")
    if arg(args, "add_position_embedding", True) is False:
        problems.append("add_position_embedding=False")
    heads = arg(args, "num_attention_heads")
    groups = arg(args, "num_query_groups")
    if arg(args, "group_query_attention", False) and groups is not None and heads is not None and groups != heads:
        problems.append(f"grouped-query attention (num_query_groups={groups}, num_attention_heads={heads})")
    if (arg(args, "num_experts") or 0) > 1:
        problems.append(f"mixture of experts (num_experts={arg(args, 'num_experts')})")
    if problems:
        raise UserError(f"{where}: MegatronBERT cannot represent this model: {'; '.join(problems)}")


def lowercase_from_args(args: Any) -> bool | None:
    """True for Megatron's ``BertWordPieceLowerCase`` tokenizer, False for ``…Case``; else None."""
    tokenizer_type = arg(args, "tokenizer_type")
    if not isinstance(tokenizer_type, str):
        return None
    if tokenizer_type == "BertWordPieceLowerCase":
        return True
    if tokenizer_type == "BertWordPieceCase":
        return False
    return None


def activation_from_args(args: Any) -> str:
    """HF ``hidden_act`` for Megatron's GELU choice (``--openai-gelu`` is the tanh approximation)."""
    return "gelu_new" if arg(args, "openai_gelu", False) else "gelu"


def _vocab_divisor(vocab_size: int, tensor_parallel: int) -> int:
    """The largest power of two <= 128 with ``vocab_size`` a multiple of it times the TP degree.

    Megatron pads the tokenizer's vocabulary to a multiple of ``make_vocab_size_divisible_by
    * tensor_parallel``; recording this divisor makes Megatron arrive at our row count.
    """
    divisor = 128
    while divisor > 1 and vocab_size % (divisor * tensor_parallel) != 0:
        divisor //= 2
    return divisor


def config_to_args(
    config: MegatronBertConfig,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    padded_vocab_size: int,
    binary_head: bool,
    dtype: torch.dtype,
    iteration: int,
    tokenizer_type: str | None,
) -> argparse.Namespace:
    """Megatron-LM arguments describing ``config`` split ``tensor_parallel`` x ``pipeline_parallel`` ways."""
    if config.hidden_act == "gelu":
        openai_gelu = False
    elif config.hidden_act in _TANH_GELUS:
        openai_gelu = True
    else:
        raise UserError(
            f"hidden_act={config.hidden_act!r} has no Megatron-LM equivalent (Megatron BERT uses gelu, "
            "or the tanh approximation gelu_new with --openai-gelu)"
        )
    if config.position_embedding_type != "absolute":
        raise UserError(
            f"position_embedding_type={config.position_embedding_type!r} has no Megatron-LM BERT equivalent"
        )
    heads = config.num_attention_heads
    return argparse.Namespace(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=heads,
        kv_channels=config.hidden_size // heads,
        num_query_groups=heads,
        group_query_attention=False,
        max_position_embeddings=config.max_position_embeddings,
        seq_length=config.max_position_embeddings,
        encoder_seq_length=config.max_position_embeddings,
        add_position_embedding=True,
        position_embedding_type="learned_absolute",
        layernorm_epsilon=float(config.layer_norm_eps),
        normalization="LayerNorm",
        apply_layernorm_1p=False,
        apply_residual_connection_post_layernorm=False,
        add_bias_linear=True,
        openai_gelu=openai_gelu,
        onnx_safe=None,
        swiglu=False,
        untie_embeddings_and_output_weights=False,
        bert_binary_head=binary_head,
        padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=_vocab_divisor(padded_vocab_size, tensor_parallel),
        tokenizer_type=tokenizer_type,
        tensor_model_parallel_size=tensor_parallel,
        model_parallel_size=tensor_parallel,  # the name checkpoints before version 3.0 used
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=None,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        iteration=iteration,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        hidden_dropout=float(config.hidden_dropout_prob),
        attention_dropout=float(config.attention_probs_dropout_prob),
        init_method_std=float(config.initializer_range),
    )
