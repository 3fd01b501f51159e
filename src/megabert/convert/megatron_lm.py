"""Convert Megatron-LM BERT checkpoints to the Hugging Face layout and back, without Megatron-LM.

:func:`convert_megatron_to_hf` reads NVIDIA's NGC zips, single ``model_optim_rng.pt`` files
and Megatron-LM save folders (tensor- and pipeline-parallel shards, legacy or Megatron Core
names, checkpoint versions 0 to 3) and writes a model folder (``config.json`` +
``model.safetensors``, plus the tokenizer with ``vocab_file``) that megabert and
``transformers`` load. :func:`convert_hf_to_megatron` writes a model folder back as a
Megatron-LM legacy checkpoint split over any TP x PP grid, or as a Megatron Core
``torch_dist`` checkpoint (:mod:`to_torch_dist`), to go on training in Megatron-LM.

Both are safe with untrusted files (pickles are read without running their code, zip paths are
checked) and atomic: the output folder appears only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch

from megabert.config import MegatronBertConfig
from megabert.convert.hf_folder import NOT_CONVERTED, write_hf_folder
from megabert.convert.megatron_args import config_to_args
from megabert.convert.qkv import check_version
from megabert.convert.reader import load_checkpoint
from megabert.convert.sources import CHECKPOINT_NAME, TRACKER_NAME, ShardSet, find_shards
from megabert.convert.to_megatron import check_hf_shapes, megatron_shard, normalise_hf_state, pad_vocab
from megabert.errors import UserError, require_file
from megabert.utils import atomic_folder

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf"]

logger = logging.getLogger(__name__)

_SCRATCH = ".megatron-source"  # zip extraction folder inside the (temporary) output folder


def _is_nemo(src: Path) -> bool:
    import tarfile

    return src.is_file() and (src.suffix == ".nemo" or (not zipfile.is_zipfile(src) and tarfile.is_tarfile(src)))


def convert_megatron_to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vocab_file: str | os.PathLike | None = None,
    lowercase: bool | None = None,
    num_attention_heads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Megatron-LM BERT checkpoint into a Hugging Face model folder at ``out``.

    ``src``: an NGC zip, one ``model_optim_rng.pt``, or a Megatron-LM save folder (with
    ``latest_checkpointed_iteration.txt``, an ``iter_NNNNNNN``/``release`` folder, or the
    ``mp_rank_*`` folders themselves), legacy (``torch``) or distributed (``torch_dist``:
    ``*.distcp`` + ``.metadata``); a NeMo ``.nemo`` archive goes to :func:`convert_nemo_to_hf`. ``vocab_file``: the ``vocab.txt`` the model was trained
    with; the tokenizer files are written too, lower-casing per ``lowercase`` (default: the
    checkpoint's ``tokenizer_type``, else guessed from the vocabulary). ``num_attention_heads``:
    only needed for checkpoints saved without ``args`` whose head size is not 64.

    The folder gets ``config.json`` (with the checkpoint's LayerNorm epsilon, 1e-5 when not
    saved) and ``model.safetensors`` in the checkpoint's dtype, the padded vocabulary kept. It
    appears only when complete. Returns ``out``.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"Megatron checkpoint {src} does not exist")
    if vocab_file is not None:
        vocab_file = require_file(vocab_file, "vocabulary file", expected_name="vocab.txt")
    if _is_nemo(src):
        from megabert.convert.nemo import convert_nemo_to_hf

        return convert_nemo_to_hf(
            src, out, vocab_file=vocab_file, lowercase=lowercase, num_attention_heads=num_attention_heads,
            overwrite=overwrite,
        )  # fmt: skip
    from megabert.convert.torch_dist import find_torch_dist, load_torch_dist

    dist_folder = find_torch_dist(src)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        if dist_folder is not None:
            ckpt = load_torch_dist(dist_folder, str(src))
        else:
            ckpt = load_checkpoint(find_shards(src, tmp / _SCRATCH))
        config = write_hf_folder(ckpt, tmp, src, vocab_file=vocab_file, lowercase=lowercase,
                                 num_attention_heads=num_attention_heads)  # fmt: skip
        del ckpt
        shutil.rmtree(tmp / _SCRATCH, ignore_errors=True)
    logger.info("wrote %s (%d layers, vocab %d, eps %g)", out, config.num_hidden_layers, config.vocab_size, config.layer_norm_eps)
    return out


def _tokenizer_type(hf_dir: Path, tokenizer_type: str | None) -> str | None:
    """Megatron's tokenizer_type: the caller's, else from the folder's ``tokenizer_config.json``."""
    if tokenizer_type is not None:
        return tokenizer_type
    path = hf_dir / "tokenizer_config.json"
    if path.is_file():
        try:
            lower = json.loads(path.read_text(encoding="utf-8")).get("do_lower_case")
        except (json.JSONDecodeError, AttributeError):
            lower = None
        if isinstance(lower, bool):
            return "BertWordPieceLowerCase" if lower else "BertWordPieceCase"
    logger.warning(
        "%s has no tokenizer_config.json saying the casing: args.tokenizer_type is left unset "
        "(pass tokenizer_type / --tokenizer-type for Megatron-LM's checkpoint check)", hf_dir,
    )  # fmt: skip
    return None


CKPT_FORMATS = ("legacy", "torch_dist")


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    checkpoint_version: float = 3.0,
    iteration: int | None = None,
    tokenizer_type: str | None = None,
    overwrite: bool = False,
    ckpt_format: str = "legacy",
) -> Path:
    """Write the HF model folder ``hf_dir`` as a Megatron-LM checkpoint at ``out``.

    ``ckpt_format="legacy"`` (Megatron-LM's ``--ckpt-format torch``): the model is split over
    ``tensor_parallel`` x ``pipeline_parallel`` ranks (``mp_rank_XX`` or ``mp_rank_XX_YYY``
    folders); ``checkpoint_version`` (0, 1, 2 or 3) picks the fused-QKV layout and the names
    (``transformer``/``attention`` below 3, ``encoder``/``self_attention`` from 3).

    ``ckpt_format="torch_dist"`` (``--ckpt-format torch_dist``, Megatron-LM's default): one
    distributed checkpoint in megatron-core's BertModel layout, which Megatron-LM loads at any
    TP x PP, so ``tensor_parallel``/``pipeline_parallel`` must stay 1 and ``checkpoint_version`` 3;
    an untied output layer is kept (the legacy layout refuses it). See :mod:`to_torch_dist`.

    Without ``iteration`` the checkpoint is a ``release`` (Megatron-LM then starts at iteration
    0 and loads no optimizer or RNG state); with it, ``iter_NNNNNNN``. Returns ``out``.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if ckpt_format not in CKPT_FORMATS:
        raise UserError(f"unknown checkpoint format {ckpt_format!r} (use {' or '.join(CKPT_FORMATS)})")
    for name, value in (("tensor_parallel", tensor_parallel), ("pipeline_parallel", pipeline_parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if iteration is not None and (isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0):
        raise UserError(f"iteration must be a non-negative integer, got {iteration!r}")
    version = check_version(checkpoint_version, "--checkpoint-version")
    dist = ckpt_format == "torch_dist"
    if dist and (tensor_parallel, pipeline_parallel) != (1, 1):
        raise UserError(
            f"a torch_dist checkpoint is not split by rank (Megatron-LM loads it at any TP x PP): "
            f"drop --tensor-parallel {tensor_parallel} / --pipeline-parallel {pipeline_parallel}, "
            "or use --format legacy"
        )
    if dist and version != 3.0:
        raise UserError(f"a torch_dist checkpoint has Megatron Core's layout (checkpoint version 3), not {version:g}")
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"model folder {hf_dir} does not exist")

    from megabert.modeling.pretrained import check_finite_weights, read_state_dict

    config = MegatronBertConfig.from_pretrained(hf_dir)
    hf_state = read_state_dict(hf_dir, check_finite=False)
    check_finite_weights(hf_state, hf_dir, NOT_CONVERTED)
    state, binary_head = normalise_hf_state(hf_state, str(hf_dir), keep_untied=dist)
    untied = "cls.predictions.decoder.weight" in state
    check_hf_shapes(state, config, binary_head, str(hf_dir), untied=untied)
    if dist:
        return _write_torch_dist(hf_dir, out, state, config, binary_head, untied, iteration, tokenizer_type, overwrite)
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    if heads % tensor_parallel != 0:
        raise UserError(
            f"num_attention_heads={heads} is not divisible by the tensor-parallel degree {tensor_parallel}: "
            "every rank must hold whole heads"
        )
    if config.intermediate_size % tensor_parallel != 0:
        raise UserError(
            f"intermediate_size={config.intermediate_size} is not divisible by the tensor-parallel degree {tensor_parallel}"
        )
    if layers % pipeline_parallel != 0:
        raise UserError(
            f"num_hidden_layers={layers} is not divisible by the pipeline-parallel degree {pipeline_parallel}"
        )
    padded_vocab = pad_vocab(state, tensor_parallel)
    token_types = state.get("bert.embeddings.token_type_embeddings.weight")
    # Megatron without the binary head has no token types; keep a table that is in use, though.
    write_token_types = binary_head or (token_types is not None and bool(token_types.any()))
    dtype = state["bert.embeddings.word_embeddings.weight"].dtype
    args = config_to_args(
        config,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        padded_vocab_size=padded_vocab,
        binary_head=binary_head,
        dtype=dtype,
        iteration=iteration or 0,
        tokenizer_type=_tokenizer_type(hf_dir, tokenizer_type),
    )
    grid = ShardSet({}, tensor_parallel, pipeline_parallel, str(out))
    folder_name = "release" if iteration is None else f"iter_{iteration:07d}"
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for pp in range(pipeline_parallel):
            for tp in range(tensor_parallel):
                model = megatron_shard(
                    state, config,
                    binary_head=binary_head, write_token_types=write_token_types, version=version,
                    tensor_rank=tp, tensor_parallel=tensor_parallel,
                    pipeline_rank=pp, pipeline_parallel=pipeline_parallel,
                )  # fmt: skip
                target = tmp / folder_name / grid.rank_name(pp, tp) / CHECKPOINT_NAME
                target.parent.mkdir(parents=True)
                checkpoint = {"model": model, "args": args, "checkpoint_version": version, "iteration": iteration or 0}
                torch.save(checkpoint, target)
        (tmp / TRACKER_NAME).write_text("release" if iteration is None else str(iteration), encoding="utf-8")
    return out


def _write_torch_dist(
    hf_dir: Path,
    out: Path,
    state: dict[str, torch.Tensor],
    config: MegatronBertConfig,
    binary_head: bool,
    untied: bool,
    iteration: int | None,
    tokenizer_type: str | None,
    overwrite: bool,
) -> Path:
    """The torch_dist half of :func:`convert_hf_to_megatron` (``state`` checked, in the legacy exporter's names)."""
    from megabert.convert.to_torch_dist import core_tensors, write_torch_dist

    # No padding: tensors are saved whole, and megatron-core's embedding and output layer load
    # with `allow_shape_mismatch` when Megatron-LM pads the vocabulary for its TP degree.
    padded_vocab = state["bert.embeddings.word_embeddings.weight"].shape[0]
    token_types = state.get("bert.embeddings.token_type_embeddings.weight")
    write_token_types = binary_head or (token_types is not None and bool(token_types.any()))
    dtype = state["bert.embeddings.word_embeddings.weight"].dtype
    args = config_to_args(
        config, tensor_parallel=1, pipeline_parallel=1, padded_vocab_size=padded_vocab, binary_head=binary_head,
        dtype=dtype, iteration=iteration or 0, tokenizer_type=_tokenizer_type(hf_dir, tokenizer_type),
    )  # fmt: skip
    args.untie_embeddings_and_output_weights = untied
    args.ckpt_format = "torch_dist"
    args.transformer_impl = "local"
    tensors = core_tensors(state, config, binary_head=binary_head, write_token_types=write_token_types, untied=untied)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        write_torch_dist(tmp, tensors, args=args, iteration=iteration, num_layers=config.num_hidden_layers)
    return out
