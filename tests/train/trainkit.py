"""Helpers of the trainer tests: tiny models, synthetic pretraining batches, a tiny corpus."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from megabert.config import MegatronBertConfig

TINY_MODEL = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)

WORDS = (
    "the a one two red blue green cat dog bird fish tree house car road river sun moon star "
    "runs jumps sees eats likes finds makes takes gives sings walks swims flies reads writes "
    "big small old new fast slow happy sad warm cold near far over under with from into"
).split()


def tiny_config(**overrides) -> MegatronBertConfig:
    values = dict(TINY_MODEL)
    values.update(overrides)
    return MegatronBertConfig(**values)


def synthetic_sample(index: int, seq: int = 16, vocab: int = 128, binary: bool = True) -> dict[str, np.ndarray]:
    """One pretraining-like sample, fixed by ``index``: random length, ~20% of tokens labelled."""
    rng = np.random.default_rng([7, index])
    length = int(rng.integers(seq // 2, seq + 1))
    ids = rng.integers(5, vocab, length)
    ids[0], ids[-1] = 2, 3
    labels = np.full(length, -100)
    chosen = rng.random(length) < 0.2
    chosen[0] = chosen[-1] = False
    chosen[1] = True  # at least one prediction per sample
    labels[chosen] = ids[chosen]
    ids = ids.copy()
    ids[chosen] = 4  # [MASK]
    types = np.zeros(length, dtype=np.int64)
    types[length // 2 :] = 1
    sample = {"input_ids": ids, "token_type_ids": types, "labels": labels}
    if binary:
        sample["next_sentence_label"] = int(rng.integers(0, 2))
    return sample


class SyntheticPretrainingData(torch.utils.data.Dataset):
    """Map-style dataset of :func:`synthetic_sample` (deterministic per index, like PretrainingDataset)."""

    def __init__(self, size: int = 64, seq: int = 16, binary: bool = True) -> None:
        self.size, self.seq, self.binary = size, seq, binary

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return synthetic_sample(index, self.seq, binary=self.binary)


def synthetic_batch(first: int, batch: int = 4, seq: int = 16, binary: bool = True) -> dict[str, torch.Tensor]:
    from megabert.data.pretraining import collate_pretraining

    return collate_pretraining([synthetic_sample(first + i, seq, binary=binary) for i in range(batch)])


def write_tiny_corpus(folder: Path, documents: int = 40, seed: int = 0) -> list[Path]:
    """Text files of random sentences over WORDS; one document per blank-line-separated block."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(documents):
        for _ in range(rng.randint(3, 7)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " .")
        lines.append("")
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [path]


def write_tiny_tokenizer(folder: Path):
    """A word-level WordPiece vocabulary over WORDS (+ '.') saved as a tokenizer folder."""
    from megabert.tokenization import MegatronBertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + WORDS
    tokenizer = MegatronBertTokenizer.from_vocab(tokens, lowercase=True)
    tokenizer.save_pretrained(folder)
    return tokenizer
