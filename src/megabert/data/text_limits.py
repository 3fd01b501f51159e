"""How much of one input text megabert reads: a character cap applied before tokenizing.

Tokenizing costs memory in proportion to the characters of a text, whatever the model then
keeps of it: a 5 MB line takes about 1 GB in the Rust tokenizer (offsets and alignments per
byte) before a 512-token model refuses or truncates it. A WordPiece token covers at most
:data:`CHARS_PER_TOKEN` characters (longer words become one ``[UNK]``), so a text longer than
``max_tokens * CHARS_PER_TOKEN`` characters never fits in ``max_tokens`` tokens unless it is
mostly whitespace; :func:`max_chars` is that cap. Real text runs at 1 (CJK) to about 6
(English, code) characters per token, so the cap only ever bites on pathological input.

* :func:`limit_text` is for inputs the model must take whole or truncated (the prediction
  commands but ``tokens`` and ``qa``, which read long texts in windows): without truncation a
  text over the cap is refused, naming where it is and the limit; with truncation it is cut at
  the cap (at a space when there is one), which the tokenizer's truncation would cut anyway.
* :func:`split_text` is for inputs kept whole (corpus preprocessing): a long text is cut into
  pieces at whitespace, tokenized piece by piece and the ids joined, which gives the same ids
  as one call (WordPiece never joins across whitespace) at a fraction of the memory.
"""

from __future__ import annotations

from megabert.errors import UserError

# The most characters one WordPiece token covers: the default max_input_chars_per_word of
# BERT's WordPiece (a longer word is a single [UNK]).
CHARS_PER_TOKEN = 100
# The cap of texts whose token budget is unknown (corpus preprocessing): a 512-token model.
DEFAULT_MAX_TOKENS = 512


def max_chars(max_tokens: int | None = None) -> int:
    """The most characters read of one text for a ``max_tokens``-token input (default 512 tokens)."""
    tokens = DEFAULT_MAX_TOKENS if max_tokens is None or max_tokens < 1 else int(max_tokens)
    return tokens * CHARS_PER_TOKEN


def _cut_point(text: str, start: int, limit: int) -> int:
    """End of the piece of ``text`` from ``start``: at most ``limit`` characters, before a space if one is near."""
    end = start + limit
    if end >= len(text):
        return len(text)
    # Cut before whitespace in the piece's last quarter, so that no word is split; a piece
    # without any (one huge "word") is cut hard: it is an [UNK] either way.
    for i in range(end, start + limit * 3 // 4, -1):
        if text[i].isspace():
            return i
    return end


def limit_text(text: str, max_tokens: int, where: str, truncate: bool, what: str = "text") -> str:
    """``text`` when it is within :func:`max_chars` of ``max_tokens``; else cut (``truncate``) or refused.

    The refusal is a UserError naming ``where`` (e.g. ``input.txt:5``), the length and the
    limit, and the way out (``--truncate``). The cut keeps at most the cap, ending at a space.
    """
    limit = max_chars(max_tokens)
    if len(text) <= limit:
        return text
    if truncate:
        return text[: _cut_point(text, 0, limit)]
    raise UserError(
        f"{where}: the {what} is {len(text):,} characters long, more than the {limit:,} that a "
        f"{max_tokens}-token input can hold ({CHARS_PER_TOKEN} characters per token at most); it is "
        "refused before tokenizing: shorten it, or pass --truncate to cut it"
    )


def split_text(text: str, limit: int | None = None) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters (default :func:`max_chars`), cut before whitespace.

    Joining the word-piece ids of the pieces gives the ids of ``text`` (a WordPiece tokenizer
    splits at whitespace first). A text within the limit is returned as the only piece.
    """
    limit = max_chars() if limit is None else int(limit)
    if limit < 1:
        raise UserError(f"the piece length must be >= 1 character, got {limit}")
    if len(text) <= limit:
        return [text]
    pieces = []
    start = 0
    while start < len(text):
        end = _cut_point(text, start, limit)
        pieces.append(text[start:end])
        start = end
    return pieces
