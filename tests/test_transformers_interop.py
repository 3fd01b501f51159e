"""Folders both ways between megabert and the installed transformers (4.37.2 or 5.x).

Run by `make test` beside both generations. The cases here are the ones 5.x broke: an untied
MLM decoder (5.x keeps `cls.predictions.decoder.bias` apart from `cls.predictions.bias`) and the
dtype recorded as "dtype" (5.x) instead of "torch_dtype" (4.x).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import megabert
from megabert import MegatronBertConfig
from tests.conftest import TINY, padded_batch
from tests.reference import to_tuple

pytestmark = pytest.mark.reference

MLM_CLASSES = ["MegatronBertForMaskedLM", "MegatronBertForPreTraining", "MegatronBertForCausalLM"]


def _randomise_biases(model: torch.nn.Module, seed: int) -> None:
    """Non-zero biases everywhere, so a bias that is dropped or zeroed on the way shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=g))


def _logits(model, name: str) -> tuple:
    ids, mask, types = padded_batch(3, 10, TINY["vocab_size"], seed=3)
    with torch.no_grad():
        return to_tuple(model(input_ids=ids, attention_mask=mask, token_type_ids=types))


def _close(a: tuple, b: tuple, atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y.float(), x.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", MLM_CLASSES)
def test_megabert_folder_loads_in_transformers_and_back(name, tied, tmp_path):
    config = MegatronBertConfig(**TINY, tie_word_embeddings=tied, is_decoder=name.endswith("CausalLM"))
    torch.manual_seed(0)
    ours = getattr(megabert, name)(config).eval()
    _randomise_biases(ours, seed=1)
    ours.config.unpad_inputs = False
    ours.save_pretrained(tmp_path / "ours")

    ref, info = getattr(transformers, name).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref.eval()
    _close(_logits(ref, name), _logits(ours, name), atol=1e-5)
    assert (ref.get_output_embeddings().weight is ref.get_input_embeddings().weight) == tied

    ref.save_pretrained(tmp_path / "ref")
    again = getattr(megabert, name).from_pretrained(tmp_path / "ref", unpad_inputs=False)
    _close(_logits(ref, name), _logits(again, name), atol=1e-5)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_folder_with_its_own_decoder_bias_loads(tied, tmp_path):
    """The bias the reference adds is the decoder's; megabert reads that one when present."""
    config = transformers.MegatronBertConfig(**TINY, tie_word_embeddings=tied)
    torch.manual_seed(0)
    ref = transformers.MegatronBertForMaskedLM(config).eval()
    _randomise_biases(ref, seed=2)
    ref.save_pretrained(tmp_path)
    ref = transformers.MegatronBertForMaskedLM.from_pretrained(tmp_path).eval()
    ours = megabert.MegatronBertForMaskedLM.from_pretrained(tmp_path, unpad_inputs=False)
    _close(_logits(ref, "MegatronBertForMaskedLM"), _logits(ours, "MegatronBertForMaskedLM"), atol=1e-5)


def test_bf16_folder_keeps_its_dtype_both_ways(tmp_path):
    torch.manual_seed(0)
    ref = transformers.MegatronBertForMaskedLM(transformers.MegatronBertConfig(**TINY)).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref")
    written = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert "bfloat16" in (written.get("dtype"), written.get("torch_dtype"))
    ours = megabert.MegatronBertForMaskedLM.from_pretrained(tmp_path / "ref", dtype="auto")
    assert ours.dtype == torch.bfloat16
    for key, tensor in ref.state_dict().items():
        if key in ours.state_dict():
            assert torch.equal(ours.state_dict()[key], tensor), key

    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16"
    back = transformers.MegatronBertForMaskedLM.from_pretrained(tmp_path / "ours", **{
        "dtype" if transformers.__version__ >= "5" else "torch_dtype": "auto"})
    assert back.dtype == torch.bfloat16


def test_config_with_only_the_5x_dtype_key(tmp_path):
    MegatronBertConfig(**TINY).save_pretrained(tmp_path)
    megabert.MegatronBertModel(MegatronBertConfig(**TINY)).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    values.pop("torch_dtype")
    values["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert MegatronBertConfig.from_pretrained(tmp_path).torch_dtype == "bfloat16"
    assert megabert.MegatronBertModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["int8", "bfloat17", "complex64"])
def test_unknown_config_dtype_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=rf"config dtype '{bad}' is not a floating-point torch dtype; expected one of float32"):
        MegatronBertConfig(**TINY, dtype=bad)
