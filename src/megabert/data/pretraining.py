"""BERT pretraining samples over an indexed dataset: sentence pairs (NSP / SOP) and MLM masking.

A sample is ``[CLS] A [SEP] B [SEP]`` (token types 0 for ``[CLS] A [SEP]``, 1 for
``B [SEP]``), or ``[CLS] A [SEP]`` without a binary task. The pieces:

* :class:`PretrainingDataset` -- builds one epoch's sample index once (numpy, from the
  sentence sizes), then makes sample ``i`` from ``(seed, i)`` alone, for any number of epochs
  (each epoch visits the same segments in a fresh order, with fresh pairing and masking), so
  a trainer resuming at sample ``i`` sees exactly the samples it would have seen.
* :class:`MaskingVocab`, :class:`MaskingConfig`, :func:`mask_tokens` -- BERT's masked-LM
  corruption (15% of word-pieces; of those 80% ``[MASK]``, 10% a random token, 10% kept),
  optionally whole-word and n-gram spans.
* :func:`collate_pretraining` / :class:`PretrainingCollator` -- pad samples into a batch of
  tensors (the argument names of ``MegatronBertForPreTraining.forward``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megabert.data.indexed import IndexedDataset
from megabert.errors import UserError

IGNORE_INDEX = -100  # label of positions that are not predicted (torch's cross-entropy default)
BINARY_TASKS = ("nsp", "sop")
SINGLE_SENTENCE_MODES = ("split", "skip")

# Independent random streams derived from the seed (the second SeedSequence word).
_STREAM_INDEX = 0  # sample index construction (segment boundaries, target lengths)
_STREAM_ORDER = 1  # per-epoch shuffling of the segments
_STREAM_SAMPLE = 2  # per-sample choices: pairing, truncation, masking


# --------------------------------------------------------------------------------------------
# Vocabulary facts needed for masking
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields do not compare as a bool
class MaskingVocab:
    """The vocabulary facts that sample building and masking need.

    Build it with :meth:`from_tokenizer` (a tokenizer or a token -> id mapping).
    """

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int | None
    vocab_size: int
    is_special: np.ndarray  # bool [vocab_size]: never masked, never a random replacement
    is_continuation: np.ndarray  # bool [vocab_size]: "##" word-pieces that continue a word
    replacement_ids: np.ndarray  # int64 [R]: ids a masked position may be replaced with

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "MaskingVocab":
        """From a tokenizer (``get_vocab()``, ``cls_token``..., ``all_special_ids``) or a mapping.

        Raises :class:`UserError` when ``[CLS]``, ``[SEP]`` or ``[MASK]`` (or the tokenizer's
        own names for them) are missing from the vocabulary.
        """
        if isinstance(tokenizer, MaskingVocab):
            return tokenizer
        if isinstance(tokenizer, Mapping):
            vocab = dict(tokenizer)
            names: dict[str, str | None] = {}
            extra_special: list[int] = []
        elif hasattr(tokenizer, "get_vocab"):
            vocab = dict(tokenizer.get_vocab())
            names = {
                role: getattr(tokenizer, f"{role}_token", None) for role in ("cls", "sep", "mask", "pad", "unk")
            }
            extra_special = [int(i) for i in getattr(tokenizer, "all_special_ids", []) or []]
        else:
            raise TypeError(f"expected a tokenizer or a token->id mapping, got {type(tokenizer).__name__}")
        if not vocab:
            raise UserError("the vocabulary is empty")
        defaults = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"}
        tokens = {role: (names.get(role) or default) for role, default in defaults.items()}
        missing = [tokens[role] for role in ("cls", "sep", "mask") if tokens[role] not in vocab]
        if missing:
            raise UserError(
                "the vocabulary has no " + ", ".join(missing) + " token(s); BERT pretraining needs "
                f"{tokens['cls']}, {tokens['sep']} and {tokens['mask']} ({len(vocab)} entries given)"
            )
        vocab_size = max(vocab.values()) + 1
        is_special = np.zeros(vocab_size, dtype=bool)
        is_continuation = np.zeros(vocab_size, dtype=bool)
        for token, index in vocab.items():
            if token.startswith("##") and len(token) > 2:
                is_continuation[index] = True
        for role in defaults:
            if tokens[role] in vocab:
                is_special[vocab[tokens[role]]] = True
        for index in extra_special:
            if 0 <= index < vocab_size:
                is_special[index] = True
        replacement_ids = np.flatnonzero(~is_special).astype(np.int64)
        if replacement_ids.size == 0:
            raise UserError("the vocabulary holds only special tokens; nothing to replace masked tokens with")
        return cls(
            cls_id=vocab[tokens["cls"]],
            sep_id=vocab[tokens["sep"]],
            mask_id=vocab[tokens["mask"]],
            pad_id=vocab.get(tokens["pad"]),
            vocab_size=vocab_size,
            is_special=is_special,
            is_continuation=is_continuation,
            replacement_ids=replacement_ids,
        )


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingConfig:
    """How :func:`mask_tokens` corrupts a sequence.

    Args:
        probability: fraction of the (non-special) word-pieces to predict.
        mask_prob / random_prob: of the predicted positions, the fraction replaced by
            ``[MASK]`` and by a random token; the rest (``1 - mask_prob - random_prob``) keep
            their token.
        max_predictions_per_seq: cap on predicted positions per sequence (None: no cap).
        whole_word: mask all pieces of a word together (``##`` pieces join the piece before).
        max_ngram: mask spans of up to this many consecutive words (1: single words); span
            length n is drawn with probability proportional to 1/n, as Megatron does.
    """

    probability: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    max_predictions_per_seq: int | None = None
    whole_word: bool = False
    max_ngram: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise UserError(f"masking probability must be in (0, 1), got {self.probability}")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1.0 + 1e-9:
            raise UserError(
                f"mask_prob ({self.mask_prob}) and random_prob ({self.random_prob}) must be >= 0 "
                "and add up to at most 1"
            )
        if self.max_predictions_per_seq is not None and self.max_predictions_per_seq < 1:
            raise UserError(f"max_predictions_per_seq must be >= 1, got {self.max_predictions_per_seq}")
        if self.max_ngram < 1:
            raise UserError(f"max_ngram must be >= 1, got {self.max_ngram}")


def _word_units(ids: np.ndarray, candidate: np.ndarray, vocab: MaskingVocab, whole_word: bool) -> list[list[int]]:
    """Groups of positions masked together: single pieces, or whole words with ``whole_word``."""
    positions = np.flatnonzero(candidate).tolist()
    if not whole_word:
        return [[p] for p in positions]
    continuation = vocab.is_continuation[ids]
    units: list[list[int]] = []
    for p in positions:
        # A "##" piece joins the word before it, unless that word was cut off by a special token.
        if units and continuation[p] and units[-1][-1] == p - 1:
            units[-1].append(p)
        else:
            units.append([p])
    return units


def _choose_units(units: list[list[int]], budget: int, max_ngram: int, rng: np.random.Generator) -> list[int]:
    """Pick positions to predict: random (n-grams of) units, never more than ``budget`` positions."""
    chosen: list[int] = []
    if budget <= 0 or not units:
        return chosen
    if max_ngram == 1:
        for u in rng.permutation(len(units)).tolist():
            if len(chosen) + len(units[u]) <= budget:
                chosen.extend(units[u])
                if len(chosen) == budget:
                    break
        return chosen

    # Spans must not jump over a special token: find, for each unit, where its run of
    # adjacent units ends.
    count = len(units)
    run_end = [count - 1] * count
    for u in range(count - 2, -1, -1):
        run_end[u] = run_end[u + 1] if units[u + 1][0] == units[u][-1] + 1 else u
    # P(n) proportional to 1/n over the span lengths that fit: cumulative tables per longest span.
    weights = 1.0 / np.arange(1, max_ngram + 1)
    cumulative = [None] + [np.cumsum(weights[:k]) / weights[:k].sum() for k in range(1, max_ngram + 1)]
    sizes = [len(unit) for unit in units]
    taken = [False] * count
    order = rng.permutation(count).tolist()
    draws = rng.random(count).tolist()  # one draw per candidate start, vectorised up front
    for u, draw in zip(order, draws):
        left = budget - len(chosen)
        if left <= 0:
            break
        longest = min(max_ngram, run_end[u] - u + 1)
        n = int(np.searchsorted(cumulative[longest], draw, side="right")) + 1
        n = min(n, longest)  # guards against rounding in the last cumulative entry
        # Shorten the span until it fits the remaining budget.
        while n > 0 and sum(sizes[u : u + n]) > left:
            n -= 1
        if n == 0 or any(taken[u : u + n]):
            continue
        for v in range(u, u + n):
            taken[v] = True
            chosen.extend(units[v])
    return chosen


def mask_tokens(
    input_ids: Sequence[int] | np.ndarray,
    rng: np.random.Generator,
    vocab: MaskingVocab,
    config: MaskingConfig = MaskingConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masked-LM corruption of one (unpadded) sequence.

    ``round(probability * n)`` (at least 1, at most ``max_predictions_per_seq``) positions are
    chosen among the ``n`` non-special word-pieces (special tokens, including padding, are
    never chosen); whole words / n-gram spans that would exceed that number are skipped.
    Each chosen position becomes ``[MASK]`` with ``mask_prob``, a random non-special token
    with ``random_prob``, else keeps its token.

    Returns ``(masked_ids, labels)``, int64 arrays of the input's length; ``labels`` holds the
    original id at chosen positions and -100 elsewhere.
    """
    ids = np.asarray(input_ids, dtype=np.int64)  # [T]
    if ids.ndim != 1:
        raise ValueError(f"mask_tokens takes one sequence (1-D), got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab.vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise UserError(f"token id {bad} is outside the vocabulary of {vocab.vocab_size} entries")
    candidate = ~vocab.is_special[ids]  # [T]
    n_candidates = int(candidate.sum())
    budget = max(1, int(round(n_candidates * config.probability))) if n_candidates else 0
    if config.max_predictions_per_seq is not None:
        budget = min(budget, config.max_predictions_per_seq)

    units = _word_units(ids, candidate, vocab, config.whole_word)
    positions = np.sort(np.asarray(_choose_units(units, budget, config.max_ngram, rng), dtype=np.int64))

    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[positions] = ids[positions]
    masked = ids.copy()
    # One draw per chosen position decides [MASK] / random / keep.
    draw = rng.random(positions.size)
    random_tokens = vocab.replacement_ids[rng.integers(0, vocab.replacement_ids.size, positions.size)]
    to_mask = draw < config.mask_prob
    to_random = (draw >= config.mask_prob) & (draw < config.mask_prob + config.random_prob)
    masked[positions[to_mask]] = vocab.mask_id
    masked[positions[to_random]] = random_tokens[to_random]
    return masked, labels


# --------------------------------------------------------------------------------------------
# Sentence pairs
# --------------------------------------------------------------------------------------------


def truncate_pair(
    a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``a``/``b`` to at most ``max_tokens`` together, BERT's way.

    BERT removes one token at a time from the longer segment (``b`` on ties), from its front
    or back with equal chance. The final lengths of that loop are fixed, so they are computed
    directly, and the front/back split of each segment's removals is one binomial draw.
    """
    la, lb = len(a), len(b)
    excess = la + lb - max_tokens
    if excess <= 0:
        return a, b
    gap = min(excess, abs(la - lb))  # first the longer one shrinks to the shorter's length
    if la > lb:
        la -= gap
    else:
        lb -= gap
    excess -= gap
    lb -= (excess + 1) // 2  # then they alternate, b first
    la -= excess // 2
    cut_a, cut_b = len(a) - la, len(b) - lb
    front_a = int(rng.binomial(cut_a, 0.5)) if cut_a else 0
    front_b = int(rng.binomial(cut_b, 0.5)) if cut_b else 0
    return a[front_a : front_a + la], b[front_b : front_b + lb]


class PretrainingDataset(torch.utils.data.Dataset):
    """BERT pretraining samples (sentence pairs + MLM masking) over a Megatron indexed dataset.

    Args:
        data: an :class:`IndexedDataset` or its prefix (sequences = sentences, grouped into
            documents by its document index).
        tokenizer: the tokenizer (or token -> id mapping, or :class:`MaskingVocab`) whose ids
            the dataset holds; it must contain ``[CLS]``, ``[SEP]`` and ``[MASK]``.
        max_seq_length: length of a full sample including special tokens.
        binary_task: ``"nsp"`` (label 1 = B is a random segment of another document, drawn
            with p = 0.5), ``"sop"`` (A and B are consecutive, label 1 = swapped, p = 0.5), or
            None (``[CLS] A [SEP]``, no label).
        short_seq_prob: probability that a segment targets a random shorter length in
            ``[2, max_seq_length - 3]`` instead of ``max_seq_length - 3``.
        masking: the MLM corruption; None leaves the tokens as they are (labels all -100).
        num_samples: ``len(dataset)``; more than one epoch is fine (default: one epoch).
        seed: everything random derives from ``(seed, sample index)``.
        shuffle: visit segments in a random order per epoch (False: document order).
        single_sentence: what a binary task does with documents of a single sentence:
            ``"split"`` cuts that sentence at a random token into A and B (documents of one
            single-token sentence are skipped), ``"skip"`` leaves them out. ``stats`` counts both.

    ``dataset[i]`` is a dict of int64 numpy arrays ``input_ids``, ``token_type_ids``,
    ``labels`` (each ``[T]``, ``T <= max_seq_length``) and, with a binary task, the int
    ``next_sentence_label``. Pad them into a batch with :func:`collate_pretraining`.
    """

    def __init__(
        self,
        data: IndexedDataset | str | os.PathLike,
        tokenizer: Any,
        max_seq_length: int = 512,
        *,
        binary_task: str | None = "nsp",
        short_seq_prob: float = 0.1,
        masking: MaskingConfig | None = MaskingConfig(),
        num_samples: int | None = None,
        seed: int = 1234,
        shuffle: bool = True,
        single_sentence: str = "split",
    ) -> None:
        super().__init__()
        if binary_task is not None and binary_task not in BINARY_TASKS:
            raise UserError(f"binary_task must be one of {', '.join(BINARY_TASKS)} or None, got {binary_task!r}")
        if single_sentence not in SINGLE_SENTENCE_MODES:
            raise UserError(f"single_sentence must be one of {', '.join(SINGLE_SENTENCE_MODES)}, got {single_sentence!r}")
        minimum = 5 if binary_task else 3
        if max_seq_length < minimum:
            layout = "[CLS] A [SEP] B [SEP]" if binary_task else "[CLS] A [SEP]"
            raise UserError(
                f"max_seq_length {max_seq_length} is too small: {layout} needs at least {minimum} "
                f"(room for 2 text tokens)"
            )
        if not 0.0 <= short_seq_prob <= 1.0:
            raise UserError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
        if num_samples is not None and num_samples < 0:
            raise UserError(f"num_samples must be >= 0, got {num_samples}")

        self.data = data if isinstance(data, IndexedDataset) else IndexedDataset(data)
        if not np.issubdtype(self.data.dtype, np.integer):
            raise UserError(f"indexed dataset {self.data.prefix} holds {self.data.dtype} values, not token ids")
        self.vocab = MaskingVocab.from_tokenizer(tokenizer)
        self.max_seq_length = max_seq_length
        self.binary_task = binary_task
        self.short_seq_prob = short_seq_prob
        self.masking = masking
        self.seed = int(seed)
        self.shuffle = shuffle
        self.single_sentence = single_sentence
        # Text tokens per sample: the special tokens take 3 (pairs) or 2 (single segment).
        self.max_tokens = max_seq_length - (3 if binary_task else 2)

        self._documents_with_text = self._find_documents_with_text()
        if binary_task == "nsp" and len(self._documents_with_text) < 2:
            raise UserError(
                f"indexed dataset {self.data.prefix}: NSP needs at least 2 non-empty documents to "
                f"draw random next segments, found {len(self._documents_with_text)}"
            )
        self.sample_index, self.stats = self._build_sample_index()
        self.samples_per_epoch = len(self.sample_index)
        if self.samples_per_epoch == 0:
            raise UserError(
                f"indexed dataset {self.data.prefix}: no pretraining samples can be made "
                f"({self.stats['documents']} documents, {self.stats['skipped_documents']} skipped)"
            )
        self.num_samples = self.samples_per_epoch if num_samples is None else int(num_samples)
        self.stats["samples_per_epoch"] = self.samples_per_epoch
        self._order_epoch = -1
        self._order = np.arange(0)

    # -- sample index ---------------------------------------------------------------------------
    def _find_documents_with_text(self) -> np.ndarray:
        starts = self.data.document_indices[:-1]
        tokens_before = np.concatenate([[0], np.cumsum(self.data.sizes, dtype=np.int64)])
        doc_tokens = tokens_before[self.data.document_indices[1:]] - tokens_before[starts]
        return np.flatnonzero(doc_tokens > 0)

    def _draw_target(self, rng: np.random.Generator) -> int:
        if self.short_seq_prob > 0 and rng.random() < self.short_seq_prob:
            return int(rng.integers(2, self.max_tokens + 1))
        return self.max_tokens

    def _build_sample_index(self) -> tuple[np.ndarray, dict[str, int]]:
        """One epoch of segments: rows ``(document, first sequence, end sequence, target length)``.

        Sentences of a document are taken in order until a segment reaches its target length;
        with a binary task a segment holds >= 2 sentences (a lone last sentence joins the
        segment before it), except single-sentence documents in ``"split"`` mode.
        """
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _STREAM_INDEX]))
        min_sentences = 2 if self.binary_task else 1
        sizes = self.data.sizes
        doc_index = self.data.document_indices
        rows: list[tuple[int, int, int, int]] = []
        stats = {"documents": self.data.num_documents, "empty_documents": 0, "single_sentence_documents": 0, "skipped_documents": 0}
        for doc in range(self.data.num_documents):
            first, end = int(doc_index[doc]), int(doc_index[doc + 1])
            sentences = first + np.flatnonzero(sizes[first:end] > 0)  # non-empty sentences only
            lengths = sizes[sentences].tolist()
            count = len(lengths)
            if count == 0:
                stats["empty_documents"] += 1
                continue
            if count < min_sentences:
                # A single sentence in a pair task: cut it into A and B, if it has 2 tokens.
                stats["single_sentence_documents"] += 1
                if self.single_sentence == "split" and lengths[0] >= 2:
                    rows.append((doc, int(sentences[0]), int(sentences[0]) + 1, self._draw_target(rng)))
                else:
                    stats["skipped_documents"] += 1
                continue
            target = self._draw_target(rng)
            start, length, taken = 0, 0, 0
            for k in range(count):
                length += lengths[k]
                taken += 1
                remaining = count - k - 1
                if (length >= target and taken >= min_sentences and remaining >= min_sentences) or remaining == 0:
                    rows.append((doc, int(sentences[start]), int(sentences[k]) + 1, target))
                    start, length, taken = k + 1, 0, 0
                    target = self._draw_target(rng)
        index = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        return index, stats

    # -- indexing -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, _STREAM_ORDER, epoch]))
                self._order = rng.permutation(self.samples_per_epoch)
            else:
                self._order = np.arange(self.samples_per_epoch)
            self._order_epoch = epoch
        return self._order

    def segment_of(self, index: int) -> tuple[int, int, int, int]:
        """The sample-index row ``(document, first sequence, end sequence, target)`` of sample ``index``."""
        epoch, position = divmod(index, self.samples_per_epoch)
        row = self.sample_index[self._epoch_order(epoch)[position]]
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def _sentences(self, first: int, end: int) -> list[np.ndarray]:
        out = []
        for i in range(first, end):
            if self.data.sizes[i] > 0:
                ids = self.data[i].astype(np.int64)
                if ids.max() >= self.vocab.vocab_size or ids.min() < 0:
                    bad = int(ids.max()) if ids.max() >= self.vocab.vocab_size else int(ids.min())
                    raise UserError(
                        f"indexed dataset {self.data.prefix}: sequence {i} holds token id {bad}, outside the "
                        f"tokenizer's vocabulary of {self.vocab.vocab_size}; was it built with another tokenizer?"
                    )
                out.append(ids)
        return out

    def _random_segment(self, doc: int, target: int, rng: np.random.Generator) -> np.ndarray:
        """Sentences of a random other document, from a random sentence, until ``target`` tokens."""
        docs = self._documents_with_text
        own = int(np.searchsorted(docs, doc))
        pick = int(rng.integers(0, len(docs) - 1))
        if pick >= own:  # skip the sample's own document
            pick += 1
        other = int(docs[pick])
        first, end = int(self.data.document_indices[other]), int(self.data.document_indices[other + 1])
        non_empty = first + np.flatnonzero(self.data.sizes[first:end] > 0)  # documents can be books: read lazily
        start = int(non_empty[rng.integers(0, len(non_empty))])
        pieces, length = [], 0
        for i in range(start, end):
            for sentence in self._sentences(i, i + 1):
                pieces.append(sentence)
                length += len(sentence)
            if length >= target:
                break
        return np.concatenate(pieces)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` (any index < len, over as many epochs as that takes)."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"sample index must be an integer, got {type(index).__name__}")
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range for {self.num_samples} samples")
        index = int(index)
        doc, first, end, target = self.segment_of(index)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _STREAM_SAMPLE, index]))
        sentences = self._sentences(first, end)
        vocab = self.vocab

        label = None
        if self.binary_task is None:
            a, _ = truncate_pair(np.concatenate(sentences), np.zeros(0, np.int64), target, rng)
            parts = [[vocab.cls_id], a, [vocab.sep_id]]
            types = [0] * (len(a) + 2)
        else:
            if len(sentences) == 1:  # single-sentence document: cut the sentence itself
                tokens = sentences[0]
                cut = int(rng.integers(1, len(tokens)))
                a, b = tokens[:cut], tokens[cut:]
            else:
                split = int(rng.integers(1, len(sentences)))  # sentences in A: 1 .. n-1
                a, b = np.concatenate(sentences[:split]), np.concatenate(sentences[split:])
            label = int(rng.random() < 0.5)
            if label and self.binary_task == "nsp":
                b = self._random_segment(doc, max(1, target - len(a)), rng)
            elif label:  # sop: swapped order
                a, b = b, a
            a, b = truncate_pair(a, b, target, rng)
            parts = [[vocab.cls_id], a, [vocab.sep_id], b, [vocab.sep_id]]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)

        input_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])  # [T]
        token_type_ids = np.asarray(types, dtype=np.int64)  # [T]
        if self.masking is not None:
            input_ids, labels = mask_tokens(input_ids, rng, vocab, self.masking)
        else:
            labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        sample: dict[str, Any] = {"input_ids": input_ids, "token_type_ids": token_type_ids, "labels": labels}
        if label is not None:
            sample["next_sentence_label"] = label
        return sample


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def collate_pretraining(
    samples: Sequence[Mapping[str, Any]],
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad samples of :class:`PretrainingDataset` into a batch of int64 tensors.

    Returns ``input_ids``, ``token_type_ids``, ``attention_mask`` (1 = token, 0 = padding),
    ``labels`` (padding -100), each ``[B, T]`` with ``T`` the longest sample rounded up to a
    multiple of ``pad_to_multiple_of`` (e.g. 8 for tensor cores), and ``next_sentence_label``
    ``[B]`` when the samples carry one.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)  # [B, T]
    token_type_ids = torch.zeros((batch, width), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        input_ids[row, :length] = torch.as_tensor(np.asarray(sample["input_ids"], dtype=np.int64))
        token_type_ids[row, :length] = torch.as_tensor(np.asarray(sample["token_type_ids"], dtype=np.int64))
        attention_mask[row, :length] = 1
        if "labels" in sample:
            labels[row, :length] = torch.as_tensor(np.asarray(sample["labels"], dtype=np.int64))
    out = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
    with_label = ["next_sentence_label" in s for s in samples]
    if any(with_label):
        if not all(with_label):
            raise ValueError("some samples have a next_sentence_label and some do not")
        out["next_sentence_label"] = torch.tensor([int(s["next_sentence_label"]) for s in samples], dtype=torch.long)
    return out


@dataclass(frozen=True)
class PretrainingCollator:
    """Picklable ``collate_fn`` for a DataLoader: :func:`collate_pretraining` with fixed options."""

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_pretraining(samples, self.pad_token_id, self.pad_to_multiple_of)
