"""Bad input to `megabert finetune` / `evaluate`: one-line errors naming what and where, or counted skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_finetune import MAX_LENGTH, write_conll, write_mrpc, write_squad, write_tiny_model

from megabert.cli import main as cli_main
from megabert.errors import UserError
from megabert.train.jobs.finetune import DataOptions, FinetuneConfig, finetune


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit status, stderr and stdout of one `megabert` call."""
    rc = cli_main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err, captured.out


def finetune_cli(capsys, model: Path, task: str, train: Path, dev: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "finetune", "--task", task, "--model", str(model), "--train", str(train),
                   "--validation", str(dev), "--output", str(out), "--max-length", str(MAX_LENGTH),
                   "--max-steps", "2", "--batch-size", "4", "--quiet", *extra)


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("megabert "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_validation_label_not_in_training(tiny_model, tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "the film is good\t1\nit was bad\t0\n" * 4)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nthe film is good\t1\nthe plot\tmaybe\n")
    rc, err, out = finetune_cli(capsys, tiny_model, "sequence-classification", tmp_path / "train.tsv",
                           tmp_path / "dev.tsv", tmp_path / "out")
    one_line_error(rc, err, f"{tmp_path / 'dev.tsv'}:3", "label 'maybe' is not among the training labels ['0', '1']")
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


def test_tag_in_validation_not_in_training(tiny_model, tmp_path, capsys):
    write_conll(tmp_path / "train.txt", 20, seed=1)
    (tmp_path / "dev.txt").write_text("john B-PER\nlives O\nin O\nberlin B-GPE\n")
    rc, err, out = finetune_cli(capsys, tiny_model, "token-classification", tmp_path / "train.txt",
                           tmp_path / "dev.txt", tmp_path / "out")
    one_line_error(rc, err, f"{tmp_path / 'dev.txt'}:4", "tag 'B-GPE' is not among the training labels")


def test_malformed_line_is_an_error_or_a_counted_skip(tiny_model, tmp_path, capsys, caplog):
    good = "".join("the film is good\t1\nit was bad\t0\n" for _ in range(6))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + good[:34] + "a\tb\tc\n" + good[34:])
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nthe film is good\t1\nit was bad\t0\n")
    rc, err, out = finetune_cli(capsys, tiny_model, "sequence-classification", tmp_path / "train.tsv",
                           tmp_path / "dev.tsv", tmp_path / "out")
    one_line_error(rc, err, f"{tmp_path / 'train.tsv'}:4", "expected 2 columns, found 3")

    rc, err, out = finetune_cli(capsys, tiny_model, "sequence-classification", tmp_path / "train.tsv",
                           tmp_path / "dev.tsv", tmp_path / "out", "--on-bad", "skip")
    assert rc == 0, err
    assert "skipped 1 bad record(s)" in caplog.text and "train.tsv:4" in caplog.text  # the reader's warning
    assert "train: 12 examples (1 bad record skipped" in out  # the summary
    train = json.loads((tmp_path / "out" / "eval_results.json").read_text())["data"]["train"]
    assert train["skipped"] == 1 and train["examples"] == 12 and train["first_skipped"].endswith(
        "train.tsv:4: expected 2 columns, found 3")


def test_answer_not_at_its_offset(tiny_model, tmp_path, capsys):
    write_squad(tmp_path / "train.json", 8, seed=1)
    doc = json.loads((tmp_path / "train.json").read_text())
    doc["data"][2]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    (tmp_path / "bad.json").write_text(json.dumps(doc, indent=1))
    rc, err, out = finetune_cli(capsys, tiny_model, "question-answering", tmp_path / "bad.json",
                           tmp_path / "train.json", tmp_path / "out")
    one_line_error(rc, err, str(tmp_path / "bad.json"), "question id q2", "does not occur at offset")


def test_fewer_than_two_choices(tiny_model, tmp_path, capsys):
    lines = [json.dumps({"query": "the cat", "choices": ["sat", "ran"], "gold": 0})] * 4
    lines.insert(2, json.dumps({"query": "the dog", "choices": ["sat"], "gold": 0}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    rc, err, out = finetune_cli(capsys, tiny_model, "multiple-choice", tmp_path / "train.jsonl",
                           tmp_path / "train.jsonl", tmp_path / "out")
    one_line_error(rc, err, f"{tmp_path / 'train.jsonl'}:3", "needs at least 2 choices, found 1")


def test_empty_file(tiny_model, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    write_conll(tmp_path / "dev.txt", 4, seed=2)
    rc, err, out = finetune_cli(capsys, tiny_model, "token-classification", tmp_path / "empty.txt",
                           tmp_path / "dev.txt", tmp_path / "out")
    one_line_error(rc, err, str(tmp_path / "empty.txt"), "no sentences found (the file is empty)")


def test_missing_file_and_missing_model(tiny_model, tmp_path, capsys):
    write_conll(tmp_path / "dev.txt", 4, seed=2)
    rc, err, out = finetune_cli(capsys, tiny_model, "token-classification", tmp_path / "nope.txt",
                           tmp_path / "dev.txt", tmp_path / "out")
    one_line_error(rc, err, "nope.txt: no such file")
    rc, err, out = finetune_cli(capsys, tmp_path / "no-model", "token-classification", tmp_path / "dev.txt",
                           tmp_path / "dev.txt", tmp_path / "out")
    one_line_error(rc, err, "no-model does not exist")


def test_settings_that_do_not_fit(tiny_model, tmp_path, capsys):
    write_conll(tmp_path / "train.txt", 10, seed=3)
    files = (tiny_model, "token-classification", tmp_path / "train.txt", tmp_path / "train.txt", tmp_path / "out")
    rc, err, out = finetune_cli(capsys, *files, "--text-column", "2")
    one_line_error(rc, err, "--text-column applies to sequence-classification only")
    rc, err, out = run_cli(capsys, "finetune", "--task", "token-classification", "--model", str(tiny_model),
                      "--train", str(files[2]), "--validation", str(files[3]), "--output", str(files[4]),
                      "--max-length", "100")
    one_line_error(rc, err, "max length 100 is above the model's max_position_embeddings (64")
    rc, err, out = finetune_cli(capsys, *files, "--metric", "mcc")
    one_line_error(rc, err, "--metric 'mcc' is not reported for this task", "'f1'")
    rc, err, out = finetune_cli(capsys, *files, "--batch-size", "0")
    one_line_error(rc, err, "batch size must be an integer >= 1, got 0")
    rc, err, out = finetune_cli(capsys, *files, "--batch-size", "64")  # 10 sentences
    one_line_error(rc, err, "the dataset has 10 examples, fewer than one batch of 64")


def test_single_training_label(tiny_model, tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nthe film\t1\nthe plot\t1\n")
    with pytest.raises(UserError, match=r"train.tsv:2: the training data has a single label '1'"):
        finetune("sequence-classification", tiny_model, tmp_path / "train.tsv", tmp_path / "train.tsv",
                 tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH))


def test_output_of_an_earlier_run_is_not_overwritten(tiny_model, tmp_path, capsys):
    write_mrpc(tmp_path / "train.tsv", 16, seed=4)
    files = (tiny_model, "sequence-classification", tmp_path / "train.tsv", tmp_path / "train.tsv", tmp_path / "out")
    assert finetune_cli(capsys, *files)[0] == 0
    before = (tmp_path / "out" / "best" / "model.safetensors").read_bytes()
    rc, err, out = finetune_cli(capsys, *files, "--seed", "5")
    one_line_error(rc, err, "already holds a fine-tuning run", "--overwrite")
    assert (tmp_path / "out" / "best" / "model.safetensors").read_bytes() == before
    # --overwrite with a bad input fails before anything of the earlier run is removed.
    rc, err, out = finetune_cli(capsys, *files[:3], tmp_path / "missing.tsv", files[4], "--overwrite")
    one_line_error(rc, err, "missing.tsv: no such file")
    assert (tmp_path / "out" / "best" / "model.safetensors").read_bytes() == before
    rc, err, out = finetune_cli(capsys, *files, "--seed", "5", "--overwrite")
    assert rc == 0, err
    assert (tmp_path / "out" / "best" / "model.safetensors").read_bytes() != before


def test_evaluate_bad_inputs(tiny_model, tmp_path, capsys):
    write_mrpc(tmp_path / "train.tsv", 16, seed=6)
    out = tmp_path / "out"
    finetune("sequence-classification", tiny_model, tmp_path / "train.tsv", tmp_path / "train.tsv", out,
             data=DataOptions(max_length=MAX_LENGTH), config=FinetuneConfig(max_steps=1, batch_size=4, progress=False))
    # The pretrained MLM folder has no classification head.
    rc, err, _ = run_cli(capsys, "evaluate", str(tiny_model), "--task", "sequence-classification",
                      "--data", str(tmp_path / "train.tsv"))
    one_line_error(rc, err, "holds a MegatronBertForMaskedLM, not a MegatronBertForSequenceClassification")
    rc, err, _ = run_cli(capsys, "evaluate", str(tiny_model), "--data", str(tmp_path / "train.tsv"))
    one_line_error(rc, err, "cannot tell which task the model is for; pass --task")
    # A label the fine-tuned model does not know.
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nthe film\t2\n")
    rc, err, _ = run_cli(capsys, "evaluate", str(out / "best"), "--data", str(tmp_path / "dev.tsv"),
                      "--format", "tsv")
    one_line_error(rc, err, "dev.tsv:2: label '2' is not among the training labels ['0', '1']")
    # A task that is not the model's.
    rc, err, _ = run_cli(capsys, "evaluate", str(out / "best"), "--task", "token-classification",
                      "--data", str(tmp_path / "dev.tsv"))
    one_line_error(rc, err, "not a MegatronBertForTokenClassification")
