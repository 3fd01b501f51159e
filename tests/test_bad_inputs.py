"""Every bad input named in the model issue gets a ValueError naming the value and the limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import megabert
from megabert import MegatronBertConfig
from tests.conftest import TINY


@pytest.fixture(scope="module")
def model():
    return megabert.MegatronBertForSequenceClassification(MegatronBertConfig(**TINY, num_labels=3)).eval()


def test_token_id_outside_vocabulary(model):
    ids = torch.tensor([[1, 2, 3], [4, 99, 6]])
    with pytest.raises(ValueError, match=r"token id 99 at \[1, 1\] is outside the vocabulary \[0, 99\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"token id -1 at \[0, 0\]"):
        model(torch.tensor([[-1, 2]]))


def test_token_type_outside_range(model):
    with pytest.raises(ValueError, match=r"token_type_ids: token type 2 at \[0, 2\] is outside the token types \[0, 2\)"):
        model(torch.tensor([[1, 2, 3]]), token_type_ids=torch.tensor([[0, 1, 2]]))


def test_sequence_longer_than_max_positions(model):
    with pytest.raises(ValueError, match=r"sequence length 65 is longer than max_position_embeddings \(64\)"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_mask_and_token_type_shapes_must_match(model):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(1, 5\), expected \(2, 5\)"):
        model(ids, token_type_ids=torch.zeros(1, 5, dtype=torch.long))


def test_both_or_neither_of_ids_and_embeds(model):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="either input_ids or inputs_embeds, not both"):
        model(ids, inputs_embeds=torch.zeros(1, 3, TINY["hidden_size"]))
    with pytest.raises(ValueError, match="pass input_ids or inputs_embeds"):
        model()


def test_classification_labels_out_of_range(model):
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels: label 3 at \[1\] is outside \[0, 3\)"):
        model(ids, labels=torch.tensor([0, 3]))
    tokens = megabert.MegatronBertForTokenClassification(MegatronBertConfig(**TINY, num_labels=2))
    with pytest.raises(ValueError, match=r"label 5 at \[0, 1\] is outside \[0, 2\)"):
        tokens(ids[:1], labels=torch.tensor([[0, 5, -100]]))
    # -100 is allowed anywhere
    tokens(ids[:1], labels=torch.tensor([[0, -100, 1]]))


def test_multiple_choice_needs_3d():
    mc = megabert.MegatronBertForMultipleChoice(MegatronBertConfig(**TINY))
    with pytest.raises(ValueError, match=r"must be 3-D \(batch, num_choices, seq\), got shape \(2, 5\)"):
        mc(torch.ones(2, 5, dtype=torch.long))


def test_checkpoint_shape_mismatch_names_key_and_shapes(tmp_path):
    megabert.MegatronBertModel(MegatronBertConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"embeddings.word_embeddings.weight: checkpoint shape \(99, 32\) does not fit the model's \(120, 32\)"):
        megabert.MegatronBertModel.from_pretrained(tmp_path, vocab_size=120)


def test_folder_without_config(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        megabert.MegatronBertModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        megabert.MegatronBertModel.from_pretrained(tmp_path / "nope")


class _Planted:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickled_code_in_bin_is_not_run(tmp_path):
    MegatronBertConfig(**TINY).save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Planted()
    payload.target = str(marker)
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(99, 32), "evil": payload}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load .*pytorch_model.bin"):
        megabert.MegatronBertModel.from_pretrained(tmp_path)
    assert not marker.exists()
    # the payload is live: plain unpickling would have created the file
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be divisible by config.num_attention_heads \(4\)"):
        MegatronBertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act 'gelu2' is not supported"):
        MegatronBertConfig(hidden_act="gelu2")
    with pytest.raises(ValueError, match="position_embedding_type 'rotary' is not supported"):
        MegatronBertConfig(position_embedding_type="rotary")
    with pytest.raises(ValueError, match=r"num_hidden_layers must be a positive integer, got -1"):
        MegatronBertConfig(num_hidden_layers=-1)
    with pytest.raises(ValueError, match=r"hidden_dropout_prob must be in \[0, 1\), got 1.5"):
        MegatronBertConfig(hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match="problem_type 'ranking' is not supported"):
        MegatronBertConfig(problem_type="ranking")
