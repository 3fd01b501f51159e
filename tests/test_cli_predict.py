"""The prediction commands and `megabert info`: the real entry point as a subprocess (happy paths and a
few errors), and the rest of the error messages through `megabert.cli.main` in this process."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from megabert.cli import main  # noqa: E402
from megabert.inference.pipelines import pipeline  # noqa: E402
from tests.test_pipelines import NER_LABELS, build_model_folder  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "pretraining": build_model_folder(root / "pretraining", "MegatronBertForPreTraining", initializer_range=0.5),
            "cls": build_model_folder(
                root / "cls", "MegatronBertForSequenceClassification", id2label={0: "neg", 1: "pos"},
                label2id={"neg": 0, "pos": 1},
            ),
            "ner": build_model_folder(
                root / "ner", "MegatronBertForTokenClassification", id2label=NER_LABELS,
                label2id={v: k for k, v in NER_LABELS.items()}, seed=4, head_scale=10.0,
            ),
            "qa": build_model_folder(root / "qa", "MegatronBertForQuestionAnswering", seed=5, head_scale=10.0),
            "mc": build_model_folder(root / "mc", "MegatronBertForMultipleChoice", seed=6),
            "bare": build_model_folder(root / "bare", "MegatronBertForMaskedLM", tokenizer=False),
        }  # fmt: skip


def megabert(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megabert", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
        env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin",
             "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def assert_close_lists(a: list[dict], b: list[dict]) -> None:
    assert [x["token"] for x in a] == [x["token"] for x in b]
    np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-5)


# ------------------------------------------------------------------ subprocess: happy paths
def test_fill_mask_file_to_output(models: dict[str, Path], tmp_path: Path) -> None:
    texts = ["paris is the [MASK] of france .", "the [MASK] wrote a [MASK] ."]
    source = tmp_path / "in.txt"
    source.write_text(f"{texts[0]}\n\n{texts[1]}\n")
    result = megabert("fill-mask", str(models["pretraining"]), "-i", str(source), "-o", str(tmp_path / "out.jsonl"), "--top-k", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "2/2" in result.stderr  # the progress bar went to stderr
    rows = jsonl((tmp_path / "out.jsonl").read_text())
    assert [(r["line"], r["text"]) for r in rows] == [(1, texts[0]), (3, texts[1])]
    fill = pipeline("fill-mask", models["pretraining"], device="cpu")
    assert len(rows[0]["masks"]) == 1 and len(rows[1]["masks"]) == 2
    assert_close_lists(rows[0]["masks"][0], fill(texts[0], top_k=3))
    for got, want in zip(rows[1]["masks"], fill(texts[1], top_k=3)):
        assert_close_lists(got, want)


def test_classify_csv_pairs_all_labels(models: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "pairs.csv"
    source.write_text('id,sentence1,sentence2\n7,"a good movie, really",a great film\n8,bad film,the dog\n')
    result = megabert("classify", str(models["cls"]), "-i", str(source), "--top-k", "0", "-q")
    assert result.returncode == 0, result.stderr
    rows = jsonl(result.stdout)
    expected = pipeline("text-classification", models["cls"], device="cpu")(
        [("a good movie, really", "a great film"), ("bad film", "the dog")], top_k=None
    )
    for row, want, ident, line in zip(rows, expected, (7, 8), (2, 3)):
        assert row["id"] == str(ident) and row["line"] == line
        assert row["label"] == want[0]["label"] and row["score"] == pytest.approx(want[0]["score"], abs=1e-5)
        assert [x["label"] for x in row["labels"]] == [x["label"] for x in want]
    assert rows[0]["text"] == "a good movie, really" and rows[0]["text_pair"] == "a great film"


def test_qa_from_stdin_jsonl(models: dict[str, Path]) -> None:
    items = [
        {"id": "q1", "question": "who wrote it ?", "context": "john smith wrote it in paris ."},
        {"question": "where did mary play ?", "context": "mary played music in london ."},
    ]
    stdin = "\n".join(json.dumps(item) for item in items) + "\n"
    result = megabert("qa", str(models["qa"]), "-i", "-", "--format", "jsonl", "--top-k", "2", "-q", stdin=stdin)
    assert result.returncode == 0, result.stderr
    rows = jsonl(result.stdout)
    expected = pipeline("question-answering", models["qa"], device="cpu")(items, top_k=2)
    assert rows[0]["id"] == "q1" and "id" not in rows[1] and "context" not in rows[0]
    for row, item, want in zip(rows, items, expected):
        assert [a["answer"] for a in row["answers"]] == [a["answer"] for a in want]
        assert row["answer"] == want[0]["answer"] == item["context"][row["start"] : row["end"]]


def test_tokens_inline_and_choices_jsonl_and_info(models: dict[str, Path], tmp_path: Path) -> None:
    text = "john smith worked for apple in new york ."
    result = megabert("tokens", str(models["ner"]), text, "--aggregation", "first")
    assert result.returncode == 0, result.stderr
    (row,) = jsonl(result.stdout)
    want = pipeline("token-classification", models["ner"], device="cpu", aggregation_strategy="first")(text)
    assert row["text"] == text and "line" not in row
    assert [(e["entity_group"], e["start"], e["end"]) for e in row["entities"]] == [
        (e["entity_group"], e["start"], e["end"]) for e in want
    ]

    source = tmp_path / "piqa.jsonl"
    source.write_text('{"query": "where is paris ?", "choices": ["in france", "in england", "at home"], "gold": 0}\n')
    result = megabert("choices", str(models["mc"]), "-i", str(source), "-q")
    assert result.returncode == 0, result.stderr
    (row,) = jsonl(result.stdout)
    want = pipeline("multiple-choice", models["mc"], device="cpu")(("where is paris ?", ["in france", "in england", "at home"]))
    np.testing.assert_allclose(row["scores"], want["scores"], atol=1e-6)
    assert row["label"] == want["label"] and row["choices"] == ["in france", "in england", "at home"]

    result = megabert("info", str(models["pretraining"]), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    import transformers

    reference = transformers.MegatronBertForPreTraining.from_pretrained(models["pretraining"])
    assert info["parameters"] == sum(p.numel() for p in reference.parameters())
    assert info["heads"] == ["masked-lm", "next-sentence", "pooler"]
    assert info["commands"] == ["embed", "fill-mask", "next-sentence"]
    assert info["tokenizer_files"] == ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
    assert info["config"]["hidden_size"] == 32 and info["architectures"] == ["MegatronBertForPreTraining"]


# ------------------------------------------------------------------ subprocess: errors
def test_errors_from_the_real_command(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the [MASK] ."}\n{"text": "oops"\n')
    result = megabert("fill-mask", str(models["pretraining"]), "-i", str(bad), "-q")
    assert result.returncode == 2
    assert last_line(result.stderr) == f"megabert fill-mask: error: {bad}:2: not valid JSON (Expecting ',' delimiter at column 16)"
    assert "Traceback" not in result.stderr

    texts = tmp_path / "texts.txt"
    texts.write_text("the [MASK] .\n\nno mask on this line\n")
    out = tmp_path / "filled.jsonl"
    result = megabert("fill-mask", str(models["pretraining"]), "-i", str(texts), "-o", str(out), "-q")
    assert result.returncode == 2
    assert last_line(result.stderr) == (
        f"megabert fill-mask: error: {texts}:3: no [MASK] token in the text (fill-mask needs at least one)"
    )
    assert not out.exists() and list(tmp_path.glob(".filled.jsonl*")) == []  # nothing half-written

    result = megabert("classify", str(tmp_path / "missing-model"), "a text")
    assert result.returncode == 2
    assert last_line(result.stderr) == f"megabert classify: error: model folder {tmp_path / 'missing-model'} does not exist"


# ------------------------------------------------------------------ in-process: error messages
def test_input_errors(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = str(models["cls"])
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text("sentence\tlabel\na good movie\t1\n")
    code, _, err = run_main(capsys, "classify", model, "-i", str(tsv), "--text-column", "review", "-q")
    assert code == 2 and last_line(err) == (
        f"megabert classify: error: {tsv}: no column 'review' for the text (columns present: sentence, label); "
        "pick one with --text-column"
    )
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "fine"}\n{"review": "no text key"}\n')
    code, out, err = run_main(capsys, "classify", model, "-i", str(records), "-q")
    assert code == 2 and last_line(err) == (
        f"megabert classify: error: {records}:2: no key 'text' or 'sentence' or 'sentence1' for the text "
        "(keys present: review); pick one with --text-column"
    )
    assert out == ""  # the error came while reading the first chunk, before it ran
    records.write_text('{"text": 5}\n')
    code, _, err = run_main(capsys, "classify", model, "-i", str(records), "-q")
    assert last_line(err) == f"megabert classify: error: {records}:1: 'text' must be a string, got int"
    records.write_text("[1, 2]\n")
    code, _, err = run_main(capsys, "classify", model, "-i", str(records), "-q")
    assert last_line(err) == f"megabert classify: error: {records}:1: expected a JSON object, got list"

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = run_main(capsys, "classify", model, "-i", str(empty), "-q")
    assert code == 2 and last_line(err) == (
        f"megabert classify: error: {empty}: no inputs (the file is empty or has only blank lines)"
    )
    code, _, err = run_main(capsys, "classify", model)
    assert code == 2 and "error: no input: give texts as arguments or --input FILE" in err
    code, _, err = run_main(capsys, "classify", model, "-i", str(tmp_path / "nope.txt"))
    assert last_line(err) == f"megabert classify: error: input file {tmp_path / 'nope.txt'} does not exist"
    code, _, err = run_main(capsys, "classify", model, "a text", "-i", str(empty))
    assert last_line(err) == "megabert classify: error: give inputs as arguments or with --input, not both"

    long_file = tmp_path / "long.txt"
    long_file.write_text("short one\n" + "good " * 80 + "\n")
    code, _, err = run_main(capsys, "classify", model, "-i", str(long_file), "-q")
    assert last_line(err) == (
        f"megabert classify: error: {long_file}:2: 82 tokens, more than the model takes (64); "
        "shorten it or turn on truncation (truncation=True, --truncate)"
    )
    code, out, _ = run_main(capsys, "classify", model, "-i", str(long_file), "-q", "--truncate")
    assert code == 0 and [r["line"] for r in jsonl(out)] == [1, 2]

    pairs = tmp_path / "pairs.txt"
    pairs.write_text("first\tsecond\njust one\n")
    code, _, err = run_main(capsys, "next-sentence", str(models["pretraining"]), "-i", str(pairs), "-q")
    assert last_line(err) == f"megabert next-sentence: error: {pairs}:2: expected two texts separated by a tab"
    code, _, err = run_main(capsys, "next-sentence", str(models["pretraining"]), "a", "b")
    assert last_line(err) == "megabert next-sentence: error: give one --pair per TEXT: got 2 TEXT and 0 --pair"
    code, _, err = run_main(capsys, "qa", str(models["qa"]), "-i", str(pairs))
    assert last_line(err) == (
        f"megabert qa: error: qa reads JSONL, CSV or TSV input (it needs named fields), not plain text: {pairs}"
    )
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("question,context\nwho?,john,extra\n")
    code, _, err = run_main(capsys, "qa", str(models["qa"]), "-i", str(ragged))
    assert last_line(err) == f"megabert qa: error: {ragged}:2: 3 fields, but the header has 2 (question, context)"


def test_model_folder_errors(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(capsys, "fill-mask", str(models["bare"]), "the [MASK] .")
    assert code == 2 and last_line(err) == (
        f"megabert fill-mask: error: model folder {models['bare']} has no tokenizer files (tokenizer.json or vocab.txt); "
        "save the tokenizer into it or pass a tokenizer (--tokenizer DIR)"
    )
    code, out, _ = run_main(capsys, "fill-mask", str(models["bare"]), "the [MASK] .", "--tokenizer", str(models["cls"]))
    assert code == 0 and len(jsonl(out)[0]["masks"][0]) == 5
    (tmp_path / "notes").mkdir()
    code, _, err = run_main(capsys, "embed", str(tmp_path / "notes"), "text")
    assert last_line(err) == f"megabert embed: error: model folder {tmp_path / 'notes'} has no config.json"
    code, _, err = run_main(capsys, "qa", str(models["cls"]), "--question", "who?", "--context", "john")
    assert last_line(err) == (
        f"megabert qa: error: model folder {models['cls']} has no question-answering head, which the "
        "question-answering pipeline needs (heads in the checkpoint: classifier, pooler)"
    )
    code, _, err = run_main(capsys, "info", str(tmp_path / "absent"))
    assert last_line(err) == f"megabert info: error: model folder {tmp_path / 'absent'} does not exist"
    code, out, _ = run_main(capsys, "info", str(models["ner"]))
    assert code == 0 and "labels           6: O, B-PER, I-PER, B-LOC, I-LOC, MISC" in out
    assert "commands         embed, tokens" in out


def test_help_explains_every_command(capsys: pytest.CaptureFixture) -> None:
    for command in ("fill-mask", "next-sentence", "classify", "tokens", "qa", "choices", "embed", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and f"megabert {command} " in out
