"""Metrics: hand-computed values, and scikit-learn / scipy as the reference on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from megabert.errors import UserError
from megabert.train.jobs import metrics as M

# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def test_hand_computed_binary_scores():
    pred = [1, 1, 0, 0, 1, 0]
    gold = [1, 0, 0, 1, 1, 0]
    # tp=2 (0, 4), fp=1 (1), fn=1 (3), tn=2
    assert M.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert M.f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / sqrt(3*3*3*3)
    assert M.matthews_corrcoef(pred, gold) == pytest.approx(3 / 9)
    # class 0: tp=2 fp=1 fn=1 -> 2/3 as well
    assert M.f1_macro(pred, gold) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_classification_matches_sklearn(seed, classes):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, classes, 200)
    pred = np.where(rng.random(200) < 0.6, gold, rng.integers(0, classes, 200))
    assert M.accuracy(pred, gold) == pytest.approx(skm.accuracy_score(gold, pred))
    assert M.matthews_corrcoef(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred))
    assert M.f1_macro(pred, gold) == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    if classes == 2:
        assert M.f1_binary(pred, gold) == pytest.approx(skm.f1_score(gold, pred))


def test_classification_edge_cases():
    # A constant prediction has no correlation with anything.
    assert M.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert M.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
    assert M.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # The positive class never predicted nor present: F1 is 0, not a division error.
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
    assert M.f1_macro([0, 0], [0, 0]) == pytest.approx(1.0)  # class 0 perfect, the only class
    assert M.f1_macro([0, 0], [0, 0], labels=[0, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        M.accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no predictions"):
        M.accuracy([], [])


# --------------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=300)
    y = 0.5 * x + rng.normal(size=300)
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    # Ties (STS-B scores come in steps of 0.2): average ranks, as scipy.
    xt = np.round(x * 2) / 2
    yt = rng.integers(0, 6, 300).astype(float)
    assert M.spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0])
    np.testing.assert_allclose(M.rank(xt), stats.rankdata(xt))


def test_correlation_edge_cases():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3], [1, 8, 27]) == pytest.approx(1.0)  # monotone, not linear
    assert M.pearson([1, 2, 3], [1, 8, 27]) < 1.0
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))  # constant: undefined, as scipy
    assert math.isnan(M.spearman([1, 2, 3], [5, 5, 5]))
    assert M.mean_squared_error([1, 2], [2, 4]) == pytest.approx((1 + 4) / 2)


# --------------------------------------------------------------------------------------------
# Multi-label
# --------------------------------------------------------------------------------------------


def test_multi_label_matches_sklearn():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, (50, 4))
    pred = np.where(rng.random((50, 4)) < 0.7, gold, 1 - gold)
    scores = M.multi_label_scores(pred, gold)
    assert scores["micro_f1"] == pytest.approx(skm.f1_score(gold, pred, average="micro"))
    assert scores["macro_f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    assert scores["subset_accuracy"] == pytest.approx(skm.accuracy_score(gold, pred))


# --------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------


def test_extract_entities_bio_and_iob1():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O"]
    assert M.extract_entities(tags) == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 5)]
    # IOB1 / sloppy BIO: an I- without a B- starts an entity; a type change starts a new one.
    assert M.extract_entities(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert M.extract_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert M.extract_entities(["O", "O"]) == []
    assert M.extract_entities(["B-ORG"]) == [("ORG", 0, 0)]
    with pytest.raises(ValueError, match="'PER' is not 'O', 'B-TYPE' or 'I-TYPE'"):
        M.extract_entities(["PER"])


def test_entity_scores_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
    # gold: PER(0-1), LOC(3), ORG(0), MISC(2-3) -> 4; pred: PER(0-1), ORG(3), ORG(0), MISC(2) -> 4
    # hits: PER, ORG(0) -> 2 (MISC has the wrong span, ORG(3) the wrong type)
    s = M.entity_scores(pred, gold)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["per_type"]["PER"]["f1"] == pytest.approx(1.0)
    assert s["per_type"]["ORG"]["precision"] == pytest.approx(0.5)
    assert s["per_type"]["ORG"]["recall"] == pytest.approx(1.0)
    assert s["per_type"]["LOC"]["recall"] == 0.0
    assert s["per_type"]["MISC"]["f1"] == 0.0
    # Nothing predicted: precision 0, not a division error.
    none = M.entity_scores([["O", "O"]], [["B-PER", "O"]])
    assert (none["precision"], none["recall"], none["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags but 2 reference tags"):
        M.entity_scores([["O"]], [["O", "O"]])


# --------------------------------------------------------------------------------------------
# SQuAD
# --------------------------------------------------------------------------------------------


def test_squad_normalisation_and_scores():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.normalize_answer("an apple a day") == "apple day"
    assert M.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert M.squad_exact_match("the Denver Broncos", "Denver Broncos.") == 1.0
    # pred tokens: denver broncos won; gold: denver broncos -> p=2/3, r=1, f1=0.8
    assert M.squad_f1("Denver Broncos won", "the Denver Broncos") == pytest.approx(0.8)
    assert M.squad_f1("", "") == 1.0
    assert M.squad_f1("x", "") == 0.0
    scores = M.squad_scores(["Denver Broncos won", "1996"], [["Broncos", "the Denver Broncos"], ["in 1995"]])
    # q1: EM 0, F1 max(0.5, 0.8) = 0.8; q2: EM 0, F1 0
    assert scores == {"exact_match": 0.0, "f1": pytest.approx(40.0)}


def test_squad_v2_unanswerable_and_dicts():
    preds = {"a": "", "b": "Paris", "c": "somewhere"}
    refs = {"a": [], "b": ["Paris", "in Paris"], "c": []}
    s = M.squad_scores(preds, refs)
    assert s["exact_match"] == pytest.approx(200 / 3)
    assert s["has_answer_exact_match"] == 100.0
    assert s["no_answer_exact_match"] == 50.0
    assert s["no_answer_total"] == 2.0
    with pytest.raises(ValueError, match="1 question\\(s\\) have no prediction, e.g. 'c'"):
        M.squad_scores({"a": "", "b": "Paris"}, refs)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def test_compute_metrics_dispatch():
    s = M.compute_metrics("sequence-classification", [1, 0, 1, 1], [1, 0, 0, 1])
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["f1"] == pytest.approx(0.8)  # tp=2 fp=1 fn=0
    assert set(s) == {"accuracy", "macro_f1", "mcc", "f1"}
    s3 = M.compute_metrics("sequence-classification", [0, 1, 2], [0, 1, 1])
    assert "f1" not in s3 and s3["accuracy"] == pytest.approx(2 / 3)
    named = M.compute_metrics("sequence-classification", ["pos", "neg"], ["pos", "pos"], label_list=["neg", "pos"])
    assert named["f1"] == pytest.approx(2 / 3)
    r = M.compute_metrics("regression", [1.0, 2.0, 3.0], [1.0, 2.5, 2.9])
    assert r["pearson"] == pytest.approx(stats.pearsonr([1, 2, 3], [1, 2.5, 2.9])[0])
    assert r["pearson_spearman_mean"] == pytest.approx((r["pearson"] + r["spearman"]) / 2)
    t = M.compute_metrics("token-classification", [["B-PER", "O"]], [["B-PER", "O"]])
    assert t["f1"] == 1.0 and t["PER_f1"] == 1.0
    pos = M.compute_metrics("token-classification", [["NN", "VB"]], [["NN", "NN"]])
    assert pos == {"accuracy": 0.5}
    assert M.compute_metrics("multiple-choice", [0, 1, 1], [0, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    assert M.compute_metrics("question-answering", ["a cat"], [["cat"]])["exact_match"] == 100.0
    with pytest.raises(UserError, match="unknown metric task 'nope'"):
        M.compute_metrics("nope", [1], [1])
