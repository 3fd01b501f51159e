"""The common machinery of every pipeline: inputs in, model batches, results out in input order.

A task pipeline subclasses :class:`Pipeline` and fills in four steps:

- ``_normalize(item, index)``: check one input and put it in a canonical form;
- ``_encode(items, first_index, params)``: tokenize a chunk of inputs at once (one call into the
  Rust tokenizer) into one :class:`Encoded` per input, each with one or more model rows;
- ``_forward(batch, params)``: run the model on a padded batch of rows and return one small
  per-row result (reduced on the device: top-k, softmax... so little crosses back to the CPU);
- ``_postprocess(item, encoded, row_outputs, params)``: turn an input's row results into its answer.

:meth:`Pipeline.stream` runs them over any iterable, ``lookahead`` inputs at a time, so memory
does not grow with the input; :meth:`Pipeline.__call__` is the convenience form for one input or
a list. The model runs in eval mode under ``torch.inference_mode()``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
from tokenizers import decoders

from megabert.errors import UserError
from megabert.inference.batching import Row, chunked, collate, length_sorted_batches

logger = logging.getLogger(__name__)
# Loggers of the tokenizers that warn about sequences longer than model_max_length.
_TOKENIZER_LOGGERS = ("megabert.tokenization", "transformers.tokenization_utils_base")


class InputError(UserError):
    """A bad input: ``index`` is its position in the stream (0-based), ``reason`` what is wrong."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"input {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass
class Encoded:
    """One input after tokenization: its model rows and whatever postprocessing needs."""

    rows: list[Row]
    meta: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Base class of the task pipelines; build one with :func:`megabert.inference.pipelines.pipeline`.

    Args:
        model: a loaded megabert model of the class the task needs.
        tokenizer: its tokenizer (``MegatronBertTokenizer`` or anything with the same call API).
        batch_size: model rows per forward pass.
        lookahead: inputs read ahead and sorted by length together (default ``max(256, 8 * batch_size)``).
        max_length: longest row the model takes (default: the smaller of the model's position
            embeddings and the tokenizer's ``model_max_length``).
        **defaults: default values of the call parameters (e.g. ``top_k=3``).
    """

    task: ClassVar[str] = ""
    # Call parameters and their defaults; subclasses extend and check them in _check_params.
    call_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        lookahead: int | None = None,
        max_length: int | None = None,
        **defaults: Any,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        if lookahead is not None and (isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1):
            raise UserError(f"lookahead must be a positive integer, got {lookahead!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.batch_size = batch_size
        self.lookahead = lookahead or max(256, 8 * batch_size)
        limit = min(int(self.config.max_position_embeddings), int(getattr(tokenizer, "model_max_length", 10**9)))
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3):
            raise UserError(f"max_length must be an integer >= 3, got {max_length!r}")
        if max_length is not None and max_length > limit:
            raise UserError(f"max_length={max_length} is more than the model takes ({limit} tokens)")
        self.max_length = max_length or limit
        self.pad_token_id = int(tokenizer.pad_token_id)
        unknown = sorted(set(defaults) - set(self.call_defaults))
        if unknown:
            raise UserError(
                f"{self.task} pipeline: unknown option(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(self.call_defaults)) or 'none'}"
            )
        self.defaults = self._check_params({**self.call_defaults, **defaults})

    # ----------------------------------------------------------------- public
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, inputs: Any, **params: Any) -> Any:
        """Run on one input (returns its result) or a list of inputs (returns a list of results)."""
        if self._is_single(inputs):
            return next(iter(self.stream([inputs], **params)))
        if not isinstance(inputs, (list, tuple)):
            inputs = list(inputs)
        return list(self.stream(inputs, **params))

    def stream(self, inputs: Iterable[Any], **params: Any) -> Iterator[Any]:
        """Results of an iterable of inputs, in input order, reading ``lookahead`` inputs at a time."""
        unknown = sorted(set(params) - set(self.call_defaults))
        if unknown:
            raise UserError(
                f"{self.task} pipeline: unknown option(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(self.call_defaults)) or 'none'}"
            )
        checked = self._check_params({**self.defaults, **params})
        if isinstance(inputs, (str, bytes, dict)):
            raise UserError("stream() takes an iterable of inputs; for one input call the pipeline directly")
        first = 0
        for chunk in chunked(inputs, self.lookahead):
            yield from self._run_chunk(chunk, first, checked)
            first += len(chunk)

    # ------------------------------------------------------------- the steps
    def _is_single(self, inputs: Any) -> bool:
        """Whether ``inputs`` is one input rather than a list of them (default: a str)."""
        return isinstance(inputs, str)

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return params

    def _normalize(self, item: Any, index: int) -> Any:
        raise NotImplementedError

    def _encode(self, items: list[Any], first: int, params: dict[str, Any]) -> list[Encoded]:
        raise NotImplementedError

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def _postprocess(self, item: Any, encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _run_chunk(self, chunk: list[Any], first: int, params: dict[str, Any]) -> Iterator[Any]:
        items = [self._normalize(item, first + i) for i, item in enumerate(chunk)]
        encoded = self._encode(items, first, params)
        owners = [i for i, enc in enumerate(encoded) for _ in enc.rows]
        rows = [row for enc in encoded for row in enc.rows]
        passes = length_sorted_batches([len(row) for row in rows], self.batch_size)
        outputs = self.run_rows(rows, params, passes)
        per_input: list[list[Any]] = [[] for _ in items]
        for owner, output in zip(owners, outputs):
            per_input[owner].append(output)
        for i, (item, enc, outs) in enumerate(zip(items, encoded, per_input)):
            self.check_answerable(first + i, outs)
            yield self._postprocess(item, enc, outs, params)

    def run_rows(self, rows: list[Any], params: dict[str, Any], passes: list[list[int]]) -> list[Any]:
        """The model's output for each row, computed in the forward passes ``passes`` (row indices).

        Shared by the pipelines (passes of ``batch_size`` rows) and ``megabert serve`` (passes
        by token budget, over the rows of several requests).
        """
        outputs: list[Any] = [None] * len(rows)
        for pass_rows in passes:
            batch = collate([rows[r] for r in pass_rows], self.pad_token_id, self.device)
            with torch.inference_mode():
                results = self._forward(batch, params)
            for r, result in zip(pass_rows, results):
                outputs[r] = result
        return outputs

    def check_answerable(self, index: int, outputs: list[Any]) -> None:
        """Raise a UserError naming input ``index`` when its outputs hold NaN or inf.

        One check for every task, before any result is built: a pipeline never returns (or
        prints) NaN; JSON has no NaN, and a NaN score ranks arbitrarily.
        """
        if _has_non_finite(outputs):
            raise UserError(
                f"input {index}: the model produced non-finite scores (NaN or inf), so there is no "
                f"answer to give; its weights may be damaged, or {getattr(self.model, 'dtype', 'its dtype')} "
                "overflowed (try float32: dtype='float32', --dtype float32)"
            )

    # ------------------------------------------------------------ helpers
    def call_tokenizer(self, *args: Any, **kwargs: Any) -> Any:
        """Call the tokenizer without its "longer than model_max_length" log line.

        The pipelines check lengths themselves (and raise an InputError that names the input)
        or cut long texts into windows on purpose, so the tokenizer's warning would only mislead.
        """
        loggers = [logging.getLogger(name) for name in _TOKENIZER_LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            return self.tokenizer(*args, **kwargs)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)

    def _tokenize(
        self,
        texts: list[str],
        pairs: list[str] | None,
        indices: Sequence[int],
        truncation: bool | str,
        **options: Any,
    ) -> Any:
        """Tokenize a batch (one call); unless truncating, an input longer than the model is an InputError."""
        encoding = self.call_tokenizer(
            texts,
            pairs,
            truncation=truncation if truncation else False,
            max_length=self.max_length if truncation else None,
            return_token_type_ids=True,
            return_attention_mask=False,
            **options,
        )
        if not truncation:
            for index, ids in zip(indices, encoding["input_ids"]):
                if len(ids) > self.max_length:
                    raise InputError(
                        index,
                        f"{len(ids)} tokens, more than the model takes ({self.max_length}); "
                        "shorten it or turn on truncation (truncation=True, --truncate)",
                    )
        return encoding

    def _encode_texts(self, items: list[tuple[str, str | None]], first: int, truncation: bool) -> list[Encoded]:
        """One row per (text, text_pair or None): singles and pairs tokenized in one call each, in item order."""
        encoded: list[Encoded | None] = [None] * len(items)
        for has_pair in (False, True):
            chosen = [i for i, (_, pair) in enumerate(items) if (pair is not None) == has_pair]
            if not chosen:
                continue
            texts = [items[i][0] for i in chosen]
            pairs = [items[i][1] for i in chosen] if has_pair else None
            encoding = self._tokenize(texts, pairs, [first + i for i in chosen], truncation)
            for i, row in zip(chosen, self._rows(encoding)):
                encoded[i] = Encoded([row])
        return encoded  # type: ignore[return-value]

    @staticmethod
    def _rows(encoding: Any) -> list[Row]:
        return [Row(ids, types) for ids, types in zip(encoding["input_ids"], encoding["token_type_ids"])]


def _has_non_finite(value: Any) -> bool:
    """Whether a per-row result (floats, tensors, arrays, and lists/tuples/dicts of them) holds NaN or inf.

    Results are small (top-k scores, one row's logits), so walking them costs little.
    """
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and value.numel() > 0 and not bool(torch.isfinite(value).all())
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "fc" and value.size > 0 and not bool(np.isfinite(value).all())
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


# ---------------------------------------------------------------- text from word-pieces
# What BERT's decoding removes after joining word-pieces with spaces (`transformers`'
# clean_up_tokenization_spaces, also applied by the `tokenizers` WordPiece decoder).
_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip
_WORDPIECE = decoders.WordPiece(prefix="##", cleanup=True)


def tokens_to_text(tokens: list[str]) -> str:
    """Word-pieces back to text as BERT's ``decode`` does: ``##`` pieces glued, spaces before punctuation removed.

    Equal to ``tokenizer.decode(ids)`` for the same tokens, without a tokenizer call per text
    (the pipelines build many candidate texts).
    """
    text = _WORDPIECE.decode(tokens)
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------- shared input checks
def _check_chars(text: str, index: int, what: str) -> None:
    """The tokenizer's check for text that is not valid Unicode, raised early with the input's index."""
    from megabert.tokenization import check_unicode

    try:
        check_unicode(text, what)
    except UserError as exc:
        raise InputError(index, str(exc)) from None


def as_text(item: Any, index: int, what: str = "text") -> str:
    """``item`` if it is a str of valid text, else an InputError."""
    if not isinstance(item, str):
        raise InputError(index, f"{what} must be a str, got {type(item).__name__}")
    _check_chars(item, index, what)
    return item


def as_pair(item: Any, index: int, allow_single: bool) -> tuple[str, str | None]:
    """A text or a (text, text_pair): from a str, a 2-sequence, or a dict with text/text_pair."""
    if isinstance(item, str):
        if not allow_single:
            raise InputError(index, "expected a pair of texts (text, text_pair), got one str")
        return item, None
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"text", "text_pair"})
        if "text" not in item or unknown:
            raise InputError(index, f"a dict input needs keys 'text' and 'text_pair', got {sorted(item)}")
        text, pair = item["text"], item.get("text_pair")
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        text, pair = item
    else:
        raise InputError(index, f"expected a str, a (text, text_pair) pair or a dict, got {type(item).__name__}")
    if not isinstance(text, str) or not (isinstance(pair, str) or (pair is None and allow_single)):
        raise InputError(index, "text and text_pair must both be str")
    if pair is None and not allow_single:
        raise InputError(index, "expected a pair of texts: text_pair is missing")
    _check_chars(text, index, "text")
    if pair is not None:
        _check_chars(pair, index, "text_pair")
    return text, pair


def check_top_k(value: Any, allow_none: bool = False) -> int | None:
    """A positive int (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"top_k must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be True or False, got {value!r}")
    return value


class TextPairPipeline(Pipeline):
    """A pipeline whose inputs are a text or a text pair (``(a, b)`` or ``{"text", "text_pair"}``)."""

    # False: every input must be a pair (next-sentence); True: a lone text is accepted too.
    allow_single_text: ClassVar[bool] = True

    def _is_single(self, inputs: Any) -> bool:
        return (self.allow_single_text and isinstance(inputs, str)) or isinstance(inputs, dict) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs)
        )

    def _normalize(self, item: Any, index: int) -> tuple[str, str | None]:
        return as_pair(item, index, allow_single=self.allow_single_text)

    def _encode(self, items: list[tuple[str, str | None]], first: int, params: dict[str, Any]) -> list[Encoded]:
        return self._encode_texts(items, first, params["truncation"])
