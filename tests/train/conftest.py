"""Fixtures of the trainer tests (helpers live in trainkit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainkit import tiny_config, write_tiny_corpus, write_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer folder and train/valid indexed datasets (shared by the job tests; read only)."""
    from megabert.data.preprocess import preprocess_corpus

    root = tmp_path_factory.mktemp("tiny-corpus")
    tokenizer_dir = root / "tokenizer"
    write_tiny_tokenizer(tokenizer_dir)
    files = write_tiny_corpus(root / "text")
    preprocess_corpus(files, root / "data" / "tiny", tokenizer_dir, valid_fraction=0.25, seed=1, progress=False)
    return {
        "root": root,
        "tokenizer": tokenizer_dir,
        "train": root / "data" / "tiny_train",
        "valid": root / "data" / "tiny_valid",
    }


@pytest.fixture
def tiny_model_file(tmp_path) -> Path:
    """A config.json of a tiny model (for --model-config PATH)."""
    path = tmp_path / "tiny-model"
    tiny_config(vocab_size=128, max_position_embeddings=64).save_pretrained(path)
    return path / "config.json"
