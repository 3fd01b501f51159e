"""Batching for the pipelines: chunks of a stream, length-sorted batches, padding.

A pipeline reads its inputs as a stream, a chunk of ``lookahead`` inputs at a time, so memory
stays flat however long the stream is. Inside a chunk the model rows are sorted by token count
and cut into batches, so each batch pads to a length close to all of its rows; the results are
put back in input order before they leave the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclass(slots=True)
class Row:
    """One model input row (unpadded): token ids and token types of equal length."""

    input_ids: list[int]
    token_type_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter); reads lazily."""
    iterator = iter(items)
    while True:
        chunk = list(islice(iterator, size))
        if not chunk:
            return
        yield chunk


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length, longest batch first.

    Longest first, so that a batch too large for the device fails at once rather than at the
    end of a long run. The sort is stable: equal lengths keep their order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(rows: Sequence[Row], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad rows on the right to the longest one: ``input_ids``, ``token_type_ids``, ``attention_mask``.

    Each tensor is (rows, longest); built in numpy and moved to ``device`` in one copy each.
    """
    longest = max(len(row) for row in rows)
    ids = np.full((len(rows), longest), pad_token_id, dtype=np.int64)
    types = np.zeros((len(rows), longest), dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = row.input_ids
        types[i, :n] = row.token_type_ids
        mask[i, :n] = 1
    non_blocking = device.type == "cuda"
    return {
        "input_ids": torch.from_numpy(ids).to(device, non_blocking=non_blocking),
        "token_type_ids": torch.from_numpy(types).to(device, non_blocking=non_blocking),
        "attention_mask": torch.from_numpy(mask).to(device, non_blocking=non_blocking),
    }
