"""torch.compile: whole graphs (no graph breaks) for every model class, and compiled == eager.

The default tests use the ``aot_eager`` backend (the same Dynamo capture and AOT autograd as
inductor, without code generation, which takes ~30 s per shape on a small CPU); the inductor
check is marked slow.
"""

from __future__ import annotations

import pytest
import torch

from megabert import MegatronBertConfig
from megabert.modeling.attention import AttentionPlan, additive_mask_from
from megabert.modeling.heads import MODEL_CLASSES
from megabert.modeling.layers import MegatronBertLayer
from tests.conftest import TINY, padded_batch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_config(**overrides) -> MegatronBertConfig:
    return MegatronBertConfig(**{**TINY, **overrides})


def build(task: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if task in ("sequence-classification", "token-classification"):
        overrides.setdefault("num_labels", 3)
    config = tiny_config(is_decoder=task == "causal-lm", **overrides)
    return MODEL_CLASSES[task](config).eval()


def inputs_for(task: str, batch: int = 3, seq: int = 10) -> dict[str, torch.Tensor]:
    ids, mask, types = padded_batch(batch, seq)
    if task == "multiple-choice":  # (batch, choices, seq): the three rows as one question's choices
        ids, mask, types = ids[None], mask[None], types[None]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# ------------------------------------------------------------------- graph breaks
@pytest.mark.parametrize("masked", [False, True])
def test_a_layer_is_one_graph(masked: bool) -> None:
    config = tiny_config()
    layer = MegatronBertLayer(config).eval()
    hidden = torch.randn(3, 10, config.hidden_size)
    _, mask, _ = padded_batch()
    plan = AttentionPlan("sdpa", additive_mask_from(mask[:, None, None, :], torch.float32) if masked else None)
    explanation = torch._dynamo.explain(layer)(hidden, plan)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # fullgraph=True raises on any break; and the captured graph computes the same values.
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, plan)[0], layer(hidden, plan)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("task", list(MODEL_CLASSES))
def test_every_model_is_one_graph(task: str) -> None:
    """Padded inputs, unpadding switched on: compiling takes the masked path, without breaks."""
    model = build(task, unpad_inputs=True)
    with torch.no_grad():  # no_grad: eager inference would take the fused-QKV path; compiling must not
        explanation = torch._dynamo.explain(model)(**inputs_for(task))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    "task,labels",
    [
        ("masked-lm", {"labels": padded_batch()[0]}),
        ("sequence-classification", {"labels": torch.tensor([0, 2, 1])}),
        ("pretraining", {"labels": padded_batch()[0], "next_sentence_label": torch.tensor([0, 1, 0])}),
        ("question-answering", {"start_positions": torch.tensor([1, 2, 3]), "end_positions": torch.tensor([2, 4, 3])}),
    ],
)
def test_losses_do_not_break_the_graph(task: str, labels: dict) -> None:
    """Training mode with labels: the label checks and losses stay in the graph."""
    model = build(task).train()
    explanation = torch._dynamo.explain(model)(**inputs_for(task), **labels)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


# ------------------------------------------------------------- compiled == eager
def test_compiled_matches_eager_at_two_shapes() -> None:
    """One dynamic-shape compile, two padded batches of other shapes.

    The model has unpadding on: eager drops the pad tokens (and zeroes their outputs), while the
    compiled graph takes the masked padded path. So real tokens are compared with the unpadded
    eager run, and every position (pads included) with the eager masked path (unpadding off).
    """
    model = build("masked-lm", unpad_inputs=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch, seq in ((3, 10), (2, 17)):
        batch_inputs = inputs_for("masked-lm", batch, seq)
        real = batch_inputs["attention_mask"].bool()
        with torch.no_grad():
            got = compiled(**batch_inputs).logits
            eager_unpadded = model(**batch_inputs).logits
            model.config.unpad_inputs = False
            eager_masked = model(**batch_inputs).logits
            model.config.unpad_inputs = True
        assert not real.all()
        torch.testing.assert_close(got[real], eager_unpadded[real], rtol=0, atol=1e-5)
        torch.testing.assert_close(got, eager_masked, rtol=0, atol=1e-5)
        assert not torch.allclose(got[0], got[1])  # rows differ: not a constant output


def test_compiled_training_step_matches_eager() -> None:
    """Loss and every gradient of a compiled forward/backward equal eager's."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # comparable runs
    eager_model = build("sequence-classification", **no_dropout).train()
    compiled_model = build("sequence-classification", **no_dropout).train()
    batch_inputs = inputs_for("sequence-classification")
    labels = torch.tensor([0, 2, 1])
    eager_loss = eager_model(**batch_inputs, labels=labels).loss
    eager_loss.backward()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    compiled_loss = compiled(**batch_inputs, labels=labels).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-6)
    for (name, p_eager), (_, p_compiled) in zip(eager_model.named_parameters(), compiled_model.named_parameters()):
        assert p_eager.grad is not None, name
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_inductor_matches_eager() -> None:
    """Inductor's generated CPU code, at two shapes (about a minute on a small CPU)."""
    model = build("question-answering")
    compiled = torch.compile(model, backend="inductor", fullgraph=True, dynamic=True)
    for batch, seq in ((3, 10), (2, 17)):
        batch_inputs = inputs_for("question-answering", batch, seq)
        with torch.no_grad():
            eager = model(**batch_inputs)
            got = compiled(**batch_inputs)
        torch.testing.assert_close(got.start_logits, eager.start_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.end_logits, eager.end_logits, rtol=0, atol=1e-4)
