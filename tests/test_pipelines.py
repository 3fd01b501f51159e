"""Pipelines: parity with `transformers` 4.37 pipelines on tiny random models saved by `transformers`,
heads' outputs computed by hand where `transformers` has no pipeline, batching and streaming, errors."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from megabert.errors import UserError  # noqa: E402
from megabert.inference.base import InputError  # noqa: E402
from megabert.inference.pipelines import pipeline  # noqa: E402
from tests.reference import V5, only_v4, reference_tokenizer  # noqa: E402

pytestmark = pytest.mark.reference

WORDS = """the a an of to in is was and or but for on at by with from as it this that he she they we
you paris france london england capital city river music art book books read reads write writer wrote
new york john smith mary works worked company apple google microsoft germany berlin small large big
good bad great movie film love hate day night year old young man woman people time first last long
who what where when why how which question answer one two three four five play played run house home
car red blue green cat dog . , ! ? ' - ( ) : ;""".split()
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "MISC"}
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)


def build_model_folder(
    folder: Path, class_name: str, *, seed: int = 0, head_scale: float = 30.0, tokenizer: bool = True, **config: object
) -> Path:
    """Save a tiny random `transformers` MegatronBERT (and a BertTokenizerFast over WORDS) into ``folder``.

    Head weights are scaled up so that the random model's outputs are far from uniform (no
    near-ties for the rankings the tests compare).
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + ["##s", "##ing", "##ed", "##er", "##ly"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if tokenizer:
        tok = reference_tokenizer(folder / "vocab.txt", do_lower_case=True, model_max_length=64)
        tok.save_pretrained(folder)
    else:
        (folder / "vocab.txt").unlink()
    settings = dict(TINY, vocab_size=len(vocab), initializer_range=0.2)
    settings.update(config)
    hf_config = transformers.MegatronBertConfig(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("classifier.", "qa_outputs.", "cls.seq_relationship.")) and name.endswith("weight"):
                param.mul_(head_scale)
    model.save_pretrained(folder)
    return folder


def hf_model(folder: Path, class_name: str):
    return getattr(transformers, class_name).from_pretrained(folder).eval()


def hf_tokenizer(folder: Path):
    return transformers.BertTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "mlm": build_model_folder(root / "mlm", "MegatronBertForMaskedLM", initializer_range=0.5),
            "pretraining": build_model_folder(root / "pretraining", "MegatronBertForPreTraining", seed=1),
            "cls": build_model_folder(
                root / "cls", "MegatronBertForSequenceClassification", id2label={0: "neg", 1: "pos", 2: "neutral"},
                label2id={"neg": 0, "pos": 1, "neutral": 2},
            ),
            "multilabel": build_model_folder(
                root / "multilabel", "MegatronBertForSequenceClassification", num_labels=4,
                problem_type="multi_label_classification", seed=2,
            ),
            "regression": build_model_folder(
                root / "regression", "MegatronBertForSequenceClassification", num_labels=1, problem_type="regression", seed=3
            ),
            "ner": build_model_folder(
                root / "ner", "MegatronBertForTokenClassification", id2label=NER_LABELS,
                label2id={v: k for k, v in NER_LABELS.items()}, seed=4, head_scale=10.0,
            ),
            "qa": build_model_folder(root / "qa", "MegatronBertForQuestionAnswering", seed=5, head_scale=10.0),
            "mc": build_model_folder(root / "mc", "MegatronBertForMultipleChoice", seed=6),
            "nsp": build_model_folder(root / "nsp", "MegatronBertForNextSentencePrediction", seed=7),
            "base": build_model_folder(root / "base", "MegatronBertModel", seed=8),
        }  # fmt: skip


def hf_pipeline(task: str, folder: Path, **kwargs: object):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.pipeline(task, model=str(folder), device=-1, **kwargs)


def assert_same_records(ours: list[dict], theirs: list[dict], score_keys: tuple[str, ...] = ("score",)) -> None:
    """Same keys and values; scores within 1e-4."""
    assert len(ours) == len(theirs), (ours, theirs)
    for a, b in zip(ours, theirs):
        assert set(a) == set(b), (a, b)
        for key in a:
            if key in score_keys:
                assert a[key] == pytest.approx(float(b[key]), abs=1e-4), (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)


# ------------------------------------------------------------------------------ parity
def test_fill_mask_matches_transformers(folders: dict[str, Path]) -> None:
    texts = ["paris is the [MASK] of france .", "the [MASK] wrote a book about cats .", "john's [MASK] worked in berlin"]
    ours = pipeline("fill-mask", folders["mlm"], device="cpu")
    theirs = hf_pipeline("fill-mask", folders["mlm"])
    for text in texts:
        assert_same_records(ours(text, top_k=4), theirs(text, top_k=4))
    # Several texts at once, in order; restricted targets.
    for a, b in zip(ours(texts, top_k=2), theirs(texts, top_k=2)):
        assert_same_records(a, b)
    targets = ["paris", "london", "music", "cat"]
    assert_same_records(ours(texts[0], targets=targets, top_k=3), theirs(texts[0], targets=targets, top_k=3))
    # Several masks: one list per mask with the same tokens and scores; our sequences keep the
    # other mask and drop [CLS]/[SEP] (transformers keeps every special token there).
    two = "the [MASK] wrote a [MASK] ."
    mine, ref = ours(two, top_k=8), theirs(two, top_k=8)
    assert len(mine) == 2
    for a, b in zip(mine, ref):
        assert [x["token"] for x in a] == [x["token"] for x in b]
        assert [x["token_str"] for x in a] == [x["token_str"] for x in b]
        np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-4)
    first = next(x for x in mine[0] if not x["token_str"].startswith(("[", "#")))
    second = next(x for x in mine[1] if not x["token_str"].startswith(("[", "#")))
    assert first["sequence"] == f"the {first['token_str']} wrote a [MASK]."
    assert second["sequence"] == f"the [MASK] wrote a {second['token_str']}."


def test_fill_mask_on_a_pretraining_checkpoint(folders: dict[str, Path]) -> None:
    """A ForPreTraining folder has the MLM head: fill-mask runs on it like transformers' does."""
    text = "mary [MASK] a book ."
    ours = pipeline("fill-mask", folders["pretraining"], device="cpu")(text, top_k=3)
    assert_same_records(ours, hf_pipeline("fill-mask", folders["pretraining"])(text, top_k=3))


def test_text_classification_matches_transformers(folders: dict[str, Path]) -> None:
    texts = ["a good movie", "a bad film about a dog", "john smith wrote the book in paris ."]
    ours = pipeline("text-classification", folders["cls"], device="cpu", batch_size=2)
    theirs = hf_pipeline("text-classification", folders["cls"])
    assert_same_records(ours(texts), theirs(texts))
    assert_same_records([ours(texts[0])], theirs(texts[0]))  # transformers wraps a single result in a list
    for a, b in zip(ours(texts, top_k=None), theirs(texts, top_k=None)):
        assert [x["label"] for x in a] == [x["label"] for x in b]
        assert_same_records(a, b)
    for a, b in zip(ours(texts, top_k=2), theirs(texts, top_k=2)):
        assert_same_records(a, b)
    # Text pairs: a tuple or a dict, as transformers' {"text", "text_pair"}.
    pair = {"text": "a good movie", "text_pair": "a great film"}
    assert_same_records([ours(pair)], [theirs(pair)])
    assert ours(("a good movie", "a great film")) == ours(pair)
    # Mixed singles and pairs in one call keep their order.
    mixed = ours([texts[0], ("a good movie", "a great film"), texts[1]])
    assert_same_records(mixed, [ours(texts[0]), ours(pair), ours(texts[1])])


def test_multi_label_and_regression(folders: dict[str, Path]) -> None:
    texts = ["a good movie", "the dog played music in london"]
    ours = pipeline("text-classification", folders["multilabel"], device="cpu")
    theirs = hf_pipeline("text-classification", folders["multilabel"])
    for a, b in zip(ours(texts, top_k=None), theirs(texts, top_k=None)):
        assert_same_records(a, b)  # sigmoid per label
    # Regression: the raw score (transformers would apply a sigmoid to a one-label model).
    model, tok = hf_model(folders["regression"], "MegatronBertForSequenceClassification"), hf_tokenizer(folders["regression"])
    with torch.no_grad():
        expected = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    results = pipeline("text-classification", folders["regression"], device="cpu")(texts)
    assert [r["label"] for r in results] == ["LABEL_0", "LABEL_0"]
    np.testing.assert_allclose([r["score"] for r in results], expected, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_matches_transformers(folders: dict[str, Path], strategy: str) -> None:
    texts = [
        "john smith worked for apple in new york and paris .",
        "mary reads books in london",
        "Ω playing runs , the cats played",  # an unknown character and word-pieces
        "",
    ]
    ours = pipeline("token-classification", folders["ner"], device="cpu", aggregation_strategy=strategy)
    theirs = hf_pipeline("token-classification", folders["ner"], aggregation_strategy=strategy)
    mine, ref = ours(texts), theirs(texts)
    for a, b in zip(mine, ref):
        assert_same_records(a, b)
    # The grouping is not trivial here: several groups and labels occur.
    if strategy == "simple":
        assert len({e["entity_group"] for r in mine for e in r}) >= 2
        assert sum(len(r) for r in mine) >= 4
    for text, result in zip(texts, mine):
        for entity in result:
            assert 0 <= entity["start"] < entity["end"] <= len(text)


def test_token_classification_reads_long_texts_in_windows(folders: dict[str, Path]) -> None:
    """A text longer than the model: every word-piece gets the scores of the window where it is most central."""
    text = " ".join(["john smith worked in new york and paris with mary ."] * 12)
    ours = pipeline("token-classification", folders["ner"], device="cpu", ignore_labels=[], stride=20)
    result = ours(text)
    tok = hf_tokenizer(folders["ner"])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 62 and [e["index"] for e in result] == list(range(1, len(ids) + 1))
    # Windows of 62 pieces every 42: the first piece comes from the first window, the last from the last.
    model = hf_model(folders["ner"], "MegatronBertForTokenClassification")

    def window_probs(start: int) -> torch.Tensor:
        row = [tok.cls_token_id, *ids[start : start + 62], tok.sep_token_id]
        with torch.no_grad():
            return model(torch.tensor([row])).logits[0, 1:-1].softmax(-1)

    first, last = window_probs(0), window_probs(len(ids) - 62)
    assert result[0]["score"] == pytest.approx(first[0].max().item(), abs=1e-4)
    assert result[30]["score"] == pytest.approx(first[30].max().item(), abs=1e-4)
    assert result[-1]["score"] == pytest.approx(last[-1].max().item(), abs=1e-4)
    assert result[-1]["end"] == len(text)


@only_v4("the question-answering pipeline")
def test_question_answering_matches_transformers(folders: dict[str, Path]) -> None:
    short = "mary played music in london . john worked in berlin ."
    long = " ".join(["john smith wrote a book about paris in the year one . mary played music in london ."] * 6)
    questions = [
        {"question": "where did mary play music ?", "context": short},
        {"question": "who wrote the book ?", "context": long},  # several windows
    ]
    ours = pipeline("question-answering", folders["qa"], device="cpu")
    theirs = hf_pipeline("question-answering", folders["qa"])
    assert_same_records(ours(questions), theirs(questions))
    for options in ({"top_k": 3}, {"top_k": 2, "max_answer_len": 3}, {"top_k": 3, "max_seq_len": 40, "doc_stride": 10}):
        for a, b in zip(ours(questions, **options), theirs(questions, **options)):
            assert_same_records(a, b)
    assert_same_records(
        [ours(questions[0], handle_impossible_answer=True)], [theirs(questions[0], handle_impossible_answer=True)]
    )
    answer = ours(("who wrote the book ?", long))
    assert long[answer["start"] : answer["end"]] == answer["answer"]


def test_feature_extraction_matches_transformers(folders: dict[str, Path]) -> None:
    texts = ["john smith worked in new york .", "mary reads books"]
    ours = pipeline("feature-extraction", folders["base"], device="cpu")
    theirs = hf_pipeline("feature-extraction", folders["base"])
    for a, b in zip(ours(texts), theirs(texts)):
        np.testing.assert_allclose(np.array(a), np.array(b[0]), atol=1e-4)  # transformers adds a batch axis
    # Pooled vectors, by hand from the reference model.
    model, tok = hf_model(folders["base"], "MegatronBertModel"), hf_tokenizer(folders["base"])
    with torch.no_grad():
        out = model(**tok(texts[0], return_tensors="pt"))
    hidden = out.last_hidden_state[0]
    expected = {"cls": hidden[0], "mean": hidden.mean(0), "pooler": out.pooler_output[0]}
    for pooling, vector in expected.items():
        np.testing.assert_allclose(ours(texts[0], pooling=pooling), vector.numpy(), atol=1e-4)
        unit = ours(texts[0], pooling=pooling, normalize=True)
        np.testing.assert_allclose(unit, (vector / vector.norm()).numpy(), atol=1e-5)
    tensors = ours(texts, pooling="mean", return_tensors=True)
    assert isinstance(tensors[0], torch.Tensor) and tensors[0].shape == (32,)
    # Mean pooling ignores padding: the same vector alone or batched with a longer text.
    np.testing.assert_allclose(ours(texts[1], pooling="mean"), ours(texts, pooling="mean")[1], atol=1e-5)


def test_next_sentence_is_the_softmax_of_the_nsp_head(folders: dict[str, Path]) -> None:
    pairs = [("john wrote a book .", "mary read it ."), ("the cat played .", "paris is in france .")]
    model, tok = hf_model(folders["nsp"], "MegatronBertForNextSentencePrediction"), hf_tokenizer(folders["nsp"])
    with torch.no_grad():
        expected = [model(**tok(a, b, return_tensors="pt")).logits.softmax(-1)[0, 0].item() for a, b in pairs]
    results = pipeline("next-sentence", folders["nsp"], device="cpu")(pairs)
    np.testing.assert_allclose([r["probability"] for r in results], expected, atol=1e-5)
    assert [r["is_next"] for r in results] == [p >= 0.5 for p in expected]
    # The pretraining checkpoint's NSP head serves too.
    model = hf_model(folders["pretraining"], "MegatronBertForPreTraining")
    with torch.no_grad():
        p = model(**tok(*pairs[0], return_tensors="pt")).seq_relationship_logits.softmax(-1)[0, 0].item()
    single = pipeline("next-sentence", folders["pretraining"], device="cpu")({"text": pairs[0][0], "text_pair": pairs[0][1]})
    assert single["probability"] == pytest.approx(p, abs=1e-5)


def test_multiple_choice_is_the_softmax_over_choices(folders: dict[str, Path]) -> None:
    items = [
        {"question": "who wrote the book ?", "choices": ["john", "mary smith", "the old dog in paris"]},
        {"question": "where is paris ?", "choices": ["in france", "in england"]},
    ]
    model, tok = hf_model(folders["mc"], "MegatronBertForMultipleChoice"), hf_tokenizer(folders["mc"])
    expected = []
    for item in items:
        enc = tok([item["question"]] * len(item["choices"]), item["choices"], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**{k: v[None] for k, v in enc.items()}).logits[0]
        expected.append(logits.softmax(-1).tolist())
    results = pipeline("multiple-choice", folders["mc"], device="cpu", batch_size=2)(items)
    for item, result, probs in zip(items, results, expected):
        np.testing.assert_allclose(result["scores"], probs, atol=1e-5)
        best = int(np.argmax(probs))
        assert result["label"] == best and result["choice"] == item["choices"][best]
        assert result["score"] == pytest.approx(probs[best], abs=1e-5)
    single = pipeline("multiple-choice", folders["mc"], device="cpu")(("where is paris ?", ["in france", "in england"]))
    np.testing.assert_allclose(single["scores"], expected[1], atol=1e-5)


# --------------------------------------------------------------- batching and streaming
def test_length_sorted_batches_keep_input_order(folders: dict[str, Path]) -> None:
    texts = [" ".join(["good"] * n) + " movie" for n in (9, 1, 30, 4, 17, 2, 25, 6)]
    one_by_one = [pipeline("text-classification", folders["cls"], device="cpu")(t, top_k=None) for t in texts]
    for batch_size, lookahead in ((1, 1), (3, 4), (16, None)):
        pipe = pipeline("text-classification", folders["cls"], device="cpu", batch_size=batch_size, lookahead=lookahead)
        for got, want in zip(pipe(texts, top_k=None), one_by_one):
            assert [x["label"] for x in got] == [x["label"] for x in want]
            np.testing.assert_allclose([x["score"] for x in got], [x["score"] for x in want], atol=1e-5)


def test_unpadded_and_padded_runs_agree(folders: dict[str, Path]) -> None:
    texts = ["john smith worked in new york .", "mary", "the cat played music in london with the dog ."]
    a = pipeline("token-classification", folders["ner"], device="cpu", unpad_inputs=True)(texts)
    b = pipeline("token-classification", folders["ner"], device="cpu", unpad_inputs=False)(texts)
    for x, y in zip(a, b):
        assert_same_records(x, y)


def test_stream_is_lazy_and_ordered(folders: dict[str, Path]) -> None:
    pipe = pipeline("fill-mask", folders["mlm"], device="cpu", batch_size=2, lookahead=3)
    consumed = []

    def endless():
        for i in itertools.count():
            consumed.append(i)
            yield ["the [MASK] .", "a [MASK] movie about paris"][i % 2]

    results = list(itertools.islice(pipe.stream(endless(), top_k=1), 5))
    assert len(results) == 5 and len(consumed) <= 6  # read a lookahead at a time, not the whole stream
    assert_same_records(results[0], pipe("the [MASK] .", top_k=1))
    assert_same_records(results[1], pipe("a [MASK] movie about paris", top_k=1))
    assert_same_records(results[4], results[0])


def test_dtype_bfloat16_runs_close_to_float32(folders: dict[str, Path]) -> None:
    texts = ["a good movie", "the dog played music in london"]
    full = pipeline("text-classification", folders["cls"], device="cpu")(texts, top_k=None)
    half = pipeline("text-classification", folders["cls"], device="cpu", dtype="bfloat16")(texts, top_k=None)
    for a, b in zip(full, half):
        assert {x["label"]: x["score"] for x in a} == pytest.approx({x["label"]: x["score"] for x in b}, abs=0.05)


def test_model_object_and_tokenizer_object(folders: dict[str, Path]) -> None:
    from megabert import MegatronBertForQuestionAnswering
    from megabert.tokenization import MegatronBertTokenizer

    model = MegatronBertForQuestionAnswering.from_pretrained(folders["qa"])
    tok = MegatronBertTokenizer.from_pretrained(folders["qa"])
    item = {"question": "who wrote it ?", "context": "john wrote it in paris ."}
    assert_same_records([pipeline("qa", model, tok)(item)], [pipeline("question-answering", folders["qa"], device="cpu")(item)])
    with pytest.raises(UserError, match="needs a MegatronBertForMaskedLM or MegatronBertForPreTraining, got a MegatronBertForQuestionAnswering"):
        pipeline("fill-mask", model, tok)
    with pytest.raises(UserError, match="without a tokenizer"):
        pipeline("qa", model)


# ------------------------------------------------------------------------------ errors
def test_bad_inputs_name_the_input(folders: dict[str, Path]) -> None:
    fill = pipeline("fill-mask", folders["mlm"], device="cpu")
    with pytest.raises(InputError, match=r"input 1: no \[MASK\] token in the text") as info:
        fill(["the [MASK] .", "no mask here"])
    assert info.value.index == 1
    with pytest.raises(InputError, match="input 0: text must be a str, got int"):
        fill([3])
    long = "the [MASK] " + "good " * 80
    with pytest.raises(InputError, match=r"input 0: 84 tokens, more than the model takes \(64\); .*truncation=True"):
        fill(long)
    assert len(fill(long, truncation=True)) == 5
    with pytest.raises(InputError, match=r"a \[MASK\] lies beyond the model's 64 tokens"):
        fill("good " * 80 + "[MASK]", truncation=True)
    with pytest.raises(UserError, match=r"target 'zebra' is not a token of the vocabulary \(it splits into \['\[UNK\]'\]\)"):
        fill("the [MASK] .", targets=["zebra"])
    with pytest.raises(UserError, match="top_k must be a positive integer, got 0"):
        fill("the [MASK] .", top_k=0)
    with pytest.raises(UserError, match="unknown option.*aggregation_strategy.*it takes targets, top_k, truncation"):
        fill("the [MASK] .", aggregation_strategy="simple")

    qa = pipeline("question-answering", folders["qa"], device="cpu")
    with pytest.raises(InputError, match="input 0: the context is empty"):
        qa({"question": "who ?", "context": "  "})
    with pytest.raises(InputError, match=r"the question has 70 tokens: .*max_seq_len=64"):
        qa({"question": "who " * 70, "context": "john"})
    with pytest.raises(InputError, match="a dict input needs 'question' and 'context'"):
        qa({"question": "who ?"})
    with pytest.raises(UserError, match=r"doc_stride \(64\) must be smaller than max_seq_len \(64\)"):
        qa({"question": "who ?", "context": "john"}, doc_stride=64)
    mc = pipeline("multiple-choice", folders["mc"], device="cpu")
    with pytest.raises(InputError, match="choices must be a non-empty list of str"):
        mc({"question": "q", "choices": []})
    nsp = pipeline("next-sentence", folders["nsp"], device="cpu")
    with pytest.raises(InputError, match=r"expected a pair of texts \(text, text_pair\), got one str"):
        nsp(["just one text"])
    ner = pipeline("token-classification", folders["ner"], device="cpu")
    with pytest.raises(UserError, match="aggregation_strategy must be one of 'none', 'simple'"):
        ner("john", aggregation_strategy="best")
    base = pipeline("feature-extraction", folders["mlm"], device="cpu")
    with pytest.raises(UserError, match='pooling="pooler" needs pooler weights, and this checkpoint has none'):
        base("john", pooling="pooler")


def test_bad_model_folders(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown task 'summarize'"):
        pipeline("summarize", folders["mlm"])
    with pytest.raises(UserError, match=f"model folder {tmp_path / 'nope'} does not exist"):
        pipeline("fill-mask", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        pipeline("fill-mask", tmp_path / "empty")
    bare = build_model_folder(tmp_path / "bare", "MegatronBertForMaskedLM", tokenizer=False)
    with pytest.raises(UserError, match=r"has no tokenizer files \(tokenizer.json or vocab.txt\)"):
        pipeline("fill-mask", bare)
    with pytest.raises(UserError, match=r"has no masked-lm head, which the fill-mask pipeline needs \(heads in the checkpoint: classifier\)"):
        pipeline("fill-mask", folders["ner"], device="cpu")
    with pytest.raises(UserError, match=r"is a MegatronBertForTokenClassification; use the token-classification pipeline \(megabert tokens\)"):
        pipeline("text-classification", folders["ner"], device="cpu")
    with pytest.raises(UserError, match="has no next-sentence head"):
        pipeline("next-sentence", folders["mlm"], device="cpu")
    config = json.loads((folders["mlm"] / "config.json").read_text())
    assert config["architectures"] == ["MegatronBertForMaskedLM"]
    with pytest.raises(UserError, match="dtype 'int8' is not one of float32, bfloat16, float16, auto"):
        pipeline("fill-mask", folders["mlm"], device="cpu", dtype="int8")
    with pytest.raises(UserError, match="batch_size must be a positive integer, got 0"):
        pipeline("fill-mask", folders["mlm"], device="cpu", batch_size=0)
