"""Megatron indexed datasets: byte-for-byte parity with megatron-core, reading, validation, atomicity."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from megabert.data.indexed import (
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetWriter,
    token_dtype_for_vocab,
    write_indexed_dataset,
)
from megabert.errors import UserError


def random_documents(seed: int = 0, vocab: int = 30000, count: int = 25) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, vocab, int(rng.integers(1, 30))).tolist() for _ in range(int(rng.integers(1, 6)))]
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def megatron():
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def megatron_build(megatron, prefix: Path, documents, dtype) -> None:
    import torch

    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        flat = [token for sentence in document for token in sentence]
        builder.add_document(torch.tensor(flat, dtype=torch.int64), [len(s) for s in document])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("vocab_size, dtype", [(30522, np.uint16), (70000, np.int32)])
def test_files_equal_megatron_core_builder_byte_for_byte(tmp_path, megatron, vocab_size, dtype):
    documents = random_documents(vocab=min(vocab_size, 65000))
    documents[3].append([])  # an empty sentence is legal in the format
    megatron_build(megatron, tmp_path / "ref", documents, dtype)
    write_indexed_dataset(tmp_path / "ours", documents, vocab_size=vocab_size)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_megatron_core_reads_ours_and_we_read_megatron_core(tmp_path, megatron):
    documents = random_documents(seed=1)
    write_indexed_dataset(tmp_path / "ours", documents, vocab_size=30522)
    theirs = megatron.IndexedDataset(str(tmp_path / "ours"))
    flat = [sentence for document in documents for sentence in document]
    assert len(theirs) == len(flat)
    for i, sentence in enumerate(flat):
        assert theirs[i].tolist() == sentence
    expected_doc_index = np.cumsum([0] + [len(d) for d in documents])
    assert theirs.document_indices.tolist() == expected_doc_index.tolist()

    # A dataset built by megatron-core item by item (add_item / end_document) reads here.
    import torch

    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for document in documents:
        for sentence in document:
            builder.add_item(torch.tensor(sentence, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    ours = IndexedDataset(tmp_path / "ref")
    assert ours.dtype == np.int32
    assert [ours[i].tolist() for i in range(len(ours))] == flat
    assert ours.document_indices.tolist() == expected_doc_index.tolist()
    assert ours.sizes.tolist() == [len(s) for s in flat]


def test_reader_api(tmp_path):
    documents = [[[5, 6, 7], [8]], [[9, 10, 11, 12]], [[1, 2], [3], [4, 4]]]
    write_indexed_dataset(tmp_path / "d", documents, vocab_size=100)
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 6 and ds.num_documents == 3 and ds.num_tokens == 13
    assert ds.dtype == np.uint16
    assert ds[0].tolist() == [5, 6, 7] and ds[-1].tolist() == [4, 4]
    assert ds.sizes.tolist() == [3, 1, 4, 2, 1, 2]
    assert ds.pointers.tolist() == [0, 6, 8, 16, 20, 22]  # bytes, uint16 tokens
    assert ds.document_indices.tolist() == [0, 2, 3, 6]
    assert ds.get(2, offset=1, length=2).tolist() == [10, 11]
    assert ds.get(2, offset=3).tolist() == [12]
    assert [s.tolist() for s in ds.document(2)] == [[1, 2], [3], [4, 4]]
    with pytest.raises(IndexError, match="sequence index 6 out of range for 6 sequences"):
        ds[6]
    with pytest.raises(IndexError, match="outside sequence 2 of 4 tokens"):
        ds.get(2, offset=3, length=2)
    with pytest.raises(IndexError, match="document index 3 out of range"):
        ds.document(3)
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers reopen the memory maps
    assert [clone[i].tolist() for i in range(len(clone))] == [ds[i].tolist() for i in range(len(ds))]


def test_dtype_follows_vocab_size_like_megatron(tmp_path):
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32
    assert token_dtype_for_vocab(None) == np.int32
    write_indexed_dataset(tmp_path / "small", [[[1, 2]]], vocab_size=65499)
    write_indexed_dataset(tmp_path / "large", [[[1, 65499]]], vocab_size=65500)
    assert (tmp_path / "small.idx").read_bytes()[17] == 8  # uint16 code
    assert (tmp_path / "large.idx").read_bytes()[17] == 4  # int32 code
    assert IndexedDataset(tmp_path / "large")[0].tolist() == [1, 65499]


def test_empty_dataset_round_trips(tmp_path):
    write_indexed_dataset(tmp_path / "empty", [], vocab_size=10)
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.num_documents == 0
    assert (tmp_path / "empty.idx").stat().st_size == HEADER_SIZE + 8


def test_writer_rejects_bad_ids(tmp_path):
    with IndexedDatasetWriter(tmp_path / "w", vocab_size=50) as writer:
        with pytest.raises(ValueError, match=r"document 0, sentence 1: token id 50 is out of range \[0, 49\] for vocab_size 50"):
            writer.add_document([[1, 2], [50]])
        with pytest.raises(ValueError, match="token id -1 is out of range"):
            writer.add_document([[-1]])
        with pytest.raises(ValueError, match="expected a flat list of token ids"):
            writer.add_document([[[1, 2]]])
        with pytest.raises(ValueError, match="must be integers"):
            writer.add_document([[1.5]])
        writer.add_document([[1, 2, 3]])  # rejected documents left nothing behind
    ds = IndexedDataset(tmp_path / "w")
    assert len(ds) == 1 and ds[0].tolist() == [1, 2, 3]
    # Without a vocabulary, the dtype's range is the limit (no silent uint16 wrap-around).
    with IndexedDatasetWriter(tmp_path / "x", dtype=np.uint16) as writer:
        with pytest.raises(ValueError, match=r"token id 65536 is out of range \[0, 65535\] for dtype uint16"):
            writer.add_document([[65536]])


def test_writer_is_atomic(tmp_path):
    write_indexed_dataset(tmp_path / "d", [[[1, 2, 3]]], vocab_size=10)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "d", vocab_size=10) as writer:
            writer.add_document([[4, 5]])
            # Nothing new is visible before finalize.
            assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"d.bin", "d.idx"}
            raise RuntimeError("boom")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # old dataset untouched, no temp files left
    writer = IndexedDatasetWriter(tmp_path / "new", vocab_size=10)
    writer.add_document([[1]])
    assert not (tmp_path / "new.bin").exists() and not (tmp_path / "new.idx").exists()
    writer.finalize()
    assert IndexedDataset(tmp_path / "new")[0].tolist() == [1]
    with pytest.raises(RuntimeError, match="already finalized"):
        writer.add_document([[2]])
    # Files get the permissions a plain open() gives (not the 0600 of temp files).
    umask = os.umask(0)
    os.umask(umask)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"new{suffix}").stat().st_mode & 0o777 == 0o666 & ~umask


# -- corrupt files --------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> Path:
    write_indexed_dataset(tmp_path / "c", [[[1, 2, 3], [4]], [[5, 6]]], vocab_size=100)
    return tmp_path / "c"


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_missing_files(good):
    Path(f"{good}.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"c\.bin does not exist"):
        IndexedDataset(good)
    with pytest.raises(FileNotFoundError, match=r"nothing\.idx does not exist"):
        IndexedDataset(good.parent / "nothing")


def test_bad_magic(good):
    patch(Path(f"{good}.idx"), 0, b"NOTANIDX\x00")
    with pytest.raises(UserError, match=r"c\.idx: not a Megatron indexed-dataset index: starts with b'NOTANIDX"):
        IndexedDataset(good)


def test_bad_version(good):
    patch(Path(f"{good}.idx"), 9, struct.pack("<Q", 2))
    with pytest.raises(UserError, match=r"c\.idx: unsupported index version 2"):
        IndexedDataset(good)


def test_bad_dtype_code(good):
    patch(Path(f"{good}.idx"), 17, bytes([9]))
    with pytest.raises(UserError, match=r"c\.idx: unknown token dtype code 9"):
        IndexedDataset(good)


def test_truncated_index(good):
    idx = Path(f"{good}.idx")
    idx.write_bytes(idx.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"c\.idx: index truncated: 89 bytes, but the header's 3 sequences and 2 documents need 94"):
        IndexedDataset(good)
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(UserError, match="shorter than the 34-byte header"):
        IndexedDataset(good)


def test_trailing_bytes_in_index(good):
    idx = Path(f"{good}.idx")
    idx.write_bytes(idx.read_bytes() + b"\x00" * 5)
    with pytest.raises(UserError, match=r"c\.idx: index has unexpected trailing bytes"):
        IndexedDataset(good)


def test_truncated_bin(good):
    data = Path(f"{good}.bin")
    data.write_bytes(data.read_bytes()[:-2])  # last sequence (2 uint16 tokens at bytes 8..12) cut
    with pytest.raises(UserError, match=r"c\.bin: sequence 2 \(bytes 8\.\.12\) does not fit the 10-byte token file"):
        IndexedDataset(good)


def test_corrupt_document_index(good):
    # document index sits after 34 + 3*4 + 3*8 bytes: [0, 2, 3]; make it end at 7
    patch(Path(f"{good}.idx"), HEADER_SIZE + 3 * 12 + 16, struct.pack("<q", 7))
    with pytest.raises(UserError, match=r"c\.idx: corrupt document index: .* sequence count 3 \(got first 0, last 7\)"):
        IndexedDataset(good)


def test_negative_size(good):
    patch(Path(f"{good}.idx"), HEADER_SIZE + 4, struct.pack("<i", -3))
    with pytest.raises(UserError, match="sequence 1 has negative size -3"):
        IndexedDataset(good)
