"""AdamW parameter groups (no decay on biases / LayerNorm) and the LR schedule's values."""

from __future__ import annotations

import math

import pytest
import torch

from trainkit import tiny_config
from megabert import MegatronBertForPreTraining
from megabert.errors import UserError
from megabert.train.engine.optim import (
    OptimizerConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    learning_rates,
    parameter_groups,
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MegatronBertForPreTraining(tiny_config())


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_exclude_biases_and_layernorm(model):
    groups = {g["name"]: g for g in parameter_groups(model, 0.01)}
    decay = _names(model, groups["decay"]["params"])
    plain = _names(model, groups["no_decay"]["params"])
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    # Hand-picked members of each group.
    for name in (
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.dense.weight",
        "cls.predictions.transform.dense.weight",
        "cls.seq_relationship.weight",
        "bert.pooler.dense.weight",
    ):
        assert name in decay, name
    for name in (
        "bert.encoder.ln.weight",
        "bert.encoder.ln.bias",
        "bert.encoder.layer.0.attention.ln.weight",
        "bert.encoder.layer.0.ln.weight",
        "bert.encoder.layer.0.attention.self.query.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.bias",
        "cls.seq_relationship.bias",
    ):
        assert name in plain, name
    assert not decay & plain
    # Every decayed parameter is a matrix; every undecayed one is a vector.
    assert all(p.dim() == 2 for p in groups["decay"]["params"])
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    # Each distinct parameter exactly once (the tied decoder weight/bias are not repeated).
    counted = sum(p.numel() for g in groups.values() for p in g["params"])
    assert counted == model.num_parameters()


def test_adamw_decays_only_the_decay_group(model):
    """With zero gradients, one AdamW step multiplies decayed weights by (1 - lr * wd) and leaves the rest."""
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["bert.encoder.layer.0.intermediate.dense.weight"],
                               before["bert.encoder.layer.0.intermediate.dense.weight"] * 0.95)
    torch.testing.assert_close(after["bert.encoder.layer.0.ln.weight"], before["bert.encoder.layer.0.ln.weight"])
    torch.testing.assert_close(after["cls.predictions.bias"], before["cls.predictions.bias"])


def _rates_via_scheduler(kind: str, warmup: int, total: int, ratio: float, peak: float = 1e-3) -> list[float]:
    """The rate each update t = 1..total+2 actually uses, read from a real optimizer + scheduler."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=peak)
    scheduler = build_scheduler(optimizer, ScheduleConfig(kind, warmup, ratio), total)
    rates = []
    for _ in range(total + 2):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_linear_schedule_values():
    # peak 1e-3, 4 warmup of 12 updates, floor 0.1: t=1 -> 2.5e-4, t=4 -> 1e-3,
    # t=6: p = 2/8 = 0.25 -> 1 - 0.9 * 0.25 = 0.775; t=8: p = 0.5 -> 0.55; t=12 and after: 0.1.
    rates = _rates_via_scheduler("linear", 4, 12, 0.1)
    expected = {1: 2.5e-4, 2: 5e-4, 4: 1e-3, 5: 1e-3 * (1 - 0.9 / 8), 6: 7.75e-4, 8: 5.5e-4, 12: 1e-4, 13: 1e-4, 14: 1e-4}
    for t, value in expected.items():
        assert rates[t - 1] == pytest.approx(value, rel=1e-12), t


def test_cosine_schedule_values():
    # t=6: p = 0.25 -> 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.868198; t=8: p = 0.5 -> 0.55; t=10: p = 0.75 -> 0.231802.
    rates = _rates_via_scheduler("cosine", 4, 12, 0.1)
    expected = {3: 7.5e-4, 4: 1e-3, 6: 8.681980515339464e-4, 8: 5.5e-4, 10: 2.318019484660536e-4, 12: 1e-4, 14: 1e-4}
    for t, value in expected.items():
        assert rates[t - 1] == pytest.approx(value, rel=1e-12), t


def test_schedule_without_warmup_and_constant():
    # No warmup, decay to 0 over 4 updates: t=1 already has p = 1/4 -> 0.75, then 0.5, 0.25, 0.
    rates = _rates_via_scheduler("linear", 0, 4, 0.0, peak=1.0)
    assert rates[:5] == pytest.approx([0.75, 0.5, 0.25, 0.0, 0.0])
    rates = _rates_via_scheduler("constant", 2, 6, 0.0, peak=1.0)
    assert rates[:7] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert learning_rates(ScheduleConfig("cosine", 0, 0.0), 2.0, [2], 4) == pytest.approx([2.0 * (1 + math.cos(math.pi / 2)) / 2])


@pytest.mark.parametrize(
    "config, message",
    [
        (OptimizerConfig(lr=0.0), "learning rate must be a positive number, got 0.0"),
        (OptimizerConfig(lr=1e-3, weight_decay=-1.0), "weight decay must be >= 0, got -1.0"),
        (OptimizerConfig(lr=1e-3, beta2=1.0), "AdamW beta2 must be in [0, 1), got 1.0"),
    ],
)
def test_bad_optimizer_settings(model, config, message):
    with pytest.raises(UserError) as info:
        build_optimizer(model, config)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "config, message",
    [
        (ScheduleConfig(kind="step"), "unknown schedule 'step'; choose one of linear, cosine, constant"),
        (ScheduleConfig(warmup_steps=-2), "warmup steps must be an integer >= 0, got -2"),
        (ScheduleConfig(min_lr_ratio=1.5), "min lr ratio must be in [0, 1], got 1.5"),
    ],
)
def test_bad_schedule_settings(config, message):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(UserError) as info:
        build_scheduler(optimizer, config, 10)
    assert message in str(info.value)


def test_adamw_implementation(model):
    """torch's fused AdamW by default for plain tensors (one kernel per parameter); fused=False gives
    foreach, which bumps the weights' version counters."""
    assert build_optimizer(model, OptimizerConfig()).defaults["fused"] is True
    assert not build_optimizer(model, OptimizerConfig(fused=False)).defaults["fused"]
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    optimizer = build_optimizer(model, OptimizerConfig(fused=False))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    version = weight._version
    optimizer.step()
    assert weight._version > version


def test_fused_and_foreach_adamw_take_the_same_steps(model):
    """The default (fused) update equals torch's foreach AdamW with the same groups, step after step."""
    import copy

    twin = copy.deepcopy(model)
    fused = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    foreach = build_optimizer(twin, OptimizerConfig(lr=1e-2, weight_decay=0.1, fused=False))
    for step in range(3):
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.full_like(a, 0.1 * (step + 1)) + a.detach() * 0.01
            b.grad = a.grad.clone()
        fused.step()
        foreach.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_time_budget_drives_the_decay():
    from megabert.train.engine.optim import WarmupDecay

    schedule = WarmupDecay("linear", warmup_steps=2, total_steps=1002, min_lr_ratio=0.1)
    assert schedule.factor(1) == 0.5  # warmup is by steps, whatever the clock says
    schedule.time_fraction = 0.5
    # Step 12 is 1% of the steps after warmup, but half the time is used: half the decay done.
    assert schedule.factor(12) == pytest.approx(1 - 0.9 * 0.5)
    schedule.time_fraction = 0.001
    assert schedule.factor(502) == pytest.approx(1 - 0.9 * 0.5)  # the steps lead: they count
    schedule.time_fraction = 1.3
    assert schedule.factor(12) == pytest.approx(0.1)  # time is up: the floor
    cosine = WarmupDecay("cosine", 0, 100, 0.0)
    cosine.time_fraction = 0.5
    assert cosine.factor(1) == pytest.approx(0.5)
