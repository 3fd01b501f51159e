"""A generated toy corpus and WordPiece vocabulary for the data tests (no shared data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
STEMS = [
    "the", "a", "cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "sun", "moon",
    "star", "road", "city", "boat", "king", "queen", "child", "book", "song", "word", "light",
    "night", "day", "sees", "finds", "likes", "moves", "keeps", "under", "over", "near", "with",
    "and", "but", "old", "new", "red", "blue", "green", "small", "big", "quiet", "loud",
    "play", "walk", "jump", "talk", "read", "sing",
]
# Continuation pieces: "play" + "##ing" -> "playing" is one word of two word-pieces.
SUFFIXES = ["##ing", "##ed", "##er", "##s", "##ly"]
PUNCT = [".", ","]
VERB_STEMS = ["play", "walk", "jump", "talk", "read", "sing"]


def toy_vocab() -> list[str]:
    """The vocabulary: 5 specials, stems, suffix pieces, punctuation (id = position)."""
    return SPECIALS + STEMS + SUFFIXES + PUNCT


def write_vocab(folder: Path) -> Path:
    """Write ``vocab.txt`` into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(toy_vocab()) + "\n", encoding="utf-8")
    return path


def toy_tokenizer():
    """megabert's tokenizer over the toy vocabulary (uncased)."""
    from megabert.tokenization import MegatronBertTokenizer

    return MegatronBertTokenizer.from_vocab(toy_vocab(), lowercase=True)


def toy_sentence(rng: np.random.Generator) -> str:
    """A sentence of 3..14 words; about a third of the verbs carry a suffix (two word-pieces)."""
    words = []
    for _ in range(int(rng.integers(3, 15))):
        if rng.random() < 0.3:
            words.append(VERB_STEMS[int(rng.integers(len(VERB_STEMS)))] + SUFFIXES[int(rng.integers(len(SUFFIXES)))][2:])
        else:
            words.append(STEMS[int(rng.integers(len(STEMS)))])
    return " ".join(words).capitalize() + "."


def toy_documents(num_documents: int = 40, seed: int = 0, min_sentences: int = 2, max_sentences: int = 14) -> list[list[str]]:
    """``num_documents`` documents of ``min_sentences..max_sentences`` sentences each."""
    rng = np.random.default_rng(seed)
    return [
        [toy_sentence(rng) for _ in range(int(rng.integers(min_sentences, max_sentences + 1)))]
        for _ in range(num_documents)
    ]


def write_text_corpus(path: Path, documents: list[list[str]]) -> Path:
    """One sentence per line, a blank line between documents."""
    path.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n", encoding="utf-8")
    return path
