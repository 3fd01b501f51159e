"""Acceptance tests of fine-tuning: each task head end to end on tiny synthetic data.

Every test fine-tunes a tiny random MegatronBERT (hidden 32, 2 layers) for a few dozen steps
and checks: the training loss goes down, the metrics JSON has the task's keys, a metric
recomputed by hand from the predictions file equals the reported one, the saved config carries
the labels, and the best folder loads in `transformers` with the same outputs as ours.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megabert.cli import main as cli_main
from megabert.train.jobs.finetune import (
    BEST_DIR,
    PREDICTIONS_FILE,
    RESULTS_FILE,
    DataOptions,
    FinetuneConfig,
    build_model,
    evaluate,
    finetune,
)
from megabert.train.jobs.finetune_data import LabelScheme
from megabert.train.jobs.metrics import normalize_answer

VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] . , ? the a this that film movie plot is was good great bad awful "
    "very not and it john mary ann paris london ibm acme lives live does in works at who where what "
    "city cat dog sat on mat ran yes no today ##s ##ed"
).split()
FILLER = "the a this that film movie plot is was very not and it today city cat dog sat on mat ran".split()
MAX_LENGTH = 48


def write_tiny_model(folder: Path) -> Path:
    """A tokenizer and a random MegatronBertForMaskedLM (the 'pretrained' model) in ``folder``."""
    from megabert.config import MegatronBertConfig
    from megabert.modeling.heads import MegatronBertForMaskedLM
    from megabert.tokenization import MegatronBertTokenizer

    tokenizer = MegatronBertTokenizer.from_vocab(VOCAB, lowercase=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = MegatronBertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64)
    MegatronBertForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def quick(**overrides: Any) -> FinetuneConfig:
    """Settings for a few dozen fast steps."""
    values = dict(epochs=3, batch_size=16, lr=1e-2, warmup_ratio=0.1, seed=0, progress=False, log_every=1)
    values.update(overrides)
    return FinetuneConfig(**values)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def loss_went_down(losses: list[float], k: int = 5) -> bool:
    return float(np.mean(losses[-k:])) < float(np.mean(losses[:k])) - 0.05


def check_in_transformers(best: Path, class_name: str, ours: torch.nn.Module, inputs: dict) -> Any:
    """Load ``best`` with transformers (model and tokenizer) and compare its outputs with ours."""
    import transformers

    theirs = getattr(transformers, class_name).from_pretrained(best).eval()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(best)
    assert tokenizer.vocab_size == len(VOCAB)
    with torch.no_grad():
        a = ours.eval()(**inputs)
        b = theirs(**inputs)
    for name in ("logits", "start_logits", "end_logits"):
        if getattr(a, name, None) is not None:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4)
    return theirs


def _our_model(best: Path, class_name: str) -> torch.nn.Module:
    import megabert.modeling.heads as heads

    return getattr(heads, class_name).from_pretrained(best)


def _encode(best: Path, text: str, pair: str | None = None) -> dict:
    from megabert.tokenization import MegatronBertTokenizer

    return dict(MegatronBertTokenizer.from_pretrained(best)(text, pair, return_tensors="pt"))


# ------------------------------------------------------------------------- data writers
def sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    words.insert(rng.randint(0, len(words)), rng.choice(["good", "great"] if positive else ["bad", "awful"]))
    return " ".join(words)


def write_mrpc(path: Path, n: int, seed: int) -> None:
    """MRPC-style TSV (BOM, GLUE header): label 1 when the second sentence is positive (15% noise).

    The second sentence is all sentiment words: a signal a random-init tiny model picks up in a
    few dozen steps whatever the seed (one such word among fillers it learns only sometimes).
    """
    rng = random.Random(seed)
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for i in range(n):
        y = rng.randint(0, 1)
        label = y if rng.random() > 0.15 else 1 - y
        second = " ".join(rng.choice(["good", "great"] if y else ["bad", "awful"]) for _ in range(rng.randint(2, 5)))
        lines.append(f"{label}\t{i}\t{i + 1000}\t{sentence(rng, rng.random() < 0.5)}\t{second}")
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))


# ------------------------------------------------------------------ sequence classification
def test_sentence_pairs_glue_mrpc_through_the_cli(tiny_model, tmp_path, capsys):
    write_mrpc(tmp_path / "train.tsv", 160, seed=1)
    write_mrpc(tmp_path / "dev.tsv", 40, seed=2)
    out = tmp_path / "out"
    rc = cli_main([
        "finetune", "--task", "sequence-classification", "--model", str(tiny_model),
        "--train", str(tmp_path / "train.tsv"), "--validation", str(tmp_path / "dev.tsv"), "--output", str(out),
        "--max-length", str(MAX_LENGTH), "--epochs", "4", "--batch-size", "16", "--lr", "1e-2", "--seed", "0",
        "--log-every", "1", "--quiet",
    ])
    assert rc == 0
    assert "best f1" in capsys.readouterr().out

    # The loss went down (train records of the trainer's metrics.jsonl, one per step).
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 40 and loss_went_down(losses)

    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["metric"] == "f1"  # the MRPC convention
    assert results["data"]["train"]["format"] == "glue-mrpc"
    assert set(results["metrics"]) == {"accuracy", "macro_f1", "mcc", "f1", "loss"}
    assert [h["step"] for h in results["history"]] == [10, 20, 30, 40]
    best_f1 = max(h["f1"] for h in results["history"])
    assert results["metrics"]["f1"] == pytest.approx(best_f1)
    assert results["best_step"] == next(h["step"] for h in results["history"] if h["f1"] == best_f1)

    # Recompute accuracy and the F1 of label "1" from the predictions file.
    records = read_jsonl(out / PREDICTIONS_FILE)
    assert len(records) == 40
    assert records[0]["where"].endswith("dev.tsv:2") and "text_pair" in records[0]
    assert all(r["label"] in ("0", "1") and 0.5 <= r["score"] <= 1.0 for r in records)
    pred = [r["label"] for r in records]
    gold = [r["gold"] for r in records]
    tp = sum(p == g == "1" for p, g in zip(pred, gold))
    fp = sum(p == "1" != g for p, g in zip(pred, gold))
    fn = sum(g == "1" != p for p, g in zip(pred, gold))
    assert results["metrics"]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert results["metrics"]["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(pred, gold)]))

    best = out / BEST_DIR
    config = json.loads((best / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["label2id"] == {"0": 0, "1": 1}
    assert config["problem_type"] == "single_label_classification"
    assert config["architectures"] == ["MegatronBertForSequenceClassification"]
    theirs = check_in_transformers(best, "MegatronBertForSequenceClassification",
                                   _our_model(best, "MegatronBertForSequenceClassification"),
                                   _encode(best, "this film was good", "a plot is bad"))
    assert theirs.config.id2label == {0: "0", 1: "1"}

    # `megabert evaluate` on the best folder reproduces the validation metrics.
    rc = cli_main(["evaluate", str(best), "--data", str(tmp_path / "dev.tsv"), "--output", str(tmp_path / "ev"),
                   "--quiet"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "sequence-classification"
    for key in ("accuracy", "f1", "mcc"):
        assert printed[key] == pytest.approx(results["metrics"][key])
    # The same predictions; scores to float rounding (the reloaded weights sit at other addresses,
    # and MKL's kernels may then sum in another order).
    again = read_jsonl(tmp_path / "ev" / PREDICTIONS_FILE)
    assert [{k: v for k, v in r.items() if k != "score"} for r in again] == [
        {k: v for k, v in r.items() if k != "score"} for r in records
    ]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(again, records)) < 1e-6

    # predict-file ignores the labels and writes the same predictions.
    rc = cli_main(["predict-file", str(best), "--data", str(tmp_path / "dev.tsv"), "--output",
                   str(tmp_path / "pred.jsonl"), "--quiet"])
    assert rc == 0
    unlabeled = read_jsonl(tmp_path / "pred.jsonl")
    assert [r["label"] for r in unlabeled] == pred and "gold" not in unlabeled[0]


def test_single_sentences_csv_three_string_labels(tiny_model, tmp_path):
    rng = random.Random(3)

    def rows(n):
        out = ["review,sentiment"]
        for _ in range(n):
            kind = rng.choice(["pos", "neg", "neutral"])
            # sentiment words make up most of a pos/neg text: learnable in a few dozen steps whatever the seed
            words = {"pos": ["good", "great"], "neg": ["bad", "awful"], "neutral": FILLER}[kind]
            text = " ".join(rng.choices(words, k=rng.randint(3, 5)) + rng.choices(FILLER, k=1))
            out.append(f'"{text}, yes",{kind}')  # a quoted comma
        return "\n".join(out) + "\n"

    (tmp_path / "train.csv").write_text(rows(150))
    (tmp_path / "dev.csv").write_text(rows(30))
    result = finetune("sequence-classification", tiny_model, tmp_path / "train.csv", tmp_path / "dev.csv",
                      tmp_path / "out", data=DataOptions(text_column="review", label_column="sentiment",
                                                         max_length=MAX_LENGTH), config=quick())
    assert loss_went_down(result.train.losses)
    assert result.metric == "accuracy"
    assert set(result.best_metrics) == {"accuracy", "macro_f1", "mcc", "loss"}  # no binary F1 for 3 classes
    records = read_jsonl(result.predictions_file)
    assert records[0]["text"].endswith(", yes")
    assert result.best_metrics["accuracy"] == pytest.approx(np.mean([r["label"] == r["gold"] for r in records]))
    config = json.loads((result.best_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}


def test_regression_stsb_style(tiny_model, tmp_path):
    from scipy.stats import pearsonr, spearmanr

    rng = random.Random(4)

    def rows(n):
        header = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
        out = ["\t".join(header)]
        for i in range(n):
            k = rng.randint(0, 3)  # the score is the number of "good" words in sentence 2
            s2 = " ".join(["good"] * k + rng.choices(FILLER, k=3))
            out.append("\t".join([str(i), "g", "f", "2012", str(i), "s", "s", "the film", s2, f"{k * 1.5:.2f}"]))
        return "\n".join(out) + "\n"

    (tmp_path / "train.tsv").write_text(rows(160))
    (tmp_path / "dev.tsv").write_text(rows(40))
    result = finetune("sequence-classification", tiny_model, tmp_path / "train.tsv", tmp_path / "dev.tsv",
                      tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH), config=quick())
    assert loss_went_down(result.train.losses)
    assert result.metric == "pearson_spearman_mean"
    assert set(result.best_metrics) == {"pearson", "spearman", "pearson_spearman_mean", "mse", "loss"}
    records = read_jsonl(result.predictions_file)
    predicted = [r["score"] for r in records]
    gold = [r["gold"] for r in records]
    assert result.best_metrics["pearson"] == pytest.approx(pearsonr(predicted, gold)[0], abs=1e-6)
    assert result.best_metrics["spearman"] == pytest.approx(spearmanr(predicted, gold)[0], abs=1e-6)
    assert result.best_metrics["pearson"] > 0.5  # it learned the count
    config = json.loads((result.best_dir / "config.json").read_text())
    assert len(config["id2label"]) == 1
    assert config["problem_type"] == "regression"
    check_in_transformers(result.best_dir, "MegatronBertForSequenceClassification",
                          _our_model(result.best_dir, "MegatronBertForSequenceClassification"),
                          _encode(result.best_dir, "the film", "good good it"))


def test_multi_label_jsonl(tiny_model, tmp_path):
    rng = random.Random(5)

    def rows(n):
        lines = []
        for _ in range(n):
            labels = [name for name, word in (("people", "john"), ("places", "paris"), ("things", "cat"))
                      if rng.random() < 0.5]
            words = rng.choices(FILLER, k=3) + [{"people": "john", "places": "paris", "things": "cat"}[x] for x in labels]
            rng.shuffle(words)
            lines.append(json.dumps({"text": " ".join(words), "labels": labels}))
        return "\n".join(lines) + "\n"

    (tmp_path / "train.jsonl").write_text(rows(160))
    (tmp_path / "dev.jsonl").write_text(rows(30))
    result = finetune("sequence-classification", tiny_model, tmp_path / "train.jsonl", tmp_path / "dev.jsonl",
                      tmp_path / "out", data=DataOptions(problem_type="multi_label_classification",
                                                         max_length=MAX_LENGTH), config=quick())
    assert loss_went_down(result.train.losses, k=3)
    assert result.metric == "micro_f1"
    assert set(result.best_metrics) == {"micro_f1", "macro_f1", "subset_accuracy", "loss"}
    records = read_jsonl(result.predictions_file)
    exact = [sorted(r["labels"]) == sorted(r["gold"]) for r in records]
    assert result.best_metrics["subset_accuracy"] == pytest.approx(np.mean(exact))
    assert all(set(r["scores"]) == {"people", "places", "things"} for r in records)
    config = json.loads((result.best_dir / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "people", "1": "places", "2": "things"}


# --------------------------------------------------------------------- token classification
def write_conll(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    entities = [(["john"], "PER"), (["mary", "ann"], "PER"), (["paris"], "LOC"), (["london"], "LOC"),
                (["ibm"], "ORG"), (["acme"], "ORG")]
    for _ in range(n):
        words: list[tuple[str, str]] = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.4:
                names, kind = rng.choice(entities)
                words += [(w, ("B-" if j == 0 else "I-") + kind) for j, w in enumerate(names)]
            else:
                words.append((rng.choice(FILLER + ["cats", "filmed"]), "O"))  # cats = cat ##s
        lines += [f"{w} NN O {t}" for w, t in words] + [""]
    path.write_text("\n".join(lines) + "\n")


def test_token_classification_conll(tiny_model, tmp_path):
    write_conll(tmp_path / "train.txt", 160, seed=6)
    write_conll(tmp_path / "dev.txt", 30, seed=7)
    result = finetune("token-classification", tiny_model, tmp_path / "train.txt", tmp_path / "dev.txt",
                      tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH), config=quick())
    assert loss_went_down(result.train.losses)
    assert result.metric == "f1"
    assert {"accuracy", "precision", "recall", "f1", "PER_f1", "LOC_f1", "ORG_f1", "loss"} <= set(result.best_metrics)
    records = read_jsonl(result.predictions_file)
    assert len(records) == 30 and records[0]["where"].endswith("dev.txt:3")
    assert all(len(r["tags"]) == len(r["words"]) == len(r["gold"]) for r in records)
    words = [(p, g) for r in records for p, g in zip(r["tags"], r["gold"])]
    assert result.best_metrics["accuracy"] == pytest.approx(np.mean([p == g for p, g in words]))
    assert result.best_metrics["f1"] > 0.3  # entities are learnable from the names
    config = json.loads((result.best_dir / "config.json").read_text())
    assert list(config["id2label"].values()) == ["B-LOC", "B-ORG", "B-PER", "I-PER", "O"]
    ours = _our_model(result.best_dir, "MegatronBertForTokenClassification")
    check_in_transformers(result.best_dir, "MegatronBertForTokenClassification", ours,
                          _encode(result.best_dir, "mary ann lives in paris"))


# ----------------------------------------------------------------------- question answering
def write_squad(path: Path, n: int, seed: int) -> None:
    """SQuAD v2 JSON: long contexts (several windows at max_length 48), some unanswerable questions."""
    rng = random.Random(seed)
    data = []
    for i in range(n):
        person = rng.choice(["john", "mary"])
        place = rng.choice(["paris", "london"])
        before = " ".join(rng.choices(FILLER, k=rng.randint(5, 40)))
        after = " ".join(rng.choices(FILLER, k=rng.randint(5, 30)))
        context = f"{before} . {person} lives in {place} . {after} ."
        start = context.index(f"{person} lives in ") + len(f"{person} lives in ")
        other = "mary" if person == "john" else "john"
        qas = [{"id": f"q{i}", "question": f"where does {person} live ?",
                "answers": [{"text": place, "answer_start": start}], "is_impossible": False}]
        if i % 4 == 0:
            qas.append({"id": f"q{i}-none", "question": f"where does {other} live ?", "answers": [],
                        "is_impossible": True})
        data.append({"title": f"t{i}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}, indent=1))


def test_question_answering_squad_v2_with_windows(tiny_model, tmp_path, caplog):
    write_squad(tmp_path / "train.json", 120, seed=8)
    write_squad(tmp_path / "dev.json", 24, seed=9)
    with caplog.at_level(logging.WARNING, logger="megabert.train.jobs.finetune"):
        result = finetune("question-answering", tiny_model, tmp_path / "train.json", tmp_path / "dev.json",
                          tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH, doc_stride=16),
                          config=quick(epochs=2))
    # The loss that differs from the reference's is said, with the way to the reference's.
    assert "pad positions are left out of the start/end softmax" in caplog.text
    assert "--reference-loss" in caplog.text
    assert loss_went_down(result.train.losses)
    results = json.loads(result.results_file.read_text())
    assert results["data"]["validation"]["features"] > results["data"]["validation"]["examples"]  # windows
    assert result.metric == "f1"
    assert {"exact_match", "f1", "has_answer_exact_match", "has_answer_f1", "no_answer_exact_match",
            "no_answer_f1", "loss"} <= set(result.best_metrics)
    records = read_jsonl(result.predictions_file)
    assert len(records) == 24 + 6
    assert {r["id"] for r in records} == {f"q{i}" for i in range(24)} | {f"q{i}-none" for i in range(0, 24, 4)}
    dev = json.loads((tmp_path / "dev.json").read_text())
    contexts = {qa["id"]: p["context"] for a in dev["data"] for p in a["paragraphs"] for qa in p["qas"]}
    for r in records:  # an answer is a span of its context (or empty: SQuAD v2)
        assert r["answer"] == "" or contexts[r["id"]][r["start"]:r["start"] + len(r["answer"])] == r["answer"]
    exact = [max((normalize_answer(r["answer"]) == normalize_answer(g) for g in r["gold"]),
                 default=r["answer"] == "") for r in records]
    assert result.best_metrics["exact_match"] == pytest.approx(100 * np.mean(exact))
    info = json.loads((result.best_dir / "finetune.json").read_text())
    assert info["version_2"] is True and info["task"] == "question-answering"
    ours = _our_model(result.best_dir, "MegatronBertForQuestionAnswering")
    check_in_transformers(result.best_dir, "MegatronBertForQuestionAnswering", ours,
                          _encode(result.best_dir, "where does john live ?", "john lives in paris ."))


# -------------------------------------------------------------------------- multiple choice
def test_multiple_choice_jsonl_train_swag_csv_validation(tiny_model, tmp_path):
    rng = random.Random(10)
    lines = []
    for _ in range(160):
        choices = [sentence(rng, False), sentence(rng, True)]
        gold = rng.randint(0, 1)
        if gold == 0:
            choices.reverse()
        lines.append(json.dumps({"query": " ".join(rng.choices(FILLER, k=3)), "choices": choices, "gold": gold}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    rows = ["video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,label"]
    for i in range(30):  # three choices here: the head scores any number
        endings = [sentence(rng, False), sentence(rng, False), sentence(rng, True)]
        label = rng.randint(0, 2)
        endings[label], endings[2] = endings[2], endings[label]
        rows.append(f"v{i},{i},x,{' '.join(rng.choices(FILLER, k=3))},the,gold,{','.join(endings)},{label}")
    (tmp_path / "dev.csv").write_text("\n".join(rows) + "\n")
    result = finetune("multiple-choice", tiny_model, tmp_path / "train.jsonl", tmp_path / "dev.csv",
                      tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH), config=quick())
    assert loss_went_down(result.train.losses)
    assert result.metric == "accuracy" and set(result.best_metrics) == {"accuracy", "loss"}
    records = read_jsonl(result.predictions_file)
    assert len(records) == 30 and all(len(r["scores"]) == 3 for r in records)
    assert all(r["prediction"] == int(np.argmax(r["scores"])) for r in records)
    assert result.best_metrics["accuracy"] == pytest.approx(np.mean([r["prediction"] == r["gold"] for r in records]))
    assert records[0]["choice"].startswith("the ")  # sent2 + ending
    inputs = _encode(result.best_dir, "the cat", "the film was good")
    inputs = {k: v.unsqueeze(1).expand(-1, 2, -1).contiguous() for k, v in inputs.items()}  # (1, 2, seq)
    check_in_transformers(result.best_dir, "MegatronBertForMultipleChoice",
                          _our_model(result.best_dir, "MegatronBertForMultipleChoice"), inputs)


# ------------------------------------------------------------------------ loop behaviour
def test_epochs_give_steps_and_one_evaluation_per_epoch(tiny_model, tmp_path):
    write_mrpc(tmp_path / "train.tsv", 50, seed=11)
    write_mrpc(tmp_path / "dev.tsv", 10, seed=12)
    # 50 examples in batches of 8: 6 full batches per epoch (the partial one is dropped).
    result = finetune("sequence-classification", tiny_model, tmp_path / "train.tsv", tmp_path / "dev.tsv",
                      tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH),
                      config=quick(epochs=1.5, batch_size=8, lr=1e-4))
    assert result.steps == 9 and result.stop_reason == "max_steps"
    assert [h["step"] for h in result.history] == [6, 9]
    run = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert run["steps_per_epoch"] == 6 and run["max_steps"] == 9 and run["warmup_steps"] == 1


def test_early_stopping_after_patience_evaluations(tiny_model, tmp_path):
    write_mrpc(tmp_path / "train.tsv", 64, seed=13)
    write_mrpc(tmp_path / "dev.tsv", 10, seed=14)
    # A vanishing learning rate: the metric never improves after the first evaluation.
    result = finetune("sequence-classification", tiny_model, tmp_path / "train.tsv", tmp_path / "dev.tsv",
                      tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH),
                      config=quick(max_steps=40, eval_every=2, lr=1e-12, metric="accuracy",
                                   early_stopping_patience=2))
    assert result.stop_reason == "early stopping" and not result.interrupted
    assert result.steps == 6
    assert [h["step"] for h in result.history] == [2, 4, 6]
    assert result.best_step == 2
    saved = json.loads(result.results_file.read_text())
    assert saved["stop_reason"] == "early stopping" and saved["best_step"] == 2
    assert json.loads((result.best_dir / "finetune.json").read_text())["step"] == 2


def test_resume_continues_an_interrupted_run(tiny_model, tmp_path, monkeypatch):
    import os
    import signal

    from megabert.train.jobs.finetune import BestModelKeeper

    write_mrpc(tmp_path / "train.tsv", 64, seed=15)
    write_mrpc(tmp_path / "dev.tsv", 10, seed=16)
    args = (tiny_model, tmp_path / "train.tsv", tmp_path / "dev.tsv")
    data = DataOptions(max_length=MAX_LENGTH)
    whole = finetune("sequence-classification", *args, tmp_path / "whole", data=data,
                     config=quick(max_steps=8, eval_every=4))

    # Ctrl-C during the evaluation of step 4: the trainer finishes the step, checkpoints, stops.
    on_evaluate = BestModelKeeper.on_evaluate

    def interrupt_at_4(self, trainer, step, results):
        on_evaluate(self, trainer, step, results)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(BestModelKeeper, "on_evaluate", interrupt_at_4)
    stopped = finetune("sequence-classification", *args, tmp_path / "parts", data=data,
                       config=quick(max_steps=8, eval_every=4))
    assert stopped.interrupted and stopped.stop_reason == "SIGINT" and stopped.steps == 4
    monkeypatch.setattr(BestModelKeeper, "on_evaluate", on_evaluate)
    resumed = finetune("sequence-classification", *args, tmp_path / "parts", data=data,
                       config=quick(max_steps=8, eval_every=4, resume="auto"))
    assert resumed.steps == 8 and resumed.stop_reason == "max_steps"
    assert [h["step"] for h in resumed.history] == [4, 8]
    assert resumed.train.losses == pytest.approx(whole.train.losses[4:], abs=1e-5)
    assert resumed.best_step == whole.best_step
    assert resumed.best_metrics["loss"] == pytest.approx(whole.best_metrics["loss"], abs=1e-5)


def test_random_init_keeps_config_not_weights(tiny_model):
    from megabert.modeling.pretrained import read_state_dict

    scheme = LabelScheme("sequence-classification", ("a", "b"), "single_label_classification")
    stored = read_state_dict(tiny_model)["bert.embeddings.word_embeddings.weight"]
    torch.manual_seed(1)
    loaded = build_model("sequence-classification", tiny_model, scheme)
    torch.manual_seed(1)
    fresh = build_model("sequence-classification", tiny_model, scheme, random_init=True)
    assert torch.equal(loaded.bert.embeddings.word_embeddings.weight, stored)
    assert not torch.equal(fresh.bert.embeddings.word_embeddings.weight, stored)
    assert fresh.config.hidden_size == loaded.config.hidden_size == 32
    assert loaded.config.unpad_inputs and loaded.config.id2label == {0: "a", 1: "b"}


def test_evaluate_function_without_labels(tiny_model, tmp_path):
    write_conll(tmp_path / "train.txt", 40, seed=17)
    write_conll(tmp_path / "dev.txt", 8, seed=18)
    result = finetune("token-classification", tiny_model, tmp_path / "train.txt", tmp_path / "dev.txt",
                      tmp_path / "out", data=DataOptions(max_length=MAX_LENGTH), config=quick(max_steps=3))
    (tmp_path / "words.txt").write_text("john\nlives\nin\nparis\n\nibm\n")
    predicted = evaluate(result.best_dir, tmp_path / "words.txt", labeled=False, progress=False)
    assert predicted.task == "token-classification" and predicted.metrics == {}
    assert [r["words"] for r in predicted.records] == [["john", "lives", "in", "paris"], ["ibm"]]
    assert all(t in ("B-LOC", "B-ORG", "B-PER", "I-PER", "O") for r in predicted.records for t in r["tags"])


@pytest.mark.parametrize("reference_loss", [False, True])
def test_question_answering_training_loss_with_and_without_reference_loss(tiny_model, tmp_path, reference_loss):
    """Training mode on a padded batch: --reference-loss gives transformers' QA loss exactly; the
    default (unpadded) leaves the pads out of the softmax, a lower loss (README, Differences)."""
    import shutil

    import transformers

    folder = tmp_path / "no-dropout"  # training mode without dropout: deterministic
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    scheme = LabelScheme("question-answering")
    ours = build_model("question-answering", folder, scheme, unpad_training=not reference_loss).train()
    ref = transformers.MegatronBertForQuestionAnswering.from_pretrained(folder).train()
    ref.qa_outputs.load_state_dict(ours.qa_outputs.state_dict())  # the same fresh head
    torch.manual_seed(0)
    ids = torch.randint(5, ours.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[1, 4:] = 0
    starts, ends = torch.tensor([2, 1, 5]), torch.tensor([4, 3, 9])
    got = ours(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss
    expected = ref(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss
    if reference_loss:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:
        assert got < expected - 1e-3  # pads no longer share the probability mass
