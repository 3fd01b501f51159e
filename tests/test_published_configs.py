"""MegatronBERT configs as published for real checkpoints load and run on every attention path.

The configs keep the published widths, heads, vocabularies and extra keys; only the depth is cut
(one or two layers) so the test stays quick. Each runs eager, SDPA, unpadded and in bf16, and
must equal the reference built from the same config.json and weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import megabert

pytestmark = pytest.mark.reference

BASE = dict(
    model_type="megatron-bert", architectures=["MegatronBertForMaskedLM"], hidden_act="gelu",
    attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1, initializer_range=0.02,
    layer_norm_eps=1e-12, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
    position_embedding_type="absolute", use_cache=True,
)
PUBLISHED = {
    # GatorTron (UF Health): 50176 word-pieces, a Megatron tokenizer_type key.
    "gatortron": dict(BASE, hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=2,
                      vocab_size=50176, tokenizer_type="BertWordPieceCase"),
    # BioMegatron 345M uncased: gelu_new, initializer_range 0.2, the NGC-padded vocabulary.
    "biomegatron": dict(BASE, hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=2,
                        vocab_size=30592, hidden_act="gelu_new", initializer_range=0.2),
    # Erlangshen-MegatronBert-1.3B: 2048 wide with 8 heads, so head_dim 256.
    "erlangshen": dict(BASE, hidden_size=2048, num_attention_heads=8, intermediate_size=8192, num_hidden_layers=1,
                       vocab_size=21248),
    # KBLab's Swedish megatron-bert-base: 64128 word-pieces.
    "kblab": dict(BASE, hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=2,
                  vocab_size=64128),
}


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def published(request, tmp_path_factory):
    """(name, folder, reference model) for one published config, weights saved by transformers."""
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "config.json").write_text(json.dumps(PUBLISHED[request.param]))
    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    reference = transformers.MegatronBertForMaskedLM(config).eval()
    reference.save_pretrained(folder)
    return request.param, folder, reference


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    return dict(input_ids=ids * mask, attention_mask=mask)


@pytest.mark.parametrize("path", ["eager", "sdpa", "unpadded", "bf16"])
def test_published_config_runs_every_attention_path_like_the_reference(published, path):
    name, folder, reference = published
    config = megabert.MegatronBertConfig.from_pretrained(folder)
    assert config.vocab_size == PUBLISHED[name]["vocab_size"] and config.head_dim == (256 if name == "erlangshen" else 64)
    kwargs = dict(attn_implementation="eager" if path == "eager" else "sdpa", unpad_inputs=path == "unpadded")
    if path == "bf16":
        kwargs["dtype"] = torch.bfloat16
    ours = megabert.MegatronBertForMaskedLM.from_pretrained(folder, **kwargs).eval()
    batch = _batch(config.vocab_size)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        want = reference(**batch).logits[keep]
        got = ours(**batch).logits[keep].float()
    scale = want.abs().max().item()
    if path == "bf16":
        # bf16 rounds weights and activations: ours must be as close to the fp32 logits as the
        # reference's own bf16 run is (its error, with a little room), not bit-equal.
        reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
        with torch.no_grad():
            theirs = reference_bf16(**batch).logits[keep].float()
        their_error = (theirs - want).abs().max().item()
        assert (got - want).abs().max().item() <= 1.5 * their_error + 1e-3 * scale
    else:
        torch.testing.assert_close(got, want, atol=1e-5 * max(scale, 1.0), rtol=0)
