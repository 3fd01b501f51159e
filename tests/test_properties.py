"""Property-based tests of the boundaries that take user input: any input works or is a UserError.

The data readers (TSV/CSV/JSONL, CoNLL, SQuAD, multiple choice), the tokenizer call, the
model's input checks and the config loader are fed generated inputs, valid and not; each call
either succeeds or raises :class:`megabert.errors.UserError` (one line for the CLI), never
another exception type. The example budget is fixed and derandomized, so the file runs the
same examples every time and stays within a few seconds per test.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import megabert  # noqa: E402
from megabert import MegatronBertConfig  # noqa: E402
from megabert.data import tasks  # noqa: E402
from megabert.errors import UserError  # noqa: E402
from megabert.tokenization import MegatronBertTokenizer  # noqa: E402

BUDGET = settings(
    max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# ------------------------------------------------------------------------------ file contents

# Pieces that matter to the parsers: separators, quotes, JSON punctuation, numbers, labels,
# line ends of every kind, a BOM, non-ASCII text and bytes that are not UTF-8.
_PIECES = [
    "\t", ",", '"', "'", "\n", "\r\n", "\r", " ", "{", "}", "[", "]", ":", "0", "1", "-1", "2.5", "nan",
    "label", "text", "sentence", "sentence1", "sentence2", "score", "query", "choices", "gold", "O", "B-PER",
    "-DOCSTART-", "null", "true", "é", "日本", "\u2028", "\x00",
]
_TEXT_PIECES = st.one_of(st.sampled_from(_PIECES), st.text(max_size=6))
_BAD_BYTES = st.sampled_from([b"\xff", b"\xc3", b"\xef\xbb\xbf", b"\x80\x02", b"\xed\xa0\x80"])


@st.composite
def file_bytes(draw: st.DrawFn) -> bytes:
    """Bytes of a data file: mostly text made of parser-relevant pieces, sometimes broken bytes."""
    parts = draw(st.lists(st.one_of(_TEXT_PIECES.map(lambda t: t.encode("utf-8", "surrogatepass")), _BAD_BYTES), max_size=40))
    return b"".join(parts)


def json_values(max_leaves: int = 8) -> st.SearchStrategy:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True), st.text(max_size=8)
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=max_leaves,
    )


@st.composite
def jsonl_bytes(draw: st.DrawFn) -> bytes:
    """JSON lines whose objects have (some of) the keys the readers look for, with any values."""
    keys = st.sampled_from(["text", "text_pair", "label", "sentence", "query", "choices", "gold", "x"])
    lines = draw(st.lists(st.one_of(st.dictionaries(keys, json_values(), max_size=4), json_values()), max_size=6))
    out = "\n".join(json.dumps(line) for line in lines).encode()
    return out + draw(st.sampled_from([b"", b"\n", b"\n{", b"\xff\n"]))


@st.composite
def squad_bytes(draw: st.DrawFn) -> bytes:
    """SQuAD-shaped JSON with arbitrary pieces (answers off their offsets, wrong types, ...)."""
    answer = st.fixed_dictionaries({"text": json_values(2), "answer_start": st.one_of(st.integers(-2, 30), json_values(2))})
    question = st.fixed_dictionaries(
        {"id": st.one_of(st.text(max_size=4), st.integers(0, 3)), "question": json_values(2),
         "answers": st.one_of(st.lists(answer, max_size=2), json_values(2))},
        optional={"is_impossible": st.booleans()},
    )  # fmt: skip
    paragraph = st.fixed_dictionaries({"context": st.one_of(st.text(max_size=30), json_values(2)),
                                       "qas": st.one_of(st.lists(question, max_size=2), json_values(2))})
    doc = st.one_of(
        st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries({"paragraphs": st.lists(paragraph, max_size=2)}), max_size=2)}),
        json_values(),
    )
    return json.dumps(draw(doc)).encode()


def _with_file(data: bytes, suffix: str, read) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        try:
            read(path)
        except UserError:
            pass


# ------------------------------------------------------------------------------ the readers


@BUDGET
@given(
    data=st.one_of(file_bytes(), jsonl_bytes()),
    suffix=st.sampled_from([".tsv", ".csv", ".jsonl", ".txt"]),
    fmt=st.sampled_from(["auto", "tsv", "csv", "jsonl", "glue-sst2", "glue-mrpc", "glue-stsb", "glue-cola"]),
    problem_type=st.sampled_from([None, "single_label_classification", "regression", "multi_label_classification"]),
    labeled=st.booleans(),
    on_bad=st.sampled_from(["error", "skip"]),
    has_header=st.sampled_from([None, True, False]),
    text_column=st.sampled_from([None, 0, 1, -1, 7, "text", "sentence"]),
)
def test_sequence_classification_reader(data, suffix, fmt, problem_type, labeled, on_bad, has_header, text_column):
    _with_file(data, suffix, lambda path: tasks.read_sequence_classification(
        path, format=fmt, problem_type=problem_type, labeled=labeled, on_bad=on_bad, has_header=has_header,
        text_column=text_column,
    ))  # fmt: skip


@BUDGET
@given(data=file_bytes(), labeled=st.booleans(), on_bad=st.sampled_from(["error", "skip"]))
def test_conll_reader(data, labeled, on_bad):
    _with_file(data, ".conll", lambda path: tasks.read_conll(path, labeled=labeled, on_bad=on_bad))


@BUDGET
@given(data=st.one_of(squad_bytes(), file_bytes()), labeled=st.booleans(), on_bad=st.sampled_from(["error", "skip"]))
def test_squad_reader(data, labeled, on_bad):
    _with_file(data, ".json", lambda path: tasks.read_squad(path, labeled=labeled, on_bad=on_bad))


@BUDGET
@given(
    data=st.one_of(jsonl_bytes(), file_bytes()), suffix=st.sampled_from([".jsonl", ".csv"]),
    labeled=st.booleans(), on_bad=st.sampled_from(["error", "skip"]),
)
def test_multiple_choice_reader(data, suffix, labeled, on_bad):
    _with_file(data, suffix, lambda path: tasks.read_multiple_choice(path, labeled=labeled, on_bad=on_bad))


@BUDGET
@given(data=st.one_of(file_bytes(), jsonl_bytes()), fmt=st.sampled_from(["text", "jsonl", "csv", "tsv"]))
def test_prediction_input_reader(data, fmt):
    from megabert.inference.io import read_records, table_header

    _with_file(data, ".in", lambda path: (table_header(str(path), fmt), list(read_records(str(path), fmt))))


# ------------------------------------------------------------------------------ the tokenizer

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "the", "##s", "é", "日"]


@pytest.fixture(scope="module")
def tokenizer() -> MegatronBertTokenizer:
    return MegatronBertTokenizer.from_vocab(_VOCAB, lowercase=True, model_max_length=16)


# Any code point, lone surrogates included (what errors="surrogateescape" decoding makes).
_ANY_TEXT = st.lists(
    st.one_of(st.characters(exclude_categories=()), st.sampled_from(["\udcff", "\ud800", " ", "[MASK]", "the"])),
    max_size=12,
).map("".join)
_TEXT_ARG = st.one_of(
    _ANY_TEXT, st.lists(_ANY_TEXT, max_size=3), st.lists(st.lists(_ANY_TEXT, max_size=3), max_size=2),
    st.none(), st.integers(), st.lists(st.one_of(st.integers(), st.none()), max_size=2),
)  # fmt: skip


@BUDGET
@given(
    text=_TEXT_ARG,
    pair=st.one_of(st.none(), _TEXT_ARG),
    padding=st.sampled_from([False, True, "longest", "max_length", "bogus", 3]),
    truncation=st.sampled_from([None, False, True, "longest_first", "only_first", "only_second", "x"]),
    max_length=st.sampled_from([None, 0, 1, 3, 5, 16, 40, -1, 2.5]),
    stride=st.sampled_from([0, 1, 2, 4, -1]),
    split=st.booleans(),
    overflow=st.booleans(),
    tensors=st.sampled_from([None, "pt", "np", "tf"]),
)
def test_tokenizer_call(tokenizer, text, pair, padding, truncation, max_length, stride, split, overflow, tensors):
    try:
        tokenizer(
            text, pair, padding=padding, truncation=truncation, max_length=max_length, stride=stride,
            is_split_into_words=split, return_overflowing_tokens=overflow, return_tensors=tensors,
            return_offsets_mapping=True,
        )  # fmt: skip
    except UserError:
        pass


# ------------------------------------------------------------------------------ the model

_CONFIG = MegatronBertConfig(
    vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
    max_position_embeddings=12, num_labels=3,
)  # fmt: skip
_MODELS = {
    name: getattr(megabert, name)(_CONFIG.copy(num_labels=2) if "Question" in name else _CONFIG).eval()
    for name in ("MegatronBertForMaskedLM", "MegatronBertForSequenceClassification", "MegatronBertForTokenClassification",
                 "MegatronBertForQuestionAnswering", "MegatronBertForPreTraining", "MegatronBertForNextSentencePrediction")
}  # fmt: skip

_DTYPES = st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool])
_SHAPES = st.lists(st.integers(0, 14), min_size=0, max_size=3).map(tuple)


@st.composite
def tensors(draw: st.DrawFn, shape=None, low: int = -3, high: int = 24, floats: bool = False) -> torch.Tensor:
    shape = draw(_SHAPES) if shape is None else shape
    numel = 1
    for dim in shape:
        numel *= dim
    if floats:
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=numel, max_size=numel))
        return torch.tensor(values, dtype=torch.float32).reshape(shape)
    values = draw(st.lists(st.integers(low, high), min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.long).reshape(shape).to(draw(_DTYPES))


@st.composite
def model_inputs(draw: st.DrawFn) -> dict:
    """Inputs of mostly the right shapes (so the deeper checks are reached), sometimes of any."""
    batch, seq = draw(st.integers(0, 3)), draw(st.integers(0, 14))
    right = (batch, seq)
    shape = st.one_of(st.just(right), _SHAPES)
    inputs: dict = {}
    if draw(st.booleans()):
        inputs["input_ids"] = draw(tensors(draw(shape)))
    else:
        embeds_shape = draw(st.one_of(st.just((batch, seq, 16)), _SHAPES))
        inputs["inputs_embeds"] = draw(tensors(embeds_shape, floats=True))
    for name, high in (("attention_mask", 2), ("token_type_ids", 3), ("position_ids", 13)):
        if draw(st.booleans()):
            inputs[name] = draw(tensors(draw(shape), low=-1, high=high))
    if draw(st.booleans()):
        head_shape = draw(st.sampled_from([(2,), (2, 2), (3,), (2, 3), (5, 2), (2, 1, 2, 1, 1), (2, 2, 2, 2, 2), ()]))
        inputs["head_mask"] = draw(tensors(head_shape, floats=True))
    if draw(st.booleans()):
        label_shape = draw(st.one_of(st.just(right), st.just((batch,)), _SHAPES))
        inputs["labels"] = draw(tensors(label_shape, low=-101, high=22))
    if draw(st.booleans()):
        inputs["input_ids" if "input_ids" not in inputs else "token_type_ids"] = draw(
            st.sampled_from([[[1, 2]], "ids", 3, None])
        )
    return inputs


@BUDGET
@given(name=st.sampled_from(sorted(_MODELS)), inputs=model_inputs())
def test_model_input_checks(name, inputs):
    model = _MODELS[name]
    if name == "MegatronBertForQuestionAnswering" and "labels" in inputs:
        labels = inputs.pop("labels")
        inputs["start_positions"] = labels
        inputs["end_positions"] = labels
    if name == "MegatronBertForPreTraining" and "labels" in inputs:
        inputs["next_sentence_label"] = inputs["labels"].reshape(-1)[:2] if isinstance(inputs["labels"], torch.Tensor) else None
    with torch.no_grad():
        try:
            model(**inputs)
        except UserError:
            pass


# ------------------------------------------------------------------------------ the config

_FIELDS = [
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id", "position_embedding_type", "use_cache", "is_decoder",
    "add_cross_attention", "tie_word_embeddings", "num_labels", "id2label", "label2id", "problem_type",
    "output_attentions", "output_hidden_states", "return_dict", "architectures", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "model_type", "extra", "attn_implementation", "unpad_inputs", "some_new_key",
]  # fmt: skip
_GOOD = {"vocab_size": 20, "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 8}


@BUDGET
@given(values=st.dictionaries(st.sampled_from(_FIELDS), json_values(4), max_size=6), base=st.booleans())
def test_config_from_dict(values, base):
    data = {**_GOOD, **values} if base else values
    try:
        MegatronBertConfig.from_dict(data)
    except UserError:
        pass


@BUDGET
@given(data=st.one_of(
    st.dictionaries(st.sampled_from(_FIELDS), json_values(4), max_size=6).map(lambda d: json.dumps({**_GOOD, **d}).encode()),
    file_bytes(),
))  # fmt: skip
def test_config_from_json_file(data):
    _with_file(data, ".json", MegatronBertConfig.from_json_file)
