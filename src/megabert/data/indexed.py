"""Megatron-LM's indexed token dataset (``PREFIX.idx`` + ``PREFIX.bin``): writer and reader.

The layout (the one megatron-core's ``IndexedDataset`` uses, so files move freely between the
two) is, all little-endian::

    PREFIX.idx
        9 bytes   magic b"MMIDIDX\\x00\\x00"
        uint64    version, always 1
        uint8     dtype code of the tokens in .bin (1 uint8, 2 int8, 3 int16, 4 int32,
                  5 int64, 6 float64, 7 float32, 8 uint16)
        uint64    S = number of sequences (sentences)
        uint64    D = number of entries in the document index (documents + 1)
        int32[S]  sizes: tokens per sequence
        int64[S]  pointers: byte offset of each sequence in .bin
        int64[D]  document index: sequence index where each document starts; starts at 0
                  and ends at S, so document d is sequences [doc[d], doc[d + 1])
        (int8[S]  sequence modes, only in multimodal datasets; not written here)
    PREFIX.bin
        the tokens of all sequences, back to back, in the dtype above

A sequence is one sentence of a document; documents are lists of sentences.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from megabert.errors import UserError
from megabert.utils import atomic_path

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document-index count (8)
HEADER_SIZE = 34

# Megatron's dtype codes (fixed by the file format).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}

# Megatron switches to int32 tokens at this vocabulary size (not 65536: it keeps a margin).
UINT16_VOCAB_LIMIT = 65500


def idx_path(prefix: str | os.PathLike) -> Path:
    """The index file of a dataset prefix: ``PREFIX.idx``."""
    return Path(f"{os.fspath(prefix)}.idx")


def bin_path(prefix: str | os.PathLike) -> Path:
    """The token file of a dataset prefix: ``PREFIX.bin``."""
    return Path(f"{os.fspath(prefix)}.bin")


def token_dtype_for_vocab(vocab_size: int | None) -> np.dtype:
    """The token dtype Megatron uses for a vocabulary: uint16 below 65,500 entries, else int32."""
    if vocab_size is not None and vocab_size < UINT16_VOCAB_LIMIT:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _new_file_mode() -> int:
    """The mode ``open()`` gives new files (0o666 less the umask); temp files start at 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """Whether both ``PREFIX.idx`` and ``PREFIX.bin`` exist."""
    return idx_path(prefix).is_file() and bin_path(prefix).is_file()


class IndexedDatasetWriter:
    """Write documents (lists of sentences of token ids) to ``PREFIX.bin`` / ``PREFIX.idx``.

    Tokens stream to a temp file beside ``PREFIX.bin``; :meth:`finalize` renames it into place
    and then writes the index atomically, so neither file appears half-written. Leaving a
    ``with`` block by an exception (or calling :meth:`abort`) removes the temp file and leaves
    any existing dataset at the prefix untouched.

    Args:
        prefix: output prefix (``PREFIX.bin`` / ``PREFIX.idx``); parent folders are created.
        vocab_size: picks the token dtype (uint16 when ``< 65500``, else int32) and bounds
            the ids accepted.
        dtype: force a token dtype instead (one of Megatron's: uint8 ... uint16, int32, int64).
    """

    def __init__(
        self,
        prefix: str | os.PathLike,
        vocab_size: int | None = None,
        dtype: np.dtype | type[np.generic] | str | None = None,
    ) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype) if dtype is not None else token_dtype_for_vocab(vocab_size)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(
                f"token dtype {self.dtype} has no Megatron dtype code; "
                f"use one of {sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}"
            )
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        # Largest id the dtype holds without wrapping (numpy casts would wrap silently).
        if np.issubdtype(self.dtype, np.integer):
            self._max_id = int(np.iinfo(self.dtype).max)
        else:
            self._max_id = int(2 ** np.finfo(self.dtype).nmant)
        if vocab_size is not None:
            self._max_id = min(self._max_id, vocab_size - 1)

        self._sizes: list[int] = []
        self._document_index: list[int] = [0]
        self.num_tokens = 0
        self._closed = False

        # The token file is written under a temp name that atomic_path renames on success
        # (stack closed normally) or deletes on failure (stack closed with an exception).
        self._stack = contextlib.ExitStack()
        self._tmp_bin = self._stack.enter_context(atomic_path(bin_path(self.prefix)))
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed in finalize/abort)
        # Datasets are often shared: give them the permissions a plain open() would.
        os.chmod(self._tmp_bin, _new_file_mode())

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()

    # -- writing ---------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        """Documents added so far."""
        return len(self._document_index) - 1

    @property
    def num_sequences(self) -> int:
        """Sequences (sentences) added so far."""
        return len(self._sizes)

    def add_document(self, sentences: Sequence[Sequence[int] | np.ndarray]) -> None:
        """Append one document: a list of sentences, each a list (or 1-D array) of token ids."""
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")
        arrays = []
        for number, sentence in enumerate(sentences):
            ids = np.asarray(sentence)
            if ids.ndim != 1:
                raise ValueError(
                    f"document {self.num_documents}, sentence {number}: expected a flat list of "
                    f"token ids, got an array of shape {ids.shape}"
                )
            if ids.size:
                if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == self.dtype):
                    raise ValueError(
                        f"document {self.num_documents}, sentence {number}: token ids must be "
                        f"integers, got dtype {ids.dtype}"
                    )
                low, high = int(ids.min()), int(ids.max())
                if low < 0 or high > self._max_id:
                    bad = low if low < 0 else high
                    limit = (
                        f"vocab_size {self.vocab_size}" if self.vocab_size is not None else f"dtype {self.dtype}"
                    )
                    raise ValueError(
                        f"document {self.num_documents}, sentence {number}: token id {bad} is out "
                        f"of range [0, {self._max_id}] for {limit}"
                    )
            arrays.append(ids.astype(self.dtype, copy=False))
        for ids in arrays:
            self._bin.write(ids.tobytes(order="C"))
            self._sizes.append(int(ids.size))
            self.num_tokens += int(ids.size)
        self._document_index.append(len(self._sizes))

    def add_documents(self, documents: Iterable[Sequence[Sequence[int]]]) -> None:
        """Append several documents (see :meth:`add_document`)."""
        for document in documents:
            self.add_document(document)

    def index_bytes(self) -> bytes:
        """The ``.idx`` file content for the documents added so far."""
        sizes = np.asarray(self._sizes, dtype=np.int32)
        if len(self._sizes) and max(self._sizes) > np.iinfo(np.int32).max:
            raise ValueError("a sequence is longer than 2**31 - 1 tokens (int32 sizes)")
        # pointers[i] = bytes before sequence i; the first sequence starts at 0.
        pointers = np.zeros(len(self._sizes), dtype=np.int64)
        if len(self._sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_index = np.asarray(self._document_index, dtype=np.int64)
        header = (
            INDEX_MAGIC
            + struct.pack("<Q", INDEX_VERSION)
            + struct.pack("<B", _CODE_OF_DTYPE[self.dtype])
            + struct.pack("<Q", len(sizes))
            + struct.pack("<Q", len(document_index))
        )
        return b"".join([header, sizes.tobytes(), pointers.tobytes(), document_index.tobytes()])

    def finalize(self) -> tuple[Path, Path]:
        """Close the token file and write the index; returns ``(idx_path, bin_path)``."""
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")
        try:
            index = self.index_bytes()
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._stack.close()  # .bin renamed into place, complete
        # The index goes last: a reader needs it, so it never sees a dataset without its tokens.
        with atomic_path(idx_path(self.prefix)) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(index)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, _new_file_mode())
        return idx_path(self.prefix), bin_path(self.prefix)

    def abort(self) -> None:
        """Drop everything written so far (the temp token file); the prefix is left untouched."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._bin.close()
        # Closing the stack with an exception makes atomic_path delete the temp file.
        error = RuntimeError("indexed dataset write aborted")
        with contextlib.suppress(RuntimeError):
            self._stack.__exit__(RuntimeError, error, None)

    def __del__(self) -> None:  # a writer dropped without finalize leaves no temp file
        with contextlib.suppress(Exception):
            self.abort()


def write_indexed_dataset(
    prefix: str | os.PathLike,
    documents: Iterable[Sequence[Sequence[int]]],
    vocab_size: int | None = None,
    dtype: np.dtype | type[np.generic] | str | None = None,
) -> tuple[Path, Path]:
    """Write ``documents`` (lists of sentences of ids) to ``PREFIX.idx``/``PREFIX.bin`` at once."""
    with IndexedDatasetWriter(prefix, vocab_size=vocab_size, dtype=dtype) as writer:
        writer.add_documents(documents)
    return idx_path(prefix), bin_path(prefix)


class IndexedDataset:
    """Memory-mapped reader of a Megatron indexed dataset (``PREFIX.idx`` + ``PREFIX.bin``).

    ``len(ds)`` is the number of sequences (sentences); ``ds[i]`` is sequence ``i`` as a
    read-only numpy array of the file's token dtype. Documents are
    ``ds.document_indices[d] : ds.document_indices[d + 1]`` (sequence indices).

    Opening validates the header, version, dtype code, counts, the document index, and that
    every sequence lies inside ``PREFIX.bin``; a bad file raises :class:`UserError` naming
    the file and the problem. Pickling reopens the files (for DataLoader workers).
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        self._open()

    # -- opening and validation -------------------------------------------------------------
    def _open(self) -> None:
        index_file, token_file = idx_path(self.prefix), bin_path(self.prefix)
        for path in (index_file, token_file):
            if not path.exists():
                raise FileNotFoundError(
                    f"indexed dataset {self.prefix}: {path} does not exist "
                    "(a dataset is the pair PREFIX.idx + PREFIX.bin; pass the prefix without suffix)"
                )
            if not path.is_file():
                raise UserError(f"indexed dataset {self.prefix}: {path} is not a file")

        idx_size = index_file.stat().st_size
        if idx_size < HEADER_SIZE:
            raise UserError(
                f"{index_file}: truncated index: {idx_size} bytes, shorter than the "
                f"{HEADER_SIZE}-byte header"
            )
        with open(index_file, "rb") as handle:
            header = handle.read(HEADER_SIZE)
        magic = header[:9]
        if magic != INDEX_MAGIC:
            raise UserError(
                f"{index_file}: not a Megatron indexed-dataset index: starts with {magic!r}, "
                f"expected {INDEX_MAGIC!r}"
            )
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            raise UserError(f"{index_file}: unsupported index version {version} (only {INDEX_VERSION} is known)")
        code = header[17]
        if code not in DTYPE_CODES:
            raise UserError(
                f"{index_file}: unknown token dtype code {code} (known: "
                + ", ".join(f"{c}={np.dtype(d)}" for c, d in DTYPE_CODES.items())
                + ")"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        sequence_count, index_count = struct.unpack("<QQ", header[18:34])
        if index_count < 1:
            raise UserError(f"{index_file}: document index is empty (it must hold at least the leading 0)")

        expected = HEADER_SIZE + sequence_count * (4 + 8) + index_count * 8
        # A multimodal index carries one int8 mode per sequence after the document index.
        if idx_size not in (expected, expected + sequence_count):
            problem = "truncated" if idx_size < expected else "has unexpected trailing bytes"
            raise UserError(
                f"{index_file}: index {problem}: {idx_size} bytes, but the header's "
                f"{sequence_count} sequences and {index_count - 1} documents need {expected}"
            )

        index_map = np.memmap(index_file, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sizes = np.frombuffer(index_map, dtype=np.int32, count=sequence_count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(index_map, dtype=np.int64, count=sequence_count, offset=offset)
        offset += self.pointers.nbytes
        self.document_indices = np.frombuffer(index_map, dtype=np.int64, count=index_count, offset=offset)
        self._index_map = index_map

        docs = self.document_indices
        if docs[0] != 0 or docs[-1] != sequence_count or (index_count > 1 and np.any(np.diff(docs) < 0)):
            raise UserError(
                f"{index_file}: corrupt document index: it must rise from 0 to the sequence "
                f"count {sequence_count} (got first {int(docs[0])}, last {int(docs[-1])})"
            )

        bin_size = token_file.stat().st_size
        self._check_extents(index_file, token_file, bin_size)
        if bin_size:
            self._tokens = np.memmap(token_file, dtype=np.uint8, mode="r")
        else:  # mmap cannot map an empty file
            self._tokens = np.zeros(0, dtype=np.uint8)

    def _check_extents(self, index_file: Path, token_file: Path, bin_size: int) -> None:
        """Every sequence must have a non-negative size and lie inside the .bin file."""
        itemsize = self.dtype.itemsize
        block = 1 << 22  # bound the temporaries on very large indexes
        for start in range(0, len(self.sizes), block):
            sizes = self.sizes[start : start + block].astype(np.int64)
            pointers = self.pointers[start : start + block]
            if sizes.size and sizes.min() < 0:
                bad = start + int(np.argmin(sizes))
                raise UserError(f"{index_file}: corrupt index: sequence {bad} has negative size {int(sizes.min())}")
            ends = pointers + sizes * itemsize
            bad_mask = (pointers < 0) | (pointers % itemsize != 0) | (ends > bin_size)
            if bad_mask.any():
                bad = int(np.flatnonzero(bad_mask)[0])
                raise UserError(
                    f"{token_file}: sequence {start + bad} (bytes {int(pointers[bad])}..{int(ends[bad])}) "
                    f"does not fit the {bin_size}-byte token file: the .bin is truncated or does not "
                    f"belong to {index_file.name}"
                )

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    def _check_index(self, i: int) -> int:
        n = len(self.sizes)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"sequence index must be an integer, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences in {self.prefix}")
        return int(i)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i`` (negative counts from the end) as a read-only 1-D array."""
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end when length is None)."""
        i = self._check_index(i)
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"slice offset={offset} length={length} is outside sequence {i} of {size} tokens"
            )
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._tokens, dtype=self.dtype, count=length, offset=start)

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all sequences."""
        return int(self.sizes.sum(dtype=np.int64))

    def document(self, d: int) -> list[np.ndarray]:
        """The sentences (sequences) of document ``d``."""
        if not 0 <= d < self.num_documents:
            raise IndexError(f"document index {d} out of range for {self.num_documents} documents")
        start, end = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self.get(i) for i in range(start, end)]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}, documents={self.num_documents}, "
            f"sequences={len(self)}, dtype={self.dtype})"
        )
