"""Megatron-LM -> HF: every layout converts to a model whose outputs equal the reference's (1e-6).

The reference is a `transformers` MegatronBERT with random weights; the Megatron checkpoint is
built from those weights by the independent writer in ``megatron_fixtures``. The converted
folder is loaded with `transformers` (the converter's own check) and with megabert.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open

import megabert
from megabert.convert.megatron_lm import convert_megatron_to_hf
from megabert.errors import UserError
from tests.convert.megatron_fixtures import (
    Layout,
    batch,
    megatron_shards,
    reference_model,
    write_ngc_zip,
    write_save_folder,
)

ATOL = 1e-6  # the converter's check: same weights, same `transformers` math
# megabert's own model against `transformers` (parity tolerance of tests/test_parity.py): its
# kernels may order float operations differently (e.g. the tanh GELU), off by ~1e-6.
OURS_ATOL = 1e-5


def _outputs(model: torch.nn.Module, binary_head: bool) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**batch())
    if binary_head:
        return [out.prediction_logits, out.seq_relationship_logits]
    return [out.logits]


def _check_converted(out, reference: torch.nn.Module, binary_head: bool = True) -> None:
    """Converted folder == reference, loaded by transformers (1e-6) and by megabert."""
    expected = _outputs(reference, binary_head)
    name = "MegatronBertForPreTraining" if binary_head else "MegatronBertForMaskedLM"
    theirs = getattr(transformers, name).from_pretrained(out).eval()
    ours = getattr(megabert, name).from_pretrained(out, attn_implementation="eager")
    mask = batch()["attention_mask"].bool()
    for got_t, got_o, want in zip(_outputs(theirs, binary_head), _outputs(ours, binary_head), expected):
        assert got_t.shape == want.shape
        torch.testing.assert_close(got_t, want, atol=ATOL, rtol=0)
        if got_o.dim() == 3:  # megabert leaves pad positions out of the comparison contract
            got_o, want = got_o[mask], want[mask]
        torch.testing.assert_close(got_o, want, atol=OURS_ATOL, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [name]
    assert config["layer_norm_eps"] == reference.config.layer_norm_eps


def _convert(tmp_path, shards, **kwargs):
    src = write_save_folder(tmp_path / "megatron", shards)
    return convert_megatron_to_hf(src, tmp_path / "hf", **kwargs)


def test_ngc_zip_without_version_or_args(tmp_path):
    """NGC style: a zip holding a legacy-format (pre-1.6 torch) file, no checkpoint_version, no args."""
    reference = reference_model(hidden_size=64, num_attention_heads=1)  # head size 64, as the 345M models
    ckpt = megatron_shards(reference, Layout(version=None, old_names=True, args=False))[(0, 0)]
    assert "checkpoint_version" not in ckpt and "args" not in ckpt
    src = write_ngc_zip(tmp_path / "megatron_bert_345m_v0_1_uncased.zip", ckpt, tmp_path)
    out = convert_megatron_to_hf(src, tmp_path / "hf")
    _check_converted(out, reference)
    # Megatron's epsilon when the checkpoint does not say, not BERT's 1e-12
    assert json.loads((out / "config.json").read_text())["layer_norm_eps"] == 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "layout",
    [
        Layout(version=None, old_names=True),
        Layout(version=1.0, old_names=True),
        Layout(version=1.0),
        Layout(version=2.0),
        Layout(version=3.0, old_names=True),
        Layout(version=3.0),
        Layout(version=3.0, late_norm_names=True),
        Layout(core=True),
        Layout(core=True, te_norms=True),
    ],
    ids=["v0", "v1-transformer", "v1-encoder", "v2", "v3-transformer", "v3", "v3-norm-names", "core", "core-te"],
)
def test_layouts_with_tensor_parallel_2(tmp_path, layout):
    reference = reference_model()
    _check_converted(_convert(tmp_path, megatron_shards(reference, layout, tp=2)), reference)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("core", [False, True], ids=["legacy", "core"])
def test_tensor_and_pipeline_parallel(tmp_path, tp, pp, core):
    reference = reference_model(seed=tp * 10 + pp)
    _check_converted(_convert(tmp_path, megatron_shards(reference, Layout(core=core), tp=tp, pp=pp)), reference)


@pytest.mark.parametrize("core", [False, True], ids=["legacy", "core"])
def test_without_binary_head(tmp_path, core):
    reference = reference_model(binary_head=False)
    out = _convert(tmp_path, megatron_shards(reference, Layout(core=core), tp=2, pp=2, binary_head=False))
    _check_converted(out, reference, binary_head=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any(k.startswith(("bert.pooler", "cls.seq_relationship")) for k in keys)
        assert torch.count_nonzero(f.get_tensor("bert.embeddings.token_type_embeddings.weight")) == 0


def test_virtual_pipeline_chunks(tmp_path):
    """Interleaved schedule: each rank holds model0, model1; chunk v of rank p is stage v * P + p."""
    reference = reference_model()
    _check_converted(_convert(tmp_path, megatron_shards(reference, Layout(virtual=2), tp=1, pp=2)), reference)


def test_globally_numbered_pipeline_stages(tmp_path):
    """Some tools number the layers of later stages globally (2, 3 instead of 0, 1): both read."""
    reference = reference_model()
    shards = megatron_shards(reference, Layout(core=True), tp=1, pp=2)
    model = shards[(1, 0)]["model"]
    shards[(1, 0)]["model"] = {k.replace("layers.0.", "layers.2.").replace("layers.1.", "layers.3."): v for k, v in model.items()}
    _check_converted(_convert(tmp_path, shards), reference)


def test_pipeline_stage_with_unexpected_layer_numbers(tmp_path):
    shards = megatron_shards(reference_model(), Layout(core=True), tp=1, pp=2)
    model = shards[(1, 0)]["model"]
    shards[(1, 0)]["model"] = {k.replace("layers.0.", "layers.5.").replace("layers.1.", "layers.6."): v for k, v in model.items()}
    with pytest.raises(UserError, match=r"mp_rank_00_001.*layers start at index 5, expected 0 \(or 2, after the 2 layers"):
        _convert(tmp_path, shards)


def test_untied_output_layer_with_pipeline(tmp_path):
    reference = reference_model(tie_word_embeddings=False)
    with torch.no_grad():
        reference.cls.predictions.decoder.weight.copy_(torch.randn_like(reference.cls.predictions.decoder.weight))
    out = _convert(tmp_path, megatron_shards(reference, Layout(core=True, untied=True), tp=2, pp=2))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    _check_converted(out, reference)


def test_epsilon_and_activation_from_args(tmp_path):
    reference = reference_model(layer_norm_eps=1e-12, hidden_act="gelu_new")
    out = _convert(tmp_path, megatron_shards(reference, Layout()))
    config = json.loads((out / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-12 and config["hidden_act"] == "gelu_new"
    _check_converted(out, reference)


def test_fp16_checkpoint_keeps_dtype(tmp_path):
    reference = reference_model()
    shards = megatron_shards(reference.half(), Layout(), tp=2)
    out = _convert(tmp_path, shards)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("bert.encoder.layer.0.attention.self.query.weight").dtype == torch.float16
        want = reference.state_dict()["bert.encoder.layer.3.attention.self.value.weight"]
        assert torch.equal(f.get_tensor("bert.encoder.layer.3.attention.self.value.weight"), want)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_single_file_and_iteration_folder(tmp_path):
    reference = reference_model()
    shards = megatron_shards(reference, Layout())
    root = write_save_folder(tmp_path / "m", shards, tracker="1200")
    single = root / "iter_0001200" / "mp_rank_00" / "model_optim_rng.pt"
    _check_converted(convert_megatron_to_hf(single, tmp_path / "a"), reference)
    _check_converted(convert_megatron_to_hf(root / "iter_0001200", tmp_path / "b"), reference)


def test_vocab_file_writes_tokenizer(tmp_path):
    reference = reference_model()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(80)]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    out = _convert(tmp_path, megatron_shards(reference, Layout()), vocab_file=vocab_file)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["do_lower_case"] is True  # from args.tokenizer_type BertWordPieceLowerCase
    tokenizer = megabert.MegatronBertTokenizer.from_pretrained(out)
    assert tokenizer("w3 w7")["input_ids"] == [2, 8, 12, 3]
    # the config keeps Megatron's padded row count, not the 85 tokens
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 96


def test_vocab_file_larger_than_embedding(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]))
    with pytest.raises(UserError, match=r"205 tokens but the checkpoint's embedding has only 96 rows"):
        _convert(tmp_path, megatron_shards(reference_model(), Layout()), vocab_file=vocab_file)
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------ bad input


def test_src_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Megatron checkpoint .*nope does not exist"):
        convert_megatron_to_hf(tmp_path / "nope", tmp_path / "hf")


def test_shape_disagreeing_with_config(tmp_path):
    shards = megatron_shards(reference_model(), Layout(), tp=2)
    layer = shards[(0, 1)]["model"]["language_model"]["encoder"]
    layer["layers.1.mlp.dense_h_to_4h.weight"] = torch.zeros(30, 32)
    with pytest.raises(UserError) as info:
        _convert(tmp_path, shards)
    message = str(info.value)
    assert "mp_rank_01" in message and "layers.1.mlp.dense_h_to_4h.weight" in message
    assert "[30, 32]" in message and "[32, 32]" in message and "ffn_hidden_size=64" in message
    assert not (tmp_path / "hf").exists()


def test_unknown_checkpoint_version(tmp_path):
    shards = megatron_shards(reference_model(), Layout(version=4.0))
    with pytest.raises(UserError, match=r"unknown checkpoint_version 4\.0 \(known: 0, 1, 2, 3\)"):
        _convert(tmp_path, shards)


def test_shards_with_different_iterations(tmp_path):
    shards = megatron_shards(reference_model(), Layout(), tp=2)
    shards[(0, 1)]["iteration"] = 8
    with pytest.raises(UserError, match=r"disagree on the iteration \(mp_rank_00: 7, mp_rank_01: 8\)"):
        _convert(tmp_path, shards)


def test_missing_rank_folder(tmp_path):
    shards = megatron_shards(reference_model(), Layout(), tp=2, pp=2)
    del shards[(1, 0)]
    with pytest.raises(UserError, match=r"missing rank folder\(s\) mp_rank_00_001 \(found 3 of 2 tensor x 2 pipeline"):
        _convert(tmp_path, shards)


def test_args_promise_more_ranks_than_found(tmp_path):
    shards = megatron_shards(reference_model(), Layout(), tp=2)
    del shards[(0, 1)]
    with pytest.raises(UserError, match=r"args say tensor_model_parallel_size=2, but 1 tensor-parallel rank"):
        _convert(tmp_path, shards)
    single = write_save_folder(tmp_path / "one", shards) / "release" / "mp_rank_00" / "model_optim_rng.pt"
    with pytest.raises(UserError, match=r"one shard of a checkpoint with tensor_model_parallel_size=2"):
        convert_megatron_to_hf(single, tmp_path / "hf2")


def test_unknown_tensor_is_refused(tmp_path):
    shards = megatron_shards(reference_model(), Layout())
    shards[(0, 0)]["model"]["lm_head"]["extra.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match=r"not part of a Megatron BERT: lm_head\.extra\.weight"):
        _convert(tmp_path, shards)


def test_missing_layer_is_reported(tmp_path):
    shards = megatron_shards(reference_model(), Layout(args=False))
    encoder = shards[(0, 0)]["model"]["language_model"]["encoder"]
    for key in [k for k in encoder if k.startswith("layers.2.mlp")]:
        del encoder[key]
    with pytest.raises(UserError, match=r"incomplete: nothing converts to bert\.encoder\.layer\.2\.intermediate"):
        convert_megatron_to_hf(write_save_folder(tmp_path / "m", shards), tmp_path / "hf", num_attention_heads=4)


def test_unsupported_architecture_is_refused(tmp_path):
    shards = megatron_shards(reference_model(), Layout(extra_args={"apply_residual_connection_post_layernorm": True}))
    with pytest.raises(UserError, match=r"cannot represent this model: apply_residual_connection_post_layernorm"):
        _convert(tmp_path, shards)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import megabert.convert.hf_folder as module  # where the HF folder is written

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_safetensors", interrupted)
    ckpt = megatron_shards(reference_model(), Layout(version=None, args=False))[(0, 0)]
    src = write_ngc_zip(tmp_path / "ngc.zip", ckpt, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        convert_megatron_to_hf(src, tmp_path / "out", num_attention_heads=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ngc.zip"]


def test_existing_output_is_not_touched(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        _convert(tmp_path, megatron_shards(reference_model(), Layout()))
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"


def test_heads_guess_without_args_is_overridable(tmp_path):
    reference = reference_model()  # head size 8: the default guess (hidden / 64) cannot apply
    shards = megatron_shards(reference, Layout(version=2.0, args=False))
    src = write_save_folder(tmp_path / "m", shards)
    with pytest.raises(UserError, match=r"saves no args and hidden_size=32 is not a multiple of 64"):
        convert_megatron_to_hf(src, tmp_path / "hf")
    _check_converted(convert_megatron_to_hf(src, tmp_path / "hf", num_attention_heads=4), reference)
    assert math.isclose(json.loads((tmp_path / "hf" / "config.json").read_text())["layer_norm_eps"], 1e-5)
