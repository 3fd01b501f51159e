"""Examples -> model features per head, the collator, and QA span decoding.

The features are built with our tokenizer and with ``transformers.BertTokenizerFast`` (the same
call API) on a tiny vocabulary; QA decoding is checked against transformers' question-answering
pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megabert.data.features import (
    IGNORE_INDEX,
    Collator,
    QAWindow,
    encode_examples,
    encode_multiple_choice,
    encode_question_answering,
    encode_sequence_classification,
    encode_token_classification,
    word_predictions,
)
from megabert.data.tasks import Answer, ChoiceExample, QAExample, SequenceExample, TokenExample
from megabert.errors import UserError
from megabert.inference.qa_decoding import answer_texts, decode_example, decode_predictions
from tests.reference import only_v4, reference_tokenizer

pytestmark = pytest.mark.reference

VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] . , ? ' - ! the a cat sat on mat dog ran in park who what where when"
    " did is was john smith lives paris new york city and he she it of to born 1990 went home big red house"
    " un ##believ ##able hyper ##para ##meter ##s zur ##ich team won game go live"
).split()


@pytest.fixture(scope="module", params=["megabert", "transformers"])
def tokenizer(request, tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    if request.param == "megabert":
        tokenization = pytest.importorskip("megabert.tokenization")
        return tokenization.MegatronBertTokenizer.from_pretrained(vocab, lowercase=True)
    return reference_tokenizer(vocab, do_lower_case=True)


def ids(tokenizer, tokens: str) -> list[int]:
    return [VOCAB.index(t) for t in tokens.split()]


# --------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------


def test_sequence_classification_single_and_pair(tokenizer):
    examples = [
        SequenceExample("The cat sat.", "A dog ran.", "pos", "f:1"),
        SequenceExample("John lives in Paris", "he ran", "neg", "f:2"),
    ]
    fs = encode_sequence_classification(examples, tokenizer, max_length=32, label_list=["neg", "pos"], progress=False)
    assert fs.rows[0]["input_ids"] == ids(tokenizer, "[CLS] the cat sat . [SEP] a dog ran . [SEP]")
    assert fs.rows[0]["token_type_ids"] == [0] * 6 + [1] * 5
    assert fs.rows[0]["attention_mask"] == [1] * 11
    assert [r["labels"] for r in fs.rows] == [1, 0]
    assert fs.num_truncated == 0 and fs.label_list == ["neg", "pos"]
    single = encode_sequence_classification(
        [SequenceExample("unbelievable", None, "pos")], tokenizer, max_length=8, label_list=["neg", "pos"]
    )
    assert single.rows[0]["input_ids"] == ids(tokenizer, "[CLS] un ##believ ##able [SEP]")
    assert single.rows[0]["token_type_ids"] == [0] * 5


def test_sequence_classification_truncation_is_counted(tokenizer, caplog):
    long = SequenceExample("the cat sat on the mat and the dog ran in the park", "he went home", "pos")
    short = SequenceExample("the cat", "a dog", "neg")
    with caplog.at_level("WARNING", logger="megabert.data"):
        fs = encode_sequence_classification([long, short], tokenizer, max_length=10, label_list=["neg", "pos"])
    # longest_first: tokens come off the longer text until both fit in 10 - 3 specials.
    assert fs.rows[0]["input_ids"] == ids(tokenizer, "[CLS] the cat sat on [SEP] he went home [SEP]")
    assert fs.num_truncated == 1
    assert "1 of 2 examples were longer than max_length=10" in caplog.text
    exact = SequenceExample("the cat sat on the mat and", None, "pos")  # 7 words + 2 specials
    fs2 = encode_sequence_classification([exact], tokenizer, max_length=9, label_list=["neg", "pos"])
    assert len(fs2.rows[0]["input_ids"]) == 9 and fs2.num_truncated == 0  # a full row is not a cut row


def test_sequence_classification_label_kinds(tokenizer):
    reg = encode_sequence_classification(
        [SequenceExample("a cat", "a dog", 3.8)], tokenizer, max_length=16, problem_type="regression"
    )
    assert reg.rows[0]["labels"] == 3.8
    multi = encode_sequence_classification(
        [SequenceExample("a cat", None, ("x", "z")), SequenceExample("a dog", None, ())],
        tokenizer, max_length=16, label_list=["x", "y", "z"], problem_type="multi_label_classification",
    )  # fmt: skip
    assert [r["labels"] for r in multi.rows] == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    batch = Collator(tokenizer.pad_token_id)(multi.rows)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (2, 3)
    unlabeled = encode_sequence_classification([SequenceExample("a cat")], tokenizer, max_length=16)
    assert "labels" not in unlabeled.rows[0]


def test_sequence_classification_bad_input(tokenizer):
    with pytest.raises(UserError, match=r"dev.tsv:7: label 'maybe' is not among the training labels \['neg', 'pos'\]"):
        encode_sequence_classification(
            [SequenceExample("a", None, "pos", "dev.tsv:6"), SequenceExample("b", None, "maybe", "dev.tsv:7")],
            tokenizer, max_length=16, label_list=["neg", "pos"],
        )  # fmt: skip
    with pytest.raises(UserError, match=r"f:2: mixes single sentences and sentence pairs"):
        encode_sequence_classification(
            [SequenceExample("a", "b", "pos", "f:1"), SequenceExample("c", None, "pos", "f:2")],
            tokenizer, max_length=16, label_list=["pos"],
        )  # fmt: skip
    with pytest.raises(UserError, match=r"max_length must be an integer >= 4, got 2"):
        encode_sequence_classification([SequenceExample("a", None, "pos")], tokenizer, max_length=2, label_list=["pos"])
    with pytest.raises(UserError, match=r"need a label_list"):
        encode_sequence_classification([SequenceExample("a", None, "pos")], tokenizer, max_length=8)
    with pytest.raises(UserError, match=r"no examples to encode"):
        encode_sequence_classification([], tokenizer, max_length=8)


# --------------------------------------------------------------------------------------------
# Token classification
# --------------------------------------------------------------------------------------------


def test_token_labels_on_first_piece(tokenizer):
    ex = TokenExample(("John", "unbelievable", "ran", "."), ("B-PER", "O", "B-MISC", "O"), "d.txt", 1)
    labels = ["B-MISC", "B-PER", "O"]
    fs = encode_token_classification([ex], tokenizer, max_length=16, label_list=labels)
    row, meta = fs.rows[0], fs.meta[0]
    assert row["input_ids"] == ids(tokenizer, "[CLS] john un ##believ ##able ran . [SEP]")
    assert meta.word_ids == [None, 0, 1, 1, 1, 2, 3, None]
    assert row["labels"] == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX, 0, 2, IGNORE_INDEX]
    # Per-token predictions back to per-word tags: the first piece decides.
    predicted = [2, 1, 0, 1, 1, 2, 2, 0]
    assert word_predictions(predicted, meta, labels) == (["B-PER", "B-MISC", "O", "O"], 0)


def test_token_word_ids_match_transformers_split_words(tokenizer, tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    reference = reference_tokenizer(vocab, do_lower_case=True)
    sentences = [
        ("Zurich", "hyperparameters", "won", "1990-born", "?"),  # pieces, and a word holding punctuation
        ("Xylophone", "cat", "'s", "mat"),  # an unknown word is one [UNK] piece
        ("the",),
    ]
    examples = [TokenExample(words, ("O",) * len(words)) for words in sentences]
    fs = encode_token_classification(examples, tokenizer, max_length=32, label_list=["O"])
    expected = reference([list(s) for s in sentences], is_split_into_words=True)
    for i in range(len(sentences)):
        assert fs.rows[i]["input_ids"] == expected["input_ids"][i]
        assert fs.meta[i].word_ids == expected.word_ids(i)


def test_token_truncation_and_unknown_tag(tokenizer):
    words = ("the", "cat", "sat", "on", "the", "mat")
    ex = TokenExample(words, ("O",) * 6, "d.txt", 10)
    fs = encode_token_classification([ex], tokenizer, max_length=5, label_list=["O"])
    assert fs.meta[0].word_ids == [None, 0, 1, 2, None] and fs.num_truncated == 1
    tags, missing = word_predictions([0] * 5, fs.meta[0], ["O"], fallback="O")
    assert tags == ["O"] * 6 and missing == 3
    bad = TokenExample(("a", "b", "c"), ("O", "O", "B-LOC"), "dev.txt", 40)
    with pytest.raises(UserError, match=r"dev.txt:42: tag 'B-LOC' is not among the training labels \['O'\]"):
        encode_token_classification([bad], tokenizer, max_length=16, label_list=["O"])


# --------------------------------------------------------------------------------------------
# Question answering
# --------------------------------------------------------------------------------------------

CONTEXT = (
    "John Smith lives in Paris. He was born in 1990 and went home to the big red house in New York City."
    " The cat sat on the mat, the dog ran in the park and the team won the game."
)


def qa_example(answer: str = "New York City", impossible: bool = False) -> QAExample:
    answers = () if impossible else (Answer(answer, CONTEXT.index(answer)),)
    return QAExample("q1", "Where did John go?", CONTEXT, answers, impossible, where="s.json (q1)")


def test_qa_windows_positions_and_stride(tokenizer):
    ex = qa_example()
    fs = encode_question_answering([ex], tokenizer, max_length=24, doc_stride=6, progress=False)
    question = ids(tokenizer, "[CLS] where did john go ? [SEP]")
    assert len(fs) >= 3
    inside = 0
    for row, window in zip(fs.rows, fs.meta):
        assert window.example_index == 0 and window.cls_index == 0
        assert row["input_ids"][: len(question)] == question and row["input_ids"][-1] == tokenizer.sep_token_id
        context_tokens = [t for t, o in enumerate(window.offsets) if o is not None]
        assert context_tokens == list(range(len(question), len(row["input_ids"]) - 1))
        assert all(row["token_type_ids"][t] == 1 for t in context_tokens)
        s, e = row["start_positions"], row["end_positions"]
        spans = [window.offsets[t] for t in context_tokens]
        if spans[0][0] <= ex.answers[0].start and spans[-1][1] >= ex.answers[0].end:
            inside += 1
            assert CONTEXT[window.offsets[s][0] : window.offsets[e][1]] == "New York City"
            assert tokenizer.decode(row["input_ids"][s : e + 1]) == "new york city"
        else:
            assert (s, e) == (0, 0)
    assert 1 <= inside < len(fs)
    # Consecutive windows share exactly doc_stride context tokens.
    for a, b in zip(fs.meta, fs.meta[1:]):
        ctx_a = [o for o in a.offsets if o is not None]
        ctx_b = [o for o in b.offsets if o is not None]
        assert ctx_a[-6:] == ctx_b[:6]
        assert ctx_b[6][0] > ctx_a[-1][0]  # and then move on
    # The windows cover the whole context.
    assert fs.meta[0].offsets[len(question)][0] == 0
    assert [o for o in fs.meta[-1].offsets if o is not None][-1][1] == len(CONTEXT)


def test_qa_unanswerable_and_answer_straddling_windows(tokenizer):
    fs = encode_question_answering([qa_example(impossible=True)], tokenizer, max_length=24, doc_stride=6)
    assert all((r["start_positions"], r["end_positions"]) == (0, 0) for r in fs.rows)
    unlabeled = encode_question_answering([qa_example()], tokenizer, max_length=24, doc_stride=6, with_labels=False)
    assert "start_positions" not in unlabeled.rows[0]
    # An answer longer than any window's context is inside none of them.
    long_answer = "He was born in 1990 and went home to the big red house in New York City."
    fs2 = encode_question_answering([qa_example(long_answer)], tokenizer, max_length=24, doc_stride=6)
    assert all((r["start_positions"], r["end_positions"]) == (0, 0) for r in fs2.rows)


def test_qa_long_question(tokenizer, caplog):
    long_q = QAExample("q", "who " * 30 + "?", CONTEXT, (Answer("Paris", CONTEXT.index("Paris")),), where="s.json:3")
    with pytest.raises(
        UserError,
        match=r"s.json:3: the question takes 31 word-pieces, leaving -10 context tokens per window of"
        r" max_length=24; that must exceed doc_stride=6",
    ):
        encode_question_answering([long_q], tokenizer, max_length=24, doc_stride=6, max_question_length=None)
    with caplog.at_level("WARNING", logger="megabert.data"):
        fs = encode_question_answering([long_q], tokenizer, max_length=24, doc_stride=6, max_question_length=8)
    assert fs.rows[0]["input_ids"][:10] == ids(tokenizer, "[CLS]" + " who" * 8 + " [SEP]")
    assert fs.num_truncated == 1 and "1 of 1 questions were longer than max_question_length=8" in caplog.text
    with pytest.raises(UserError, match=r"doc_stride must be an integer >= 0, got -1"):
        encode_question_answering([long_q], tokenizer, max_length=24, doc_stride=-1)


# --------------------------------------------------------------------------------------------
# Multiple choice and the collator
# --------------------------------------------------------------------------------------------


def test_multiple_choice_and_collator(tokenizer):
    examples = [
        ChoiceExample("the cat sat on", ("the mat.", "a dog."), 0, "c:1"),
        ChoiceExample("john went", ("home", "to the big red house in new york city"), 1, "c:2"),
    ]
    fs = encode_multiple_choice(examples, tokenizer, max_length=12)
    assert fs.rows[0]["input_ids"] == [
        ids(tokenizer, "[CLS] the cat sat on [SEP] the mat . [SEP]"),
        ids(tokenizer, "[CLS] the cat sat on [SEP] a dog . [SEP]"),
    ]
    assert fs.rows[1]["input_ids"][1] == ids(tokenizer, "[CLS] john went [SEP] to the big red house in new [SEP]")
    assert [r["labels"] for r in fs.rows] == [0, 1] and fs.num_truncated == 1
    batch = Collator(tokenizer.pad_token_id)(fs.rows)
    assert batch["input_ids"].shape == (2, 2, 12)  # (batch, choices, longest)
    assert batch["input_ids"][0, 0].tolist() == fs.rows[0]["input_ids"][0] + [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][1, 0].tolist() == [1] * 6 + [0] * 6  # [CLS] john went [SEP] home [SEP]
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.long
    with pytest.raises(UserError, match=r"different numbers of choices \[2, 3\]"):
        encode_multiple_choice(examples + [ChoiceExample("q", ("a", "b", "c"), 0)], tokenizer, max_length=12)


def test_collator_pads_token_labels(tokenizer):
    fs = encode_examples(
        "ner",
        [TokenExample(("john",), ("B-PER",)), TokenExample(("the", "big", "cat"), ("O", "O", "O"))],
        tokenizer, max_length=16, label_list=["B-PER", "O"],
    )  # fmt: skip
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)(fs.rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 0] + [IGNORE_INDEX] * 6
    assert batch["token_type_ids"][0].tolist() == [0] * 8
    loader = torch.utils.data.DataLoader(fs, batch_size=2, collate_fn=Collator(tokenizer.pad_token_id))
    assert next(iter(loader))["input_ids"].shape == (2, 5)


# --------------------------------------------------------------------------------------------
# QA decoding
# --------------------------------------------------------------------------------------------


def synthetic_window(seq: int, context: range) -> tuple[QAWindow, str]:
    """A window whose context tokens are one character each: token t covers chars [t, t + 1)."""
    offsets = [(t, t + 1) if t in context else None for t in range(seq)]
    return QAWindow(0, offsets, [t if t in context else None for t in range(seq)]), "x" * seq


@only_v4("the question-answering pipeline")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decoding_matches_transformers_select_starts_ends(seed):
    from transformers.pipelines.question_answering import select_starts_ends

    rng = np.random.default_rng(seed)
    seq, context = 40, range(9, 39)
    window, text = synthetic_window(seq, context)
    start = rng.normal(size=(1, seq)).astype(np.float32) * 3
    end = rng.normal(size=(1, seq)).astype(np.float32) * 3
    start[0, 0] += 5.0 * seed  # seed 2: the null answer wins
    end[0, 0] += 5.0 * seed
    p_mask = np.array([[0 if (t == 0 or t in context) else 1 for t in range(seq)]])
    ref_s, ref_e, ref_scores, ref_null = select_starts_ends(
        start, end, p_mask, np.ones((1, seq), dtype=np.int64), 1000000, 10, True, 7
    )
    got = decode_example(text, [window], [start[0]], [end[0]], n_best=10, max_answer_length=7, allow_null=True)
    assert [(s.start_token, s.end_token) for s in got.nbest] == list(zip(ref_s.tolist(), ref_e.tolist()))
    np.testing.assert_allclose([s.score for s in got.nbest], ref_scores, rtol=1e-5)
    assert got.null_score == pytest.approx(ref_null, rel=1e-5)
    assert all(s.end_token - s.start_token < 7 and s.start_token in context for s in got.nbest)
    assert got.is_null == (ref_null > ref_scores[0]) == (seed == 2)
    assert (got.text, got.score) == ("", got.null_score) if got.is_null else got.text == got.nbest[0].text


def test_decoding_logit_sum_null_threshold_and_windows():
    window, text = synthetic_window(8, range(3, 7))
    start = np.full(8, -5.0)
    end = np.full(8, -5.0)
    start[[0, 4, 5]] = [1.0, 3.0, 2.5]
    end[[0, 5, 2]] = [1.0, 4.0, 9.0]  # token 2 is a question token: never an answer
    got = decode_example(text, [window], [start], [end], n_best=3, score="logit_sum", allow_null=True)
    assert [(s.start_token, s.end_token, s.score) for s in got.nbest] == [(4, 5, 7.0), (5, 5, 6.5), (3, 5, -1.0)]
    assert (got.text, got.start, got.end, got.null_score, got.is_null) == ("xx", 4, 6, 2.0, False)
    # Null wins when null_score - best > threshold: 2 - 7 = -5.
    assert decode_example(text, [window], [start], [end], score="logit_sum", allow_null=True,
                          null_threshold=-6.0).is_null  # fmt: skip
    assert not decode_example(text, [window], [start], [end], score="logit_sum", allow_null=True,
                              null_threshold=-4.0).is_null  # fmt: skip
    short = decode_example(text, [window], [start], [end], score="logit_sum", max_answer_length=1)
    assert [(s.start_token, s.end_token) for s in short.nbest[:2]] == [(5, 5), (4, 4)]
    # Across windows the best span wins, wherever it is; the null score is the minimum.
    start2, end2 = start.copy(), end.copy()
    start2[[0, 3]], end2[[0, 3]] = [0.0, 10.0], [0.0, 10.0]
    both = decode_example(text, [window, window], [start, start2], [end, end2], score="logit_sum", allow_null=True)
    assert (both.nbest[0].window, both.nbest[0].start_token, both.null_score) == (1, 3, 0.0)
    with pytest.raises(ValueError, match="window 0 has 8 tokens but 4/8 logits"):
        decode_example(text, [window], [start[:4]], [end])


def test_decode_predictions_groups_windows(tokenizer):
    ex = qa_example()
    other = QAExample("q2", "Who won?", "Zurich won the game.", (Answer("Zurich", 0),))
    fs = encode_question_answering([ex, other], tokenizer, max_length=24, doc_stride=6, with_labels=False)
    # Logits that point at "new york city" in whichever window holds it, and at "zur ##ich" in q2.
    start = np.zeros((len(fs), 24))
    end = np.zeros((len(fs), 24))
    for r, window in enumerate(fs.meta):
        for t, o in enumerate(window.offsets):
            if o is None:
                continue
            context = [ex, other][window.example_index].context
            start[r, t] += 8.0 * (context[o[0] :].startswith("New York") or context[o[0] :].startswith("Zurich"))
            end[r, t] += 8.0 * (context[: o[1]].endswith("City") or context[: o[1]].endswith("Zurich"))
    predictions = decode_predictions([ex, other], fs.meta, torch.tensor(start), torch.tensor(end))
    assert answer_texts(predictions) == {"q1": "New York City", "q2": "Zurich"}
    with pytest.raises(ValueError, match=r"\d+ windows but 1/1 logit rows"):
        decode_predictions([ex], fs.meta, start[:1], end[:1])


@only_v4("the question-answering pipeline")
def test_qa_pipeline_parity(tokenizer, tmp_path):
    """Our windows + decoding give transformers' question-answering pipeline answers and scores."""
    from transformers import BertTokenizerFast, MegatronBertConfig, MegatronBertForQuestionAnswering, pipeline

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    hf_tokenizer = reference_tokenizer(vocab, do_lower_case=True)
    torch.manual_seed(0)
    config = MegatronBertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    model = MegatronBertForQuestionAnswering(config).eval()
    qa = pipeline("question-answering", model=model, tokenizer=hf_tokenizer, device="cpu")
    context = CONTEXT.replace("Zurich", "Zürich") + " Unbelievable hyperparameters!"
    for question, handle_null in [("Where did John go?", False), ("Who won the game?", True)]:
        reference = qa(question=question, context=context, top_k=4, max_seq_len=32, doc_stride=8,
                       max_answer_len=5, handle_impossible_answer=handle_null)  # fmt: skip
        ex = QAExample("q", question, context)
        fs = encode_question_answering([ex], tokenizer, max_length=32, doc_stride=8, max_question_length=None,
                                       with_labels=False)  # fmt: skip
        with torch.no_grad():
            out = model(**Collator(tokenizer.pad_token_id)(fs.rows))
        got = decode_predictions([ex], fs.meta, out.start_logits, out.end_logits, n_best=4, max_answer_length=5,
                                 allow_null=handle_null, align_to_words=True)["q"]  # fmt: skip
        ours = [(s.score, s.start, s.end, s.text) for s in got.nbest]
        if handle_null:  # the pipeline lists the null answer among the spans
            ours = sorted(ours + [(got.null_score, 0, 0, "")], key=lambda a: -a[0])[:4]
        assert [(a["start"], a["end"], a["answer"]) for a in reference] == [a[1:] for a in ours]
        np.testing.assert_allclose([a["score"] for a in reference], [a[0] for a in ours], rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_data_features():
    from pathlib import Path

    from megabert.data.tasks import label_list_from, read_conll, read_squad

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    tokenization = pytest.importorskip("megabert.tokenization")
    tok = tokenization.MegatronBertTokenizer.from_pretrained(data / "vocab" / "bert-uncased")
    squad = read_squad(data / "qa" / "xquad.en.json")
    fs = encode_question_answering(squad, tok, max_length=384, doc_stride=128, progress=False)
    labelled = set()
    for row, window in zip(fs.rows, fs.meta):
        s, e = row["start_positions"], row["end_positions"]
        if s == 0:
            continue
        answer = squad[window.example_index].answers[0]
        span = (window.offsets[s][0], window.offsets[e][1])
        # The token span covers the answer and no more than its first and last tokens' extra characters.
        assert span[0] <= answer.start and span[1] >= answer.end
        assert window.offsets[s][1] > answer.start and window.offsets[e][0] < answer.end
        labelled.add(window.example_index)
    assert len(labelled) == len(squad) == 1190  # every answer lies inside some 384-token window
    conll = read_conll(data / "conll2003" / "dev.txt")
    fs = encode_token_classification(conll, tok, max_length=128, label_list=label_list_from(conll), progress=False)
    for ex, row, meta in zip(conll, fs.rows, fs.meta):
        _, missing = word_predictions([0] * len(meta.word_ids), meta, ["O"])
        assert missing == 0 or len(row["input_ids"]) == 128, ex.where  # only cut sentences lose words
    assert fs.num_truncated == 3
