"""Corpus preprocessing: text/JSONL -> indexed dataset, the split, the sentence splitter, the CLI, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megabert.data.indexed import IndexedDataset
from megabert.data.preprocess import preprocess_corpus, split_sentences
from megabert.errors import UserError
from tests.data.toy_corpus import toy_documents, toy_tokenizer, write_text_corpus, write_vocab


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def dataset_documents(prefix) -> list[list[list[int]]]:
    ds = IndexedDataset(prefix)
    return [[s.tolist() for s in ds.document(d)] for d in range(ds.num_documents)]


def expected_documents(tok, documents: list[list[str]]) -> list[list[list[int]]]:
    return [tok.encode_plain(doc) for doc in documents]


def test_text_files_one_sentence_per_line(tmp_path, tok):
    docs = toy_documents(12, seed=1)
    # Two files; the file boundary ends a document, extra blank lines do not make empty ones.
    write_text_corpus(tmp_path / "a.txt", docs[:7])
    (tmp_path / "b.txt").write_text("\n\n" + "\n\n\n".join("\n".join(d) for d in docs[7:]) + "\n\n", encoding="utf-8")
    summary = preprocess_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", tok, progress=False)
    assert dataset_documents(tmp_path / "out") == expected_documents(tok, docs)
    ds = IndexedDataset(tmp_path / "out")
    assert ds.dtype == np.uint16  # 63-entry vocabulary
    assert summary.documents == 12
    assert summary.sentences == sum(len(d) for d in docs) == len(ds)
    assert summary.tokens == ds.num_tokens
    assert summary.outputs["all"]["prefix"] == str(tmp_path / "out")
    assert "documents: 12" in summary.format()


def test_workers_give_identical_files(tmp_path, tok):
    docs = toy_documents(30, seed=2)
    write_text_corpus(tmp_path / "c.txt", docs)
    preprocess_corpus([tmp_path / "c.txt"], tmp_path / "one", tok, progress=False, batch_sentences=16)
    preprocess_corpus([tmp_path / "c.txt"], tmp_path / "two", tok, progress=False, workers=2, batch_sentences=16)
    for suffix in (".bin", ".idx"):
        assert Path(f"{tmp_path}/one{suffix}").read_bytes() == Path(f"{tmp_path}/two{suffix}").read_bytes()


def test_jsonl_with_and_without_sentence_splitting(tmp_path, tok):
    docs = toy_documents(6, seed=3)
    lines = [json.dumps({"id": i, "body": " ".join(doc)}) for i, doc in enumerate(docs)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")

    preprocess_corpus([tmp_path / "d.jsonl"], tmp_path / "whole", tok, json_key="body", progress=False)
    # Without splitting a document is one sequence.
    assert dataset_documents(tmp_path / "whole") == [[tok.encode_plain([" ".join(doc)])[0]] for doc in docs]

    summary = preprocess_corpus(
        [tmp_path / "d.jsonl"], tmp_path / "split", tok, json_key="body", split_sentences=True, progress=False
    )
    # The toy sentences are capitalised and end in '.', so the splitter recovers them.
    assert dataset_documents(tmp_path / "split") == expected_documents(tok, docs)
    assert summary.single_sentence_documents == sum(len(d) == 1 for d in docs)


def test_valid_split_is_by_document_and_deterministic(tmp_path, tok):
    docs = toy_documents(40, seed=4)
    write_text_corpus(tmp_path / "c.txt", docs)
    summary = preprocess_corpus([tmp_path / "c.txt"], tmp_path / "s", tok, valid_fraction=0.25, seed=7, progress=False)
    train, valid = dataset_documents(tmp_path / "s_train"), dataset_documents(tmp_path / "s_valid")
    assert len(valid) == 10 and len(train) == 30
    assert summary.outputs["valid"]["documents"] == 10 and summary.outputs["train"]["documents"] == 30
    expected = expected_documents(tok, docs)
    # The valid documents are the seed's permutation's first 10, in corpus order.
    chosen = set(np.random.default_rng(7).permutation(40)[:10].tolist())
    assert valid == [d for i, d in enumerate(expected) if i in chosen]
    assert train == [d for i, d in enumerate(expected) if i not in chosen]
    assert not Path(f"{tmp_path}/s.bin").exists()

    preprocess_corpus([tmp_path / "c.txt"], tmp_path / "again", tok, valid_fraction=0.25, seed=7, progress=False)
    assert Path(f"{tmp_path}/again_valid.bin").read_bytes() == Path(f"{tmp_path}/s_valid.bin").read_bytes()
    preprocess_corpus([tmp_path / "c.txt"], tmp_path / "other", tok, valid_fraction=0.25, seed=8, progress=False)
    assert dataset_documents(tmp_path / "other_valid") != valid


def test_documents_without_tokens_are_dropped(tmp_path, tok):
    lines = [json.dumps({"text": t}) for t in ["The cat sees a dog.", "", "   ", "A red boat."]]
    (tmp_path / "e.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = preprocess_corpus([tmp_path / "e.jsonl"], tmp_path / "e", tok, progress=False)
    assert summary.documents == 2 and summary.empty_documents == 2
    assert dataset_documents(tmp_path / "e") == [tok.encode_plain(["The cat sees a dog."]), tok.encode_plain(["A red boat."])]


def test_split_sentences_rules():
    text = 'Dr. Smith met J. R. Tolkien in the U.S. today. "Really?" she asked! It cost 5.5 dollars. e.g. this.\nNew line'
    assert split_sentences(text) == [
        "Dr. Smith met J. R. Tolkien in the U.S. today.",
        '"Really?" she asked!',
        "It cost 5.5 dollars. e.g. this.",
        "New line",
    ]
    assert split_sentences("  \n\n ") == []
    assert split_sentences("No end punctuation") == ["No end punctuation"]
    assert split_sentences("(One.) Two? Three!") == ["(One.)", "Two?", "Three!"]


# -- bad input ------------------------------------------------------------------------------------


def test_nonexistent_input(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"input file .*missing\.txt does not exist"):
        preprocess_corpus([tmp_path / "missing.txt"], tmp_path / "o", tok, progress=False)


def test_empty_and_blank_inputs(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"input file .*empty\.txt is empty"):
        preprocess_corpus([tmp_path / "empty.txt"], tmp_path / "o", tok, progress=False)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(UserError, match=r"input file .*blank\.txt contains no text"):
        preprocess_corpus([tmp_path / "blank.txt"], tmp_path / "o", tok, progress=False)


def test_binary_input(tmp_path, tok):
    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(UserError, match=r"input file .*blob\.txt looks binary \(it contains NUL bytes\)"):
        preprocess_corpus([tmp_path / "blob.txt"], tmp_path / "o", tok, progress=False)
    (tmp_path / "latin1.txt").write_bytes("The cat.\nCaf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt:2: not valid UTF-8 text"):
        preprocess_corpus([tmp_path / "latin1.txt"], tmp_path / "o", tok, progress=False)


def test_malformed_jsonl(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"text": "A cat."}\n{"text": "A dog.",\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON \(Expecting property name"):
        preprocess_corpus([tmp_path / "bad.jsonl"], tmp_path / "o", tok, progress=False)
    (tmp_path / "list.jsonl").write_text('["A cat."]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        preprocess_corpus([tmp_path / "list.jsonl"], tmp_path / "o", tok, progress=False)
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"num\.jsonl:1: the value of 'text' must be a string, got int"):
        preprocess_corpus([tmp_path / "num.jsonl"], tmp_path / "o", tok, progress=False)


def test_missing_json_key(tmp_path, tok):
    (tmp_path / "k.jsonl").write_text('{"text": "A cat."}\n{"body": "A dog.", "id": 2}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"k\.jsonl:2: no key 'text' in this JSON object \(its keys: 'body', 'id'\); choose the text field with --json-key"):
        preprocess_corpus([tmp_path / "k.jsonl"], tmp_path / "o", tok, progress=False)


def test_errors_leave_no_output(tmp_path, tok):
    write_text_corpus(tmp_path / "good.txt", toy_documents(3))
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:1"):
        preprocess_corpus([tmp_path / "good.txt", tmp_path / "bad.jsonl"], tmp_path / "o", tok, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.txt"]


def test_bad_options(tmp_path, tok):
    write_text_corpus(tmp_path / "c.txt", toy_documents(3))
    with pytest.raises(UserError, match=r"valid fraction must be in \[0, 1\), got 1.5"):
        preprocess_corpus([tmp_path / "c.txt"], tmp_path / "o", tok, valid_fraction=1.5, progress=False)
    with pytest.raises(UserError, match="valid fraction 0.9 of 3 documents leaves no training documents"):
        preprocess_corpus([tmp_path / "c.txt"], tmp_path / "o", tok, valid_fraction=0.9, progress=False)
    with pytest.raises(UserError, match="workers must be >= 1, got 0"):
        preprocess_corpus([tmp_path / "c.txt"], tmp_path / "o", tok, workers=0, progress=False)
    with pytest.raises(UserError, match="no input files given"):
        preprocess_corpus([], tmp_path / "o", tok, progress=False)


# -- the command ----------------------------------------------------------------------------------


def test_cli_preprocess(tmp_path, tok, capsys):
    from megabert.cli import main

    docs = toy_documents(20, seed=5)
    write_text_corpus(tmp_path / "c.txt", docs)
    write_vocab(tmp_path / "tok")
    code = main(
        ["preprocess", str(tmp_path / "c.txt"), "--output", str(tmp_path / "out" / "corpus"),
         "--tokenizer", str(tmp_path / "tok"), "--valid-fraction", "0.1", "--seed", "3", "--quiet"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"documents: 20  sentences: {sum(len(d) for d in docs)}" in out
    assert "valid: " in out and "documents 2" in out
    assert len(dataset_documents(tmp_path / "out" / "corpus_valid")) == 2
    chosen = set(np.random.default_rng(3).permutation(20)[:2].tolist())
    expected = expected_documents(tok, docs)
    assert dataset_documents(tmp_path / "out" / "corpus_train") == [d for i, d in enumerate(expected) if i not in chosen]

    code = main(["preprocess", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "tok")])
    assert code == 2
    assert "megabert preprocess: error: input file" in capsys.readouterr().err


@pytest.mark.slow
def test_real_corpus_end_to_end(tmp_path, shared_data):
    """Gutenberg books with the BERT uncased vocabulary: preprocess with workers, then NSP samples."""
    from megabert.data.pretraining import IGNORE_INDEX, MaskingConfig, PretrainingDataset
    from megabert.tokenization import MegatronBertTokenizer

    books = sorted((shared_data / "gutenberg").glob("*.txt"))[:4]
    vocab = shared_data / "vocab" / "bert-uncased"
    summary = preprocess_corpus(books, tmp_path / "g", vocab, workers=2, valid_fraction=0.25, seed=0, progress=False)
    assert summary.outputs["valid"]["documents"] >= 1 and summary.tokens > 100_000
    tok = MegatronBertTokenizer.from_pretrained(vocab)
    train = IndexedDataset(tmp_path / "g_train")
    assert train.dtype == np.uint16  # 30,522 entries
    # Training sentences are the tokenizer's encodings of lines of the books.
    lines = [line.strip() for book in books for line in book.read_text(encoding="utf-8").splitlines() if line.strip()]
    encoded = {tuple(ids) for ids in tok.encode_plain(lines)}
    assert all(tuple(train[i].tolist()) in encoded for i in range(0, len(train), 50))

    ds = PretrainingDataset(train, tok, 128, binary_task="nsp", masking=MaskingConfig(whole_word=True, max_predictions_per_seq=20))
    labels, predicted = [], []
    for i in range(0, len(ds), max(1, len(ds) // 400)):
        sample = ds[i]
        assert len(sample["input_ids"]) <= 128 and sample["input_ids"][0] == tok.cls_token_id
        predicted.append(int((sample["labels"] != IGNORE_INDEX).sum()))
        labels.append(sample["next_sentence_label"])
    assert max(predicted) <= 20 and np.mean(predicted) > 10
    assert 0.4 < np.mean(labels) < 0.6
