"""The training loop against a hand-written one; accumulation, precision, evaluation, metrics, errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from trainkit import SyntheticPretrainingData, tiny_config
from megabert import MegatronBertForPreTraining
from megabert.errors import UserError
from megabert.data.pretraining import collate_pretraining
from megabert.train.engine import checkpoint as ckpt
from megabert.train.engine.logging import MetricsConfig, read_metrics
from megabert.train.engine.optim import OptimizerConfig, ScheduleConfig, learning_rates
from megabert.train.jobs.pretrain import PretrainingObjective
from megabert.train.engine.trainer import ResumableLoader, StepOutput, Trainer, TrainerConfig, TrainingError

QUIET = MetricsConfig(log_every=1, progress=False, tensorboard=False, plot=False)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


def regression_batches(count: int, size: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(size, 4, generator=g)
        out.append({"x": x, "y": x.sum(-1, keepdim=True).sin()})
    return out


def mse(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def test_trainer_matches_a_hand_written_loop(tmp_path):
    """Param groups, accumulation, clipping, warmup + linear decay: the same weights as plain torch code."""
    batches = regression_batches(6, 5)
    steps, accum, clip, lr, wd = 3, 2, 0.05, 0.05, 0.1
    model = small_net()
    trainer = Trainer(
        model, batches, TrainerConfig(tmp_path, max_steps=steps, grad_accum=accum, clip_grad=clip, device="cpu"),
        optimizer=OptimizerConfig(lr=lr, weight_decay=wd), schedule=ScheduleConfig("linear", 2, 0.2),
        loss_fn=mse, metrics=QUIET,
    )
    result = trainer.train()

    ref = small_net()
    decay = [ref[0].weight, ref[3].weight]
    plain = [ref[0].bias, ref[1].weight, ref[1].bias, ref[3].bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": plain, "weight_decay": 0.0}], lr=lr)
    # update t (1-based): t/2 during warmup, then 1 - 0.8 * (t - 2) / 1 ... at t = 3 = total: the floor 0.2.
    factors = {1: 0.5, 2: 1.0, 3: 0.2}
    losses = []
    for t in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * factors[t]
        opt.zero_grad()
        total = 0.0
        for micro in range(accum):
            loss = mse(ref, batches[(t - 1) * accum + micro]) / accum
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        losses.append(total)
    assert result.losses == pytest.approx(losses, rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = regression_batches(3, 8, seed=3)
    halves = [{k: v[i * 4 : (i + 1) * 4] for k, v in b.items()} for b in big for i in range(2)]
    runs = []
    for batches, accum in ((big, 1), (halves, 2)):
        model = small_net()
        config = TrainerConfig(tmp_path / f"a{accum}", max_steps=3, grad_accum=accum, clip_grad=None, device="cpu")
        Trainer(model, batches, config, optimizer=OptimizerConfig(lr=0.01), loss_fn=mse, metrics=QUIET).train()
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def pretraining_trainer(tmp_path, max_steps: int, samples: int = 32, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = MegatronBertForPreTraining(tiny_config(unpad_inputs=True))
    loader = ResumableLoader(SyntheticPretrainingData(samples), 4, collate_pretraining, seed=5)
    options = dict(optimizer=OptimizerConfig(lr=3e-3), loss_fn=PretrainingObjective("nsp"), metrics=QUIET)
    options.update(kwargs.pop("options", {}))
    config = TrainerConfig(tmp_path, max_steps=max_steps, device="cpu", **kwargs)
    return Trainer(model, loader, config, **options)


def test_tiny_model_loss_decreases(tmp_path):
    # 8 samples seen again and again: the model can memorise them.
    result = pretraining_trainer(tmp_path, 40, samples=8).train()
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < first - 0.5, (first, last)


def test_evaluation_leaves_training_untouched(tmp_path):
    """Evaluating (which here even draws random numbers) never changes the training losses (dropout on)."""
    seen = []

    def eval_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        torch.rand(3), random.random(), np.random.rand()  # consume every RNG
        return {"loss": 1.0}

    plain = pretraining_trainer(tmp_path / "plain", 6).train()
    with_eval = pretraining_trainer(tmp_path / "eval", 6, eval_every=2, options={"eval_fn": eval_fn}).train()
    assert with_eval.losses == plain.losses
    assert seen == [(False, False)] * 3  # steps 2, 4, 6 (the end coincides with step 6)
    valid = [r for r in read_metrics(tmp_path / "eval" / "metrics.jsonl") if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4, 6]


def test_metrics_records(tmp_path):
    metrics = MetricsConfig(log_every=2, progress=False, tensorboard=False, plot=False)
    trainer = pretraining_trainer(
        tmp_path, 5, options={"metrics": metrics, "schedule": ScheduleConfig("cosine", 2, 0.1)}
    )
    result = trainer.train()
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 5]
    # A record's loss is the mean over its window; its lr is the rate its last step used.
    assert train[0]["loss"] == pytest.approx(np.mean(result.losses[0:2]), rel=1e-6)
    assert train[2]["loss"] == pytest.approx(result.losses[4], rel=1e-6)
    rates = learning_rates(ScheduleConfig("cosine", 2, 0.1), 3e-3, [2, 4, 5], 5)
    assert [r["lr"] for r in train] == pytest.approx(rates)
    for key in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "grad_norm", "tokens_per_s"):
        assert key in train[0]
    assert train[0]["mlm_loss"] + train[0]["nsp_loss"] == pytest.approx(train[0]["loss"], rel=1e-5)
    # Tokens: the real (unpadded) tokens of the 5 x 4 samples consumed.
    batches = trainer.source.index_batches(0)
    consumed = [i for _ in range(5) for i in next(batches)]
    data = SyntheticPretrainingData(32)
    assert trainer.state.tokens == sum(len(data[i]["input_ids"]) for i in consumed)
    assert trainer.state.samples == 20 and trainer.state.micro_batches == 5


def test_bf16_autocast_on_cpu(tmp_path):
    dtypes = []

    def loss_fn(model, batch):
        out = PretrainingObjective("nsp")(model, batch)
        dtypes.append(model.bert.embeddings.word_embeddings.weight.dtype)
        dtypes.append(torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype)  # autocast turns this bf16
        return out

    bf16 = pretraining_trainer(tmp_path / "bf16", 3, precision="bf16", options={"loss_fn": loss_fn}).train()
    fp32 = pretraining_trainer(tmp_path / "fp32", 3).train()
    assert dtypes[:2] == [torch.float32, torch.bfloat16]  # fp32 weights, bf16 compute
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=2e-2)
    assert bf16.losses != fp32.losses


@pytest.mark.parametrize("policy, noted", [("fp32", True), ("native", False)])
def test_bf16_on_a_cpu_with_slow_bf16_products_is_noted(tmp_path, monkeypatch, capsys, policy, noted):
    # The policy variable stands for the measured answer: "fp32" = this CPU's bf16 GEMMs are slower.
    monkeypatch.setenv("MEGABERT_CPU_HALF_MATMUL", policy)
    pretraining_trainer(tmp_path, 1, precision="bf16")
    assert ("the large products run in fp32 here" in capsys.readouterr().err) == noted


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = pretraining_trainer(tmp_path / "a", 3).train()
    trainer = pretraining_trainer(tmp_path / "b", 3, gradient_checkpointing=True)
    assert trainer.model.is_gradient_checkpointing
    assert trainer.train().losses == pytest.approx(plain.losses, rel=1e-5)


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    result = pretraining_trainer(tmp_path, 50, max_seconds=1e-6).train()
    assert result.stop_reason == "time limit" and result.step == 1
    assert result.last_checkpoint is not None and result.last_checkpoint.name == "step-00000001"


def test_data_that_runs_out(tmp_path):
    def two_batches(start):
        return iter(regression_batches(2, 3)[start:])

    trainer = Trainer(small_net(), two_batches, TrainerConfig(tmp_path, max_steps=5, device="cpu"), loss_fn=mse, metrics=QUIET)
    with pytest.raises(TrainingError) as info:
        trainer.train()
    assert "the training data ran out after 2 micro-batches (step 2 of 5)" in str(info.value)


def test_non_finite_loss_is_reported(tmp_path):
    def nan_loss(model, batch):
        return mse(model, batch) * float("nan")

    trainer = Trainer(small_net(), regression_batches(2, 3), TrainerConfig(tmp_path, max_steps=3, device="cpu"),
                      loss_fn=nan_loss, metrics=QUIET)
    with pytest.raises(TrainingError) as info:
        trainer.train()
    assert "the loss is nan at step 1: training diverged" in str(info.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_steps": 0}, "max steps must be an integer >= 1, got 0"),
        ({"grad_accum": 0}, "grad accum must be an integer >= 1, got 0"),
        ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16, got 'fp8'"),
        ({"clip_grad": -1.0}, "clip grad must be a positive norm (or None for no clipping), got -1.0"),
        ({"precision": "fp16"}, "fp16 training needs a CUDA device (it uses a gradient scaler); on CPU use bf16"),
        ({"device": "cuda:0"}, "device 'cuda:0' was asked for, but this torch has no CUDA device available"),
    ],
)
def test_bad_trainer_settings(tmp_path, changes, message):
    if "device" in changes and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    values = {"output_dir": tmp_path, "max_steps": 2, "device": "cpu"}
    values.update(changes)
    with pytest.raises(UserError) as info:
        Trainer(small_net(), regression_batches(1, 2), TrainerConfig(**values), loss_fn=mse, metrics=QUIET)
    assert message in str(info.value)


def test_loss_fn_must_return_a_loss(tmp_path):
    trainer = Trainer(small_net(), regression_batches(1, 2), TrainerConfig(tmp_path, max_steps=1, device="cpu"),
                      loss_fn=lambda m, b: "nope", metrics=QUIET)
    with pytest.raises(TypeError, match="loss_fn must return a StepOutput or a scalar tensor, got str"):
        trainer.train()


def test_step_output_metrics_are_averaged_over_micro_batches(tmp_path):
    values = iter([1.0, 3.0, 5.0, 7.0])

    def loss_fn(model, batch):
        return StepOutput(loss=mse(model, batch), metrics={"m": next(values)}, tokens=10)

    trainer = Trainer(small_net(), regression_batches(4, 2), TrainerConfig(tmp_path, max_steps=2, grad_accum=2, device="cpu"),
                      loss_fn=loss_fn, metrics=QUIET)
    trainer.train()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["m"] for r in records] == [2.0, 6.0]
    assert trainer.state.tokens == 40
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["tokens"] == 20


# ------------------------------------------------------------------------------ metrics files
def test_metrics_file_survives_a_torn_line_and_truncates_on_resume(tmp_path):
    from megabert.train.engine.logging import MetricsLogger

    logger = MetricsLogger(tmp_path, QUIET)
    for step in (1, 2, 3):
        logger.log(step, "train", {"loss": float(step), "acc": torch.tensor(0.5), "bad": float("inf")})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "split": "tr')  # a kill in the middle of a write
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0] == {"step": 1, "split": "train", "loss": 1.0, "acc": 0.5, "bad": None}
    logger.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def _logger_with_records(folder):
    from megabert.train.engine.logging import MetricsLogger

    logger = MetricsLogger(folder, QUIET)
    for step in (1, 2):
        logger.log(step, "train", {"loss": 3.0 - step, "lr": 1e-3, "mlm_accuracy": 0.1 * step})
    logger.log(2, "valid", {"loss": 2.5})
    return logger


def test_without_matplotlib_a_one_line_note(tmp_path, monkeypatch, caplog):
    import sys

    logger = _logger_with_records(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with caplog.at_level("WARNING"):
        assert logger.plot() is None
        assert logger.plot() is None
    notes = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert notes == ["matplotlib is not installed: no curves.png (pip install 'megabert[plot]')"]  # said once
    assert not (tmp_path / "curves.png").exists()


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = _logger_with_records(tmp_path).plot()
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- extension points
def test_request_stop_from_a_callback(tmp_path):
    from megabert.train.engine.trainer import TrainerCallback

    class EarlyStop(TrainerCallback):
        def on_evaluate(self, trainer, step, results):
            if step == 2:
                trainer.request_stop("early stopping")

    evaluations = []
    trainer = Trainer(small_net(), regression_batches(4, 2), TrainerConfig(tmp_path, max_steps=10, eval_every=2, device="cpu"),
                      loss_fn=mse, metrics=QUIET, eval_fn=lambda m: evaluations.append(1) or {"loss": 0.0},
                      callbacks=[EarlyStop()])
    result = trainer.train()
    assert (result.step, result.stop_reason, result.interrupted) == (2, "early stopping", False)
    assert len(evaluations) == 1  # the evaluation at step 2 is not repeated at the end
    assert result.last_checkpoint.name == "step-00000002"


class RecordingHooks:
    """DistributedHooks that record every call (as a second data-parallel rank would see them)."""

    def __new__(cls, rank: int = 0):
        from megabert.train.engine.trainer import DistributedHooks

        class Hooks(DistributedHooks):
            def __init__(self) -> None:
                self.rank, self.world_size, self.calls = rank, 2, []

            def wrap(self, module):
                self.calls.append("wrap")
                return module

            def no_sync(self, wrapped):
                self.calls.append("no_sync")
                return super().no_sync(wrapped)

            def clip_grad_norm(self, parameters, max_norm):
                self.calls.append(("clip", max_norm))
                return super().clip_grad_norm(parameters, max_norm)

            def all_reduce(self, values, op="mean"):
                self.calls.append(("all_reduce", op))
                return values

            def any_rank(self, flag):
                self.calls.append("any_rank")
                return flag

            def gather_object(self, obj):
                self.calls.append("gather")
                return [obj, obj]

            def checkpoint_format(self):
                calls, inner = self.calls, super().checkpoint_format()

                class Recording:
                    def save(self, snapshot, target):
                        calls.append("save")
                        return inner.save(snapshot, target)

                    def load(self, folder, snapshot):
                        calls.append("load")
                        return inner.load(folder, snapshot)

                return Recording()

        return Hooks()


def test_distributed_hooks_are_called_where_documented(tmp_path):
    hooks = RecordingHooks()
    config = TrainerConfig(tmp_path, max_steps=2, grad_accum=3, clip_grad=0.5, device="cpu")
    Trainer(small_net(), regression_batches(6, 2), config, loss_fn=mse, metrics=QUIET, distributed=hooks).train()
    per_step = ["no_sync", "no_sync", ("clip", 0.5), ("all_reduce", "sum"), ("all_reduce", "mean"), "any_rank"]
    assert hooks.calls == ["wrap"] + per_step * 2 + ["save", "gather"]
    # The checkpoint holds both ranks' RNG states; a resume goes through load_checkpoint.
    assert len(ckpt.load_state(tmp_path / "checkpoints" / "step-00000002")["rng"]) == 2
    resumed_hooks = RecordingHooks()
    config = TrainerConfig(tmp_path, max_steps=3, grad_accum=3, clip_grad=0.5, device="cpu")
    trainer = Trainer(small_net(), regression_batches(6, 2), config, loss_fn=mse, metrics=QUIET, distributed=resumed_hooks,
                      checkpoints=ckpt.CheckpointConfig(resume="auto"))
    assert resumed_hooks.calls[:2] == ["load", "wrap"] and trainer.state.step == 2


def test_non_main_rank_writes_nothing(tmp_path):
    hooks = RecordingHooks(rank=1)
    result = Trainer(small_net(), regression_batches(2, 2), TrainerConfig(tmp_path, max_steps=2, device="cpu"),
                     loss_fn=mse, metrics=QUIET, distributed=hooks).train()
    assert result.last_checkpoint is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signalled, reason, evaluations", [
    (False, "stop requested on another rank", 1),  # e.g. its time limit: the end-of-run evaluation still runs
    (True, "SIGTERM", 0),  # a signal anywhere: no end-of-run evaluation, on every rank alike
])
def test_a_stop_from_another_rank(tmp_path, signalled, reason, evaluations):
    """Every rank takes the same end-of-run path (evaluation, checkpoint: collectives) whoever stopped."""
    from megabert.train.engine.trainer import DistributedHooks

    class OtherRankStops(DistributedHooks):
        def __init__(self) -> None:
            self.answers: list[bool] = []

        def any_rank(self, flag):
            self.answers.append(flag)
            if len(self.answers) == 2:  # step 2: another rank wants to stop
                return True
            if len(self.answers) == 3:  # the follow-up question: was it a signal?
                return signalled
            return flag

    hooks = OtherRankStops()
    evaluated = []
    trainer = Trainer(small_net(), regression_batches(4, 2), TrainerConfig(tmp_path, max_steps=10, device="cpu"),
                      loss_fn=mse, metrics=QUIET, eval_fn=lambda m: evaluated.append(1) or {"loss": 0.0},
                      distributed=hooks)
    result = trainer.train()
    assert (result.step, result.stop_reason) == (2, reason)
    assert len(hooks.answers) == 3 and not any(hooks.answers)  # this rank itself never wanted to stop
    assert len(evaluated) == evaluations
    assert result.last_checkpoint.name == "step-00000002"


def test_a_time_budget_without_a_step_limit_ends_its_decay_with_the_time(tmp_path):
    from megabert.train.engine.optim import WarmupDecay
    from megabert.train.engine.trainer import UNTIL_TIME_LIMIT, TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, trainer, step, values):
            seen.append((step, trainer.state.train_seconds, trainer.lr))

    budget, peak = 1.5, 3e-3
    trainer = pretraining_trainer(
        tmp_path, UNTIL_TIME_LIMIT, max_seconds=budget,
        options={"schedule": ScheduleConfig("linear", warmup_steps=3, min_lr_ratio=0.05), "callbacks": [Record()]},
    )  # fmt: skip
    result = trainer.train()
    assert result.stop_reason == "time limit" and result.step == len(seen) > 5
    expected = WarmupDecay("linear", 3, UNTIL_TIME_LIMIT, 0.05)
    for step, seconds, lr in seen:  # the rate of the next update, from the step and the clock
        expected.time_fraction = seconds / budget
        assert lr == pytest.approx(peak * expected.factor(step + 1)), step
    assert seen[-1][2] == pytest.approx(peak * 0.05)  # time up: the decay has reached its floor
    after_warmup = [lr for step, _, lr in seen if step >= 3]
    assert after_warmup == sorted(after_warmup, reverse=True)  # it got there along the way,
    assert sum(0.1 * peak < lr < 0.9 * peak for lr in after_warmup) >= 2  # not in one jump
    with pytest.raises(UserError, match="needs a time limit"):
        TrainerConfig(tmp_path, max_steps=UNTIL_TIME_LIMIT).validate()
