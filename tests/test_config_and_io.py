"""config.json interchange with `transformers`, and checkpoint files (safetensors, shards, .bin)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

import megabert
from megabert import MegatronBertConfig
from tests.conftest import TINY, padded_batch
from tests.reference import V5

pytestmark = pytest.mark.reference


def test_defaults_are_the_reference_defaults():
    ours = MegatronBertConfig()
    ref = transformers.MegatronBertConfig()
    names = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
        "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id",
        "use_cache", "is_decoder", "add_cross_attention", "tie_word_embeddings", "num_labels", "problem_type",
    ]
    if not V5:
        names.append("position_embedding_type")  # 5.x removed relative position embeddings
    for name in names:
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.vocab_size == 29056 and ours.layer_norm_eps == 1e-12


def test_config_json_both_ways_keeps_unknown_keys(tmp_path):
    ours = MegatronBertConfig(**TINY, id2label={0: "neg", 1: "pos", 2: "neutral"}, my_tool_setting=7)
    ours.save_pretrained(tmp_path / "a")
    ref = transformers.AutoConfig.from_pretrained(tmp_path / "a")
    assert type(ref).__name__ == "MegatronBertConfig"
    assert ref.id2label == {0: "neg", 1: "pos", 2: "neutral"} and ref.num_labels == 3
    assert ref.hidden_size == 32 and ref.my_tool_setting == 7
    ref.save_pretrained(tmp_path / "b")
    back = MegatronBertConfig.from_pretrained(tmp_path / "b")
    assert back.label2id == {"neg": 0, "pos": 1, "neutral": 2}
    assert back.my_tool_setting == 7 and back.extra["my_tool_setting"] == 7
    assert back.hidden_size == 32 and back.num_hidden_layers == 2


def test_runtime_settings_not_written(tmp_path):
    MegatronBertConfig(**TINY, attn_implementation="eager", unpad_inputs=True).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert "attn_implementation" not in data and "unpad_inputs" not in data
    assert data["model_type"] == "megatron-bert"


def test_num_labels_override_rebuilds_labels(tmp_path):
    megabert.MegatronBertModel(MegatronBertConfig(**TINY)).save_pretrained(tmp_path)
    model = megabert.MegatronBertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert model.classifier.out_features == 5 and len(model.config.id2label) == 5


def test_wrong_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        MegatronBertConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_checkpoints_load_in_both_libraries(tmp_path, safe):
    torch.manual_seed(0)
    # Padded execution: the reference's values at pad positions too.
    model = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY, unpad_inputs=False)).eval()
    model.save_pretrained(tmp_path, max_shard_size=20_000, safe_serialization=safe)
    index = json.loads((tmp_path / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")).read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids, mask, types = padded_batch()
    expected = model(ids, mask, types).logits
    ours = megabert.MegatronBertForMaskedLM.from_pretrained(tmp_path, unpad_inputs=False)
    torch.testing.assert_close(ours(ids, mask, types).logits, expected, atol=0, rtol=0)
    ref = transformers.MegatronBertForMaskedLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(ref(ids, mask, types).logits, expected, atol=1e-5, rtol=0)
    # saving again unsharded removes the old shards
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_head_missing_from_checkpoint_is_initialised_and_named(tmp_path):
    megabert.MegatronBertModel(MegatronBertConfig(**TINY)).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = megabert.MegatronBertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    messages = " ".join(str(w.message) for w in caught)
    assert "classifier.weight" in messages and "newly initialised" in messages
    base = megabert.MegatronBertModel.from_pretrained(tmp_path)
    assert torch.equal(model.bert.encoder.ln.weight, base.encoder.ln.weight)


def test_unexpected_keys_are_reported(tmp_path):
    megabert.MegatronBertForPreTraining(MegatronBertConfig(**TINY)).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        megabert.MegatronBertForMaskedLM.from_pretrained(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "were not used" in messages and "bert.pooler.dense.weight" in messages


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_and_auto(tmp_path, dtype):
    megabert.MegatronBertModel(MegatronBertConfig(**TINY)).to(dtype).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).split(".")[1]
    assert megabert.MegatronBertModel.from_pretrained(tmp_path).dtype == torch.float32
    assert megabert.MegatronBertModel.from_pretrained(tmp_path, dtype="auto").dtype == dtype
    assert megabert.MegatronBertModel.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        megabert.MegatronBertModel.from_pretrained(tmp_path, dtype="int8")
