"""The masked-position MLM (+ NSP/SOP) objective equals the full-vocabulary loss, values and gradients."""

from __future__ import annotations

import pytest
import torch

from trainkit import synthetic_batch, tiny_config
from megabert import MegatronBertForPreTraining
from megabert.train.jobs.pretrain import PretrainingEvaluator, PretrainingObjective


def _pair(binary: bool, unpad: bool):
    """Our model with unpadding (the training setting) and a copy running the full padded forward."""
    torch.manual_seed(0)
    ours = MegatronBertForPreTraining(tiny_config(unpad_inputs=unpad), add_binary_head=binary)
    full = MegatronBertForPreTraining(tiny_config(), add_binary_head=binary)
    full.load_state_dict(ours.state_dict())
    return ours.eval(), full.eval()  # dropout off: the two must see the same function


@pytest.mark.parametrize("task", ["nsp", "sop", None])
@pytest.mark.parametrize("unpad", [True, False])
def test_masked_loss_equals_full_loss(task, unpad):
    binary = task is not None
    ours, full = _pair(binary, unpad)
    batch = synthetic_batch(0, batch=4, seq=16, binary=binary)
    assert (batch["attention_mask"] == 0).any()  # padding present
    reference = full(**batch).loss
    out = PretrainingObjective(task)(ours, batch)
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    # And the same gradients for every parameter.
    reference.backward()
    out.loss.backward()
    full_grads = dict(full.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert out.tokens == int(batch["attention_mask"].sum())
    # the tied word embeddings and the decoder shared one gradient tensor: it is dense and complete
    assert not ours.bert.embeddings.word_embeddings.weight.grad.is_sparse


def test_masked_loss_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours, _ = _pair(True, True)
    ours.save_pretrained(tmp_path)
    reference = transformers.MegatronBertForPreTraining.from_pretrained(tmp_path).eval()
    batch = synthetic_batch(8, batch=3, seq=20)
    expected = reference(**batch).loss
    torch.testing.assert_close(PretrainingObjective("nsp")(ours, batch).loss, expected, rtol=1e-5, atol=1e-6)


def test_parts_and_accuracies_by_hand():
    ours, full = _pair(True, True)
    batch = synthetic_batch(4, batch=4, seq=16)
    out = PretrainingObjective("nsp")(ours, batch)
    logits = full(**batch)
    where = batch["labels"] != -100
    mlm_logits = logits.prediction_logits[where]
    mlm = torch.nn.functional.cross_entropy(mlm_logits, batch["labels"][where])
    nsp = torch.nn.functional.cross_entropy(logits.seq_relationship_logits, batch["next_sentence_label"])
    torch.testing.assert_close(out.metrics["mlm_loss"], mlm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["nsp_loss"], nsp, rtol=1e-5, atol=1e-6)
    expected_acc = (mlm_logits.argmax(-1) == batch["labels"][where]).float().mean()
    assert float(out.metrics["mlm_accuracy"]) == pytest.approx(float(expected_acc))
    expected_nsp_acc = (logits.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).float().mean()
    assert float(out.metrics["nsp_accuracy"]) == pytest.approx(float(expected_nsp_acc))


def test_batch_without_masked_tokens_gives_the_binary_loss_only():
    ours, full = _pair(True, True)
    batch = synthetic_batch(0, batch=2, seq=12)
    batch["labels"].fill_(-100)
    out = PretrainingObjective("nsp")(ours, batch)
    nsp = torch.nn.functional.cross_entropy(full(**batch).seq_relationship_logits, batch["next_sentence_label"])
    torch.testing.assert_close(out.loss, nsp, rtol=1e-5, atol=1e-6)
    out.loss.backward()  # still differentiable
    assert ours.cls.predictions.transform.dense.weight.grad is not None


def _batch_stats(model, batch):
    """(summed MLM loss, correct, count, NSP correct, NSP count) from the full forward."""
    out = model(**batch)
    where = batch["labels"] != -100
    logits, labels = out.prediction_logits[where], batch["labels"][where]
    return (
        float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum")),
        int((logits.argmax(-1) == labels).sum()),
        labels.numel(),
        int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum()),
        batch["next_sentence_label"].numel(),
    )


def test_evaluator_pools_tokens_over_batches():
    ours, full = _pair(True, True)
    batches = [synthetic_batch(0, batch=3, seq=16), synthetic_batch(3, batch=2, seq=14)]
    with torch.no_grad():
        results = PretrainingEvaluator(lambda: iter(batches), "nsp", max_batches=5)(ours)
        first_only = PretrainingEvaluator(lambda: iter(batches), "nsp", max_batches=1)(ours)
        stats = [_batch_stats(full, b) for b in batches]
    loss, correct, count, nsp_correct, nsp_count = (sum(column) for column in zip(*stats))
    # Pooled over tokens (not a mean of per-batch means).
    assert results["mlm_loss"] == pytest.approx(loss / count, rel=1e-5)
    assert results["loss"] == results["mlm_loss"]
    assert results["mlm_accuracy"] == pytest.approx(correct / count)
    assert results["nsp_accuracy"] == pytest.approx(nsp_correct / nsp_count)
    # max_batches=1 evaluates the first batch only.
    loss1, correct1, count1, nsp1, n1 = stats[0]
    assert first_only["mlm_loss"] == pytest.approx(loss1 / count1, rel=1e-5)
    assert first_only["nsp_accuracy"] == pytest.approx(nsp1 / n1)
