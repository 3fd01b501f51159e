"""The WordPiece tokenizer against transformers.BertTokenizerFast (the reference), plus training, saving and errors."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from megabert.errors import UserError
from megabert.tokenization import (
    MegatronBertTokenizer,
    read_vocab_file,
    train_tokenizer,
    train_tokenizer_from_iterator,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, BertTokenizerFast  # noqa: E402

from tests.reference import V5, reference_tokenizer  # noqa: E402

pytestmark = pytest.mark.reference

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Call options to compare on single texts (and on pairs, with PAIR_CASES added).
CASES = [
    {},
    {"padding": True, "return_offsets_mapping": True, "return_special_tokens_mask": True, "return_length": True},
    {"truncation": True, "max_length": 16, "padding": "max_length"},
    {"max_length": 10},  # implies truncation="longest_first", as in transformers
    {"truncation": True, "max_length": 12, "stride": 3, "return_overflowing_tokens": True, "padding": True,
     "return_offsets_mapping": True, "return_special_tokens_mask": True},  # fmt: skip
    {"padding": True, "pad_to_multiple_of": 8, "return_tensors": "pt", "return_offsets_mapping": True},
    {"truncation": True, "max_length": 9, "stride": 2, "return_overflowing_tokens": True, "padding": True,
     "return_tensors": "pt"},  # fmt: skip
    {"add_special_tokens": False, "padding": True, "return_attention_mask": False, "return_token_type_ids": False},
]
PAIR_CASES = [
    {"truncation": "longest_first", "max_length": 24, "stride": 2, "return_overflowing_tokens": True, "padding": True,
     "return_offsets_mapping": True},  # fmt: skip
    {"truncation": "only_first", "max_length": 96, "stride": 4, "return_overflowing_tokens": True, "padding": True},
    {"truncation": "only_second", "max_length": 96, "stride": 4, "return_overflowing_tokens": True, "padding": True,
     "return_offsets_mapping": True},  # fmt: skip
    {"truncation": "only_second", "max_length": 80, "padding": "max_length", "return_tensors": "pt"},
]

ODD_TEXTS = [
    "Hello [MASK] world, héllo!",
    "[CLS] literal specials [SEP] and [mask] in lower case",
    "Ça coûte 3,50 € — naïve café, ÅNGSTRÖM résumé",
    "中文字符 mixed with 日本語 and 한국어",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp and zero\u200bwidth and \x00 control \x07 chars",
    "emoji 🙂 and symbols ∑∫ and ﬁ ligature",
    "x" * 101 + " a word over 100 characters and one of exactly 100 " + "y" * 100,
    "",
    "   ",
    "don't won't it's we're I'm they've ... ?! ,,",
    "e-mail: someone@example.com http://example.org/a?b=c#d",
]


# ------------------------------------------------------------------------------------- helpers


def assert_same(ours, ref, what: str = "") -> None:
    """Same keys in the same order, same values, same word/sequence ids on every row."""
    assert list(ours.keys()) == list(ref.keys()), what
    for key in ref:
        a, b = ours[key], ref[key]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{what} {key}"
        else:
            if key == "offset_mapping":  # lists of (start, end) tuples on both sides
                a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
            assert a == b, f"{what} {key}"
    assert len(ours.encodings) == len(ref.encodings), what
    for i in range(len(ref.encodings)):
        assert ours.word_ids(i) == ref.word_ids(i), f"{what} word_ids row {i}"
        assert ours.sequence_ids(i) == ref.sequence_ids(i), f"{what} sequence_ids row {i}"
        assert ours.tokens(i) == ref.tokens(i), f"{what} tokens row {i}"


def compare_one(ours, ref, text, pair, kwargs: dict, what: str) -> None:
    """One call on both; where the reference fails (a pair that cannot be truncated as asked), ours must fail clearly."""
    try:
        expected = ref(text, pair, **kwargs)
    except BaseException as exc:  # Rust errors: Exception, or pyo3's PanicException
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        with pytest.raises(UserError, match="cannot fit it into max_length|share of at most"):
            ours(text, pair, **kwargs)
        return
    assert_same(ours(text, pair, **kwargs), expected, what)


def compare_calls(ours, ref, texts: list[str], pairs: list[str] | None = None, batch: int = 512) -> None:
    """Every option set of CASES (and PAIR_CASES for pairs), on batches and on the first text alone."""
    cases = CASES + (PAIR_CASES if pairs is not None else [])
    for kwargs in cases:
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            pair_chunk = None if pairs is None else pairs[start : start + batch]
            compare_one(ours, ref, chunk, pair_chunk, kwargs, f"{kwargs} batch@{start}")
        compare_one(ours, ref, texts[0], None if pairs is None else pairs[0], kwargs, f"{kwargs} single")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def tiny_uncased_vocab() -> list[str]:
    """A small uncased WordPiece vocabulary: specials, letters, their ## forms, a few words and pieces."""
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punct = list(".,!?'-:;@/#=()[]\"€$%&*+")
    words = ["the", "hello", "world", "cat", "sat", "on", "mat", "token", "##izer", "##s", "##ing", "un", "##able", "##ed",
             "a", "mask", "cafe", "naive", "chinese", "中", "文", "字", "符", "日", "本", "語", "don", "won", "it", "we", "re"]  # fmt: skip
    vocab = SPECIALS + ["[unused0]"] + letters + [f"##{c}" for c in letters] + punct
    return vocab + [w for w in words if w not in vocab]


def cased_training_lines(n: int = 300) -> list[str]:
    """Deterministic tiny cased corpus with accents, CJK, punctuation and repeated words."""
    subjects = ["The Cat", "A Dog", "Zoë", "Müller", "the engineer", "Señor García", "北京", "An Old Man", "NASA"]
    verbs = ["sat on", "looked at", "walked to", "painted", "didn't see", "RAN past", "visited"]
    objects = ["the mat.", "a Café!", "Paris, France.", "the Über-station?", "東京", "some naïve ideas", "the résumé"]
    return [f"{subjects[i % 9]} {verbs[(i * 7) % 7 if i % 2 else (i // 3) % 7]} {objects[(i * 5) % 7]} ({i % 13})" for i in range(n)]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(ours, reference) over the same tiny uncased vocab.txt."""
    folder = tmp_path_factory.mktemp("tiny_vocab")
    vocab = write_lines(folder / "vocab.txt", tiny_uncased_vocab())
    return MegatronBertTokenizer.from_pretrained(vocab, lowercase=True), reference_tokenizer(vocab, do_lower_case=True)


@pytest.fixture(scope="module")
def cased_trained(tmp_path_factory):
    """A cased vocabulary trained by train_tokenizer on tiny text, saved; with references built from it."""
    folder = tmp_path_factory.mktemp("cased")
    corpus = write_lines(folder / "corpus.txt", cased_training_lines())
    out = folder / "tok"
    ours = train_tokenizer([corpus], vocab_size=300, lowercase=False, min_frequency=1, output_dir=out, show_progress=False)
    return ours, out


def read_glue(shared: Path):
    """SST-2 dev sentences and MRPC dev pairs."""
    sst_lines = (shared / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0] for line in sst_lines]
    mrpc_lines = (shared / "glue" / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    fields = [line.split("\t") for line in mrpc_lines]
    return sentences, [f[3] for f in fields], [f[4] for f in fields]


@pytest.fixture(scope="module")
def real_uncased():
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (root / "vocab" / "bert-uncased" / "vocab.txt").is_file():
        pytest.skip("../shared/data is not beside this checkout")
    vocab = root / "vocab" / "bert-uncased"
    ours = MegatronBertTokenizer.from_pretrained(vocab)  # the folder: its tokenizer.json (padding/truncation on)
    ref = reference_tokenizer(vocab / "vocab.txt", do_lower_case=True)
    return ours, ref, root


# ------------------------------------------------------------------------------------- parity


def test_parity_tiny_vocab_odd_texts(tiny_pair):
    ours, ref = tiny_pair
    texts = ODD_TEXTS + ["the cat sat on the mat", "tokenizers unable hello world"]
    compare_calls(ours, ref, texts)
    # Pairs overflow into (windows of A) x (windows of B) rows: keep the texts short.
    short = [text[:40] for text in texts]
    compare_calls(ours, ref, short, list(reversed(short)))


def test_tokenize_decode_and_vocab_match_reference(tiny_pair):
    ours, ref = tiny_pair
    for text in ODD_TEXTS:
        assert ours.tokenize(text) == ref.tokenize(text), text
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(torch.tensor(ids)) == ref.decode(ids)
        assert ours.decode(list(torch.tensor(ids))) == ref.decode(ids)  # a list of integer scalars
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        tokens = ref.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_ids(tokens + ["not-in-vocab"]) == ref.convert_tokens_to_ids(tokens + ["not-in-vocab"])
    assert ours.encode("hello world", "the cat", max_length=5) == ref.encode("hello world", "the cat", max_length=5, truncation=True)
    assert ours.get_vocab() == ref.get_vocab()
    assert len(ours) == ours.vocab_size == len(ref) == len(tiny_uncased_vocab())
    assert ours.all_special_ids == ref.all_special_ids == [1, 3, 0, 2, 4]
    assert ours.all_special_tokens == ref.all_special_tokens
    for role in ("cls", "sep", "pad", "unk", "mask"):
        assert getattr(ours, f"{role}_token_id") == getattr(ref, f"{role}_token_id")
        assert getattr(ours, f"{role}_token") == getattr(ref, f"{role}_token")
    batch = ref(["hello world", "the cat sat"], padding=True)["input_ids"]
    assert ours.batch_decode(torch.tensor(batch), skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)


def test_encode_plain_is_word_pieces_without_specials(tiny_pair):
    ours, ref = tiny_pair
    texts = ODD_TEXTS * 3
    assert ours.encode_plain(texts) == ref(texts, add_special_tokens=False)["input_ids"]
    assert ours.encode_plain(("the cat",)) == [[ref.convert_tokens_to_ids("the"), ref.convert_tokens_to_ids("cat")]]


def test_split_into_words_matches_reference(tiny_pair):
    ours, ref = tiny_pair
    words = [["Hello", "world", "!"], ["the", "cat's", "mat"], ["naïve", "中文"]]
    for kwargs in ({}, {"padding": True, "return_offsets_mapping": True}, {"truncation": True, "max_length": 5}):
        assert_same(ours(words, is_split_into_words=True, **kwargs), ref(words, is_split_into_words=True, **kwargs), str(kwargs))
        assert_same(ours(words[0], is_split_into_words=True, **kwargs), ref(words[0], is_split_into_words=True, **kwargs))
    assert ours(words[1], words[2], is_split_into_words=True) == ref(words[1], words[2], is_split_into_words=True)


def test_single_text_results_are_unbatched_like_reference(tiny_pair):
    ours, ref = tiny_pair
    one = ours("hello world")
    assert one["input_ids"] == [2, ours.convert_tokens_to_ids("hello"), ours.convert_tokens_to_ids("world"), 3]
    assert one.token_type_ids == [0, 0, 0, 0] and one.attention_mask == [1, 1, 1, 1]
    pair = ours("hello", "world")
    assert pair["token_type_ids"] == [0, 0, 0, 1, 1]
    assert pair.sequence_ids() == [None, 0, None, 1, None]
    tensors = ours("hello world", return_tensors="pt")
    assert tensors["input_ids"].shape == (1, 4) and tensors["input_ids"].dtype == torch.int64
    assert ours([])["input_ids"] == [] and ours([], return_tensors="pt")["input_ids"].shape == (0, 0)
    # Alignment helpers, hand-checked on "hello world!": [CLS] hello world ! [SEP]
    enc = ours(["hello world!"], return_offsets_mapping=True)
    assert enc.word_ids(0) == [None, 0, 1, 2, None]
    assert enc.char_to_token(0, 6) == 2 and enc.char_to_token(6) == 2 and enc.token_to_chars(0, 3) == (11, 12)
    assert enc["offset_mapping"][0] == [(0, 0), (0, 5), (6, 11), (11, 12), (0, 0)]


def test_pickled_tokenizer_encodes_the_same(tiny_pair):
    ours, _ = tiny_pair
    clone = pickle.loads(pickle.dumps(ours))
    kwargs = {"padding": True, "truncation": True, "max_length": 7}
    assert dict(clone(ODD_TEXTS, **kwargs)) == dict(ours(ODD_TEXTS, **kwargs))


def test_concurrent_calls_with_different_settings_do_not_mix(tiny_pair):
    from concurrent.futures import ThreadPoolExecutor

    ours, ref = tiny_pair
    settings = [{}, {"padding": "max_length", "max_length": 40}, {"truncation": True, "max_length": 6}, {"padding": True}]
    texts = ["the cat sat on the mat", "hello world", "tokenizers unable to cafe"]
    expected = [ref(texts, **kwargs)["input_ids"] for kwargs in settings]

    def work(i: int) -> bool:
        return ours(texts, **settings[i % 4])["input_ids"] == expected[i % 4]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(400)))


def test_too_long_without_truncation_warns_once(tiny_pair, caplog):
    ours = MegatronBertTokenizer.from_vocab(tiny_uncased_vocab(), model_max_length=8)
    with caplog.at_level("WARNING", logger="megabert.tokenization"):
        assert len(ours("the cat sat on the mat hello world")["input_ids"]) == 10  # kept whole, as asked
        ours("the cat sat on the mat hello world")
    assert [r.getMessage() for r in caplog.records] == [
        "a sequence of 10 tokens is longer than model_max_length=8: the model cannot take it; pass truncation=True"
    ]
    assert len(ours("the cat sat on the mat hello world", truncation=True)["input_ids"]) == 8  # model_max_length


# ------------------------------------------------------------------------------------- real vocabulary


def test_parity_real_uncased_subset(real_uncased):
    ours, ref, root = real_uncased
    sentences, first, second = read_glue(root)
    compare_calls(ours, ref, sentences[:300])
    compare_calls(ours, ref, first[:80], second[:80])


@pytest.mark.slow
def test_parity_real_uncased_all_of_sst2_and_mrpc_dev(real_uncased):
    ours, ref, root = real_uncased
    sentences, first, second = read_glue(root)
    assert len(sentences) == 6735 and len(first) == 408
    compare_calls(ours, ref, sentences)
    compare_calls(ours, ref, first, second)
    compare_calls(ours, ref, second, first)


def test_real_tokenizer_json_padding_and_truncation_do_not_leak(real_uncased):
    ours, ref, root = real_uncased
    stored = json.loads((root / "vocab" / "bert-uncased" / "tokenizer.json").read_text())
    assert stored["padding"]["strategy"] == {"Fixed": 128} and stored["truncation"]["max_length"] == 128
    long_text = " ".join(["word"] * 300)
    assert len(ours("a short text")["input_ids"]) == 5  # not padded to 128
    assert len(ours(long_text)["input_ids"]) == 302  # not truncated to 128
    assert len(ours.encode_plain([long_text])[0]) == 300
    assert ours(["a short text", long_text]) == ref(["a short text", long_text])


def test_stored_settings_do_not_leak_and_calls_do_not_leak_into_each_other(tiny_pair, tmp_path):
    ours, ref = tiny_pair
    ours.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["padding"] is None and spec["truncation"] is None
    spec["truncation"] = {"direction": "Right", "max_length": 6, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 32}, "direction": "Left", "pad_to_multiple_of": None, "pad_id": 1,
                       "pad_type_id": 1, "pad_token": "[UNK]"}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    loaded = MegatronBertTokenizer.from_pretrained(tmp_path)
    text = "the cat sat on the mat hello world"
    expected = ref(text)["input_ids"]
    assert len(expected) == 10
    assert loaded(text)["input_ids"] == expected
    assert loaded.tokenize(text) == ref.tokenize(text)
    # padding side right, pad id from the vocabulary's [PAD] (0), not the file's
    padded = loaded([text, "hello"], padding=True)
    assert padded["input_ids"][1][-1] == 0 and padded["attention_mask"][1] == [1, 1, 1] + [0] * 7
    # an earlier call's padding/truncation is not kept by the next one
    loaded(text, truncation=True, max_length=4, padding="max_length")
    assert loaded(text)["input_ids"] == expected
    assert loaded.encode_plain([text]) == [expected[1:-1]]


# ------------------------------------------------------------------------------------- saving and loading


def test_save_pretrained_files_and_autotokenizer_parity(tiny_pair, tmp_path):
    ours, ref = tiny_pair
    (tmp_path / "config.json").write_text("{}")  # a model's file in the same folder must survive
    written = ours.save_pretrained(tmp_path)
    names = sorted(Path(p).name for p in written)
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["config.json"])  # no temp files left
    assert read_vocab_file(tmp_path / "vocab.txt") == tiny_uncased_vocab()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is True
    assert config["model_max_length"] == 512 and config["cls_token"] == "[CLS]" and config["pad_token"] == "[PAD]"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["mask_token"] == "[MASK]"

    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(auto, BertTokenizerFast) and auto.model_max_length == 512
    texts = ODD_TEXTS + ["the cat sat on the mat"]
    compare_calls(ours, auto, texts, list(reversed(texts)))
    again = MegatronBertTokenizer.from_pretrained(tmp_path)
    compare_calls(again, ref, texts)
    assert again.lowercase is True and again.model_max_length == 512


def test_loading_folder_variants_and_casing(tiny_pair, tmp_path):
    ours, _ = tiny_pair
    cased_vocab = SPECIALS + ["Hello", "hello", "World", "world", "Über", "uber", "Café", "cafe", "é", "u", "##ber"]
    bare = write_lines(tmp_path / "cased_vocab.txt", cased_vocab)
    detected = MegatronBertTokenizer.from_pretrained(bare)  # capitals in the vocabulary: taken as cased
    assert detected.lowercase is False and detected.tokenize("Hello Über Café") == ["Hello", "Über", "Café"]
    forced = MegatronBertTokenizer.from_pretrained(bare, lowercase=True)
    assert forced.tokenize("Hello Über Café") == ["hello", "uber", "cafe"]
    ref = reference_tokenizer(bare, do_lower_case=False)
    compare_calls(detected, ref, ["Hello World", "Über Café é", "hello UBER"])

    # vocab.txt + tokenizer_config.json (no tokenizer.json): the config's do_lower_case and max length rule
    folder = tmp_path / "vocab_and_config"
    folder.mkdir()
    write_lines(folder / "vocab.txt", cased_vocab)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 128}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from_config = MegatronBertTokenizer.from_pretrained(folder)
    assert from_config.lowercase is True and from_config.model_max_length == 128
    compare_calls(from_config, AutoTokenizer.from_pretrained(str(folder)), ["Hello World", "Über Café é"])
    assert MegatronBertTokenizer.from_pretrained(folder, model_max_length=64).model_max_length == 64

    # tokenizer.json whose config asks for the other casing: the normalizer follows the config, as in transformers
    saved = tmp_path / "saved"
    detected.save_pretrained(saved)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config["do_lower_case"] = True
    config["model_max_length"] = int(1e30)  # transformers' "no limit": we keep our 512
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    relowered = MegatronBertTokenizer.from_pretrained(saved)
    assert relowered.lowercase is True and relowered.model_max_length == 512
    compare_calls(relowered, AutoTokenizer.from_pretrained(str(saved)), ["Hello World", "Über Café é"])
    # a tokenizer.json file given directly
    assert MegatronBertTokenizer.from_pretrained(saved / "tokenizer.json").tokenize("Hello") == ["Hello"]


# ------------------------------------------------------------------------------------- training


def test_train_cased_vocab_layout_and_parity(cased_trained):
    ours, folder = cased_trained
    vocab = read_vocab_file(folder / "vocab.txt")
    assert vocab[:5] == SPECIALS and ours.pad_token_id == 0 and ours.mask_token_id == 4
    assert len(vocab) % 128 == 0 and len(ours) == len(vocab)
    learned = [t for t in vocab if not t.startswith("[unused")]
    assert 5 < len(learned) <= 300
    assert vocab[len(learned) :] == [f"[unused{i}]" for i in range(len(vocab) - len(learned))]
    assert "Müller" in learned or "M" in learned and "##ü" in learned  # cased: capitals and accents kept
    assert ours.lowercase is False and ours.tokenize("Zoë")[0].startswith("Z")

    texts = cased_training_lines(40)[::3] + ODD_TEXTS + ["[unused0] never appears as one token"]
    ref = reference_tokenizer(folder / "vocab.txt", do_lower_case=False)
    compare_calls(ours, ref, texts, list(reversed(texts)))
    auto = AutoTokenizer.from_pretrained(str(folder))
    compare_calls(ours, auto, texts, list(reversed(texts)))
    compare_calls(MegatronBertTokenizer.from_pretrained(folder), ref, texts)
    assert ours.tokenize("[unused0]") == ref.tokenize("[unused0]") and "[unused0]" not in ours.tokenize("[unused0]")


def test_train_from_iterator_matches_training_from_files(tmp_path):
    from pydoc_data.topics import topics

    lines = [line for key in sorted(topics)[:8] for line in topics[key].splitlines() if line.strip()]
    from_files = train_tokenizer(write_lines(tmp_path / "t.txt", lines), 400, show_progress=False, pad_to_multiple_of=None)
    from_texts = train_tokenizer_from_iterator(iter(lines), 400, show_progress=False, pad_to_multiple_of=None)
    assert len(from_files) == len(from_texts) == 400  # enough text to fill the asked size; no padding asked
    files_vocab, texts_vocab = set(from_files.get_vocab()), set(from_texts.get_vocab())
    # The `tokenizers` trainer breaks ties between equally frequent pairs in a run-dependent
    # order, so two runs may differ in a few rare entries; the same text gives nearly the same set.
    assert len(files_vocab & texts_vocab) >= 0.9 * 400
    assert {"the", "class", "return", "##s"} <= files_vocab & texts_vocab
    assert all(token == token.lower() for token in files_vocab - set(SPECIALS))  # uncased by default
    padded = train_tokenizer_from_iterator(lines, 400, show_progress=False)
    assert len(padded) == 512 and padded.convert_ids_to_tokens(400) == "[unused0]"
    assert padded.convert_ids_to_tokens(511) == "[unused111]" and padded.pad_token_id == 0


def test_cli_train_tokenizer(tmp_path, capsys):
    from megabert.cli import main

    corpus = write_lines(tmp_path / "corpus.txt", cased_training_lines())
    out = tmp_path / "tok"
    args = ["train-tokenizer", str(corpus), "--vocab-size", "200", "--output", str(out), "--cased", "--quiet", "--min-frequency", "1"]
    assert main(args) == 0
    assert "to " + str(out) in capsys.readouterr().out
    loaded = MegatronBertTokenizer.from_pretrained(out)
    assert loaded.lowercase is False and len(loaded) == 256
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert main(args) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main(["train-tokenizer", str(tmp_path / "missing.txt"), "--vocab-size", "200", "--output", str(tmp_path / "o")]) == 2
    assert "training file not found" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- errors


def _vocab_folder(tmp_path: Path, lines: list[str]) -> Path:
    return write_lines(tmp_path / "vocab.txt", lines)


LOAD_ERRORS = [
    ("missing", FileNotFoundError, "tokenizer not found: .* does not exist"),
    ("empty_dir", FileNotFoundError, "neither tokenizer.json nor vocab.txt"),
    ("no_unk", UserError, r"vocab.txt: the vocabulary has no unknown-word token '\[UNK\]'"),
    ("no_mask", UserError, r"lacks special token\(s\) mask_token='\[MASK\]'"),
    ("duplicate", UserError, r"vocab.txt:7: token 'a' is listed twice \(first at line 6\)"),
    ("empty_vocab", UserError, "the vocabulary file is empty"),
    ("not_utf8", UserError, "not a UTF-8 text file"),
    ("bad_json", UserError, r"tokenizer.json:1: not valid JSON"),
    ("bpe_json", UserError, "the tokenizer model is 'BPE'; MegatronBERT uses a WordPiece vocabulary"),
]


@pytest.mark.parametrize("case, error, message", LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors(tmp_path, case, error, message):
    target = tmp_path
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "no_unk":
        _vocab_folder(tmp_path, ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "a"])
    elif case == "no_mask":
        _vocab_folder(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])
    elif case == "duplicate":
        _vocab_folder(tmp_path, SPECIALS + ["a", "a"])
    elif case == "empty_vocab":
        (tmp_path / "vocab.txt").write_text("")
    elif case == "not_utf8":
        (tmp_path / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
    elif case == "bad_json":
        (tmp_path / "tokenizer.json").write_text("{not json")
    elif case == "bpe_json":
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(error, match=message):
        MegatronBertTokenizer.from_pretrained(target)


CALL_ERRORS = [
    (lambda t: t(123), "text must be a str or a list of str, got int"),
    (lambda t: t(["ok", None]), r"text\[1\] must be a str, got NoneType"),
    (lambda t: t([["a", "b"]]), r"text\[0\] must be a str, got list \(for lists of words pass is_split_into_words=True\)"),
    (lambda t: t(["a", "b"], ["c"]), "text has 2 examples but text_pair has 1"),
    (lambda t: t("a", ["b"]), "text is one str, so text_pair must be one str too"),
    (lambda t: t(["a"], padding="max_length"), r"padding='max_length' needs max_length .*model_max_length is 512"),
    (lambda t: t(["a"], padding="yes"), "padding must be False, True, 'longest' or 'max_length', got 'yes'"),
    (lambda t: t(["a"], truncation="left"), "truncation must be False, True, 'longest_first'"),
    (lambda t: t(["a"], truncation=True, max_length=2), r"max_length=2 is too small: the special tokens take 2 positions .*use max_length >= 3"),
    (lambda t: t(["a"], ["b"], truncation=True, max_length=3), r"take 3 positions \(\[CLS\] A \[SEP\] B \[SEP\]\).*>= 4"),
    (lambda t: t(["a"], max_length=0), "max_length must be a positive integer or None, got 0"),
    (lambda t: t(["a"], truncation=True, max_length=6, stride=4), r"stride=4 must be smaller than .* = 4\)"),
    (lambda t: t(["a"], stride=-1), "stride must be a non-negative integer"),
    (lambda t: t(["a"], truncation="only_second", max_length=8), "truncation='only_second' needs pairs of texts"),
    (lambda t: t(["a", "b c"], return_tensors="pt"), "return_tensors='pt' needs rows of one length, got lengths 3 to 4: pass padding=True"),
    (lambda t: t(["a"], return_tensors="tf"), "return_tensors must be None, 'pt' or 'np'"),
    (lambda t: t(["a"], padding=True, truncation=True, max_length=10, pad_to_multiple_of=8), r"max_length \(10\) must be a multiple of pad_to_multiple_of \(8\)"),
    (lambda t: t(["a b c d e f g h"], ["a b c d e f g h i j"], truncation="only_second", max_length=8),
     r"example 0: truncation='only_second' cannot fit it into max_length=8: the first text alone is too long"),  # fmt: skip
    (lambda t: t("a", is_split_into_words=True), "with is_split_into_words=True, text must be a list of words"),
    (lambda t: t.encode_plain("a b"), "encode_plain takes a list of texts, got a single str"),
    (lambda t: t.encode_plain(["a", 3]), r"texts\[1\] must be a str, got int"),
    (lambda t: t.tokenize(b"bytes"), "text must be a str, got bytes"),
    (lambda t: t.decode([2, 10**6]), r"token id 1000000 is outside the vocabulary \(ids 0\.\.\d+\)"),
    (lambda t: t.convert_ids_to_tokens(-1), "token id -1 is outside the vocabulary"),
    (lambda t: t.decode("abc"), "expected a list of token ids"),
    (lambda t: t.decode([[2, 3]]), r"expected a flat list of token ids \(ints\); for a batch of rows use batch_decode"),
]


@pytest.mark.parametrize("call, message", CALL_ERRORS, ids=[str(i) for i in range(len(CALL_ERRORS))])
def test_call_errors(tiny_pair, call, message):
    ours, _ = tiny_pair
    with pytest.raises(UserError, match=message):
        call(ours)


def test_row_index_out_of_range(tiny_pair):
    with pytest.raises(IndexError, match=r"row 3 is out of range: this result has 1 row\(s\)"):
        tiny_pair[0](["a"]).word_ids(3)


def test_stride_too_large_for_a_pair_share_is_a_clear_error(tiny_pair):
    ours, _ = tiny_pair
    first, second = " ".join(["a"] * 30), " ".join(["b"] * 30)
    # 20 - 3 = 17 text positions split 8/9 between the texts: a stride of 9 does not fit a share
    with pytest.raises(UserError, match=r"example 0: .* leaves one of the two texts a share of at most 9 tokens"):
        ours([first], [second], truncation=True, max_length=20, stride=9, return_overflowing_tokens=True)
    a, b = ours.convert_tokens_to_ids(["a", "b"])
    assert ours("a b", truncation=True, max_length=20)["input_ids"] == [2, a, b, 3]  # still usable afterwards


TRAIN_ERRORS = [
    ("missing", FileNotFoundError, "training file not found: .*nope.txt"),
    ("empty", UserError, r"training file .*empty.txt is empty"),
    ("blank", UserError, r"training file .*blank.txt is empty \(only whitespace\)"),
    ("folder", IsADirectoryError, "is a folder; pass the text files inside it"),
    ("not_utf8", UserError, r"bad.txt:2: not UTF-8 text"),
    ("vocab_size", UserError, "vocab_size must be an integer above 5"),
    ("multiple", UserError, "pad_to_multiple_of must be a positive integer or None, got 0"),
    ("no_files", UserError, "needs a non-empty list of text files"),
    ("iterator_item", UserError, "training text 1 is int, expected str"),
]


@pytest.mark.parametrize("case, error, message", TRAIN_ERRORS, ids=[c[0] for c in TRAIN_ERRORS])
def test_train_errors(tmp_path, case, error, message):
    good = write_lines(tmp_path / "good.txt", ["some text here"] * 3)
    kwargs: dict = {"vocab_size": 100, "show_progress": False}
    if case == "iterator_item":
        with pytest.raises(error, match=message):
            train_tokenizer_from_iterator(["fine", 3], **kwargs)
        return
    files: list = [good]
    if case == "missing":
        files.append(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        files.append(tmp_path / "empty.txt")
    elif case == "blank":
        files.append(write_lines(tmp_path / "blank.txt", ["   ", "\t"]))
    elif case == "folder":
        files.append(tmp_path)
    elif case == "not_utf8":
        (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe bad\n")
        files.append(tmp_path / "bad.txt")
    elif case == "vocab_size":
        kwargs["vocab_size"] = 5
    elif case == "multiple":
        kwargs["pad_to_multiple_of"] = 0
    elif case == "no_files":
        files = []
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        train_tokenizer(files, output_dir=out, **kwargs)
    assert not out.exists()
