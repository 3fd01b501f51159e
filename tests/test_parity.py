"""Parity with `transformers` (4.37.2 and 5.x) for all nine classes: outputs, losses and gradients within 1e-5.

The reference model is built and saved by `transformers`; ours is loaded from that folder
through our own loader, so the test covers the checkpoint layout as well as the math. The
exact tests load with ``unpad_inputs=False`` (the reference's values at every position); the
default load (unpadded in eval mode) is checked on real tokens, where it must agree too.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import megabert
from tests.conftest import TINY, padded_batch
from tests.reference import legacy_cache, to_tuple

pytestmark = pytest.mark.reference

CLASSES = [
    "MegatronBertModel",
    "MegatronBertForPreTraining",
    "MegatronBertForMaskedLM",
    "MegatronBertForCausalLM",
    "MegatronBertForNextSentencePrediction",
    "MegatronBertForSequenceClassification",
    "MegatronBertForMultipleChoice",
    "MegatronBertForTokenClassification",
    "MegatronBertForQuestionAnswering",
]
ATOL = 1e-5


def _inputs(name: str) -> dict:
    ids, mask, types = padded_batch(3, 10, TINY["vocab_size"], seed=1)
    g = torch.Generator().manual_seed(2)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if name == "MegatronBertForPreTraining":
        labels = torch.full_like(ids, -100)
        labels[:, 2] = ids[:, 2]
        labels[0, 7] = 5
        inputs.update(labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    elif name in ("MegatronBertForMaskedLM", "MegatronBertForCausalLM"):
        labels = ids.masked_fill(mask == 0, -100)
        inputs.update(labels=labels)
    elif name == "MegatronBertForNextSentencePrediction":
        inputs.update(labels=torch.tensor([1, 0, 1]))
    elif name == "MegatronBertForSequenceClassification":
        inputs.update(labels=torch.tensor([2, 0, 1]))
    elif name == "MegatronBertForTokenClassification":
        inputs.update(labels=torch.randint(0, 3, ids.shape, generator=g).masked_fill(mask == 0, -100))
    elif name == "MegatronBertForQuestionAnswering":
        inputs.update(start_positions=torch.tensor([1, 3, 40]), end_positions=torch.tensor([4, 3, 2]))
    elif name == "MegatronBertForMultipleChoice":
        # (batch 2, choices 3, seq 10): reuse the padded rows as the choices of each example
        inputs = {k: torch.stack([v, v.roll(1, 0)]) for k, v in inputs.items()}
        inputs.update(labels=torch.tensor([2, 0]))
    return inputs


def _config_kwargs(name: str) -> dict:
    kwargs = dict(TINY, num_labels=3)
    if name == "MegatronBertForCausalLM":
        kwargs["is_decoder"] = True
    if name == "MegatronBertForQuestionAnswering":
        kwargs["num_labels"] = 2
    return kwargs


def _compare(ref, ours, path: str = "output", keep: torch.Tensor | None = None) -> None:
    """ref == ours within ATOL, recursively; ``keep`` (batch, seq): compare those positions only."""
    if not isinstance(ref, (torch.Tensor, tuple, list)):
        ref = legacy_cache(ref)  # a transformers 5.x Cache object
    if isinstance(ref, (tuple, list)):
        assert len(ref) == len(ours), path
        for i, (a, b) in enumerate(zip(ref, ours)):
            _compare(a, b, f"{path}[{i}]", keep)
        return
    assert ref.shape == ours.shape, f"{path}: {ref.shape} vs {ours.shape}"
    if keep is not None:
        rows = keep.reshape(-1, keep.shape[-1])  # multiple choice: (batch * choices, seq)
        for positions in (keep, rows):
            if ref.shape[: positions.dim()] == positions.shape:
                ref, ours = ref[positions], ours[positions]
                break
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0, msg=lambda m: f"{path}: {m}")


@pytest.fixture(scope="module")
def saved_references(tmp_path_factory):
    """Each reference class with random weights, saved by `transformers`."""
    folders = {}
    for name in CLASSES:
        torch.manual_seed(0)
        ref = getattr(transformers, name)(transformers.MegatronBertConfig(**_config_kwargs(name)))
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_outputs_losses_and_gradients_match_reference(name, attn, saved_references):
    folder = saved_references[name]
    ref = getattr(transformers, name).from_pretrained(folder).eval()
    ours = getattr(megabert, name).from_pretrained(folder, attn_implementation=attn, unpad_inputs=False).eval()
    inputs = _inputs(name)
    want_attn = attn == "eager"  # attention weights force the eager path; sdpa runs without them
    ref_out = ref(**inputs, output_hidden_states=True, output_attentions=want_attn)
    our_out = ours(**inputs, output_hidden_states=True, output_attentions=want_attn)

    assert list(our_out.keys()) == list(ref_out.keys())
    for key in ref_out.keys():
        _compare(ref_out[key], our_out[key], key)

    if "loss" in ref_out.keys():
        ref_out.loss.backward()
        our_out.loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        our_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        assert set(our_grads) == set(ref_grads)
        for pname, grad in ref_grads.items():
            torch.testing.assert_close(our_grads[pname], grad, atol=ATOL, rtol=0, msg=lambda m: f"grad {pname}: {m}")


@pytest.mark.parametrize("name", CLASSES)
def test_unpadded_inference_is_equal_on_real_tokens(name, saved_references):
    """unpad_inputs=None runs padded batches unpadded in eval mode: the reference's values at
    every real token, zeros at pads; losses equal but for QA's (pads left out of its softmax)."""
    folder = saved_references[name]
    ref = getattr(transformers, name).from_pretrained(folder).eval()
    ours = getattr(megabert, name).from_pretrained(folder).eval()
    ours.config.unpad_inputs = None  # unpadded in eval mode, padded in training mode
    inputs = _inputs(name)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref_out = ref(**inputs, output_hidden_states=True)
        our_out = ours(**inputs, output_hidden_states=True)
    assert list(our_out.keys()) == list(ref_out.keys())
    for key in ref_out.keys():
        if key == "loss" and name == "MegatronBertForQuestionAnswering":
            continue  # pads are left out of the start/end softmax when unpadded
        if key == "past_key_values":
            continue  # decoders never unpad (their mask is causal)
        _compare(ref_out[key], our_out[key], key, keep)
    if name != "MegatronBertForCausalLM":
        hidden = our_out.hidden_states[-1]  # (batch [* choices], seq, hidden)
        assert torch.count_nonzero(hidden[~keep.reshape(hidden.shape[:2])]) == 0, "pad positions of an unpadded run are zero"


@pytest.mark.parametrize("name", ["MegatronBertModel", "MegatronBertForPreTraining", "MegatronBertForQuestionAnswering"])
def test_return_dict_false_gives_reference_tuple(name, saved_references):
    folder = saved_references[name]
    ref = getattr(transformers, name).from_pretrained(folder).eval()
    ours = getattr(megabert, name).from_pretrained(folder, unpad_inputs=False).eval()
    inputs = _inputs(name)
    ref_out = ref(**inputs, output_hidden_states=True, return_dict=False)
    our_out = ours(**inputs, output_hidden_states=True, return_dict=False)
    assert isinstance(our_out, tuple) and len(our_out) == len(ref_out)
    _compare(ref_out, our_out)
    # ModelOutput indexing and to_tuple agree with the tuple form
    as_dict = ours(**inputs, output_hidden_states=True)
    _compare(as_dict.to_tuple(), our_out)
    _compare(as_dict[0], our_out[0])


def test_saved_by_us_loads_in_transformers_identically(tmp_path, saved_references):
    for name in CLASSES:
        ours = getattr(megabert, name).from_pretrained(saved_references[name], unpad_inputs=False).eval()
        ours.save_pretrained(tmp_path / name)
        auto = {
            "MegatronBertModel": transformers.AutoModel,
            "MegatronBertForPreTraining": transformers.AutoModelForPreTraining,
            "MegatronBertForMaskedLM": transformers.AutoModelForMaskedLM,
            "MegatronBertForCausalLM": transformers.AutoModelForCausalLM,
            "MegatronBertForNextSentencePrediction": transformers.AutoModelForNextSentencePrediction,
            "MegatronBertForSequenceClassification": transformers.AutoModelForSequenceClassification,
            "MegatronBertForMultipleChoice": transformers.AutoModelForMultipleChoice,
            "MegatronBertForTokenClassification": transformers.AutoModelForTokenClassification,
            "MegatronBertForQuestionAnswering": transformers.AutoModelForQuestionAnswering,
        }[name]
        ref, info = auto.from_pretrained(tmp_path / name, output_loading_info=True)
        assert type(ref).__name__ == name
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        inputs = {k: v for k, v in _inputs(name).items() if "label" not in k and "positions" not in k}
        _compare(to_tuple(ref.eval()(**inputs)), ours(**inputs).to_tuple(), name)


def test_round_trip_ours_hf_ours_is_bit_exact(tmp_path, saved_references):
    first = megabert.MegatronBertForPreTraining.from_pretrained(saved_references["MegatronBertForPreTraining"])
    first.save_pretrained(tmp_path / "ours")
    transformers.MegatronBertForPreTraining.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    second = megabert.MegatronBertForPreTraining.from_pretrained(tmp_path / "hf")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_unpadded_qa_loss_leaves_pads_out_of_the_softmax(saved_references):
    """A documented difference (README, "Differences from transformers"): unpadded, pad positions
    take no part in the start/end softmax; padded (unpad_inputs=False), the reference's loss."""
    import torch.nn.functional as F

    folder = saved_references["MegatronBertForQuestionAnswering"]
    ref = transformers.MegatronBertForQuestionAnswering.from_pretrained(folder).eval()
    ours = megabert.MegatronBertForQuestionAnswering.from_pretrained(folder, unpad_inputs=True).eval()
    inputs = _inputs("MegatronBertForQuestionAnswering")
    with torch.no_grad():
        ref_out = ref(**inputs)
        our_out = ours(**inputs)
        exact = megabert.MegatronBertForQuestionAnswering.from_pretrained(folder, unpad_inputs=False).eval()(**inputs)
    torch.testing.assert_close(exact.loss, ref_out.loss, atol=ATOL, rtol=0)
    pads = inputs["attention_mask"] == 0
    seq = pads.shape[1]
    positions = [inputs[k].clamp(0, seq) for k in ("start_positions", "end_positions")]
    want = sum(
        F.cross_entropy(logits.masked_fill(pads, float("-inf")), target, ignore_index=seq)
        for logits, target in zip((ref_out.start_logits, ref_out.end_logits), positions)
    ) / 2
    torch.testing.assert_close(our_out.loss, want, atol=ATOL, rtol=0)
    assert abs(our_out.loss.item() - ref_out.loss.item()) > 1e-3
