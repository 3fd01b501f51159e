"""A Megatron-LM checkpoint straight into a model in memory (for training jobs that start from one)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from megabert.config import MegatronBertConfig
from megabert.convert.megatron_lm import convert_megatron_to_hf
import megabert.modeling.heads as heads


def load_megatron_model(src: str | os.PathLike, model_class: type | None = None) -> nn.Module:
    """A Megatron-LM BERT checkpoint (any TP x PP split) as a whole fp32 model, ready for :meth:`wrap_model`.

    The shards are merged by :func:`convert_megatron_to_hf` (into a temporary folder of this
    process, so no shared file system is needed), so a checkpoint saved at TP=T starts a TP=T
    run -- or any other layout -- directly (``ParallelContext.wrap_model`` splits it). ``model_class``: default ``MegatronBertForPreTraining``
    when the checkpoint has the binary (NSP/SOP) head, else ``MegatronBertForMaskedLM``.
    """
    with tempfile.TemporaryDirectory(prefix="megabert-megatron-") as scratch:
        folder = convert_megatron_to_hf(src, Path(scratch) / "hf")
        if model_class is None:
            config = MegatronBertConfig.from_pretrained(folder)
            name = (config.architectures or ["MegatronBertForPreTraining"])[0]
            model_class = getattr(heads, name, heads.MegatronBertForPreTraining)
        # float32: training keeps fp32 weights (bf16/fp16 run under autocast).
        return model_class.from_pretrained(folder, dtype=torch.float32).train()
