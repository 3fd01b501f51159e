"""A real peer: megatron-core's own BertModel, saved the way Megatron-LM saves it, converts exactly.

megatron-core builds its BERT on the CPU under a one-process gloo group. Its forward touches
two CUDA-only pieces, replaced here for the test: the global memory buffer's ``get_tensor``
(a scratch tensor) and the CUDA RNG tracker's ``fork`` (dropout RNG; dropout is off in eval).
The converted folder must give megatron-core's MLM and binary logits within 1e-5.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import warnings

import numpy as np
import pytest
import torch
import transformers

import megabert
from megabert.convert.megatron_lm import convert_megatron_to_hf
from tests.convert.megatron_fixtures import batch

pytest.importorskip("megatron.core")
ATOL = 1e-5
VOCAB, HIDDEN, HEADS, LAYERS, POSITIONS, EPS = 96, 32, 4, 2, 40, 1e-6


@pytest.fixture(scope="module")
def megatron_core(tmp_path_factory):
    """megatron-core with model parallelism initialised (1 x 1) in this process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed as dist
        from megatron.core import parallel_state

    started = False
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        started = True
    parallel_state.initialize_model_parallel(1, 1)
    yield parallel_state
    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


@pytest.fixture
def cpu_forward(megatron_core, monkeypatch):
    """Replace the two CUDA-only pieces megatron-core's forward touches."""
    from megatron.core import tensor_parallel
    from megatron.core.utils import GlobalMemoryBuffer

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype)

    monkeypatch.setattr(GlobalMemoryBuffer, "get_tensor", get_tensor)
    tracker = type(tensor_parallel.get_cuda_rng_tracker())
    monkeypatch.setattr(tracker, "fork", lambda self, name=None: contextlib.nullcontext())


def _bert(tied: bool):
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=EPS,
    )  # fmt: skip
    torch.manual_seed(3)
    model = BertModel(
        config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec, vocab_size=VOCAB,
        max_sequence_length=POSITIONS, share_embeddings_and_output_weights=tied, add_binary_head=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # every weight random, LayerNorms included, so a swapped tensor shows
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def _save_like_megatron_lm(model, root, tied: bool):
    """What Megatron-LM's save_checkpoint writes (legacy `torch` format) for a Megatron Core BERT."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN, num_attention_heads=HEADS,
        num_query_groups=HEADS, group_query_attention=False, max_position_embeddings=POSITIONS,
        padded_vocab_size=VOCAB, layernorm_epsilon=EPS, normalization="LayerNorm",
        tokenizer_type="BertWordPieceLowerCase", tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        untie_embeddings_and_output_weights=not tied, bert_binary_head=True, position_embedding_type="learned_absolute",
        params_dtype=torch.float32, model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto,
        add_bias_linear=True, openai_gelu=False, transformer_impl="local",
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 10,
        "model": model.state_dict(),  # Megatron Core names, `_extra_state` entries included
        "optimizer": optimizer.state_dict(),
        "rng_state": [{
            "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {},
        }],  # fmt: skip
    }
    path = root / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    return root


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_megatron_core_bert_converts_exactly(tmp_path, cpu_forward, tied):
    model = _bert(tied)
    assert any(k.endswith("_extra_state") for k in model.state_dict())
    assert ("output_layer.weight" in model.state_dict()) is not tied
    inputs = batch(VOCAB)
    with torch.no_grad():
        lm_logits, binary_logits = model(inputs["input_ids"], inputs["attention_mask"], tokentype_ids=inputs["token_type_ids"])

    out = convert_megatron_to_hf(_save_like_megatron_lm(model, tmp_path / "megatron", tied), tmp_path / "hf")
    config = megabert.MegatronBertConfig.from_pretrained(out)
    assert config.layer_norm_eps == EPS and config.tie_word_embeddings is tied

    # Megatron masks whole pad rows, HF only pad keys: compare the real tokens.
    real = inputs["attention_mask"].bool()
    ours = megabert.MegatronBertForPreTraining.from_pretrained(out, attn_implementation="eager")
    theirs = transformers.MegatronBertForPreTraining.from_pretrained(out).eval()
    for converted in (ours, theirs):
        with torch.no_grad():
            got = converted(**inputs)
        torch.testing.assert_close(got.prediction_logits[real], lm_logits[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(got.seq_relationship_logits, binary_logits, atol=ATOL, rtol=0)
    if not tied:  # the untied output layer is really used: tying it would change the logits
        with torch.no_grad():
            tied_logits = transformers.MegatronBertForPreTraining.from_pretrained(out, tie_word_embeddings=True).eval()(**inputs)
        assert not torch.allclose(tied_logits.prediction_logits[real], lm_logits[real], atol=1e-2)
