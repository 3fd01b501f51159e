"""MegatronBertForPreTraining.pretraining_loss: forward's loss, computed at the labelled positions only."""

from __future__ import annotations

import pytest
import torch

import megabert
from megabert.config import MegatronBertConfig
from megabert.errors import UserError

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 99, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[1, 5] = 7
    labels[3, [4, 9]] = ids[3, [4, 9]]
    types = (torch.arange(12) >= 6).long().expand(4, -1)
    return ids * mask, mask, types, labels, torch.tensor([0, 1, 1, 0])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_equals_the_forward_loss_and_its_gradients(tied, binary):
    torch.manual_seed(0)
    model = megabert.MegatronBertForPreTraining(MegatronBertConfig(**TINY, tie_word_embeddings=tied),
                                                add_binary_head=binary).train()
    ids, mask, types, labels, nsp = _batch()
    expected = model(ids, mask, types, labels=labels, next_sentence_label=nsp if binary else None).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model.pretraining_loss(ids, labels, attention_mask=mask, token_type_ids=types,
                                 next_sentence_label=nsp if binary else None)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    assert out.mlm_count == 7  # column 2 of 4 rows, (1, 5), (3, 4), (3, 9)
    logits = model(ids, mask, types).prediction_logits
    where = labels != -100
    assert int(out.mlm_correct) == int((logits[where].argmax(-1) == labels[where]).sum())
    assert (out.binary_logits is not None) == binary


def test_refuses_nsp_labels_without_the_head_and_keeps_the_graph_with_nothing_labelled():
    model = megabert.MegatronBertForPreTraining(MegatronBertConfig(**TINY), add_binary_head=False)
    ids, mask, types, labels, nsp = _batch()
    with pytest.raises(UserError, match="no binary"):
        model.pretraining_loss(ids, labels, attention_mask=mask, next_sentence_label=nsp)
    out = model.pretraining_loss(ids, torch.full_like(labels, -100), attention_mask=mask)
    assert out.mlm_count == 0 and float(out.loss) == 0.0 and out.loss.requires_grad
