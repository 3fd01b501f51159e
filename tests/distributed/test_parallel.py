"""Tensor and data parallel training against the single-process run (gloo, CPU processes).

Each distributed test launches 2 or 4 worker processes (``worker.py``) with torchrun's
environment variables; the single-process reference runs in this process with the same code
(:func:`common.train`). Equal means within 1e-5 in fp32: the layouts only change the order of
some floating-point sums.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from launcher import check_ok, launch  # noqa: E402

from megabert.errors import UserError  # noqa: E402
from megabert.train.distributed.parallel import (  # noqa: E402
    EXIT_PEER_FAILURE,
    DataParallelSource,
    ParallelConfig,
    ParallelContext,
    check_tensor_parallel,
    mesh_shape,
    setup_parallel,
)
from megabert.train.engine.trainer import ResumableLoader  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def single() -> ParallelContext:
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    return setup_parallel(ParallelConfig(device="cpu"))


_REFERENCE: dict[tuple[str, int], dict] = {}


def reference(single: ParallelContext, task: str, grad_accum: int, tmp_root: Path) -> dict:
    """The single-process run (cached per task and accumulation)."""
    key = (task, grad_accum)
    if key not in _REFERENCE:
        folder = tmp_root / f"reference-{task}-{grad_accum}"
        shutil.rmtree(folder, ignore_errors=True)
        _REFERENCE[key] = common.train(single, task, folder, grad_accum=grad_accum, save_every=3)
        _REFERENCE[key]["folder"] = folder
    return _REFERENCE[key]


def assert_close(actual, expected, what: str) -> None:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    diff = float(np.abs(a - e).max()) if a.size else 0.0
    assert diff <= TOL, f"{what}: differs from the single-process run by {diff:.3g} (> {TOL})"


def compare_run(out: Path, single: ParallelContext, grad_accum: int, tmp_root: Path) -> dict[str, dict]:
    runs = {}
    for task in common.TASKS:
        run = json.loads((out / f"{task}.json").read_text())
        ref = reference(single, task, grad_accum, tmp_root)
        for name, value in ref["forward"].items():
            assert_close(run["forward"][name], value, f"{task} forward {name}")
        assert len(run["losses"]) == 5
        assert_close(run["losses"], ref["losses"], f"{task} losses of the first 5 steps")
        runs[task] = run
    return runs


def resume_single(single: ParallelContext, task: str, checkpoint: Path, out: Path, grad_accum: int) -> list[float]:
    """Continue a checkpoint in one process up to step 5; returns the losses of the steps run."""
    shutil.rmtree(out, ignore_errors=True)
    return common.train(single, task, out, grad_accum=grad_accum, resume=str(checkpoint))["losses"]


# ------------------------------------------------------------------ layouts (multi-process)
@pytest.mark.distributed
def test_tensor_parallel_2_matches_single_process_and_resumes_across_layouts(tmp_path, single):
    """TP=2: forward and 5 losses; its step-3 checkpoint resumed at TP=1, a single-process
    step-3 checkpoint resumed at TP=2; the trained model exported whole from the shards."""
    for task in common.TASKS:
        reference(single, task, 1, tmp_path)  # also writes the single-process checkpoints
    out = tmp_path / "tp2"
    check_ok(launch(2, [str(out), "--tp", "2", "--save-every", "3", "--resume-from", str(tmp_path / "reference-{task}-1"),
                            "--count-collectives"]))
    runs = compare_run(out, single, 1, tmp_path)
    # Megatron's cost: per layer 2 all-reduces forward (attention out, MLP out) and 2 backward
    # (the inputs of QKV and of the MLP), plus one for the vocabulary-sharded embedding lookup.
    layers = common.tiny_config("classify").num_hidden_layers
    assert json.loads((out / "collectives.json").read_text()) == {"forward": 2 * layers + 1, "backward": 2 * layers}
    for task in common.TASKS:
        step3 = out / task / "checkpoints" / "step-00000003"
        assert (step3 / "dcp" / ".metadata").is_file()
        resumed = resume_single(single, task, step3, tmp_path / f"resume-{task}", grad_accum=1)
        assert_close(resumed, runs[task]["losses"][3:], f"{task}: TP=2 checkpoint resumed at TP=1")
        at_tp2 = json.loads((out / f"resumed-{task}.json").read_text())["losses"]
        assert_close(at_tp2, runs[task]["losses"][3:], f"{task}: single-process checkpoint resumed at TP=2")
    # Exported from the TP shards (checkpoint model/ and save_pretrained): the whole trained model.
    from megabert.modeling.heads import MegatronBertForPreTraining

    expected = MegatronBertForPreTraining.from_pretrained(
        tmp_path / "reference-pretrain-1" / "checkpoints" / "step-00000005" / "model"
    ).state_dict()
    for folder in (out / "pretrain" / "checkpoints" / "step-00000005" / "model", out / "pretrain" / "final"):
        exported = MegatronBertForPreTraining.from_pretrained(folder).state_dict()
        assert exported.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.allclose(exported[name], value, atol=TOL), f"{folder}: {name}"


@pytest.mark.distributed
def test_data_parallel_2_matches_single_process_and_resumes_at_dp1(tmp_path, single):
    """DP=2 (DDP, batch 4 per rank) = one process with 2 accumulated micro-batches of 4."""
    out = tmp_path / "dp2"
    check_ok(launch(2, [str(out), "--save-every", "3"]))
    runs = compare_run(out, single, 2, tmp_path)
    for task in common.TASKS:
        step3 = out / task / "checkpoints" / "step-00000003"
        resumed = resume_single(single, task, step3, tmp_path / f"resume-{task}", grad_accum=2)
        assert_close(resumed, runs[task]["losses"][3:], f"{task}: DP=2 checkpoint resumed at DP=1")


@pytest.mark.distributed
def test_tensor_2_by_data_2_matches_single_process(tmp_path, single):
    """4 processes: 2 TP groups of 2, gradients averaged over the DP pairs."""
    out = tmp_path / "tp2dp2"
    check_ok(launch(4, [str(out), "--tp", "2"], timeout=150))
    compare_run(out, single, 2, tmp_path)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_data_parallel_matches_single_process(tmp_path, single):
    out = tmp_path / "fsdp"
    check_ok(launch(2, [str(out), "--dp-mode", "fsdp", "--save-every", "3"]))
    runs = compare_run(out, single, 2, tmp_path)
    step3 = out / "pretrain" / "checkpoints" / "step-00000003"
    resumed = resume_single(single, "pretrain", step3, tmp_path / "resume", grad_accum=2)
    assert_close(resumed, runs["pretrain"]["losses"][3:], "FSDP checkpoint resumed in one process")


@pytest.mark.distributed
def test_megatron_checkpoint_sharded_tp2_starts_a_tp2_run(tmp_path):
    """A Megatron-LM checkpoint saved at TP=2 loads straight into a TP=2 run, same outputs."""
    from megabert.convert.megatron_lm import convert_hf_to_megatron

    model = common.build_model("pretrain")
    model.config.unpad_inputs = None  # as a loaded model runs: unpadded in eval mode
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    megatron = tmp_path / "megatron"
    convert_hf_to_megatron(hf, megatron, tensor_parallel=2)
    assert len(list(megatron.rglob("mp_rank_01*"))) >= 1
    out = tmp_path / "run"
    check_ok(launch(2, [str(out), "--tp", "2", "--megatron", str(megatron)]))
    result = json.loads((out / "megatron.json").read_text())
    expected = common.forward_outputs(model, "pretrain")
    for name, value in expected.items():
        assert_close(result["forward"][name], value, f"Megatron TP=2 forward {name}")


# ---------------------------------------------------------------------------------- faults
@pytest.mark.distributed
def test_a_dead_rank_stops_the_others_with_a_clear_message(tmp_path):
    out = tmp_path / "die"
    results = launch(2, [str(out), "--tasks", "classify", "--heartbeat", "5"], timeout=60,
                     env={"MEGABERT_TEST_FAULT": "die"})
    assert results[1].returncode == 1  # the crash itself
    survivor = results[0]
    assert survivor.returncode == EXIT_PEER_FAILURE, survivor.stderr[-2000:]
    assert "rank 0: distributed training stopped: a collective failed" in survivor.stderr
    assert "gone: rank 1 (no heartbeat for" in survivor.stderr
    assert "Traceback" not in survivor.stderr
    assert survivor.seconds < 60


@pytest.mark.distributed
def test_a_frozen_rank_is_caught_by_the_heartbeat(tmp_path):
    """Rank 1 stops (SIGSTOP) but keeps its sockets: only the heartbeat notices, in ~2 s."""
    out = tmp_path / "freeze"
    results = launch(2, [str(out), "--tasks", "classify", "--heartbeat", "2", "--timeout", "120"], timeout=60,
                     env={"MEGABERT_TEST_FAULT": "freeze"}, until=[0])
    survivor = results[0]
    assert results[1].returncode is None  # frozen until the launcher killed it
    assert survivor.returncode == EXIT_PEER_FAILURE, survivor.stderr[-2000:]
    assert "rank 1 has sent no heartbeat" in survivor.stderr
    assert "--heartbeat-timeout 2 s" in survivor.stderr
    assert survivor.seconds < 60


# --------------------------------------------------------------------- checks (one process)
def test_tensor_parallel_must_divide_heads_mlp_and_vocabulary():
    config = common.tiny_config("pretrain")
    check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 4)
    with pytest.raises(UserError, match=r"--tensor-parallel 3 does not divide the model's 4 attention heads.*1, 2, 4"):
        check_tensor_parallel(config, 3)
    config.num_attention_heads, config.intermediate_size = 8, 60
    with pytest.raises(UserError, match="does not divide the MLP width intermediate_size=60"):
        check_tensor_parallel(config, 8)
    config.intermediate_size, config.vocab_size = 64, 131
    with pytest.raises(UserError, match=r"does not divide the vocabulary \(131 rows.*e\.g\. 256.*--replicate-vocab"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 2, shard_vocab=False)


def test_a_bad_layout_is_refused_before_the_model_is_touched():
    model = common.build_model("classify")
    model.config.num_attention_heads = 4
    ctx = ParallelContext(ParallelConfig(tensor_parallel=3, device="cpu"), rank=0, world_size=3, local_rank=0,
                          device=torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="does not divide the model's 4 attention heads"):
        ctx.wrap_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.num_heads == 4 for m in model.modules() if hasattr(m, "num_heads"))


def test_world_and_settings_are_checked():
    assert mesh_shape(8, 2) == (4, 2)
    with pytest.raises(UserError, match="--tensor-parallel 3 does not divide the world size 4"):
        mesh_shape(4, 3)
    with pytest.raises(UserError, match=r"needs 2 processes.*torchrun --nproc-per-node 2"):
        setup_parallel(ParallelConfig(tensor_parallel=2, device="cpu"))
    with pytest.raises(UserError, match="--data-parallel must be one of ddp, fsdp, got 'zero'"):
        ParallelConfig(data_parallel="zero").validate()
    with pytest.raises(UserError, match="--tensor-parallel must be an integer >= 1, got 0"):
        ParallelConfig(tensor_parallel=0).validate()
    with pytest.raises(UserError, match="--dist-timeout must be a positive"):
        ParallelConfig(timeout_s=0).validate()


def test_world_size_without_the_rest_of_torchrun_env_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT is not"):
        setup_parallel(ParallelConfig(device="cpu"))


def test_data_parallel_ranks_share_the_batches_without_overlap():
    batches = list(range(12))
    a, b, c = (DataParallelSource(batches, r, 3) for r in range(3))
    take = lambda s, start: [x for _, x in zip(range(3), s.batches(start))]  # noqa: E731
    assert take(a, 0) == [0, 3, 6] and take(b, 0) == [1, 4, 7] and take(c, 0) == [2, 5, 8]
    assert take(b, 2) == [7, 10, 1]  # resumes at global micro-batch 2 * 3, cycling the list


def test_shard_batches_reslices_a_loader_like_the_single_process_order(single):
    data = common.SyntheticData("classify")
    one = ResumableLoader(data, 4, common.collate, shuffle=True, seed=3)
    flat = [i for _, b in zip(range(4), one.index_batches(0)) for i in b]
    for rank in range(2):
        ctx = ParallelContext(ParallelConfig(device="cpu"), 0, 1, 0, torch.device("cpu"))
        ctx.dp, ctx.dp_rank = 2, rank  # as rank `rank` of two data-parallel ranks would
        sharded = ctx.shard_batches(one)
        assert (sharded.rank, sharded.world_size, sharded.global_batch) == (rank, 2, 8)
        got = [b for _, b in zip(range(2), sharded.index_batches(0))]
        assert got == [flat[4 * rank : 4 * rank + 4], flat[8 + 4 * rank : 12 + 4 * rank]]


def test_hooks_refuse_a_model_that_was_never_sharded():
    from megabert.train.distributed.parallel import ParallelHooks
    from megabert.train.engine.trainer import LossModule

    ctx = ParallelContext(ParallelConfig(tensor_parallel=2, device="cpu"), 0, 2, 0, torch.device("cpu"))
    hooks = ParallelHooks(ctx)
    with pytest.raises(UserError, match="the model was not sharded for tensor parallel 2 / ddp: .*wrap_model"):
        hooks.wrap(LossModule(common.build_model("classify"), lambda m, b: m(**b)))
