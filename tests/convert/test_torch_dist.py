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
* ``filesystem_async._process_memory`` -> 0 (it needs psutil, which is not installed);
* at pipeline-parallel size 2 (the worker), ``torch.Tensor.cuda`` -> identity while the model is
  built: the last stage's copy of the tied word embeddings is moved to the GPU to be
  all-reduced with the first stage's.

The forward stubs (global memory buffer, CUDA RNG tracker) are test_megatron_core.py's.

The export direction (``megabert convert to-megatron --format torch_dist``) is checked at the
end: megatron-core's own ``dist_checkpointing.load`` reads the export into its BertModel.
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


def _torchrun(root, tied: bool, mode: str) -> None:
    """torch_dist_worker.py on 2 gloo CPU processes under torch.distributed.run: saves into ``root``."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("torch_dist_worker.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(worker), str(root), "tied" if tied else "untied", mode]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((root / "iter_0000010").glob("*.distcp"))) == 4  # 2 ranks x 2 writer buckets


# slow: about 20 s each on 2 cores (`make test-slow`); the layout-independence of torch_dist is
# what they show, the TP=1 tests cover the mapping itself.
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tensor_parallel_2_torch_dist_converts_exactly(tmp_path, tied):
    """TP=2 under torch.distributed.run (gloo, 2 CPU processes): torch_dist_worker.py saves, we convert."""
    root = tmp_path / "tp2"
    _torchrun(root, tied, "tp")
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


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_pipeline_parallel_2_torch_dist_converts_like_tp1(tmp_path, cpu_save, cpu_forward, tied):
    """PP=2 (2 layers per stage; embeddings on stage 0, heads and the tied copy on stage 1) = the TP=1 model.

    The worker and this process fill every weight from its global checkpoint key and layer
    (torch_dist_worker.fill_by_key), so the PP=2 save and the TP=1 save hold one model. Both
    convert to the same HF weights, bit for bit, with the TP=1 model's logits.
    """
    from safetensors.torch import load_file

    from tests.convert.torch_dist_worker import fill_by_key, pipeline_stage

    _torchrun(tmp_path / "pp2", tied, "pp")
    model = pipeline_stage(tied, 4, rank=0, world=1)  # one stage: the whole model
    fill_by_key(model)
    save_torch_dist(model, tmp_path / "tp1", _args(tied, num_layers=4))
    # one global checkpoint layout (keys, shapes, chunk per layer), whichever ranks wrote it
    assert _layout(tmp_path / "pp2" / "iter_0000010") == _layout(tmp_path / "tp1" / "iter_0000010")

    pp2 = load_file(convert_megatron_to_hf(tmp_path / "pp2", tmp_path / "hf-pp2") / "model.safetensors")
    tp1 = load_file(convert_megatron_to_hf(tmp_path / "tp1", tmp_path / "hf-tp1") / "model.safetensors")
    assert sorted(pp2) == sorted(tp1) and ("cls.predictions.decoder.weight" in pp2) is not tied
    for key in tp1:
        assert torch.equal(pp2[key], tp1[key]), key
    inputs = batch(VOCAB)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        lm_logits, binary_logits = model(inputs["input_ids"], inputs["attention_mask"], tokentype_ids=inputs["token_type_ids"])
        got = megabert.MegatronBertForPreTraining.from_pretrained(tmp_path / "hf-pp2", attn_implementation="eager")(**inputs)
    assert megabert.MegatronBertConfig.from_pretrained(tmp_path / "hf-pp2").num_hidden_layers == 4
    torch.testing.assert_close(got.prediction_logits[real], lm_logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.seq_relationship_logits, binary_logits, atol=ATOL, rtol=0)


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


# ----------------------------------------------------------------------------- export (HF -> torch_dist)


def _bert_from_args(args):
    """megatron-core's BertModel (local spec) built from a checkpoint's args, as Megatron-LM's BERT builds it."""
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, layernorm_epsilon=args.layernorm_epsilon, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return BertModel(
        config, num_tokentypes=2 if args.bert_binary_head else 0, transformer_layer_spec=bert_layer_local_spec,
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        add_binary_head=args.bert_binary_head,
    ).eval()  # fmt: skip


def _layout(folder):
    """Every entry of a torch_dist folder's .metadata: tensors with shape, dtype and chunks; byte objects."""
    from megabert.safe_pickle import safe_load_dcp_metadata

    out = {}
    for key, entry in safe_load_dcp_metadata(folder / ".metadata").state_dict_metadata.items():
        if hasattr(entry, "chunks"):
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks)
            out[key] = (tuple(entry.size), entry.properties.dtype, chunks)
        else:
            out[key] = "bytes"
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_exported_torch_dist_loads_into_megatron_core(tmp_path, cpu_save, cpu_forward, tied):
    """HF -> torch_dist -> megatron-core's own dist_checkpointing.load into its BertModel: the same logits."""
    from megatron.core import dist_checkpointing

    from megabert.convert.megatron_lm import convert_hf_to_megatron
    from tests.convert.megatron_fixtures import reference_model

    reference = reference_model(tie_word_embeddings=tied)
    if not tied:
        with torch.no_grad():
            reference.cls.predictions.decoder.weight.add_(0.5)  # so that tying it would show
    hf = tmp_path / "hf"
    reference.save_pretrained(hf, safe_serialization=True)
    (hf / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    root = convert_hf_to_megatron(hf, tmp_path / "megatron", ckpt_format="torch_dist")
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "release"
    folder = root / "release"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert json.loads((folder / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1,
    }  # fmt: skip

    # common.pt through megatron-core's own (weights-only) loader, as Megatron-LM's --load reads it.
    # `import megatron.core` allow-lists argparse.Namespace for weights-only loads; other tests'
    # `torch.serialization.safe_globals([Namespace])` blocks take it off again when they end, so
    # put megatron-core's list back as a fresh Megatron-LM process has it.
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()
    common = dist_checkpointing.load_common_state_dict(str(folder))
    args = common["args"]
    assert (common["iteration"], common["checkpoint_version"]) == (0, 3.0)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.ffn_hidden_size) == (4, 32, 4, 64)
    assert (args.padded_vocab_size, args.max_position_embeddings, args.layernorm_epsilon) == (96, 40, 1e-5)
    assert args.untie_embeddings_and_output_weights is not tied and args.bert_binary_head is True
    assert (args.tokenizer_type, args.ckpt_format, args.params_dtype) == ("BertWordPieceLowerCase", "torch_dist", torch.float32)

    model = _bert_from_args(args)
    # Megatron-LM's load_checkpoint: the model's sharded state dict under "model", then load_state_dict
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(loaded["model"], strict=True)
    if not tied:
        assert torch.equal(model.output_layer.weight, reference.cls.predictions.decoder.weight)
    inputs = batch(VOCAB)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        lm_logits, binary_logits = model(inputs["input_ids"], inputs["attention_mask"], tokentype_ids=inputs["token_type_ids"])
        for converted in (megabert.MegatronBertForPreTraining.from_pretrained(hf, attn_implementation="eager"), reference):
            got = converted(**inputs)
            torch.testing.assert_close(lm_logits[real], got.prediction_logits[real], atol=ATOL, rtol=0)
            torch.testing.assert_close(binary_logits, got.seq_relationship_logits, atol=ATOL, rtol=0)

    # The layout is megatron-core's own: its save of the loaded model lists the same entries
    # (keys, global shapes, dtypes, one chunk per layer, the `_extra_state` objects).
    own = tmp_path / "own"
    own.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(own))
    assert _layout(folder) == _layout(own)
