"""MegatronBERT's WordPiece tokenizer: a thin layer over the Rust `tokenizers` library.

The pipeline is BERT's: ``BertNormalizer`` (clean control characters, space out CJK
ideographs, and for an uncased vocabulary lower-case and strip accents), ``BertPreTokenizer``
(split on whitespace and punctuation), greedy longest-match WordPiece with the ``##``
continuation prefix, ``[UNK]`` for words longer than 100 characters or not coverable, and the
template ``[CLS] A [SEP] B [SEP]`` with token types 0 for A and 1 for B.

Calls follow ``transformers.BertTokenizerFast`` (same ids, masks, offsets, truncation and
overflow windows), with three deliberate differences, each to avoid a silent surprise:

* padding or truncation stored inside a ``tokenizer.json`` never applies to a call that did
  not ask for it;
* ``padding="max_length"`` needs an explicit ``max_length`` (no silent padding to 512, no
  silent "no padding" either), and a ``max_length`` too small to hold the special tokens plus
  one token of text is an error instead of a sequence left untruncated;
* ``model_max_length`` is always a number: taken from ``tokenizer_config.json`` when it holds a
  real limit, else 512 (MegatronBERT's position embeddings). ``truncation=True`` without
  ``max_length`` truncates to it.

All the work per text happens in Rust (``encode_batch``); the Python side only validates the
call once per batch and gathers the columns, so batch calls are as fast as the library allows.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tokenizers import AddedToken, Encoding, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from megabert.errors import UserError, require_file
from megabert.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "BatchEncoding",
    "MegatronBertTokenizer",
    "check_unicode",
    "read_vocab_file",
    "train_tokenizer",
    "train_tokenizer_from_iterator",
]

DEFAULT_MODEL_MAX_LENGTH = 512
MAX_INPUT_CHARS_PER_WORD = 100
WORDPIECE_PREFIX = "##"
# Special-token roles in the order `transformers` lists them (`all_special_ids`), with BERT's names.
SPECIAL_TOKEN_ROLES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
# A trained vocabulary starts with these, so that [PAD] is id 0 (embedding row 0 is padding).
TRAINING_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# `transformers` writes int(1e30) as model_max_length for "no known limit"; anything this large is
# not a real limit.
_NO_LIMIT_THRESHOLD = 10**12
# A lone UTF-16 surrogate is not text: it comes from bytes that were not UTF-8, decoded with
# errors="surrogateescape" (as Python does for command-line arguments). The Rust tokenizer
# drops it silently, shifting every offset after it, or fails with a type error.
_SURROGATE = re.compile("[\ud800-\udfff]")

_PADDING_CHOICES = {True: "longest", "longest": "longest", False: None, "do_not_pad": None, "max_length": "max_length"}
_TRUNCATION_CHOICES = {
    True: "longest_first",
    "longest_first": "longest_first",
    "only_first": "only_first",
    "only_second": "only_second",
    False: None,
    None: None,
    "do_not_truncate": None,
}
# What `transformers` strips after decoding BERT word-pieces (clean_up_tokenization_spaces).
_DECODE_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


# --------------------------------------------------------------------------------------------
# The result of a call
# --------------------------------------------------------------------------------------------


class BatchEncoding(dict):
    """A call's result: a dict of columns plus the Rust ``Encoding`` of every row.

    Keys (as in ``transformers``): ``input_ids``, ``token_type_ids``, ``attention_mask`` and, when
    asked, ``special_tokens_mask``, ``offset_mapping``, ``length``, ``overflow_to_sample_mapping``.
    Values are lists (one row, or a list of rows for a batch) or tensors. Keys also read as
    attributes (``enc.input_ids``). Row-level alignment helpers mirror ``transformers``.
    """

    def __init__(self, data: dict[str, Any], encodings: list[Encoding]) -> None:
        super().__init__(data)
        self._encodings = encodings

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def encodings(self) -> list[Encoding]:
        """The ``tokenizers.Encoding`` of every row (overflow windows are rows of their own)."""
        return self._encodings

    def _row(self, batch_index: int) -> Encoding:
        if not isinstance(batch_index, int) or not -len(self._encodings) <= batch_index < len(self._encodings):
            raise IndexError(f"row {batch_index!r} is out of range: this result has {len(self._encodings)} row(s)")
        return self._encodings[batch_index]

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of row ``batch_index``: the index of the word it came from (None for special tokens and padding)."""
        return self._row(batch_index).word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of row ``batch_index``: 0 (first text), 1 (second text) or None (special tokens, padding)."""
        return self._row(batch_index).sequence_ids

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of row ``batch_index``."""
        return self._row(batch_index).tokens

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0) -> int | None:
        """The token that covers a character of the original text (None if it is whitespace or truncated).

        ``char_to_token(char)`` for row 0, or ``char_to_token(row, char)``; ``sequence_index`` picks
        the text of a pair.
        """
        if char_index is None:
            batch_index, char_index = 0, batch_or_char_index
        else:
            batch_index = batch_or_char_index
        return self._row(batch_index).char_to_token(char_index, sequence_index)

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> tuple[int, int] | None:
        """The (start, end) character span of a token in its text (None for special tokens)."""
        if token_index is None:
            batch_index, token_index = 0, batch_or_token_index
        else:
            batch_index = batch_or_token_index
        return self._row(batch_index).token_to_chars(token_index)

    def to(self, device: Any) -> "BatchEncoding":
        """Move every tensor value to ``device`` (in place; returns self). Lists are left alone."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


# --------------------------------------------------------------------------------------------
# Reading and building vocabularies
# --------------------------------------------------------------------------------------------


def read_vocab_file(path: str | os.PathLike) -> list[str]:
    """Read a BERT ``vocab.txt``: one token per line, the line number (from 0) is its id.

    Raises a :class:`UserError` naming the file (and lines) for a file that is not UTF-8, is
    empty, or lists a token twice (ids would no longer match line numbers).
    """
    path = require_file(path, "vocabulary file", expected_name="vocab.txt")
    try:
        # Text mode, as BERT's own reader: "\r\n" and "\r" end lines too; only the newline is stripped.
        with open(path, encoding="utf-8") as handle:
            tokens = [line.rstrip("\n") for line in handle]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if not tokens:
        raise UserError(f"{path}: the vocabulary file is empty")
    first_line: dict[str, int] = {}
    for line_number, token in enumerate(tokens, start=1):
        if token in first_line:
            raise UserError(
                f"{path}:{line_number}: token {token!r} is listed twice (first at line {first_line[token]}); "
                "each line's number is its id, so every token must be unique"
            )
        first_line[token] = line_number
    return tokens


def _looks_cased(tokens: Iterable[str]) -> bool:
    """Whether a vocabulary keeps capitals: more than 0.5% of its (non-bracketed) entries have one.

    An uncased BERT vocabulary has none at all; a cased one has thousands.
    """
    total = cased = 0
    for token in tokens:
        if token.startswith("[") and token.endswith("]"):
            continue
        total += 1
        cased += token != token.lower()
    return total > 0 and cased > 0.005 * total


def _bert_normalizer(lowercase: bool, strip_accents: bool | None = None, handle_chinese_chars: bool = True) -> normalizers.BertNormalizer:
    # strip_accents=None means "strip when lower-casing", which is what BERT does.
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=handle_chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )


def _backend_from_vocab(tokens: Sequence[str], lowercase: bool, unk_token: str) -> Tokenizer:
    """A BERT WordPiece ``tokenizers.Tokenizer`` over ``tokens`` (id = position)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError("the vocabulary lists a token twice; every token must be unique")
    if unk_token not in vocab:
        raise UserError(f"the vocabulary has no unknown-word token {unk_token!r}; WordPiece needs one")
    backend = Tokenizer(
        models.WordPiece(
            vocab=vocab,
            unk_token=unk_token,
            continuing_subword_prefix=WORDPIECE_PREFIX,
            max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
        )
    )
    backend.normalizer = _bert_normalizer(lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return backend


def _token_name(value: Any) -> str | None:
    """A special token's text from a config value: a string, or a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class MegatronBertTokenizer:
    """BERT WordPiece tokenizer with ``transformers.BertTokenizerFast``'s call API.

    Build it with :meth:`from_pretrained` (a folder or a ``vocab.txt``), :meth:`from_vocab`
    (a list of tokens) or :func:`train_tokenizer`. Calling it on a text, a pair, or a batch
    returns a :class:`BatchEncoding`. Thread-safe: one call at a time reconfigures and uses the
    Rust tokenizer. Picklable (for DataLoader workers).
    """

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    padding_side = "right"

    def __init__(
        self,
        backend: Tokenizer,
        *,
        lowercase: bool,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        unk_token: str = "[UNK]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        cls_token: str = "[CLS]",
        mask_token: str = "[MASK]",
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer`` whose model is WordPiece and whose vocabulary holds the special tokens.

        Sets the ``[CLS] A [SEP] B [SEP]`` template and the WordPiece decoder, registers the
        special tokens (so ``"[MASK]"`` in a text is one token), and switches off any padding
        or truncation the backend carried.
        """
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 1:
            raise UserError(f"model_max_length must be a positive integer, got {model_max_length!r}")
        names = {"unk_token": unk_token, "sep_token": sep_token, "pad_token": pad_token, "cls_token": cls_token, "mask_token": mask_token}
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [f"{role}={name!r}" for role, name in names.items() if name not in vocab]
        if missing:
            raise UserError(f"the vocabulary lacks special token(s) {', '.join(missing)}; a BERT vocabulary needs all five")
        self.lowercase = bool(lowercase)
        self.model_max_length = model_max_length
        self.unk_token, self.sep_token, self.pad_token, self.cls_token, self.mask_token = (
            unk_token, sep_token, pad_token, cls_token, mask_token,
        )  # fmt: skip
        self.unk_token_id, self.sep_token_id, self.pad_token_id, self.cls_token_id, self.mask_token_id = (
            vocab[unk_token], vocab[sep_token], vocab[pad_token], vocab[cls_token], vocab[mask_token],
        )  # fmt: skip

        # Special tokens match before normalisation, so "[MASK]" survives lower-casing as one token.
        backend.add_special_tokens(
            [AddedToken(name, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True) for name in names.values()]
        )
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep_token}:0",
            pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=[(cls_token, self.cls_token_id), (sep_token, self.sep_token_id)],
        )
        backend.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX, cleanup=True)
        # A tokenizer.json may carry padding/truncation (often to 128): they must not leak into calls.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        # The Rust call costs ~1 ms on a 30k vocabulary; the vocabulary never changes after this.
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._state: tuple[Any, Any] = (None, None)  # (truncation, padding) the backend is set to now
        self._lock = threading.Lock()
        self._warned_too_long = False

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_vocab(
        cls, tokens: Sequence[str], *, lowercase: bool = True, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
    ) -> "MegatronBertTokenizer":
        """A tokenizer over an in-memory vocabulary (``tokens[i]`` gets id ``i``) with BERT's special tokens."""
        tokens = list(tokens)
        bad = [i for i, token in enumerate(tokens) if not isinstance(token, str)]
        if bad:
            raise UserError(f"vocabulary entry {bad[0]} is {type(tokens[bad[0]]).__name__}, expected str")
        backend = _backend_from_vocab(tokens, lowercase, DEFAULT_SPECIAL_TOKENS["unk_token"])
        return cls(backend, lowercase=lowercase, model_max_length=model_max_length)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, lowercase: bool | None = None, model_max_length: int | None = None
    ) -> "MegatronBertTokenizer":
        """Load a tokenizer from a folder, a ``vocab.txt`` or a ``tokenizer.json``.

        A folder is read as ``transformers`` writes it: ``tokenizer.json`` if present, else
        ``vocab.txt``; ``tokenizer_config.json`` (if any) gives ``do_lower_case``,
        ``model_max_length`` and the special tokens. ``lowercase`` overrides the stored casing;
        when nothing says (a bare ``vocab.txt``), a vocabulary without capitals is taken as
        uncased. ``model_max_length`` overrides the stored limit (default 512).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer not found: {path} does not exist "
                "(expected a folder with tokenizer.json or vocab.txt, or a vocab.txt file)"
            )
        if lowercase is not None and not isinstance(lowercase, bool):
            raise UserError(f"lowercase must be True, False or None, got {lowercase!r}")
        config: dict[str, Any] = {}
        if path.is_dir():
            for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
                if (path / name).is_file():
                    config.update(_read_json(path / name))
            if (path / "tokenizer.json").is_file():
                json_file, vocab_file = path / "tokenizer.json", None
            elif (path / "vocab.txt").is_file():
                json_file, vocab_file = None, path / "vocab.txt"
            else:
                found = sorted(p.name for p in path.iterdir())[:10]
                raise FileNotFoundError(
                    f"no tokenizer in folder {path}: it has neither tokenizer.json nor vocab.txt "
                    f"(found: {', '.join(found) if found else 'nothing'})"
                )
        elif path.suffix == ".json":
            json_file, vocab_file = path, None
        else:
            json_file, vocab_file = None, path

        names = dict(DEFAULT_SPECIAL_TOKENS)
        for role in SPECIAL_TOKEN_ROLES:
            name = _token_name(config.get(role))
            if name is not None:
                names[role] = name
        if lowercase is None and isinstance(config.get("do_lower_case"), bool):
            lowercase = config["do_lower_case"]

        if json_file is not None:
            backend, lowercase = cls._load_tokenizer_json(json_file, lowercase, config)
        else:
            tokens = read_vocab_file(vocab_file)
            if lowercase is None:
                lowercase = not _looks_cased(tokens)
                logger.info("%s: no casing given; the vocabulary looks %s", vocab_file, "uncased" if lowercase else "cased")
            try:
                backend = _backend_from_vocab(tokens, lowercase, names["unk_token"])
            except UserError as exc:
                raise UserError(f"{vocab_file}: {exc}") from None

        if model_max_length is None:
            stored = config.get("model_max_length")
            valid = isinstance(stored, int) and not isinstance(stored, bool) and 0 < stored < _NO_LIMIT_THRESHOLD
            model_max_length = stored if valid else DEFAULT_MODEL_MAX_LENGTH
        try:
            return cls(backend, lowercase=lowercase, model_max_length=model_max_length, **names)
        except UserError as exc:
            raise UserError(f"{json_file or vocab_file}: {exc}") from None

    @staticmethod
    def _load_tokenizer_json(path: Path, lowercase: bool | None, config: dict[str, Any]) -> tuple[Tokenizer, bool]:
        """Load a ``tokenizer.json``; check it is WordPiece; apply the requested casing to its normalizer."""
        spec = _read_json(path)
        model_type = (spec.get("model") or {}).get("type")
        if model_type != "WordPiece":
            raise UserError(f"{path}: the tokenizer model is {model_type!r}; MegatronBERT uses a WordPiece vocabulary")
        try:
            backend = Tokenizer.from_str(json.dumps(spec))
        except Exception as exc:  # the Rust loader raises a bare Exception
            raise UserError(f"{path}: not a valid tokenizers file ({exc})") from None
        norm = spec.get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":
            wanted_strip = config.get("strip_accents", norm.get("strip_accents"))
            wanted_chinese = config.get("tokenize_chinese_chars", norm.get("handle_chinese_chars", True))
            if lowercase is None:
                lowercase = bool(norm.get("lowercase", True))
            if (norm.get("lowercase"), norm.get("strip_accents"), norm.get("handle_chinese_chars")) != (
                lowercase, wanted_strip, wanted_chinese,
            ):  # fmt: skip
                backend.normalizer = _bert_normalizer(lowercase, wanted_strip, wanted_chinese)
        elif not norm:
            if lowercase is None:
                lowercase = not _looks_cased(backend.get_vocab(with_added_tokens=False))
            backend.normalizer = _bert_normalizer(lowercase)
        elif lowercase is None:
            # Some other normalizer (e.g. a Sequence with Lowercase): keep it; infer the casing from the vocabulary.
            lowercase = not _looks_cased(backend.get_vocab(with_added_tokens=False))
        else:
            logger.warning(
                "%s: its normalizer is %s, not BertNormalizer; it is kept as is (lowercase=%s is not applied to it)",
                path, norm.get("type"), lowercase,
            )  # fmt: skip
        return backend, lowercase

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary (special tokens included): the embedding needs this many rows."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """token -> id for every entry."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def do_lower_case(self) -> bool:
        """Same as ``lowercase`` (the ``transformers`` name)."""
        return self.lowercase

    @property
    def all_special_tokens(self) -> list[str]:
        """The special tokens, in ``transformers``' order: unk, sep, pad, cls, mask."""
        return [getattr(self, role) for role in SPECIAL_TOKEN_ROLES]

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of :attr:`all_special_tokens`, same order."""
        return [getattr(self, f"{role}_id") for role in SPECIAL_TOKEN_ROLES]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """role -> token text, as in ``special_tokens_map.json``."""
        return {role: getattr(self, role) for role in SPECIAL_TOKEN_ROLES}

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens the template adds: 2 for one text ([CLS] A [SEP]), 3 for a pair."""
        return 3 if pair else 2

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token (or of each token of a list); tokens outside the vocabulary give the ``[UNK]`` id."""
        token_to_id = self._backend.token_to_id
        if isinstance(tokens, str):
            found = token_to_id(tokens)
            return self.unk_token_id if found is None else found
        ids = []
        for token in tokens:
            found = token_to_id(token)
            ids.append(self.unk_token_id if found is None else found)
        return ids

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Token of an id (or of each id of a list); an id outside the vocabulary is an error."""
        if isinstance(ids, int) and not isinstance(ids, bool):
            return self._id_to_token(ids)
        ids = self._as_id_list(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._id_to_token(i) for i in ids if i not in special]

    def _id_to_token(self, index: int) -> str:
        token = self._backend.id_to_token(index) if index >= 0 else None
        if token is None:
            raise UserError(f"token id {index} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
        return token

    def _as_id_list(self, ids: Any) -> list[int]:
        """Token ids as a list of Python ints (from a list, a tuple, a 1-D tensor or array), each in the vocabulary."""
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if not isinstance(ids, (list, tuple)):
            raise UserError(f"expected a list of token ids (ints), got {type(ids).__name__}")
        try:
            if any(isinstance(i, bool) for i in ids):
                raise TypeError("bool is not a token id")
            # operator.index takes ints and numpy/torch integer scalars; it refuses floats, strs and lists.
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise UserError("expected a flat list of token ids (ints); for a batch of rows use batch_decode") from None
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (ids 0..{size - 1})")
        return list(ids)

    # ---------------------------------------------------------------- encoding

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The word-pieces of ``text`` (and ``pair``), without special tokens unless asked."""
        self._check_text(text, "text")
        if pair is not None:
            self._check_text(pair, "pair")
        item = text if pair is None else (text, pair)
        return self._encode([item], add_special_tokens=add_special_tokens)[0].tokens

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
    ) -> list[int]:
        """Ids of one text (or pair), with the special tokens; no padding."""
        return self(
            text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length, stride=stride,
            return_token_type_ids=False, return_attention_mask=False,
        )["input_ids"]  # fmt: skip

    def encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text: no special tokens, no truncation, no padding.

        The fast path for corpus preprocessing (one Rust call for the whole batch).
        """
        if isinstance(texts, str):
            raise UserError("encode_plain takes a list of texts, got a single str (wrap it in a list)")
        texts = self._check_batch(texts, "texts", pretokenized=False)
        return [encoding.ids for encoding in self._encode(texts, add_special_tokens=False)]

    def __call__(
        self,
        text: str | Sequence[str] | Sequence[Sequence[str]],
        text_pair: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
    ) -> BatchEncoding:
        """Encode one text, one pair, or a batch of texts or pairs, as ``BertTokenizerFast`` does.

        ``text`` is a str (one example) or a list of str (a batch); with ``is_split_into_words``
        an example is a list of words. ``text_pair`` matches ``text`` in kind and length.
        ``padding``: False, True/"longest" (to the longest row) or "max_length" (needs
        ``max_length``). ``truncation``: True/"longest_first", "only_first", "only_second" or
        False; with no ``max_length`` it truncates to ``model_max_length``. Passing only
        ``max_length`` implies truncation="longest_first" (as in ``transformers``).
        ``return_overflowing_tokens`` makes every truncated example yield extra rows (windows
        overlapping by ``stride`` tokens) and adds ``overflow_to_sample_mapping``.
        ``return_tensors="pt"`` (or ``"np"``) returns (rows, length) tensors; for one example
        without overflow the lists are not batched.
        """
        batched, inputs = self._prepare_inputs(text, text_pair, is_split_into_words)
        is_pair = text_pair is not None
        truncation_config, padding_config = self._resolve_lengths(
            padding, truncation, max_length, stride, pad_to_multiple_of, is_pair, add_special_tokens
        )
        if return_tensors not in (None, "pt", "np"):
            raise UserError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        encodings = self._encode(
            inputs,
            add_special_tokens=add_special_tokens,
            is_pretokenized=is_split_into_words,
            truncation=truncation_config,
            padding=padding_config,
        )

        if return_overflowing_tokens:
            rows = []
            sample_of_row = []
            for sample, encoding in enumerate(encodings):
                windows = encoding.overflowing
                rows.append(encoding)
                rows.extend(windows)
                sample_of_row.extend([sample] * (1 + len(windows)))
        else:
            rows = encodings
        data: dict[str, Any] = {"input_ids": [row.ids for row in rows]}
        if return_token_type_ids is not False:
            data["token_type_ids"] = [row.type_ids for row in rows]
        if return_attention_mask is not False:
            data["attention_mask"] = [row.attention_mask for row in rows]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [row.special_tokens_mask for row in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [row.offsets for row in rows]
        if return_length:
            data["length"] = [len(ids) for ids in data["input_ids"]]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample_of_row
        if truncation_config is None:
            self._warn_if_too_long(data["input_ids"])

        if return_tensors is not None:
            data = _to_tensors(data, return_tensors)
        elif not batched and not return_overflowing_tokens:
            # As transformers: row columns lose their batch level; "length" stays a one-item list.
            data = {key: value[0] if key != "length" else value for key, value in data.items()}
        return BatchEncoding(data, rows)

    # ---------------------------------------------------------------- decoding

    def decode(
        self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True
    ) -> str:
        """Text of a list of ids (or a 1-D tensor): word-pieces joined, ``##`` continuations glued on.

        With ``clean_up_tokenization_spaces`` (default, as BERT), spaces before punctuation and
        English contractions are removed, as ``transformers`` does.
        """
        ids = self._as_id_list(token_ids)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces:
            for before, after in _DECODE_CLEANUPS:
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True) -> list[str]:
        """:meth:`decode` for each row of a list of id lists (or a 2-D tensor)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    # ---------------------------------------------------------------- saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write ``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        ``transformers.AutoTokenizer.from_pretrained(save_directory)`` loads the same tokenizer
        (a ``BertTokenizerFast`` with identical encodings). Other files in the folder (a model's
        config and weights) are left alone; each file is written atomically, and all contents
        are prepared before the first one is written. Returns the written paths.
        """
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot save the tokenizer: {folder} is a file, not a folder")
        with self._lock:
            self._configure(None, None)  # the saved tokenizer.json carries no padding/truncation
            tokenizer_json = self._backend.to_str(pretty=True)
        vocab = self._backend.get_vocab(with_added_tokens=True)
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[token] for token in tokens] != list(range(len(tokens))):
            raise UserError("cannot write vocab.txt: the vocabulary's ids are not contiguous from 0")
        bad = [token for token in tokens if "\n" in token or "\r" in token]
        if bad:
            raise UserError(f"cannot write vocab.txt: token {bad[0]!r} contains a line break")
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.lowercase,
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": True,
            **self.special_tokens_map,
        }
        contents = {
            "vocab.txt": "".join(f"{token}\n" for token in tokens),
            "tokenizer.json": tokenizer_json,
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(self.special_tokens_map, indent=2) + "\n",
        }
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            atomic_write_text(folder / name, text)
        return tuple(str(folder / name) for name in contents)

    # ---------------------------------------------------------------- internals

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, lowercase={self.lowercase}, "
            f"model_max_length={self.model_max_length})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def _check_text(value: Any, what: str) -> None:
        if not isinstance(value, str):
            raise UserError(f"{what} must be a str, got {type(value).__name__}")
        check_unicode(value, what)

    @staticmethod
    def _check_batch(values: Any, what: str, pretokenized: bool) -> list:
        """Check a batch: a list/tuple of str (or of lists of str when pre-tokenized)."""
        if not isinstance(values, (list, tuple)):
            raise UserError(f"{what} must be a list of {'word lists' if pretokenized else 'str'}, got {type(values).__name__}")
        if pretokenized:
            for i, words in enumerate(values):
                if not isinstance(words, (list, tuple)) or not all(type(w) is str for w in words):
                    raise UserError(f"{what}[{i}] must be a list of str (words), got {words!r:.60}")
                for j, word in enumerate(words):
                    check_unicode(word, f"{what}[{i}][{j}]")
        elif not all(type(t) is str for t in values):
            i = next(i for i, t in enumerate(values) if type(t) is not str)
            hint = " (for lists of words pass is_split_into_words=True)" if isinstance(values[i], (list, tuple)) else ""
            raise UserError(f"{what}[{i}] must be a str, got {type(values[i]).__name__}{hint}")
        else:
            for i, text in enumerate(values):
                check_unicode(text, f"{what}[{i}]")
        return values if isinstance(values, list) else list(values)

    def _prepare_inputs(self, text: Any, text_pair: Any, pretokenized: bool) -> tuple[bool, list]:
        """Validate the texts; return (batched, inputs for encode_batch: texts or (a, b) tuples)."""
        if pretokenized:
            # One example is a list of words; a batch is a list of such lists.
            if not isinstance(text, (list, tuple)):
                raise UserError(f"with is_split_into_words=True, text must be a list of words (or a list of word lists), got {type(text).__name__}")
            batched = len(text) > 0 and isinstance(text[0], (list, tuple))
        else:
            if isinstance(text, str):
                batched = False
            elif isinstance(text, (list, tuple)):
                batched = True
            else:
                raise UserError(f"text must be a str or a list of str, got {type(text).__name__}")
        texts = self._check_batch(text if batched else [text], "text", pretokenized)
        if text_pair is None:
            return batched, texts
        if batched:
            pairs = self._check_batch(text_pair, "text_pair", pretokenized)
            if len(pairs) != len(texts):
                raise UserError(f"text has {len(texts)} examples but text_pair has {len(pairs)}; they must match")
        else:
            if pretokenized:
                pairs = self._check_batch([text_pair], "text_pair", pretokenized)
            elif isinstance(text_pair, str):
                check_unicode(text_pair, "text_pair")
                pairs = [text_pair]
            else:
                raise UserError(f"text is one str, so text_pair must be one str too, got {type(text_pair).__name__}")
        return batched, list(zip(texts, pairs))

    def _resolve_lengths(
        self,
        padding: Any,
        truncation: Any,
        max_length: Any,
        stride: Any,
        pad_to_multiple_of: Any,
        is_pair: bool,
        add_special_tokens: bool,
    ) -> tuple[tuple | None, tuple | None]:
        """Turn the call's padding/truncation options into backend settings, with clear errors.

        Returns (truncation, padding): ``(max_length, stride, strategy)`` or None, and
        ``(length or None, pad_to_multiple_of)`` or None.
        """
        if not isinstance(padding, (bool, str)) or padding not in _PADDING_CHOICES:
            raise UserError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if not isinstance(truncation, (bool, str, type(None))) or truncation not in _TRUNCATION_CHOICES:
            raise UserError(
                f"truncation must be False, True, 'longest_first', 'only_first' or 'only_second', got {truncation!r}"
            )
        for name, value, low in (("max_length", max_length, 1), ("pad_to_multiple_of", pad_to_multiple_of, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise UserError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 0:
            raise UserError(f"stride must be a non-negative integer, got {stride!r}")

        # As transformers: a max_length with no padding and no truncation choice means "truncate".
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        pad_strategy = _PADDING_CHOICES[padding]
        strategy = _TRUNCATION_CHOICES[truncation]
        if pad_strategy == "max_length" and max_length is None:
            raise UserError(
                "padding='max_length' needs max_length (e.g. max_length=128; "
                f"this tokenizer's model_max_length is {self.model_max_length})"
            )
        if strategy is not None and max_length is None:
            max_length = self.model_max_length
        if strategy == "only_second" and not is_pair:
            raise UserError("truncation='only_second' needs pairs of texts (text_pair); use True or 'only_first'")

        truncation_config = None
        if strategy is not None:
            n_special = self.num_special_tokens_to_add(is_pair) if add_special_tokens else 0
            room = max_length - n_special  # positions left for text
            if room < 1:
                raise UserError(
                    f"max_length={max_length} is too small: the special tokens take {n_special} positions "
                    f"({'[CLS] A [SEP] B [SEP]' if is_pair else '[CLS] A [SEP]'}), leaving none for text; "
                    f"use max_length >= {n_special + 1}"
                )
            if stride >= room:
                raise UserError(
                    f"stride={stride} must be smaller than the text positions of a window "
                    f"(max_length={max_length} minus {n_special} special tokens = {room})"
                )
            truncation_config = (max_length, stride, strategy)

        padding_config = None
        if pad_strategy is not None:
            if strategy is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
                raise UserError(
                    f"with truncation and padding, max_length ({max_length}) must be a multiple of "
                    f"pad_to_multiple_of ({pad_to_multiple_of})"
                )
            padding_config = (max_length if pad_strategy == "max_length" else None, pad_to_multiple_of)
        return truncation_config, padding_config

    def _configure(self, truncation: tuple | None, padding: tuple | None) -> None:
        """Set the backend's truncation and padding (only when they change). Caller holds the lock."""
        if (truncation, padding) == self._state:
            return
        backend = self._backend
        if truncation is None:
            backend.no_truncation()
        else:
            max_length, stride, strategy = truncation
            backend.enable_truncation(max_length, stride=stride, strategy=strategy, direction="right")
        if padding is None:
            backend.no_padding()
        else:
            length, multiple = padding
            backend.enable_padding(
                direction="right", pad_id=self.pad_token_id, pad_type_id=0, pad_token=self.pad_token,
                length=length, pad_to_multiple_of=multiple,
            )  # fmt: skip
        self._state = (truncation, padding)

    def _encode(
        self,
        inputs: list,
        *,
        add_special_tokens: bool,
        is_pretokenized: bool = False,
        truncation: tuple | None = None,
        padding: tuple | None = None,
    ) -> list[Encoding]:
        """One ``encode_batch`` under the lock, with Rust's truncation failures turned into clear errors."""
        with self._lock:
            self._configure(truncation, padding)
            try:
                return self._backend.encode_batch(inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_pretokenized)
            except BaseException as exc:  # Rust panics arrive as pyo3's PanicException, a BaseException
                if not (isinstance(exc, Exception) or type(exc).__name__ == "PanicException"):
                    raise
                error = self._explain_failure(inputs, add_special_tokens, is_pretokenized, truncation)
            raise error from None

    def _explain_failure(self, inputs: list, add_special_tokens: bool, is_pretokenized: bool, truncation: tuple | None) -> UserError:
        """Find the example that made ``encode_batch`` fail and say why (caller holds the lock)."""
        for index, item in enumerate(inputs):
            try:
                self._backend.encode_batch([item], add_special_tokens=add_special_tokens, is_pretokenized=is_pretokenized)
            except BaseException as exc:
                if not (isinstance(exc, Exception) or type(exc).__name__ == "PanicException"):
                    raise
                if truncation is None:
                    return UserError(f"example {index} could not be tokenized: {exc}")
                max_length, stride, strategy = truncation
                if "stride" in str(exc):
                    return UserError(
                        f"example {index}: with truncation={strategy!r}, max_length={max_length} leaves one of the two "
                        f"texts a share of at most {stride} tokens, not more than stride={stride}; "
                        "use a smaller stride or a larger max_length"
                    )
                kept = "first" if strategy == "only_second" else "second"
                return UserError(
                    f"example {index}: truncation={strategy!r} cannot fit it into max_length={max_length}: the "
                    f"{kept} text alone is too long; use truncation='longest_first' or a larger max_length"
                )
        return UserError("the batch could not be tokenized (no single example fails on its own)")

    def _warn_if_too_long(self, rows: list[list[int]]) -> None:
        if self._warned_too_long or not rows:
            return
        longest = max(map(len, rows))
        if longest > self.model_max_length:
            self._warned_too_long = True
            logger.warning(
                "a sequence of %d tokens is longer than model_max_length=%d: the model cannot take it; "
                "pass truncation=True", longest, self.model_max_length,
            )  # fmt: skip


def check_unicode(text: str, what: str) -> None:
    """Raise UserError when ``text`` holds a lone surrogate, naming ``what`` and the character's position.

    Cheap: ASCII text (most of it) is skipped by one C-level check; other text is one regex scan.
    """
    if text.isascii():
        return
    match = _SURROGATE.search(text)
    if match is not None:
        raise UserError(
            f"{what}: character {match.start()} is a lone surrogate {match.group()!r}, which is not text "
            "(bytes that were not UTF-8, decoded with errors='surrogateescape'?); decode the input as UTF-8 "
            "or remove that character"
        )


def _to_tensors(data: dict[str, list], kind: str) -> dict[str, Any]:
    """Stack each column into a (rows, length) int64 tensor ((rows, length, 2) for offsets, (rows,) for flat lists)."""
    import numpy as np

    lengths = {len(row) for row in data["input_ids"]}
    if len(lengths) > 1:
        raise UserError(
            f"return_tensors={kind!r} needs rows of one length, got lengths {min(lengths)} to {max(lengths)}: "
            "pass padding=True (and truncation=True if rows may exceed the model's limit)"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "offset_mapping" and not value:
            array = np.zeros((0, 0, 2), dtype=np.int64)
        elif key in ("length", "overflow_to_sample_mapping"):
            array = np.asarray(value, dtype=np.int64)  # (rows,)
        elif not value:
            array = np.zeros((0, 0), dtype=np.int64)
        else:
            array = np.asarray(value, dtype=np.int64)  # (rows, length) or (rows, length, 2)
        out[key] = array
    if kind == "pt":
        import torch

        out = {key: torch.from_numpy(array) for key, array in out.items()}
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _check_training_options(vocab_size: Any, min_frequency: Any, pad_to_multiple_of: Any) -> None:
    n_special = len(TRAINING_SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= n_special:
        raise UserError(f"vocab_size must be an integer above {n_special} (the special tokens), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 0:
        raise UserError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
    if pad_to_multiple_of is not None and (
        not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1
    ):
        raise UserError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")


def _check_training_files(files: Any) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not isinstance(files, (list, tuple)) or not files:
        raise UserError("train_tokenizer needs a non-empty list of text files (use train_tokenizer_from_iterator for texts)")
    paths = []
    for file in files:
        if not isinstance(file, (str, os.PathLike)):
            raise UserError(f"training files must be paths, got {type(file).__name__}")
        path = Path(file)
        if not path.exists():
            raise FileNotFoundError(f"training file not found: {path}")
        if not path.is_file():
            raise IsADirectoryError(f"training file {path} is a folder; pass the text files inside it")
        if path.stat().st_size == 0:
            raise UserError(f"training file {path} is empty")
        paths.append(path)
    return paths


def _read_lines(paths: list[Path], show_progress: bool, batch_lines: int = 1000) -> Iterator[list[str]]:
    """Yield the files' lines in batches, with a byte-count progress bar; a file without text is an error."""
    from tqdm.auto import tqdm

    total = sum(path.stat().st_size for path in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading training text", disable=not show_progress) as bar:
        for path in paths:
            batch: list[str] = []
            batch_bytes = 0
            has_text = False
            with open(path, "rb") as handle:
                for line_number, raw in enumerate(handle, start=1):
                    batch_bytes += len(raw)
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise UserError(f"{path}:{line_number}: not UTF-8 text ({exc.reason})") from None
                    has_text = has_text or not line.isspace()
                    batch.append(line)
                    if len(batch) >= batch_lines:
                        yield batch
                        bar.update(batch_bytes)  # per batch: a bar update per line would cost more than the reading
                        batch, batch_bytes = [], 0
            if batch:
                yield batch
                bar.update(batch_bytes)
            if not has_text:
                raise UserError(f"training file {path} is empty (only whitespace)")


def _checked_texts(texts: Iterable[str], batch_size: int = 1000) -> Iterator[list[str]]:
    """Yield an iterable's texts in batches; a non-str item is an error naming its position."""
    batch: list[str] = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"training text {index} is {type(text).__name__}, expected str")
        batch.append(text)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _train(
    batches: Iterator[list[str]],
    vocab_size: int,
    lowercase: bool,
    min_frequency: int,
    pad_to_multiple_of: int | None,
    show_progress: bool,
    model_max_length: int,
) -> MegatronBertTokenizer:
    backend = Tokenizer(
        models.WordPiece(
            unk_token="[UNK]", continuing_subword_prefix=WORDPIECE_PREFIX, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD
        )
    )
    backend.normalizer = _bert_normalizer(bool(lowercase))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(TRAINING_SPECIAL_TOKENS),
        continuing_subword_prefix=WORDPIECE_PREFIX,
        show_progress=show_progress,
    )
    backend.train_from_iterator(batches, trainer=trainer)

    vocab = backend.get_vocab(with_added_tokens=True)
    if len(vocab) <= len(TRAINING_SPECIAL_TOKENS):
        raise UserError("the training text holds no words: nothing to build a vocabulary from")
    for expected_id, token in enumerate(TRAINING_SPECIAL_TOKENS):
        if vocab.get(token) != expected_id:  # the trainer puts them first; ids matter to the model
            raise RuntimeError(f"trained vocabulary has {token} at id {vocab.get(token)}, expected {expected_id}")
    # Pad the size to a multiple (as Megatron-LM pads its embedding) with never-produced
    # "[unusedN]" entries at the end, so the ids of real tokens do not move. Brackets are split
    # off by the pre-tokenizer, so no text can ever map to them.
    size = len(vocab)
    if pad_to_multiple_of is not None and size % pad_to_multiple_of:
        target = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
        for n in range(target - size):
            vocab[f"[unused{n}]"] = size + n
        backend.model = models.WordPiece(
            vocab=vocab,
            unk_token="[UNK]",
            continuing_subword_prefix=WORDPIECE_PREFIX,
            max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
        )
    return MegatronBertTokenizer(backend, lowercase=bool(lowercase), model_max_length=model_max_length)


def train_tokenizer(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    lowercase: bool = True,
    min_frequency: int = 2,
    output_dir: str | os.PathLike | None = None,
    pad_to_multiple_of: int | None = 128,
    show_progress: bool = True,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> MegatronBertTokenizer:
    """Train a BERT WordPiece vocabulary on UTF-8 text files (one or more lines per document).

    The vocabulary starts with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4), holds at most
    ``vocab_size`` learned entries in all, and is then padded with ``[unusedN]`` entries to a
    multiple of ``pad_to_multiple_of`` (None: no padding). ``lowercase=False`` trains a cased
    vocabulary (no lower-casing, accents kept). Word-pieces seen fewer than ``min_frequency``
    times are not merged. With ``output_dir`` the tokenizer is also saved there. Shows progress
    on stderr unless ``show_progress=False``.
    """
    _check_training_options(vocab_size, min_frequency, pad_to_multiple_of)
    paths = _check_training_files(files)
    tokenizer = _train(
        _read_lines(paths, show_progress), vocab_size, lowercase, min_frequency, pad_to_multiple_of, show_progress, model_max_length
    )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def train_tokenizer_from_iterator(
    texts: Iterable[str],
    vocab_size: int,
    lowercase: bool = True,
    min_frequency: int = 2,
    output_dir: str | os.PathLike | None = None,
    pad_to_multiple_of: int | None = 128,
    show_progress: bool = True,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> MegatronBertTokenizer:
    """:func:`train_tokenizer` on texts from any iterable (a list, a generator over a data set)."""
    _check_training_options(vocab_size, min_frequency, pad_to_multiple_of)
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise UserError(f"texts must be an iterable of str (e.g. a list), got {type(texts).__name__}")
    tokenizer = _train(
        _checked_texts(texts), vocab_size, lowercase, min_frequency, pad_to_multiple_of, show_progress, model_max_length
    )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load_tokenizer(
    spec: Any = None, model_folder: str | os.PathLike | None = None, option: str = "--tokenizer"
) -> Any:
    """The tokenizer a command, job or pipeline was given, with one-line errors.

    ``spec``: a tokenizer object (returned as is), or a tokenizer folder / ``vocab.txt``; when
    None, the tokenizer saved in ``model_folder``. ``option`` names the setting in messages.
    """
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        return spec
    if spec is not None:
        path = Path(spec)
        if not path.exists():
            raise UserError(
                f"{option} {path}: no such folder or file (expected a folder with tokenizer.json or vocab.txt, "
                "or a vocab.txt; train one with `megabert train-tokenizer`)"
            )
    elif model_folder is not None:
        path = Path(model_folder)
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(
                f"model folder {path} has no tokenizer files (tokenizer.json or vocab.txt); "
                f"save the tokenizer into it or pass a tokenizer ({option} DIR)"
            )
    else:
        raise UserError("a model object was given without a tokenizer: pass tokenizer=...")
    try:
        return MegatronBertTokenizer.from_pretrained(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the tokenizer in {path}: {exc}") from None
