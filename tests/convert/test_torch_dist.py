"""torch_dist checkpoints written by megatron-core's own ``dist_checkpointing.save`` convert exactly.

The checkpoints are made the way Megatron-LM saves ``--ckpt-format torch_dist``: the model's
``sharded_state_dict()`` plus ``args``, ``iteration`` and ``checkpoint_version`` (which land in
``common.pt``), saved by ``megatron.core.dist_checkpointing.save`` under a one-process gloo group.
megatron-core's BertModel stacks the layers' tensors along a leading num_layers axis.

On this CPU-only machine, megatron-core's save needs these stubs (test-only; conversion never
imports megatron-core):

* ``torch.cuda.synchronize`` -> no-op, and ``torch.cuda.current_device`` -> ``"cpu"`` (the save
  synchronises the device and all-reduces a failure flag on it);
* ``FileSystemWriterAsync.write_preloaded_data_multiproc`` -> the same per-bucket
  ``write_preloaded_data`` calls run in this process, with ``queue.Queue`` instead of the
  forked writers' and the spawned manager's queues;
* ``filesystem_async._process_memory`` -> 0 (it needs psutil, which is not installed).

The forward stubs (global memory buffer, CUDA RNG tracker) are test_megatron_core.py's.
"""

from __future__ import annotations

import argparse
import json
import pickle
import queue
import shutil

import pytest
import torch
import transformers

import megabert
from megabert.convert.megatron_lm import convert_megatron_to_hf
from megabert.errors import UserError
from tests.convert.megatron_fixtures import batch
from tests.convert.torch_dist_worker import stub_cpu_save
from tests.convert.test_megatron_core import EPS, HEADS, HIDDEN, LAYERS, POSITIONS, VOCAB, _bert, cpu_forward, megatron_core  # noqa: F401

pytest.importorskip("megatron.core")
ATOL = 1e-5


@pytest.fixture
def cpu_save(megatron_core, monkeypatch):
    """Let megatron-core's torch_dist save run on the CPU, in this process (see the module docstring)."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    stub_cpu_save(monkeypatch.setattr)


def _args(tied: bool, **overrides) -> argparse.Namespace:
    values = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN, num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS, padded_vocab_size=VOCAB, layernorm_epsilon=EPS,
        tokenizer_type="BertWordPieceLowerCase", tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        untie_embeddings_and_output_weights=not tied, bert_binary_head=True, params_dtype=torch.float32,
        add_bias_linear=True, openai_gelu=False, ckpt_format="torch_dist",
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def save_torch_dist(model, root, args, iteration: int = 10):
    """Megatron-LM's torch_dist save: root/latest_checkpointed_iteration.txt and root/iter_NNNNNNN/."""
    from megatron.core import dist_checkpointing

    state = model.sharded_state_dict()
    state.update(args=args, iteration=iteration, checkpoint_version=3.0)
    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    dist_checkpointing.save(state, str(folder))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return {}


def _checkpoint(saved, tmp_path_factory, tied: bool):
    """One saved checkpoint per tiedness for the module (megatron-core's save is the slow part)."""
    if tied not in saved:
        model = _bert(tied)
        root = save_torch_dist(model, tmp_path_factory.mktemp("torch_dist"), _args(tied))
        saved[tied] = (model, root)
    return saved[tied]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_torch_dist_bert_converts_exactly(tmp_path, tmp_path_factory, cpu_save, cpu_forward, saved, tied):
    model, root = _checkpoint(saved, tmp_path_factory, tied)
    folder = root / "iter_0000010"
    assert (folder / ".metadata").is_file() and list(folder.glob("*.distcp"))
    assert json.loads((folder / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    inputs = batch(VOCAB)
    with torch.no_grad():
        lm_logits, binary_logits = model(inputs["input_ids"], inputs["attention_mask"], tokentype_ids=inputs["token_type_ids"])

    # Both the run folder (tracker file) and the iteration folder itself.
    for src, name in ((root, "hf-run"), (folder, "hf-iter")):
        out = convert_megatron_to_hf(src, tmp_path / name)
        config = megabert.MegatronBertConfig.from_pretrained(out)
        assert config.layer_norm_eps == EPS and config.tie_word_embeddings is tied
        assert config.num_hidden_layers == LAYERS
        real = inputs["attention_mask"].bool()
        ours = megabert.MegatronBertForPreTraining.from_pretrained(out, attn_implementation="eager")
        theirs = transformers.MegatronBertForPreTraining.from_pretrained(out).eval()
        for converted in (ours, theirs):
            with torch.no_grad():
                got = converted(**inputs)
            torch.testing.assert_close(got.prediction_logits[real], lm_logits[real], atol=ATOL, rtol=0)
            torch.testing.assert_close(got.seq_relationship_logits, binary_logits, atol=ATOL, rtol=0)


def test_torch_dist_bf16_keeps_dtype_and_weights(tmp_path, cpu_save):
    model = _bert(True).to(torch.bfloat16)
    root = save_torch_dist(model, tmp_path / "bf16", _args(True, params_dtype=torch.bfloat16, bf16=True))
    out = convert_megatron_to_hf(root, tmp_path / "hf")
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    source = model.state_dict()
    assert torch.equal(weights["bert.embeddings.word_embeddings.weight"], source["embedding.word_embeddings.weight"])
    assert torch.equal(weights["bert.encoder.layer.1.intermediate.dense.weight"], source["encoder.layers.1.mlp.linear_fc1.weight"])
    # the per-head [q, k, v] rows of layer 0's fused QKV
    head = HIDDEN // HEADS
    fused = source["encoder.layers.0.self_attention.linear_qkv.weight"].reshape(HEADS, 3, head, HIDDEN)
    assert torch.equal(weights["bert.encoder.layer.0.attention.self.key.weight"], fused[:, 1].reshape(HIDDEN, HIDDEN))


def _copy(root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target, target / "iter_0000010"


def test_shape_disagreeing_with_args(tmp_path, tmp_path_factory, cpu_save, saved):
    _, root = _checkpoint(saved, tmp_path_factory, True)
    src, folder = _copy(root, tmp_path)
    common = torch.load(folder / "common.pt", weights_only=False)
    common["args"].hidden_size = 48
    torch.save(common, folder / "common.pt")
    with pytest.raises(UserError) as error:
        convert_megatron_to_hf(src, tmp_path / "out")
    message = str(error.value)
    assert "embedding.word_embeddings.weight has shape [96, 32]" in message and "[96, 48]" in message
    assert "hidden_size=48" in message and not (tmp_path / "out").exists()

    common["args"].hidden_size, common["args"].num_layers = HIDDEN, 3
    torch.save(common, folder / "common.pt")
    with pytest.raises(UserError, match=r"tensor encoder\.layers\.\S+ has shape \[2, .*num_layers=3"):
        convert_megatron_to_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_shard_file(tmp_path, tmp_path_factory, cpu_save, saved):
    _, root = _checkpoint(saved, tmp_path_factory, True)
    src, folder = _copy(root, tmp_path)
    victim = sorted(folder.glob("*.distcp"))[-1]
    victim.unlink()
    with pytest.raises(UserError, match=rf"\.metadata names shard file\(s\) {victim.name} that are missing"):
        convert_megatron_to_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_backend(tmp_path, tmp_path_factory, cpu_save, saved):
    _, root = _checkpoint(saved, tmp_path_factory, True)
    src, folder = _copy(root, tmp_path)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    with pytest.raises(UserError, match=r"sharded_backend 'zarr' is not supported \(only 'torch_dist'"):
        convert_megatron_to_hf(src, tmp_path / "out")


def test_malicious_metadata_pickle(tmp_path, tmp_path_factory, cpu_save, saved):
    _, root = _checkpoint(saved, tmp_path_factory, True)
    src, folder = _copy(root, tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match=r"refusing to load .*\.metadata: its pickle refers to builtins\.print"):
        convert_megatron_to_hf(src, tmp_path / "out")


def test_gpt_checkpoint_is_refused(tmp_path, cpu_save):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=True)
    gpt = GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=POSITIONS)
    root = save_torch_dist(gpt, tmp_path / "gpt", _args(True, num_layers=1))
    with pytest.raises(UserError, match=r"is a GPT \(decoder\) checkpoint, not a BERT: found decoder\."):
        convert_megatron_to_hf(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# slow: about 20 s each on 2 cores (`make test-slow`); the layout-independence of torch_dist is
# what they show, the TP=1 tests cover the mapping itself.
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tensor_parallel_2_torch_dist_converts_exactly(tmp_path, tied):
    """TP=2 under torch.distributed.run (gloo, 2 CPU processes): torch_dist_worker.py saves, we convert."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("torch_dist_worker.py")
    root = tmp_path / "tp2"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(worker), str(root), "tied" if tied else "untied"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((root / "iter_0000010").glob("*.distcp"))) == 4  # 2 ranks x 2 writer buckets
    expected = torch.load(root / "expected.pt")
    out = convert_megatron_to_hf(root, tmp_path / "hf")
    assert megabert.MegatronBertConfig.from_pretrained(out).tie_word_embeddings is tied
    inputs, real = expected["inputs"], expected["inputs"]["attention_mask"].bool()
    for converted in (
        megabert.MegatronBertForPreTraining.from_pretrained(out, attn_implementation="eager"),
        transformers.MegatronBertForPreTraining.from_pretrained(out).eval(),
    ):
        with torch.no_grad():
            got = converted(**inputs)
        torch.testing.assert_close(got.prediction_logits[real], expected["lm"][real], atol=ATOL, rtol=0)
        torch.testing.assert_close(got.seq_relationship_logits, expected["binary"], atol=ATOL, rtol=0)


def test_nemo_with_torch_dist_model_weights(tmp_path, cpu_save, cpu_forward):
    """Later NeMo: model_weights/ is a torch_dist folder whose keys carry NeMo's `model.` prefix."""
    import tarfile

    from megatron.core import dist_checkpointing

    from tests.convert.test_nemo import YAML, _add

    model = _bert(True)
    folder = tmp_path / "model_weights"
    folder.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(prefix="model."), str(folder))
    src = tmp_path / "mcore.nemo"
    yaml = YAML.format(tp=1, positions=POSITIONS, layers=LAYERS, hidden=HIDDEN, ffn=4 * HIDDEN, heads=HEADS, eps=EPS, binary="true")
    with tarfile.open(src, "w:gz") as archive:
        _add(archive, "model_config.yaml", yaml.encode())
        for path in sorted(folder.iterdir()):
            _add(archive, f"model_weights/{path.name}", path.read_bytes())
    out = convert_megatron_to_hf(src, tmp_path / "hf")
    inputs, real = batch(VOCAB), batch(VOCAB)["attention_mask"].bool()
    with torch.no_grad():
        lm_logits, binary_logits = model(inputs["input_ids"], inputs["attention_mask"], tokentype_ids=inputs["token_type_ids"])
        got = megabert.MegatronBertForPreTraining.from_pretrained(out, attn_implementation="eager")(**inputs)
    assert megabert.MegatronBertConfig.from_pretrained(out).layer_norm_eps == EPS
    torch.testing.assert_close(got.prediction_logits[real], lm_logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.seq_relationship_logits, binary_logits, atol=ATOL, rtol=0)
