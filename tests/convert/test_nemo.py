""".nemo archives built from NeMo's documented layout convert with the reference model's logits.

The archive is a tar (plain or gzip) of ``model_config.yaml``, ``model_weights.ckpt`` (TP = 1)
or ``mp_rank_XX/model_weights.ckpt`` (TP > 1), and the vocabulary under a hash-prefixed name.
The weights are NeMo MegatronBertModel's state dict: Megatron-LM's legacy key layout under
``model.``; they are made by megatron_fixtures.py from a reference ``transformers`` model.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import pytest
import torch

import megabert
from megabert.cli import main
from megabert.convert.megatron_lm import convert_megatron_to_hf
from megabert.convert.nemo import convert_nemo_to_hf
from megabert.convert.reader import _flatten
from megabert.errors import UserError
from tests.convert.megatron_fixtures import TINY_MEGATRON, Layout, batch, megatron_shards, reference_model

ATOL = 1e-5
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(80)]
YAML = """\
target: nemo.collections.nlp.models.language_modeling.megatron_bert_model.MegatronBertModel
micro_batch_size: 4
tensor_model_parallel_size: {tp}
pipeline_model_parallel_size: 1
encoder_seq_length: 40
max_position_embeddings: {positions}
num_layers: {layers}
hidden_size: {hidden}
ffn_hidden_size: {ffn}
num_attention_heads: {heads}
init_method_std: 0.02
hidden_dropout: 0.1
layernorm_epsilon: {eps}
normalization: layernorm
activation: gelu
bert_binary_head: {binary}
precision: 32
tokenizer:
  library: megatron
  type: BertWordPieceLowerCase
  model: null
  vocab_file: nemo:3f2a9c1b_vocab.txt
  merge_file: null
"""


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def write_nemo(path, reference, tp: int = 1, gzip: bool = False, binary_head: bool = True, extra=()) -> None:
    """A .nemo archive of ``reference`` split over ``tp`` tensor-parallel ranks."""
    cfg = reference.config
    shards = megatron_shards(reference, Layout(), tp=tp, binary_head=binary_head)
    yaml = YAML.format(
        tp=tp, positions=cfg.max_position_embeddings, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        ffn=cfg.intermediate_size, heads=cfg.num_attention_heads, eps=cfg.layer_norm_eps, binary=str(binary_head).lower(),
    )  # fmt: skip
    with tarfile.open(path, "w:gz" if gzip else "w") as archive:
        _add(archive, "./model_config.yaml", yaml.encode())
        _add(archive, "./3f2a9c1b_vocab.txt", ("\n".join(VOCAB) + "\n").encode())
        for (_, rank), ckpt in sorted(shards.items()):
            state = {f"model.{k}": v for k, v in _flatten(ckpt["model"]).items()}
            name = "./model_weights.ckpt" if tp == 1 else f"./mp_rank_{rank:02d}/model_weights.ckpt"
            _add(archive, name, _state_bytes(state))
        for name, data in extra:
            _add(archive, name, data)


@pytest.mark.parametrize("tp,gzip", [(1, False), (1, True), (2, False), (2, True)], ids=["tp1-tar", "tp1-gz", "tp2-tar", "tp2-gz"])
def test_nemo_converts_with_equal_logits(tmp_path, tp, gzip):
    reference = reference_model()
    src = tmp_path / "bert.nemo"
    write_nemo(src, reference, tp=tp, gzip=gzip)
    out = convert_nemo_to_hf(src, tmp_path / "hf")
    config = megabert.MegatronBertConfig.from_pretrained(out)
    assert config.layer_norm_eps == TINY_MEGATRON["layer_norm_eps"] and config.num_hidden_layers == 4
    inputs = batch(96)
    model = megabert.MegatronBertForPreTraining.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        got, want = model(**inputs), reference(**inputs)
    torch.testing.assert_close(got.prediction_logits, want.prediction_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.seq_relationship_logits, want.seq_relationship_logits, atol=ATOL, rtol=0)
    # the archive's vocabulary became the tokenizer, lower-casing per its config
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("do_lower_case") is True
    assert (out / "vocab.txt").read_text().split() == VOCAB
    assert not any(p.name.startswith(".") for p in out.iterdir())  # scratch files removed


def test_nemo_through_cli_and_megatron_autodetect(tmp_path, capsys):
    reference = reference_model(binary_head=False)
    src = tmp_path / "bert.nemo"
    write_nemo(src, reference, binary_head=False)
    assert main(["convert", "nemo", str(src), str(tmp_path / "a")]) == 0
    assert main(["convert", "megatron", str(src), str(tmp_path / "b")]) == 0
    for name in ("a", "b"):
        model = megabert.MegatronBertForMaskedLM.from_pretrained(tmp_path / name, attn_implementation="eager")
        with torch.no_grad():
            torch.testing.assert_close(model(**batch(96)).logits, reference(**batch(96)).logits, atol=ATOL, rtol=0)


def test_malicious_weights_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buffer = io.BytesIO()
    torch.save({"model.x": Evil()}, buffer)
    src = tmp_path / "evil.nemo"
    with tarfile.open(src, "w") as archive:
        _add(archive, "model_config.yaml", YAML.format(tp=1, positions=40, layers=1, hidden=32, ffn=64, heads=4, eps=1e-5, binary="true").encode())
        _add(archive, "model_weights.ckpt", buffer.getvalue())
    with pytest.raises(UserError, match=r"refusing to load .*evil\.nemo:model_weights\.ckpt: its pickle refers to print, which is not allowed"):
        convert_nemo_to_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a bare pickle in place of the weights is refused too
    with tarfile.open(src, "w") as archive:
        _add(archive, "model_config.yaml", b"num_layers: 1\n")
        _add(archive, "model_weights.ckpt", pickle.dumps(Evil()))
    with pytest.raises(UserError, match=r"refusing to load .*evil\.nemo:model_weights\.ckpt: it is a bare pickle"):
        convert_nemo_to_hf(src, tmp_path / "out")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_members_are_refused_before_writing(tmp_path, kind):
    reference = reference_model()
    src = tmp_path / "work" / "bad.nemo"
    src.parent.mkdir()
    extra = []
    if kind == "dotdot":
        extra = [("../escaped.txt", b"x")]
    elif kind == "absolute":
        extra = [(str(tmp_path / "abs-escaped.txt"), b"x")]
    write_nemo(src, reference, extra=extra)
    if kind == "symlink":
        with tarfile.open(src, "a") as archive:
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"refusing to read .*bad\.nemo: tar member"):
        convert_nemo_to_hf(src, tmp_path / "work" / "out")
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, OUT included


def test_wrong_model_kind(tmp_path):
    src = tmp_path / "gpt.nemo"
    with tarfile.open(src, "w") as archive:
        _add(archive, "model_config.yaml", b"target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel\n")
    with pytest.raises(UserError, match=r"is a MegatronGPTModel model, not a MegatronBERT"):
        convert_megatron_to_hf(src, tmp_path / "out")


def test_convert_nemo_to_hf_is_exported_at_the_top_level():
    from megabert.convert.nemo import convert_nemo_to_hf

    assert megabert.convert_nemo_to_hf is convert_nemo_to_hf and "convert_nemo_to_hf" in megabert.__all__
