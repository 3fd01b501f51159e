"""The pretraining job and `megabert pretrain`: outputs that load in megabert and transformers, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainkit import tiny_config
from megabert import MegatronBertForPreTraining
from megabert.cli import main as cli_main
from megabert.data.indexed import write_indexed_dataset
from megabert.data.pretraining import PretrainingDataset, collate_pretraining
from megabert.errors import UserError
from megabert.tokenization import MegatronBertTokenizer
from megabert.train.engine.logging import MetricsConfig, read_metrics
from megabert.train.jobs.pretrain import (
    MODEL_PRESETS,
    PretrainDataConfig,
    build_model_config,
    evaluate_model,
    padded_vocab_size,
    run_pretraining,
)
from megabert.train.engine.trainer import TrainerConfig

QUIET = MetricsConfig(log_every=1, progress=False, tensorboard=False, plot=False)


def pretrain(corpus, out: Path, model: str | Path, steps: int = 4, **data_options):
    options = dict(data=str(corpus["train"]), valid_data=str(corpus["valid"]), seq_length=32, batch_size=4)
    options.update(data_options)
    return run_pretraining(
        model, corpus["tokenizer"], PretrainDataConfig(**options),
        TrainerConfig(out, max_steps=steps, eval_every=2, device="cpu"), metrics=QUIET,
    )


def test_final_model_loads_in_megabert_and_transformers(tmp_path, tiny_corpus, tiny_model_file):
    transformers = pytest.importorskip("transformers")
    result = pretrain(tiny_corpus, tmp_path / "out", tiny_model_file)
    final = tmp_path / "out" / "final"
    assert result.final_dir == final
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= names

    ours = MegatronBertForPreTraining.from_pretrained(final)
    reference = transformers.MegatronBertForPreTraining.from_pretrained(final).eval()
    ours_tok = MegatronBertTokenizer.from_pretrained(final)
    ref_tok = transformers.BertTokenizerFast.from_pretrained(final)
    text, pair = "the red cat runs over the old road .", "a bird sings ."
    ids = ours_tok(text, pair, return_tensors="pt")
    assert ids["input_ids"].tolist() == ref_tok(text, pair, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        a = ours(**{k: ids[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
        b = reference(**{k: ids[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.seq_relationship_logits, b.seq_relationship_logits, rtol=1e-4, atol=1e-4)
    # The trained weights are those of the last checkpoint.
    last = MegatronBertForPreTraining.from_pretrained(result.train.last_checkpoint / "model")
    assert all(torch.equal(x, y) for x, y in zip(ours.state_dict().values(), last.state_dict().values()))

    records = read_metrics(result.metrics_file)
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4]
    assert {"mlm_loss", "mlm_accuracy", "nsp_accuracy"} <= set(valid[0])
    assert result.eval_results["mlm_loss"] == pytest.approx(valid[-1]["mlm_loss"])
    # Evaluating the saved model afterwards gives the job's final numbers (same samples, same masks).
    again = evaluate_model(final, tiny_corpus["valid"], seq_length=32, batch_size=4, max_batches=50, device="cpu")
    assert again == pytest.approx(result.eval_results, rel=1e-6)
    run_config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert run_config["PretrainDataConfig"]["seq_length"] == 32 and run_config["TrainerConfig"]["max_steps"] == 4


def test_first_batch_is_the_datasets_first_samples(tmp_path, tiny_corpus, tiny_model_file):
    """The job feeds PretrainingDataset samples 0..B-1 first (the data position a resume relies on)."""
    seen = []
    from megabert.train.jobs import pretrain as job

    original = job.PretrainingObjective.__call__

    def spy(self, model, batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return original(self, model, batch)

    job.PretrainingObjective.__call__ = spy
    try:
        pretrain(tiny_corpus, tmp_path / "out", tiny_model_file, steps=1, valid_data=None)
    finally:
        job.PretrainingObjective.__call__ = original
    tokenizer = MegatronBertTokenizer.from_pretrained(tiny_corpus["tokenizer"])
    data = PretrainingDataset(tiny_corpus["train"], tokenizer, 32, binary_task="nsp", seed=1234)
    expected = collate_pretraining([data[i] for i in range(4)])
    assert all(torch.equal(seen[0][k], expected[k]) for k in expected)


@pytest.mark.parametrize("task", ["sop", "none"])
def test_cli_pretrain(tmp_path, tiny_corpus, tiny_model_file, capsys, task):
    out = tmp_path / "out"
    code = cli_main([
        "pretrain", "--data", str(tiny_corpus["train"]), "--tokenizer", str(tiny_corpus["tokenizer"]),
        "--model-config", str(tiny_model_file), "--output", str(out), "--max-steps", "2", "--batch-size", "2",
        "--seq-length", "24", "--binary-task", task, "--quiet", "--bf16", "--grad-accum", "2",
        "--schedule", "cosine", "--warmup-steps", "1",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"model: {out / 'final'}" in captured.out
    assert "no --valid-data given: no evaluation during training" in captured.err
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["MegatronBertForPreTraining"]
    assert json.loads((out / "run_config.json").read_text())["TrainerConfig"]["precision"] == "bf16"
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    if task == "sop":
        assert "sop_accuracy" in records[0] and "nsp_accuracy" not in records[0]
    else:  # MLM only: no binary head, no binary metrics, and the loss is the MLM loss
        assert "sop_accuracy" not in records[0] and "nsp_accuracy" not in records[0]
        assert records[0]["loss"] == pytest.approx(records[0]["mlm_loss"])
        state = load_file(str(out / "final" / "model.safetensors"))
        assert not any(k.startswith("cls.seq_relationship") for k in state)


def test_presets_and_vocab_padding():
    assert padded_vocab_size(30522) == 30592 and padded_vocab_size(128) == 128 and padded_vocab_size(129) == 256
    for name, (layers, hidden, heads) in {"tiny": (4, 256, 4), "base": (12, 768, 12), "large": (24, 1024, 16)}.items():
        config = build_model_config(name, 30522, 128)
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, hidden, heads)
        assert config.vocab_size == 30592 and config.intermediate_size == 4 * hidden and config.unpad_inputs
    assert MODEL_PRESETS["large"]["num_hidden_layers"] == 24


# ----------------------------------------------------------------------------- bad input
def expect_error(function, message: str) -> None:
    with pytest.raises(UserError) as info:
        function()
    assert message in str(info.value), str(info.value)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, tiny_corpus):
    assert len(MegatronBertTokenizer.from_pretrained(tiny_corpus["tokenizer"])) == 57  # 6 + 51 words
    small = tmp_path / "small.json"
    small.write_text(tiny_config(vocab_size=32).to_json_string())
    expect_error(
        lambda: pretrain(tiny_corpus, tmp_path / "out", small),
        f"the tokenizer has 57 ids but the model config {small} has vocab_size 32: tokenizer ids 32..56 have no "
        "embedding. Set vocab_size >= 57 (e.g. 128) or use the matching tokenizer",
    )
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_seq_length_above_the_position_embeddings(tmp_path, tiny_corpus, tiny_model_file):
    expect_error(
        lambda: pretrain(tiny_corpus, tmp_path / "out", tiny_model_file, seq_length=128),
        f"--seq-length 128 is above the model's max_position_embeddings (64, from {tiny_model_file.parent}",
    )
    expect_error(lambda: build_model_config("base", 100, 1024), "--seq-length 1024 is above the model's max_position_embeddings (512, from the base preset)")


def test_missing_data_prefix(tmp_path, tiny_corpus, tiny_model_file):
    missing = tmp_path / "nope" / "corpus"
    expect_error(
        lambda: pretrain(tiny_corpus, tmp_path / "out", tiny_model_file, data=str(missing)),
        f"--data {missing}: no indexed dataset there ({missing}.idx, {missing}.bin missing)",
    )
    expect_error(
        lambda: pretrain(tiny_corpus, tmp_path / "out", tiny_model_file, valid_data=str(missing)),
        f"--valid-data {missing}: no indexed dataset there",
    )


def test_data_from_another_tokenizer(tmp_path, tiny_corpus, tiny_model_file):
    prefix = tmp_path / "other"
    write_indexed_dataset(prefix, [[[5, 6, 7], [8, 90]], [[9, 10, 11], [12, 13]]], vocab_size=1000)
    expect_error(
        lambda: pretrain(tiny_corpus, tmp_path / "out", tiny_model_file, data=str(prefix)),
        f"--data {prefix} holds token id 90, but the tokenizer/model vocabulary has 57 ids: the data was "
        "preprocessed with another tokenizer",
    )


def test_unknown_preset_and_missing_tokenizer(tmp_path, tiny_corpus):
    expect_error(lambda: pretrain(tiny_corpus, tmp_path / "o", "huge"), "--model-config huge: not a preset (tiny, base, large) and no such file or folder")
    corpus = dict(tiny_corpus, tokenizer=tmp_path / "no-tokenizer")
    expect_error(lambda: pretrain(corpus, tmp_path / "o", "tiny"), f"--tokenizer {tmp_path / 'no-tokenizer'}: no such folder or file")


def test_resume_from_a_run_with_another_model(tmp_path, tiny_corpus, tiny_model_file, capsys):
    out = tmp_path / "out"
    pretrain(tiny_corpus, out, tiny_model_file, steps=2, valid_data=None)
    code = cli_main([
        "pretrain", "--data", str(tiny_corpus["train"]), "--tokenizer", str(tiny_corpus["tokenizer"]),
        "--model-config", "tiny", "--output", str(out), "--max-steps", "4", "--batch-size", "4",
        "--seq-length", "32", "--resume", "auto", "--quiet",
    ])
    full_err = capsys.readouterr().err
    err = full_err.strip().splitlines()[-1]  # after the "no --valid-data" notes
    assert code == 2
    assert err.startswith(f"megabert pretrain: error: cannot resume from {out / 'checkpoints' / 'step-00000002'}: "
                          "it was written for a different configuration (")
    assert "hidden_size: 32 in the checkpoint, 256 now" in err
    assert "Traceback" not in full_err


def test_bad_numbers_on_the_command_line(tmp_path, tiny_corpus, capsys):
    code = cli_main([
        "pretrain", "--data", str(tiny_corpus["train"]), "--tokenizer", str(tiny_corpus["tokenizer"]),
        "--output", str(tmp_path / "o"), "--max-steps", "0",
    ])
    assert code == 2
    assert capsys.readouterr().err.strip() == "megabert pretrain: error: max steps must be an integer >= 1, got 0"


def test_recipe_gives_the_settings_the_command_line_leaves_out(tmp_path, tiny_corpus, tiny_model_file, monkeypatch):
    """--recipe short-budget: its values where no option is given; a given option wins; auto precision."""
    from megabert.fast_paths import half_matmul
    from megabert.train.jobs.recipes import RECIPES

    out = tmp_path / "out"
    monkeypatch.setattr(half_matmul, "_decisions", {torch.bfloat16: False})  # a CPU with fast bf16 (AMX, Zen 4)
    code = cli_main([
        "pretrain", "--data", str(tiny_corpus["train"]), "--tokenizer", str(tiny_corpus["tokenizer"]),
        "--model-config", str(tiny_model_file), "--output", str(out), "--max-steps", "2",
        "--seq-length", "24", "--batch-size", "2", "--recipe", "short-budget", "--lr", "5e-4", "--quiet",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "run_config.json").read_text())
    assert record["OptimizerConfig"]["lr"] == 5e-4  # given
    assert record["PretrainDataConfig"]["masked_lm_prob"] == RECIPES["short-budget"].masked_lm_prob == 0.15
    assert record["PretrainDataConfig"]["binary_task"] is None  # the recipe's "none"
    assert record["ScheduleConfig"] == {"kind": "linear", "warmup_steps": 100, "min_lr_ratio": 0.0, "total_steps": None}
    assert record["TrainerConfig"]["precision"] == "bf16"
    # Where bf16 products are slower (an Intel CPU without AMX), auto means fp32; --bf16 still forces bf16.
    monkeypatch.setattr(half_matmul, "_decisions", {torch.bfloat16: True})
    from megabert.train.jobs.recipes import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_default_recipe_keeps_the_classic_settings():
    from megabert.train.jobs.recipes import RECIPES

    default = RECIPES["default"]
    assert (default.lr, default.masked_lm_prob, default.binary_task, default.batch_size, default.seq_length,
            default.warmup_steps, default.precision) == (1e-4, 0.15, "nsp", 32, 128, 0, "fp32")  # fmt: skip
