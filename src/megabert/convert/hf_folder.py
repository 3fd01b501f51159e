"""Writing a converted Megatron checkpoint as a Hugging Face model folder (config, weights, tokenizer).

Shared by every Megatron-side source (Megatron-LM legacy and torch_dist checkpoints, NeMo
archives): each reads its checkpoint into a :class:`LoadedCheckpoint` and hands it here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from megabert.config import MegatronBertConfig
from megabert.convert.from_megatron import check_checkpoint, checkpoint_dims, config_from_checkpoint, plan_state
from megabert.convert.megatron_args import lowercase_from_args
from megabert.convert.reader import LoadedCheckpoint
from megabert.convert.stream_safetensors import PendingTensor, write_safetensors
from megabert.errors import UserError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"

# Non-finite weights are refused in both directions: a converted NaN spreads into every output.
NOT_CONVERTED = "; a checkpoint with non-finite weights is not converted"


def _finite_checked(name: str, pending: PendingTensor, source: Path) -> PendingTensor:
    """``pending`` whose tensor is checked for NaN/inf when it is made (just before it is written)."""
    from megabert.modeling.pretrained import check_finite_weights

    def make() -> torch.Tensor:
        tensor = pending.make()
        check_finite_weights({name: tensor}, source, NOT_CONVERTED)
        return tensor

    return PendingTensor(pending.shape, pending.dtype, make)


def _resolve_lowercase(lowercase: bool | None, args: object, where: str) -> bool | None:
    """Casing for the tokenizer: the caller's choice, else the checkpoint's tokenizer_type, else None (guess)."""
    saved = lowercase_from_args(args)
    if lowercase is None:
        return saved
    if saved is not None and saved != lowercase:
        logger.warning(
            "%s was trained with a %s tokenizer, but %s was asked for; using %s",
            where, "lower-casing" if saved else "cased", "lower-casing" if lowercase else "cased",
            "lower-casing" if lowercase else "cased",
        )  # fmt: skip
    return lowercase


def _write_tokenizer(folder: Path, vocab_file: Path, lowercase: bool | None, config: MegatronBertConfig) -> None:
    from megabert.tokenization import MegatronBertTokenizer

    tokenizer = MegatronBertTokenizer.from_pretrained(
        vocab_file, lowercase=lowercase, model_max_length=config.max_position_embeddings
    )
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{vocab_file} has {tokenizer.vocab_size} tokens but the checkpoint's embedding has only "
            f"{config.vocab_size} rows: it is not this model's vocabulary"
        )
    if tokenizer.vocab_size < config.vocab_size:
        logger.info(
            "vocabulary: %d tokens; the embedding has %d rows (Megatron pads it to a multiple of 128 x TP)",
            tokenizer.vocab_size, config.vocab_size,
        )  # fmt: skip
    tokenizer.save_pretrained(folder)


def write_hf_folder(
    ckpt: LoadedCheckpoint,
    tmp: Path,
    src: Path,
    *,
    vocab_file: Path | None,
    lowercase: bool | None,
    num_attention_heads: int | None,
) -> MegatronBertConfig:
    """Write ``config.json``, ``model.safetensors`` (one tensor at a time) and the tokenizer of ``ckpt`` into ``tmp``."""
    check_checkpoint(ckpt)
    dims = checkpoint_dims(ckpt, num_attention_heads)
    plan, binary_head, untied = plan_state(ckpt, dims)
    plan = {name: _finite_checked(name, pending, src) for name, pending in plan.items()}
    dtype = plan["bert.embeddings.word_embeddings.weight"].dtype
    config = config_from_checkpoint(ckpt, dims, binary_head, untied, dtype)
    if vocab_file is not None:
        _write_tokenizer(tmp, Path(vocab_file), _resolve_lowercase(lowercase, ckpt.args, str(src)), config)
    config.save_pretrained(tmp)
    with tqdm(total=len(plan), desc="converting", unit="tensor", disable=None) as progress:
        write_safetensors(tmp / SAFE_WEIGHTS_NAME, plan, metadata={"format": "pt"}, progress=progress)
    return config
