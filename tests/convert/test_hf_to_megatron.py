"""HF -> Megatron-LM legacy checkpoint -> HF: bit-exact, for every TP x PP grid; the written layout itself."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from megabert.convert.megatron_lm import convert_hf_to_megatron, convert_megatron_to_hf
from megabert.errors import UserError
from tests.convert.megatron_fixtures import fuse_rows, reference_model


def _save(tmp_path, model, name="hf", tokenizer_lowercase: bool | None = True):
    folder = tmp_path / name
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_lowercase is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": tokenizer_lowercase}))
    return folder


def _state(folder):
    return load_file(str(folder / "model.safetensors"))


def _read(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
def test_round_trip_is_bit_exact(tmp_path, tp, pp):
    source = _save(tmp_path, reference_model(seed=tp + 10 * pp))
    megatron = convert_hf_to_megatron(source, tmp_path / "megatron", tensor_parallel=tp, pipeline_parallel=pp)
    back = convert_megatron_to_hf(megatron, tmp_path / "back")
    before, after = _state(source), _state(back)
    before.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings: stored once
    before.pop("cls.predictions.decoder.bias", None)
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    old, new = (json.loads((f / "config.json").read_text()) for f in (source, back))
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act"):  # fmt: skip
        assert old[field] == new[field], field


@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
def test_round_trip_every_checkpoint_version(tmp_path, version):
    source = _save(tmp_path, reference_model())
    megatron = convert_hf_to_megatron(source, tmp_path / "m", tensor_parallel=2, checkpoint_version=version)
    back = convert_megatron_to_hf(megatron, tmp_path / "back")
    after = _state(back)
    for key, tensor in _state(source).items():
        if not key.startswith("cls.predictions.decoder"):
            assert torch.equal(tensor, after[key]), key


def test_round_trip_without_binary_head(tmp_path):
    source = _save(tmp_path, reference_model(binary_head=False))
    megatron = convert_hf_to_megatron(source, tmp_path / "m", tensor_parallel=2, pipeline_parallel=2)
    first = _read(megatron / "release" / "mp_rank_00_000" / "model_optim_rng.pt")
    last = _read(megatron / "release" / "mp_rank_01_001" / "model_optim_rng.pt")
    assert "tokentype_embeddings" not in first["model"]["language_model"]["embedding"]
    assert "binary_head" not in last["model"] and "pooler" not in last["model"]["language_model"]
    assert last["args"].bert_binary_head is False
    back = convert_megatron_to_hf(megatron, tmp_path / "back")
    after, before = _state(back), _state(source)
    assert sorted(after) == sorted(k for k in before if not k.startswith("cls.predictions.decoder"))
    for key in after:
        assert torch.equal(before[key], after[key]), key


def test_written_layout_is_megatrons(tmp_path):
    """Nesting, names, QKV layout, shards, args and tracker as Megatron-LM's BERT writes them."""
    model = reference_model()
    sd = model.state_dict()
    source = _save(tmp_path, model)
    out = convert_hf_to_megatron(source, tmp_path / "m", tensor_parallel=2, pipeline_parallel=2, iteration=1500)
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1500"
    assert sorted(p.name for p in (out / "iter_0001500").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001",
    ]  # fmt: skip
    ckpt = _read(out / "iter_0001500" / "mp_rank_01_001" / "model_optim_rng.pt")
    assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 1500
    args = ckpt["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.ffn_hidden_size) == (4, 32, 4, 64)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, 96)
    assert args.layernorm_epsilon == 1e-5 and args.tokenizer_type == "BertWordPieceLowerCase"
    # Megatron pads the tokenizer's vocabulary to a multiple of this x TP: 96 = 48 x 2
    assert args.make_vocab_size_divisible_by == 16
    model_dict = ckpt["model"]
    encoder = model_dict["language_model"]["encoder"]
    # pipeline rank 1 holds global layers 2, 3 as local 0, 1; tensor rank 1 holds heads 2, 3
    q, k, v = (sd[f"bert.encoder.layer.3.attention.self.{x}.weight"][16:] for x in ("query", "key", "value"))
    assert torch.equal(encoder["layers.1.self_attention.query_key_value.weight"], fuse_rows(q, k, v, 2, 3.0))
    assert torch.equal(encoder["layers.0.self_attention.dense.weight"], sd["bert.encoder.layer.2.attention.output.dense.weight"][:, 16:])
    assert torch.equal(encoder["layers.0.mlp.dense_h_to_4h.bias"], sd["bert.encoder.layer.2.intermediate.dense.bias"][32:])
    assert torch.equal(encoder["final_layernorm.weight"], sd["bert.encoder.ln.weight"])
    assert torch.equal(model_dict["lm_head"]["bias"], sd["cls.predictions.bias"][48:])
    assert torch.equal(model_dict["lm_head"]["layernorm.weight"], sd["cls.predictions.transform.LayerNorm.weight"])
    assert torch.equal(model_dict["binary_head"]["weight"], sd["cls.seq_relationship.weight"])
    assert torch.equal(model_dict["word_embeddings_for_head"]["weight"], sd["bert.embeddings.word_embeddings.weight"][48:])
    assert "embedding" not in model_dict["language_model"]
    first = _read(out / "iter_0001500" / "mp_rank_00_000" / "model_optim_rng.pt")["model"]
    assert torch.equal(
        first["language_model"]["embedding"]["word_embeddings"]["weight"], sd["bert.embeddings.word_embeddings.weight"][:48]
    )
    assert "encoder" in first["language_model"] and "final_layernorm.weight" not in first["language_model"]["encoder"]
    assert "lm_head" not in first
    # each file holds only its own slices (no whole-tensor storages behind views)
    sizes = [p.stat().st_size for p in (out / "iter_0001500").glob("*/model_optim_rng.pt")]
    total = sum(t.numel() * 4 for t in sd.values()) - sd["cls.predictions.decoder.weight"].numel() * 4
    assert sum(sizes) < 0.75 * total * 2


def test_old_version_uses_old_names(tmp_path):
    source = _save(tmp_path, reference_model())
    out = convert_hf_to_megatron(source, tmp_path / "m", checkpoint_version=0)
    ckpt = _read(out / "release" / "mp_rank_00" / "model_optim_rng.pt")
    assert ckpt["checkpoint_version"] == 0.0
    transformer = ckpt["model"]["language_model"]["transformer"]
    assert "layers.0.attention.query_key_value.weight" in transformer
    sd = reference_model().state_dict()
    q, k, v = (sd[f"bert.encoder.layer.0.attention.self.{x}.weight"] for x in ("query", "key", "value"))
    assert torch.equal(transformer["layers.0.attention.query_key_value.weight"], torch.cat([q, k, v]))
    assert ckpt["args"].model_parallel_size == 1


def test_vocab_not_divisible_by_tp_is_padded(tmp_path):
    source = _save(tmp_path, reference_model(vocab_size=97))
    out = convert_hf_to_megatron(source, tmp_path / "m", tensor_parallel=2)
    back = _state(convert_megatron_to_hf(out, tmp_path / "back"))
    assert back["bert.embeddings.word_embeddings.weight"].shape[0] == 98
    before = _state(source)["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(back["bert.embeddings.word_embeddings.weight"][:97], before)
    assert not back["bert.embeddings.word_embeddings.weight"][97:].any()


# ------------------------------------------------------------------------------ bad input


def test_heads_not_divisible_by_tp(tmp_path):
    source = _save(tmp_path, reference_model())
    with pytest.raises(UserError, match=r"num_attention_heads=4 is not divisible by the tensor-parallel degree 3"):
        convert_hf_to_megatron(source, tmp_path / "m", tensor_parallel=3)
    assert not (tmp_path / "m").exists()


def test_layers_not_divisible_by_pp(tmp_path):
    source = _save(tmp_path, reference_model())
    with pytest.raises(UserError, match=r"num_hidden_layers=4 is not divisible by the pipeline-parallel degree 3"):
        convert_hf_to_megatron(source, tmp_path / "m", pipeline_parallel=3)


def test_unknown_version_on_export(tmp_path):
    source = _save(tmp_path, reference_model())
    with pytest.raises(UserError, match=r"--checkpoint-version: unknown checkpoint_version 2\.5"):
        convert_hf_to_megatron(source, tmp_path / "m", checkpoint_version=2.5)


def test_untied_output_layer_cannot_be_written(tmp_path):
    model = reference_model(tie_word_embeddings=False)
    with torch.no_grad():
        model.cls.predictions.decoder.weight.add_(1.0)
    source = _save(tmp_path, model)
    with pytest.raises(UserError, match=r"output layer \(cls\.predictions\.decoder\.weight\) is not tied"):
        convert_hf_to_megatron(source, tmp_path / "m")


def test_task_head_is_refused(tmp_path):
    import transformers

    from tests.convert.megatron_fixtures import TINY_MEGATRON

    model = transformers.MegatronBertForSequenceClassification(transformers.MegatronBertConfig(**TINY_MEGATRON))
    source = _save(tmp_path, model)
    with pytest.raises(UserError, match=r"has no masked-LM head"):
        convert_hf_to_megatron(source, tmp_path / "m")


def test_shape_disagreeing_with_config_on_export(tmp_path):
    source = _save(tmp_path, reference_model())
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 48
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"intermediate\.dense\.weight has shape \[64, 32\], but config\.json implies \[48, 32\]"):
        convert_hf_to_megatron(source, tmp_path / "m")


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*nothing does not exist"):
        convert_hf_to_megatron(tmp_path / "nothing", tmp_path / "m")


# ----------------------------------------------------------------------------- --format torch_dist
# (that megatron-core's own dist_checkpointing.load reads the export: test_torch_dist.py)


def _untied(seed: int = 0, **overrides):
    model = reference_model(seed=seed, tie_word_embeddings=False, **overrides)
    with torch.no_grad():
        model.cls.predictions.decoder.weight.add_(0.5)  # really untied: differs from the embeddings
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_torch_dist_round_trip_is_bit_exact(tmp_path, tied):
    source = _save(tmp_path, reference_model(seed=3) if tied else _untied(seed=3))
    megatron = convert_hf_to_megatron(source, tmp_path / "megatron", ckpt_format="torch_dist")
    back = convert_megatron_to_hf(megatron, tmp_path / "back")
    before, after = _state(source), _state(back)
    if tied:
        before.pop("cls.predictions.decoder.weight", None)
    before.pop("cls.predictions.decoder.bias", None)
    assert ("cls.predictions.decoder.weight" in after) is not tied
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    old, new = (json.loads((f / "config.json").read_text()) for f in (source, back))
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act"):  # fmt: skip
        assert old[field] == new[field], field
    assert new["tie_word_embeddings"] is tied


def test_torch_dist_bf16_without_binary_head(tmp_path):
    model = reference_model(binary_head=False, seed=5).to(torch.bfloat16)
    source = _save(tmp_path, model)
    megatron = convert_hf_to_megatron(source, tmp_path / "megatron", ckpt_format="torch_dist", iteration=12)
    assert (megatron / "latest_checkpointed_iteration.txt").read_text() == "12"
    common = _read(megatron / "iter_0000012" / "common.pt")  # weights-only, Namespace the one class allowed
    args = common["args"]
    assert (common["iteration"], args.iteration, args.bf16, args.params_dtype) == (12, 12, True, torch.bfloat16)
    assert args.bert_binary_head is False and args.untie_embeddings_and_output_weights is False
    back = convert_megatron_to_hf(megatron, tmp_path / "back")
    before, after = _state(source), _state(back)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    assert not any(k.startswith(("bert.pooler", "cls.seq_relationship")) for k in after)
    for key, tensor in before.items():
        if not key.startswith("cls.predictions.decoder"):
            assert torch.equal(tensor, after[key]), key


def test_torch_dist_through_the_cli(tmp_path, capsys):
    from megabert.cli import main as cli_main

    reference = _untied(seed=7)
    source = _save(tmp_path, reference)
    out = tmp_path / "mlm"
    assert cli_main(["convert", "to-megatron", str(source), str(out), "--format", "torch_dist"]) == 0
    assert sorted(p.name for p in (out / "release").iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert cli_main(["convert", "megatron", str(out), str(tmp_path / "back")]) == 0
    after = _state(tmp_path / "back")
    assert torch.equal(after["cls.predictions.decoder.weight"], reference.cls.predictions.decoder.weight)
    capsys.readouterr()

    refused = [
        (["--format", "torch_dist", "--tensor-parallel", "2"], "--format torch_dist takes no --tensor-parallel/--pipeline-parallel"),
        (["--format", "torch_dist", "--pipeline-parallel", "1"], "--format torch_dist takes no --tensor-parallel"),
        (["--format", "torch_dist", "--checkpoint-version", "2"], "--format torch_dist takes no --checkpoint-version"),
        ([], "--tensor-parallel T is required with --format legacy"),
    ]  # fmt: skip
    for extra, message in refused:
        assert cli_main(["convert", "to-megatron", str(source), str(tmp_path / "no"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "no").exists()


def test_torch_dist_bad_options(tmp_path):
    source = _save(tmp_path, reference_model())
    with pytest.raises(UserError, match=r"a torch_dist checkpoint is not split by rank .*--tensor-parallel 2"):
        convert_hf_to_megatron(source, tmp_path / "m", ckpt_format="torch_dist", tensor_parallel=2)
    with pytest.raises(UserError, match=r"Megatron Core's layout \(checkpoint version 3\), not 1"):
        convert_hf_to_megatron(source, tmp_path / "m", ckpt_format="torch_dist", checkpoint_version=1.0)
    with pytest.raises(UserError, match=r"unknown checkpoint format 'zarr' \(use legacy or torch_dist\)"):
        convert_hf_to_megatron(source, tmp_path / "m", ckpt_format="zarr")
    assert not (tmp_path / "m").exists()


def test_torch_dist_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the shards are written (here: metadata.json) leaves neither OUT nor a temp folder."""
    import types

    from megabert.convert import to_torch_dist

    source = _save(tmp_path, reference_model())
    written = []

    def fail(*args, **kwargs):
        written.extend(p.name for p in tmp_path.glob(".m.*/release/*"))
        raise OSError("simulated failure")

    monkeypatch.setattr(to_torch_dist, "json", types.SimpleNamespace(dumps=fail))
    with pytest.raises(OSError, match="simulated failure"):
        convert_hf_to_megatron(source, tmp_path / "m", ckpt_format="torch_dist")
    assert {".metadata", "__0_0.distcp", "common.pt"} <= set(written)  # it did fail late
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
