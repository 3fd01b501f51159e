"""Shared fixtures: tiny configs, reference models saved by `transformers`, and the real data folder."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

# Tests compare numbers, so keep them deterministic and lean on the 2-core machines.
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
)


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def padded_batch(batch: int = 3, seq: int = 10, vocab: int = 99, seed: int = 0):
    """ids, attention mask with padding in two rows, token types 0/1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq - 4 :] = 0
    if batch > 2:
        mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros_like(ids)
    types[:, seq // 2 :] = 1
    return ids, mask, types
