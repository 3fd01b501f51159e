"""The documented NGC workflow through the `megabert` command: convert (with the vocabulary), fill-mask, export."""

from __future__ import annotations

import json

import torch

from megabert.cli import main as cli_main
from tests.convert.megatron_fixtures import Layout, megatron_shards, reference_model, write_ngc_zip

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(80)]


def test_ngc_workflow(tmp_path, capsys):
    reference = reference_model(hidden_size=64, num_attention_heads=1)
    ckpt = megatron_shards(reference, Layout(version=None, old_names=True, args=False))[(0, 0)]
    src = write_ngc_zip(tmp_path / "megatron_bert_345m_v0_1_uncased.zip", ckpt, tmp_path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    out = tmp_path / "bert-345m-uncased"

    assert cli_main(["convert", "megatron", str(src), str(out), "--vocab-file", str(vocab), "--lowercase"]) == 0
    err = capsys.readouterr().err
    assert "assuming 1 attention heads" in err and "Megatron's default 1e-05" in err

    assert cli_main(["fill-mask", str(out), "W3 [MASK] w5", "--top-k", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the reference model's best token for the mask ([CLS] w3 [MASK] w5 [SEP]; lower-cased input)
    ids = torch.tensor([[2, 8, 4, 10, 3]])
    with torch.no_grad():
        logits = reference(input_ids=ids).prediction_logits[0, 2]
    best = int(logits.argmax())
    assert best < len(VOCAB)  # (else the check below would compare a padding row)
    assert result["masks"][0][0]["token"] == best
    assert abs(result["masks"][0][0]["score"] - float(logits.softmax(-1)[best])) < 1e-4

    assert cli_main(["convert", "to-megatron", str(out), str(tmp_path / "mlm"), "--tensor-parallel", "1"]) == 0
    assert (tmp_path / "mlm" / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert (tmp_path / "mlm" / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_cli_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert cli_main(["convert", "to-megatron", str(tmp_path), str(tmp_path / "out"), "--tensor-parallel", "2"]) == 2
    assert "out already exists (pass --overwrite to replace it)" in capsys.readouterr().err
