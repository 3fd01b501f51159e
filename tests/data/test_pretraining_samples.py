"""Pretraining samples: structure, NSP/SOP pairs, truncation, MLM masking statistics, determinism, collate."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from megabert.data.indexed import IndexedDataset, write_indexed_dataset
from megabert.data.pretraining import (
    IGNORE_INDEX,
    MaskingConfig,
    MaskingVocab,
    PretrainingCollator,
    PretrainingDataset,
    collate_pretraining,
    mask_tokens,
    truncate_pair,
)
from megabert.errors import UserError
from tests.data.toy_corpus import toy_documents, toy_tokenizer, toy_vocab


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok) -> MaskingVocab:
    return MaskingVocab.from_tokenizer(tok)


@pytest.fixture(scope="module")
def corpus(tok, tmp_path_factory):
    """About 500 sentences in 60 documents, written as an indexed dataset."""
    prefix = tmp_path_factory.mktemp("corpus") / "toy"
    documents = [tok.encode_plain(doc) for doc in toy_documents(60, seed=0)]
    write_indexed_dataset(prefix, documents, vocab_size=len(tok))
    return IndexedDataset(prefix)


def document_tokens(data: IndexedDataset, first: int, end: int) -> list[int]:
    return np.concatenate([data[i] for i in range(first, end)]).astype(np.int64).tolist()


def split_sample(sample, vocab):
    """(A, B) of an unmasked sample, checking the [CLS] A [SEP] B [SEP] frame and token types."""
    ids = sample["input_ids"].tolist()
    types = sample["token_type_ids"].tolist()
    seps = [i for i, t in enumerate(ids) if t == vocab.sep_id]
    assert ids[0] == vocab.cls_id and vocab.cls_id not in ids[1:]
    assert len(seps) == 2 and seps[1] == len(ids) - 1
    assert types == [0] * (seps[0] + 1) + [1] * (len(ids) - seps[0] - 1)
    return ids[1 : seps[0]], ids[seps[0] + 1 : -1]


# -- pairs ------------------------------------------------------------------------------------------


def test_sop_pairs_are_consecutive_and_swapped(corpus, tok, vocab):
    # No truncation (long max length, no short targets) and no masking: the pieces are exact.
    ds = PretrainingDataset(corpus, tok, 512, binary_task="sop", short_seq_prob=0.0, masking=None, seed=3)
    labels = []
    for i in range(len(ds)):
        sample = ds[i]
        a, b = split_sample(sample, vocab)
        assert a and b
        _, first, end, _ = ds.segment_of(i)
        segment = document_tokens(corpus, first, end)
        label = sample["next_sentence_label"]
        assert (b + a if label == 1 else a + b) == segment
        # The cut is at a sentence boundary.
        cut = len(b) if label == 1 else len(a)
        bounds = np.cumsum([corpus.sizes[j] for j in range(first, end)]).tolist()
        assert cut in bounds[:-1]
        labels.append(label)
    assert (sample["labels"] == IGNORE_INDEX).all()  # masking=None predicts nothing
    assert 0.35 < np.mean(labels) < 0.65


def test_nsp_random_next_comes_from_another_document(corpus, tok, vocab):
    ds = PretrainingDataset(corpus, tok, 512, binary_task="nsp", short_seq_prob=0.0, masking=None, seed=4)
    sentence_starts = {}  # document -> token stream and sentence start offsets
    for d in range(corpus.num_documents):
        first, end = int(corpus.document_indices[d]), int(corpus.document_indices[d + 1])
        sentence_starts[d] = (document_tokens(corpus, first, end), set(np.cumsum([0] + corpus.sizes[first:end].tolist()).tolist()))
    randoms = 0
    for i in range(len(ds)):
        sample = ds[i]
        a, b = split_sample(sample, vocab)
        doc, first, end, _ = ds.segment_of(i)
        segment = document_tokens(corpus, first, end)
        if sample["next_sentence_label"] == 0:
            assert a + b == segment
            continue
        randoms += 1
        assert segment[: len(a)] == a and len(a) < len(segment)
        # B is a run of whole sentences of another document.
        homes = [
            d for d, (stream, starts) in sentence_starts.items()
            if d != doc and any(stream[s : s + len(b)] == b and (s + len(b)) in starts for s in starts)
        ]  # fmt: skip
        assert homes, f"sample {i}: B is not a sentence run of another document"
    assert 0.35 < randoms / len(ds) < 0.65


def test_truncation_keeps_max_length_and_both_segments(corpus, tok, vocab):
    ds = PretrainingDataset(corpus, tok, 16, binary_task="nsp", masking=None, seed=5)
    lengths = []
    for i in range(len(ds)):
        sample = ds[i]
        a, b = split_sample(sample, vocab)
        assert a and b and len(sample["input_ids"]) <= 16
        _, _, _, target = ds.segment_of(i)
        assert len(a) + len(b) <= target
        lengths.append(len(sample["input_ids"]))
    assert max(lengths) == 16
    # short_seq_prob 0.1: about a tenth of the segments aim shorter than the maximum
    short = np.mean([ds.segment_of(i)[3] < 13 for i in range(len(ds))])
    assert 0.02 < short < 0.25


def reference_truncate_lengths(la: int, lb: int, max_tokens: int) -> tuple[int, int]:
    """BERT's loop: drop a token from the longer segment (b on ties) until they fit."""
    while la + lb > max_tokens:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def test_truncate_pair_matches_berts_loop():
    rng = np.random.default_rng(0)
    for _ in range(500):
        la, lb, limit = int(rng.integers(1, 40)), int(rng.integers(0, 40)), int(rng.integers(2, 50))
        a, b = np.arange(la), np.arange(100, 100 + lb)
        ta, tb = truncate_pair(a, b, limit, rng)
        assert (len(ta), len(tb)) == reference_truncate_lengths(la, lb, limit)
        # What is kept is one contiguous piece of each segment.
        assert np.array_equal(np.diff(ta), np.ones(max(len(ta) - 1, 0)))
        assert np.array_equal(np.diff(tb), np.ones(max(len(tb) - 1, 0)))
    # Removals come from the front and the back about equally often.
    fronts = [int(truncate_pair(np.arange(20), np.arange(5), 10, rng)[0][0]) for _ in range(2000)]
    assert 6.5 < np.mean(fronts) < 8.5  # 15 removed, binomial(15, 0.5) from the front: mean 7.5


def test_no_task_gives_single_segments(corpus, tok, vocab):
    ds = PretrainingDataset(corpus, tok, 32, binary_task=None, masking=None, seed=6)
    for i in range(len(ds)):
        sample = ds[i]
        ids = sample["input_ids"].tolist()
        assert ids[0] == vocab.cls_id and ids[-1] == vocab.sep_id and ids.count(vocab.sep_id) == 1
        assert sample["token_type_ids"].tolist() == [0] * len(ids)
        assert len(ids) <= 32 and "next_sentence_label" not in sample


def test_single_sentence_documents(tmp_path, tok, vocab):
    docs = [tok.encode_plain(d) for d in toy_documents(6, seed=9)]
    docs += [tok.encode_plain(["The cat sees a red bird near the river."])]  # one sentence
    docs += [tok.encode_plain(["Cat."])[:1]]  # one sentence of 2 tokens
    docs += [[[tok.convert_tokens_to_ids("dog")]]]  # one single-token sentence: cannot be cut
    write_indexed_dataset(tmp_path / "s", docs, vocab_size=len(tok))
    ds = PretrainingDataset(tmp_path / "s", tok, 512, binary_task="sop", short_seq_prob=0.0, masking=None)
    assert ds.stats["single_sentence_documents"] == 3 and ds.stats["skipped_documents"] == 1
    seen = set()
    for i in range(len(ds)):
        doc, first, end, _ = ds.segment_of(i)
        a, b = split_sample(ds[i], vocab)
        if doc >= 6:
            seen.add(doc)
            label = ds[i]["next_sentence_label"]
            assert (b + a if label else a + b) == docs[doc][0]
    assert seen == {6, 7}
    skip = PretrainingDataset(tmp_path / "s", tok, 512, binary_task="sop", masking=None, single_sentence="skip")
    assert skip.stats["skipped_documents"] == 3
    assert all(skip.segment_of(i)[0] < 6 for i in range(len(skip)))


# -- masking ----------------------------------------------------------------------------------------


def synthetic_sequence(rng, vocab, length=100):
    """[CLS] words [SEP] words [SEP] [PAD]*: the specials must never be touched."""
    words = vocab.replacement_ids[rng.integers(0, len(vocab.replacement_ids), length)]
    half = length // 2
    return np.concatenate([[vocab.cls_id], words[:half], [vocab.sep_id], words[half:], [vocab.sep_id], [vocab.pad_id] * 7])


def test_masking_rates_and_80_10_10(vocab):
    rng = np.random.default_rng(0)
    chosen = masked = replaced = kept = 0
    for _ in range(400):
        ids = synthetic_sequence(rng, vocab)
        out, labels = mask_tokens(ids, rng, vocab)
        special = vocab.is_special[ids]
        assert (labels[special] == IGNORE_INDEX).all() and (out[special] == ids[special]).all()
        where = labels != IGNORE_INDEX
        assert where.sum() == 15  # round(0.15 * 100) word-pieces, exactly
        assert (labels[where] == ids[where]).all() and (out[~where] == ids[~where]).all()
        unmasked = out[where][out[where] != vocab.mask_id]
        assert not vocab.is_special[unmasked].any()  # random replacements are never special tokens
        chosen += int(where.sum())
        masked += int((out[where] == vocab.mask_id).sum())
        replaced += int(((out[where] != vocab.mask_id) & (out[where] != ids[where])).sum())
        kept += int((out[where] == ids[where]).sum())
    r = len(vocab.replacement_ids)  # a random replacement equals the original 1/r of the time
    assert abs(masked / chosen - 0.8) < 0.025
    assert abs(replaced / chosen - 0.1 * (1 - 1 / r)) < 0.02
    assert abs(kept / chosen - (0.1 + 0.1 / r)) < 0.02


def test_masking_options(vocab):
    rng = np.random.default_rng(1)
    ids = synthetic_sequence(rng, vocab)
    _, labels = mask_tokens(ids, rng, vocab, MaskingConfig(max_predictions_per_seq=4))
    assert (labels != IGNORE_INDEX).sum() == 4
    _, labels = mask_tokens(ids, rng, vocab, MaskingConfig(probability=0.5))
    assert (labels != IGNORE_INDEX).sum() == 50
    out, labels = mask_tokens(ids, rng, vocab, MaskingConfig(mask_prob=1.0, random_prob=0.0))
    assert (out[labels != IGNORE_INDEX] == vocab.mask_id).all()
    # A sequence of only special tokens has nothing to mask.
    only = np.array([vocab.cls_id, vocab.sep_id, vocab.pad_id])
    out, labels = mask_tokens(only, rng, vocab)
    assert (labels == IGNORE_INDEX).all() and (out == only).all()
    with pytest.raises(UserError, match="token id 999 is outside the vocabulary of 63 entries"):
        mask_tokens([vocab.cls_id, 999], rng, vocab)


def words_of(ids: np.ndarray, vocab: MaskingVocab) -> list[list[int]]:
    words: list[list[int]] = []
    for p, token in enumerate(ids.tolist()):
        if vocab.is_special[token]:
            continue
        if words and vocab.is_continuation[token] and words[-1][-1] == p - 1:
            words[-1].append(p)
        else:
            words.append([p])
    return words


def test_whole_word_masking_masks_all_pieces_together(vocab, tok):
    rng = np.random.default_rng(2)
    sentences = [" ".join(["playing", "walked", "the", "talks", "cat", "jumper"] * 5)]
    ids = np.concatenate([[vocab.cls_id], tok.encode_plain(sentences)[0], [vocab.sep_id]])
    multi = [w for w in words_of(ids, vocab) if len(w) > 1]
    assert len(multi) == 20
    partial_without = 0
    for _ in range(200):
        _, labels = mask_tokens(ids, rng, vocab, MaskingConfig(whole_word=True))
        for word in words_of(ids, vocab):
            flags = {labels[p] != IGNORE_INDEX for p in word}
            assert len(flags) == 1, "a word was masked only in part"
        _, labels = mask_tokens(ids, rng, vocab, MaskingConfig(whole_word=False))
        partial_without += sum(len({labels[p] != IGNORE_INDEX for p in w}) == 2 for w in multi)
    assert partial_without > 100  # without the option words are cut: the check above can fail


def masked_runs(labels: np.ndarray) -> list[int]:
    runs, length = [], 0
    for flag in (labels != IGNORE_INDEX).tolist() + [False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def test_ngram_masking_makes_spans(vocab):
    rng = np.random.default_rng(3)
    single, spans = [], []
    for _ in range(200):
        ids = synthetic_sequence(rng, vocab, length=200)
        _, labels = mask_tokens(ids, rng, vocab, MaskingConfig(max_ngram=1))
        single += masked_runs(labels)
        _, labels = mask_tokens(ids, rng, vocab, MaskingConfig(max_ngram=3))
        assert (labels != IGNORE_INDEX).sum() <= 30
        assert (labels[vocab.is_special[ids]] == IGNORE_INDEX).all()
        spans += masked_runs(labels)
    # P(n) ~ 1/n over 1..3 gives a mean span of 18/11 words; neighbouring picks merge a little.
    assert np.mean(single) < 1.25
    assert 1.45 < np.mean(spans) < 2.0


def test_dataset_masking_rate_and_specials(corpus, tok, vocab):
    ds = PretrainingDataset(corpus, tok, 64, binary_task="nsp", masking=MaskingConfig(whole_word=True, max_ngram=3), num_samples=600)
    predicted = text_tokens = 0
    for i in range(len(ds)):
        sample = ds[i]
        ids, labels = sample["input_ids"], sample["labels"]
        special_positions = [0, len(ids) - 1] + [p for p, t in enumerate(ids.tolist()) if t == vocab.sep_id]
        assert (labels[special_positions] == IGNORE_INDEX).all()
        predicted += int((labels != IGNORE_INDEX).sum())
        text_tokens += len(ids) - 3
    assert abs(predicted / text_tokens - 0.15) < 0.01


# -- determinism, epochs, resume ---------------------------------------------------------------------


def same_samples(x, y) -> bool:
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_determinism_seeds_epochs_and_resume(corpus, tok):
    make = lambda seed: PretrainingDataset(corpus, tok, 48, binary_task="sop", seed=seed, num_samples=None)  # noqa: E731
    first, again, other = make(11), make(11), make(12)
    n = first.samples_per_epoch
    assert all(same_samples(first[i], again[i]) for i in range(n))
    common = min(n, other.samples_per_epoch)  # another seed cuts other segments
    assert sum(not same_samples(first[i], other[i]) for i in range(common)) > 0.9 * common

    # Three epochs; a fresh dataset asked from index k (a resumed trainer) gives the same samples.
    run = PretrainingDataset(corpus, tok, 48, binary_task="sop", seed=11, num_samples=3 * n)
    assert len(run) == 3 * n
    full = [run[i] for i in range(3 * n)]
    resumed = PretrainingDataset(corpus, tok, 48, binary_task="sop", seed=11, num_samples=3 * n)
    start = n + 7
    assert all(same_samples(full[i], resumed[i]) for i in range(start, 3 * n))
    assert same_samples(pickle.loads(pickle.dumps(run))[start], full[start])  # DataLoader workers
    # Each epoch visits every segment once, in a new order.
    epochs = [[run.segment_of(e * n + j) for j in range(n)] for e in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
    assert epochs[0] != epochs[1] != epochs[2]
    ordered = PretrainingDataset(corpus, tok, 48, binary_task="sop", seed=11, shuffle=False)
    assert [ordered.segment_of(j) for j in range(n)] == sorted(epochs[0])
    with pytest.raises(IndexError, match=f"sample index {3 * n} out of range for {3 * n} samples"):
        run[3 * n]


# -- bad input ----------------------------------------------------------------------------------------


def test_validation_errors(corpus, tok, tmp_path):
    with pytest.raises(UserError, match=r"max_seq_length 4 is too small: \[CLS\] A \[SEP\] B \[SEP\] needs at least 5"):
        PretrainingDataset(corpus, tok, 4)
    with pytest.raises(UserError, match=r"max_seq_length 2 is too small: \[CLS\] A \[SEP\] needs at least 3"):
        PretrainingDataset(corpus, tok, 2, binary_task=None)
    no_mask = {t: i for i, t in enumerate(toy_vocab()) if t != "[MASK]"}
    with pytest.raises(UserError, match=r"the vocabulary has no \[MASK\] token\(s\); BERT pretraining needs \[CLS\], \[SEP\] and \[MASK\]"):
        PretrainingDataset(corpus, no_mask, 64)
    no_cls_sep = {t: i for i, t in enumerate(toy_vocab()) if t not in ("[CLS]", "[SEP]")}
    with pytest.raises(UserError, match=r"has no \[CLS\], \[SEP\] token"):
        MaskingVocab.from_tokenizer(no_cls_sep)
    with pytest.raises(UserError, match="binary_task must be one of nsp, sop or None, got 'mlm'"):
        PretrainingDataset(corpus, tok, 64, binary_task="mlm")
    with pytest.raises(UserError, match=r"masking probability must be in \(0, 1\), got 1.5"):
        MaskingConfig(probability=1.5)
    with pytest.raises(UserError, match="must be >= 0 and add up to at most 1"):
        MaskingConfig(mask_prob=0.8, random_prob=0.3)

    write_indexed_dataset(tmp_path / "one", [[[5, 6], [7, 8]]], vocab_size=len(tok))
    with pytest.raises(UserError, match="NSP needs at least 2 non-empty documents to draw random next segments, found 1"):
        PretrainingDataset(tmp_path / "one", tok, 64, binary_task="nsp")

    write_indexed_dataset(tmp_path / "big", [[[5, 6], [7, 300]], [[8, 9], [10, 11]]], vocab_size=1000)
    ds = PretrainingDataset(tmp_path / "big", tok, 64, binary_task="sop", shuffle=False)
    with pytest.raises(UserError, match="sequence 1 holds token id 300, outside the tokenizer's vocabulary of 63"):
        ds[0]


# -- collate ------------------------------------------------------------------------------------------


def test_collate_pads_to_a_batch():
    samples = [
        {"input_ids": np.array([2, 10, 11, 3, 12, 3]), "token_type_ids": np.array([0, 0, 0, 0, 1, 1]),
         "labels": np.array([-100, 10, -100, -100, -100, -100]), "next_sentence_label": 1},
        {"input_ids": np.array([2, 13, 3, 14, 3]), "token_type_ids": np.array([0, 0, 0, 1, 1]),
         "labels": np.array([-100, -100, -100, 14, -100]), "next_sentence_label": 0},
    ]  # fmt: skip
    batch = collate_pretraining(samples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 3, 12, 3], [2, 13, 3, 14, 3, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert batch["labels"].tolist() == [[-100, 10, -100, -100, -100, -100], [-100, -100, -100, 14, -100, -100]]
    assert batch["next_sentence_label"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in batch.values())

    padded = PretrainingCollator(pad_token_id=0, pad_to_multiple_of=8)(samples)
    assert padded["input_ids"].shape == (2, 8) and padded["labels"][:, 6:].eq(-100).all()
    assert padded["attention_mask"].sum().item() == 11

    without = [{k: v for k, v in s.items() if k != "next_sentence_label"} for s in samples]
    assert "next_sentence_label" not in collate_pretraining(without)
    with pytest.raises(ValueError, match="some samples have a next_sentence_label and some do not"):
        collate_pretraining([samples[0], without[1]])
    with pytest.raises(ValueError, match="cannot collate an empty list"):
        collate_pretraining([])


def test_dataloader_batches(corpus, tok):
    ds = PretrainingDataset(corpus, tok, 40, binary_task="nsp", seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=PretrainingCollator(tok.pad_token_id, 8))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] <= 40
    lengths = batch["attention_mask"].sum(1)
    for row in range(8):
        assert batch["input_ids"][row, : lengths[row]].tolist() == ds[row]["input_ids"].tolist()
        assert (batch["input_ids"][row, lengths[row] :] == tok.pad_token_id).all()
