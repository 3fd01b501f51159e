"""apply_cpu_fast_paths: applied from outside the model code, reversible, same results as plain modules."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import megabert
from megabert.config import MegatronBertConfig
from megabert.errors import UserError
from megabert.fast_paths import CpuFastPaths, apply_cpu_fast_paths, watch_optimizer
from megabert.fast_paths.attention import FastCpuAttention
from megabert.fast_paths.dropout import Dropout as CpuDropout
from megabert.fast_paths.half_matmul import CpuLinear
from megabert.modeling.layers import MegatronBertSelfAttention

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids * mask, mask


def _kinds(model: nn.Module) -> dict[str, int]:
    kinds = {"plain_linear": 0, "cpu_linear": 0, "plain_dropout": 0, "cpu_dropout": 0, "fast_attention": 0}
    for m in model.modules():
        kinds["plain_linear"] += type(m) is nn.Linear
        kinds["cpu_linear"] += type(m) is CpuLinear
        kinds["plain_dropout"] += type(m) is nn.Dropout
        kinds["cpu_dropout"] += type(m) is CpuDropout
        kinds["fast_attention"] += isinstance(m, FastCpuAttention)
    return kinds


def test_default_model_has_every_fast_path_and_off_gives_plain_modules():
    model = megabert.MegatronBertForPreTraining(MegatronBertConfig(**TINY))
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    dropouts = sum(isinstance(m, nn.Dropout) for m in model.modules())
    # 2 layers x (Q, K, V, attention out, MLP in, MLP out) + pooler + head transform + decoder + NSP
    assert linears == 2 * 6 + 4
    # embeddings + 2 layers x (attention weights, attention out, MLP out)
    assert dropouts == 1 + 2 * 3
    assert _kinds(model) == {"plain_linear": 0, "cpu_linear": linears, "plain_dropout": 0,
                             "cpu_dropout": dropouts, "fast_attention": 2}
    keys = list(model.state_dict())
    apply_cpu_fast_paths(model, "off")
    assert _kinds(model) == {"plain_linear": linears, "cpu_linear": 0, "plain_dropout": dropouts,
                             "cpu_dropout": 0, "fast_attention": 0}
    assert all(type(m) is MegatronBertSelfAttention for m in model.modules() if isinstance(m, MegatronBertSelfAttention))
    assert list(model.state_dict()) == keys
    off = megabert.MegatronBertForPreTraining(MegatronBertConfig(**TINY, cpu_fast_paths="off"))
    assert _kinds(off)["cpu_linear"] == 0 and _kinds(off)["fast_attention"] == 0


def test_fast_and_plain_models_agree_in_eval_and_training():
    torch.manual_seed(0)
    fast = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY))
    plain = copy.deepcopy(fast)
    apply_cpu_fast_paths(plain, "off")
    ids, mask = _batch()
    fast.eval(), plain.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids, mask).logits, plain(ids, mask).logits, atol=1e-5, rtol=0)
    # training without dropout: same loss and gradients through the fused and the separate products
    for model in (fast, plain):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model(ids, mask, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_policy_options_and_bad_values():
    assert CpuFastPaths.parse(None) == CpuFastPaths() == CpuFastPaths.parse("auto")
    assert CpuFastPaths.parse("off").is_off
    policy = CpuFastPaths.parse({"fused_qkv": False, "half_matmul": "fp32"})
    assert (policy.fused_qkv, policy.fast_dropout, policy.half_matmul) == (False, True, "fp32")
    model = megabert.MegatronBertModel(MegatronBertConfig(**TINY, cpu_fast_paths={"fast_dropout": False}))
    assert _kinds(model)["plain_dropout"] == 1 + 2 * 3 and _kinds(model)["cpu_linear"] == 2 * 6 + 1
    for bad, words in (("fast", "'auto', 'off'"), ({"fused": True}, r"unknown option\(s\) fused"),
                       ({"half_matmul": "fast"}, "choose one of auto, native, fp32"),
                       ({"fused_qkv": "yes"}, "must be true or false")):
        with pytest.raises(UserError, match=words):
            MegatronBertConfig(**TINY, cpu_fast_paths=bad)


def test_fused_cache_follows_fused_optimizer_steps_in_eval_mode():
    """Eval mode (dropout off) with a fused optimizer: watch_optimizer drops the cached Q/K/V weight."""
    torch.manual_seed(0)
    model = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY)).eval()
    ids, mask = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    watch_optimizer(opt, model)
    with torch.no_grad():
        before = model(ids, mask).logits  # builds the cache
    model(ids, mask, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(ids, mask).logits
    plain = copy.deepcopy(model)
    apply_cpu_fast_paths(plain, "off")
    with torch.no_grad():
        expected = plain(ids, mask).logits
    assert (expected - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_pruned_layers_keep_their_fast_paths_and_models_pickle():
    model = megabert.MegatronBertModel(MegatronBertConfig(**TINY)).eval()
    model.prune_heads({0: [1, 2]})
    assert _kinds(model)["plain_linear"] == 0
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
        again = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(again(ids, mask).last_hidden_state, expected, atol=0, rtol=0)
