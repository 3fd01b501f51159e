"""The PreTrainedModel methods `transformers` documents: resize_token_embeddings, prune_heads,
get/set input and output embeddings, num_parameters; each checked against the reference.

The reference model is built by `transformers` (4.37.2 or 5.x), saved and loaded into megabert,
then both are resized or pruned the same way and compared (logits within 1e-5). 5.x removed
prune_heads and head_mask from MegatronBERT: there pruning is checked against megabert's own
head-masked forward only, and the reference comparisons run on 4.37.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import megabert
from megabert import MegatronBertConfig
from megabert.errors import UserError
from tests.conftest import TINY, padded_batch
from tests.reference import V5, only_v4
from tests.test_parity import CLASSES as ALL_CLASSES

pytestmark = pytest.mark.reference

ATOL = 1e-5
OLD_VOCAB = TINY["vocab_size"]
MLM_CLASSES = ["MegatronBertForMaskedLM", "MegatronBertForPreTraining"]


def _close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


def _scores(model, **inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.prediction_logits if hasattr(out, "prediction_logits") else out.logits


def _pair(tmp_path, name: str, tie: bool = True, **config):
    """(reference, ours) of class ``name`` with the same random weights, both in eval mode.

    The MLM bias is drawn at random too, so that a mix-up of the two bias names would show.
    """
    torch.manual_seed(0)
    kwargs = dict(TINY, tie_word_embeddings=tie, **config)
    ref = getattr(transformers, name)(transformers.MegatronBertConfig(**kwargs))
    if hasattr(ref, "cls") and hasattr(ref.cls, "predictions"):
        with torch.no_grad():
            ref.cls.predictions.decoder.bias.normal_()
    folder = tmp_path / f"ref-{name}-{tie}"
    ref.save_pretrained(folder)
    ours = getattr(megabert, name).from_pretrained(folder, unpad_inputs=False)
    return ref.eval(), ours.eval()


def _batch(vocab: int = OLD_VOCAB):
    ids, mask, types = padded_batch(3, 10, vocab, seed=3)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


# --------------------------------------------------------------------- resize
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", MLM_CLASSES)
@pytest.mark.parametrize("size, multiple", [(110, None), (101, 8), (64, None)], ids=["grow", "pad", "shrink"])
def test_resize_matches_reference(tmp_path, name, tie, size, multiple):
    ref, ours = _pair(tmp_path, name, tie)
    old_embedding = ours.get_input_embeddings().weight.detach().clone()
    old_decoder = ours.get_output_embeddings().weight.detach().clone()
    old_bias = ours.cls.predictions.bias.detach().clone()
    kept = min(OLD_VOCAB, size)
    batch = _batch(kept)  # tokens both vocabularies have
    with torch.no_grad():
        before = _scores(ours, **batch)

    ref_embeddings = ref.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    embeddings = ours.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    new_size = ref_embeddings.weight.shape[0]
    assert new_size == (104 if multiple else size)

    # shapes, config and tying as the reference has them
    decoder, predictions = ours.get_output_embeddings(), ours.cls.predictions
    assert embeddings is ours.get_input_embeddings()
    assert embeddings.weight.shape == ref_embeddings.weight.shape == (new_size, TINY["hidden_size"])
    assert embeddings.num_embeddings == new_size
    assert decoder.weight.shape == ref.get_output_embeddings().weight.shape
    assert decoder.out_features == new_size
    assert ours.config.vocab_size == ref.config.vocab_size == new_size
    assert predictions.bias is decoder.bias and predictions.bias.shape == (new_size,)
    assert (decoder.weight is embeddings.weight) == tie == (ref.get_output_embeddings().weight is ref_embeddings.weight)

    assert torch.equal(embeddings.weight[:kept], old_embedding[:kept])  # old rows untouched
    assert torch.equal(decoder.weight[:kept], old_decoder[:kept])
    assert torch.equal(predictions.bias[:kept], old_bias[:kept])

    with torch.no_grad():
        ours_scores, ref_scores = _scores(ours, **batch), _scores(ref, **batch)
    assert ours_scores.shape == ref_scores.shape == (*batch["input_ids"].shape, new_size)
    _close(ours_scores[..., :kept], ref_scores[..., :kept])
    _close(ours_scores[..., :kept], before[..., :kept])  # the old tokens' scores did not move
    if new_size > OLD_VOCAB:
        # transformers 5.x's mean resizing: new rows at the old rows' mean, plus noise of
        # 1e-9 x their covariance; a tied bias grows by zeros, an untied one by its mean.
        _close(embeddings.weight[OLD_VOCAB:], old_embedding.mean(0).expand(new_size - OLD_VOCAB, -1))
        _close(decoder.weight[OLD_VOCAB:], old_decoder.mean(0).expand(new_size - OLD_VOCAB, -1))
        bias_fill = torch.zeros(()) if tie else old_bias.mean()
        _close(predictions.bias[OLD_VOCAB:], bias_fill.expand(new_size - OLD_VOCAB))
        if V5:
            # the same rule in the reference: new rows within its noise, logits over the whole
            # new vocabulary and on inputs holding new tokens (the two draw their own noise)
            _close(embeddings.weight, ref_embeddings.weight)
            _close(decoder.weight, ref.get_output_embeddings().weight)
            _close(decoder.bias, ref.get_output_embeddings().bias)
            new_tokens = _batch(new_size)
            with torch.no_grad():
                _close(_scores(ours, **new_tokens), _scores(ref, **new_tokens), atol=1e-4)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_resized_model_trains_saves_and_reloads(tmp_path, tie):
    _, ours = _pair(tmp_path, "MegatronBertForMaskedLM", tie)
    ours.resize_token_embeddings(110)
    batch = _batch(110)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = ours(**batch, labels=labels).loss  # labels of the new tokens are in range now
    loss.backward()
    assert ours.get_input_embeddings().weight.grad.shape == (110, TINY["hidden_size"])

    ours.save_pretrained(tmp_path / "resized")
    assert json.loads((tmp_path / "resized" / "config.json").read_text())["vocab_size"] == 110
    back = megabert.MegatronBertForMaskedLM.from_pretrained(tmp_path / "resized", unpad_inputs=False).eval()
    hf = transformers.MegatronBertForMaskedLM.from_pretrained(tmp_path / "resized").eval()
    ours.eval()
    with torch.no_grad():
        expected = ours(**batch).logits
        _close(back(**batch).logits, expected)
        _close(hf(**batch).logits, expected)
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) == tie


def test_resize_without_arguments_and_pad_only(tmp_path):
    ref, ours = _pair(tmp_path, "MegatronBertForMaskedLM")
    embeddings = ours.get_input_embeddings()
    weight = embeddings.weight
    assert ours.resize_token_embeddings() is embeddings and embeddings.weight is weight
    assert ours.config.vocab_size == OLD_VOCAB
    # pad_to_multiple_of alone rounds the current size up
    assert ours.resize_token_embeddings(pad_to_multiple_of=16).weight.shape[0] == 112
    assert ref.resize_token_embeddings(pad_to_multiple_of=16).weight.shape[0] == 112
    assert ours.resize_token_embeddings(112).weight.shape[0] == 112  # same size: a no-op
    assert ours.config.vocab_size == ref.config.vocab_size == 112


def test_resize_with_normal_init():
    ours = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY, tie_word_embeddings=False))
    torch.manual_seed(1)
    ours.resize_token_embeddings(OLD_VOCAB + 2000, mean_resizing=False)
    added = ours.get_input_embeddings().weight[OLD_VOCAB:]
    assert abs(float(added.std()) - ours.config.initializer_range) < 2e-3
    assert torch.equal(ours.cls.predictions.bias[OLD_VOCAB:], torch.zeros(2000))


@pytest.mark.parametrize("name", ["MegatronBertModel", "MegatronBertForSequenceClassification"])
def test_resize_models_without_decoder(tmp_path, name):
    ref, ours = _pair(tmp_path, name, num_labels=3)
    assert ours.get_output_embeddings() is None and ref.get_output_embeddings() is None
    ref.resize_token_embeddings(120)
    ours.resize_token_embeddings(120)
    assert ours.get_input_embeddings().weight.shape == ref.get_input_embeddings().weight.shape == (120, 32)
    assert ours.config.vocab_size == 120
    with torch.no_grad():
        out, expected = ours(**_batch()), ref(**_batch())
    for field in ("last_hidden_state", "logits"):
        if hasattr(expected, field):
            _close(getattr(out, field), getattr(expected, field))


# ---------------------------------------------------------- get/set embeddings
@pytest.mark.parametrize("name", ALL_CLASSES)
def test_get_and_set_embeddings_on_every_class(name):
    kwargs = dict(TINY, is_decoder=name == "MegatronBertForCausalLM")
    ref = getattr(transformers, name)(transformers.MegatronBertConfig(**kwargs))
    ours = getattr(megabert, name)(MegatronBertConfig(**kwargs))
    base = getattr(ours, "bert", ours)
    assert ours.get_input_embeddings() is base.embeddings.word_embeddings
    assert (ours.get_output_embeddings() is None) == (ref.get_output_embeddings() is None)

    replacement = torch.nn.Embedding(OLD_VOCAB, TINY["hidden_size"])
    ours.set_input_embeddings(replacement)
    assert ours.get_input_embeddings() is replacement is base.embeddings.word_embeddings

    decoder = ours.get_output_embeddings()
    if decoder is None:
        with pytest.raises(UserError, match="has no output embeddings"):
            ours.set_output_embeddings(torch.nn.Linear(32, OLD_VOCAB))
        return
    assert decoder is ours.cls.predictions.decoder
    new = torch.nn.Linear(TINY["hidden_size"], OLD_VOCAB)
    ours.set_output_embeddings(new)
    assert ours.get_output_embeddings() is new
    assert ours.cls.predictions.bias is new.bias  # one Parameter under both names
    assert "cls.predictions.bias" in ours.state_dict()
    ours.tie_weights()
    assert new.weight is replacement.weight


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_num_parameters_matches_reference(tmp_path, tie):
    ref, ours = _pair(tmp_path, "MegatronBertForMaskedLM", tie)
    for module in (ref, ours):
        module.bert.encoder.layer[0].requires_grad_(False)
    # 5.x keeps an untied decoder's bias apart from cls.predictions.bias: one vocabulary more.
    extra = OLD_VOCAB if V5 and not tie else 0
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            args = dict(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
            assert ours.num_parameters(**args) + extra == ref.num_parameters(**args), args
    assert ours.num_parameters(only_trainable=True) < ours.num_parameters()


# ---------------------------------------------------------------------- prune
PRUNE = {0: [1, 3], 1: [2]}


def _head_mask() -> torch.Tensor:
    """(layers, heads) zeros at the heads of PRUNE."""
    mask = torch.ones(TINY["num_hidden_layers"], TINY["num_attention_heads"])
    for layer, heads in PRUNE.items():
        mask[layer, heads] = 0
    return mask


@pytest.mark.parametrize("mode", ["eager", "sdpa", "varlen"])
def test_pruned_equals_head_masked_forward(mode):
    torch.manual_seed(0)
    config = MegatronBertConfig(**TINY, attn_implementation="eager" if mode == "eager" else "sdpa",
                                unpad_inputs=mode == "varlen")
    model = megabert.MegatronBertForMaskedLM(config).eval()
    batch = _batch()
    unpruned = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(**batch, head_mask=_head_mask()).logits  # eager, all heads
        model(**batch)  # builds the fused-QKV cache of the unpruned weights
    model.prune_heads(PRUNE)

    attention = model.bert.encoder.layer[0].attention
    assert attention.self.num_heads == 2 and attention.pruned_heads == {1, 3}
    assert attention.self.query.weight.shape == (16, 32) and attention.output.dense.weight.shape == (32, 16)
    assert model.bert.encoder.layer[1].attention.self.num_heads == 3
    assert model.config.pruned_heads == {0: [1, 3], 1: [2]}
    assert model.config.num_attention_heads == 4  # the original count; layers say their own
    keep = batch["attention_mask"].bool()
    with torch.no_grad():  # the fused-QKV cache must be rebuilt from the pruned projections
        _close(model(**batch).logits[keep], expected[keep])
    _close(model(**batch).logits[keep], expected[keep])  # with autograd: no cache
    # A head mask stays indexed by original heads, pruned ones included: pruned(mask) computes
    # unpruned(mask x the pruning's zeros), for a per-layer mask and for one shared by all layers.
    per_layer = torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.25]])
    with torch.no_grad():
        _close(model(**batch, head_mask=_head_mask()).logits, expected)
        for mask in (per_layer, per_layer[1]):
            _close(model(**batch, head_mask=mask).logits, unpruned(**batch, head_mask=mask * _head_mask()).logits)


def test_pruned_decoder_with_cache():
    torch.manual_seed(0)
    config = MegatronBertConfig(**TINY, is_decoder=True)
    model = megabert.MegatronBertForCausalLM(config).eval()
    ids = torch.randint(1, OLD_VOCAB, (2, 6))
    with torch.no_grad():
        expected = model(ids, head_mask=_head_mask()).logits
        model.prune_heads(PRUNE)
        _close(model(ids).logits, expected)
        first = model(ids[:, :4], use_cache=True)
        assert first.past_key_values[0][0].shape[1] == 2  # (batch, kept heads, seq, dim)
        step = model(ids[:, 4:], past_key_values=first.past_key_values, use_cache=True)
    _close(step.logits, expected[:, 4:])


@only_v4("prune_heads")
@pytest.mark.parametrize("name", ["MegatronBertModel", "MegatronBertForMaskedLM", "MegatronBertForPreTraining"])
def test_prune_matches_reference(tmp_path, name):
    ref, ours = _pair(tmp_path, name)
    ref.prune_heads(PRUNE)
    ours.prune_heads(PRUNE)
    ref.prune_heads({0: [0, 1]})  # merged with the earlier prune; head 1 is already gone
    ours.prune_heads({0: [0, 1]})
    assert ours.config.pruned_heads == {layer: sorted(h) for layer, h in ref.config.pruned_heads.items()}
    ref_base, base = getattr(ref, "bert", ref), getattr(ours, "bert", ours)
    for ref_layer, layer in zip(ref_base.encoder.layer, base.encoder.layer):
        assert layer.attention.pruned_heads == ref_layer.attention.pruned_heads
        assert layer.attention.self.num_heads == ref_layer.attention.self.num_attention_heads
    assert set(ours.state_dict()) == set(ref.state_dict())
    for key, tensor in ref.state_dict().items():
        assert ours.state_dict()[key].shape == tensor.shape, key
    with torch.no_grad():
        out, expected = ours(**_batch()), ref(**_batch())
    _close(out[0], expected[0])


def test_saved_pruned_model_reloads(tmp_path):
    ref, ours = _pair(tmp_path, "MegatronBertForMaskedLM")
    ours.prune_heads(PRUNE)
    ours.save_pretrained(tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["pruned_heads"] == {"0": [1, 3], "1": [2]}  # JSON keys are strings, as transformers writes
    back = megabert.MegatronBertForMaskedLM.from_pretrained(tmp_path / "pruned", unpad_inputs=False)
    assert back.config.pruned_heads == {0: [1, 3], 1: [2]}
    assert back.bert.encoder.layer[0].attention.self.query.weight.shape == (16, 32)
    with torch.no_grad():
        expected = ours(**_batch()).logits
        _close(back(**_batch()).logits, expected)
        if not V5:  # 5.x dropped prune_heads: it cannot build the pruned layers to load into
            hf = transformers.MegatronBertForMaskedLM.from_pretrained(tmp_path / "pruned").eval()
            _close(hf(**_batch()).logits, expected)
    # an unpruned config, and a model folder without pruning, write no pruned_heads at all
    megabert.MegatronBertModel(MegatronBertConfig(**TINY)).save_pretrained(tmp_path / "plain")
    assert "pruned_heads" not in json.loads((tmp_path / "plain" / "config.json").read_text())


@only_v4("prune_heads")
def test_pruned_by_transformers_loads_in_megabert(tmp_path):
    ref, _ = _pair(tmp_path, "MegatronBertForPreTraining")
    ref.prune_heads(PRUNE)
    ref.save_pretrained(tmp_path / "hf-pruned")
    ours = megabert.MegatronBertForPreTraining.from_pretrained(tmp_path / "hf-pruned", unpad_inputs=False)
    assert ours.config.pruned_heads == {0: [1, 3], 1: [2]}
    with torch.no_grad():
        _close(ours(**_batch()).prediction_logits, ref(**_batch()).prediction_logits)


def test_pruning_is_idempotent_and_copies_do_not_share_it():
    config = MegatronBertConfig(**TINY)
    model = megabert.MegatronBertModel(config)
    model.prune_heads(PRUNE)
    weight = model.encoder.layer[0].attention.self.query.weight
    model.prune_heads(PRUNE)  # heads already gone are skipped
    assert model.encoder.layer[0].attention.self.query.weight is weight
    model.prune_heads({0: []})  # nothing to prune
    assert config.pruned_heads == {0: [1, 3], 1: [2]}
    other = megabert.MegatronBertModel(config.copy())
    other.prune_heads({1: [0]})
    assert config.pruned_heads == {0: [1, 3], 1: [2]}  # the copy's record is its own
    assert other.config.pruned_heads == {0: [1, 3], 1: [0, 2]}


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, message",
    [
        ((0,), r"new_num_tokens must be a positive integer \(>= 1\), got 0"),
        ((-5,), r"new_num_tokens must be a positive integer \(>= 1\), got -5"),
        ((12.0,), r"new_num_tokens must be a positive integer \(>= 1\), got 12.0"),
        (("100",), r"new_num_tokens must be a positive integer \(>= 1\), got '100'"),
        ((True,), r"new_num_tokens must be a positive integer \(>= 1\), got True"),
        ((100, 0), r"pad_to_multiple_of must be a positive integer \(>= 1\), got 0"),
        ((None, -8), r"pad_to_multiple_of must be a positive integer \(>= 1\), got -8"),
        ((100, 2.5), r"pad_to_multiple_of must be a positive integer \(>= 1\), got 2.5"),
    ],
)
def test_resize_bad_sizes(args, message):
    model = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY))
    with pytest.raises(UserError, match=message):
        model.resize_token_embeddings(*args)
    assert model.config.vocab_size == OLD_VOCAB and model.get_input_embeddings().num_embeddings == OLD_VOCAB


def test_resize_below_the_padding_token():
    model = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY, pad_token_id=20))
    with pytest.raises(UserError, match=r"10 tokens would leave out the padding token \(config.pad_token_id = 20\); "
                                        r"keep at least 21 tokens"):
        model.resize_token_embeddings(10)
    assert model.resize_token_embeddings(21).num_embeddings == 21


@pytest.mark.parametrize(
    "heads, message",
    [
        ({2: [0]}, r"prune_heads: layer 2 does not exist: the model has 2 layers \(0 to 1\)"),
        ({-1: [0]}, r"prune_heads: layer -1 does not exist"),
        ({0: [4]}, r"prune_heads: head 4 of layer 0 is out of range: layers have 4 heads \(0 to 3\)"),
        ({1: [-1]}, r"prune_heads: head -1 of layer 1 is out of range"),
        ({0: [0, 1, 2, 3]}, r"prune_heads: pruning heads \[0, 1, 2, 3\] of layer 0 would remove all 4 heads"),
        ({0: [1.0]}, r"prune_heads: layer 0: head 1.0 is not a head index"),
        ({0: 1}, r"prune_heads: layer 0 must map to a list of head indices, got 1"),
        ([0, 1], r"prune_heads must be a mapping of layer -> list of heads"),
    ],
)
def test_prune_bad_heads(heads, message):
    model = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY))
    with pytest.raises(UserError, match=message):
        model.prune_heads(heads)
    assert model.config.pruned_heads == {}
    assert all(layer.attention.self.num_heads == 4 for layer in model.bert.encoder.layer)


def test_prune_every_remaining_head_over_two_calls():
    model = megabert.MegatronBertForMaskedLM(MegatronBertConfig(**TINY))
    model.prune_heads({0: [0, 1, 2]})
    with pytest.raises(UserError, match=r"pruning heads \[3\] of layer 0 would remove all its remaining heads "
                                        r"\(\[3\]; \[0, 1, 2\] were pruned before\); keep at least one"):
        model.prune_heads({0: [3], 1: [0]})
    assert model.config.pruned_heads == {0: [0, 1, 2]}  # nothing of the refused call was applied
    assert model.bert.encoder.layer[1].attention.self.num_heads == 4


def test_config_with_impossible_pruned_heads(tmp_path):
    megabert.MegatronBertModel(MegatronBertConfig(**TINY)).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    values["pruned_heads"] = {"5": [0]}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(UserError, match=r"config.pruned_heads: layer 5 does not exist: the model has 2 layers"):
        megabert.MegatronBertModel.from_pretrained(tmp_path)
