"""token-classification: a label per word-piece or word, and BIO entity groups with character offsets."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megabert.errors import UserError
from megabert.inference.base import Encoded, Pipeline, as_text, check_choice, tokens_to_text
from megabert.inference.batching import Row

AGGREGATIONS = ("none", "simple", "first", "average", "max")


def split_tag(label: str) -> tuple[str, str]:
    """``"B-PER"`` -> ("B", "PER"); ``"I-PER"`` -> ("I", "PER"); a label without a prefix continues: ("I", label)."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Start positions of windows of ``window`` tokens overlapping by ``stride``, covering all tokens."""
    if n_tokens <= window:
        return [0]
    step = window - stride
    starts = list(range(0, n_tokens - window, step))
    starts.append(n_tokens - window)  # the last window ends exactly at the last token
    return starts


class TokenClassificationPipeline(Pipeline):
    """Labels of the word-pieces of each text, grouped into entities as ``transformers`` does.

    Call parameters:

    - ``aggregation_strategy``: ``"none"`` (one result per word-piece: ``entity``, ``score``,
      ``index`` (position in ``[CLS] ... [SEP]``), ``word``, ``start``, ``end``); ``"simple"``
      (adjacent word-pieces with the same tag and no ``B-`` break grouped into ``entity_group``
      with the mean score); ``"first"`` / ``"average"`` / ``"max"`` (each word takes the label of
      its first piece / of its mean scores / of its most confident piece, then words are grouped
      as in "simple"). Words are the tokenizer's words (``word_ids``).
    - ``ignore_labels``: labels left out of the result (default ``["O"]``).
    - ``stride``: texts longer than the model are read in overlapping windows of the model's
      length; ``stride`` word-pieces overlap (default: a quarter of a window). Each word-piece
      takes its scores from the window where it has the most context on both sides.

    ``start``/``end`` are character offsets into the text (``text[start:end]``).
    """

    task = "token-classification"
    call_defaults = {"aggregation_strategy": "none", "ignore_labels": None, "stride": None}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        check_choice("aggregation_strategy", params["aggregation_strategy"], AGGREGATIONS)
        ignore = params["ignore_labels"]
        if ignore is None:
            ignore = ["O"]
        if not isinstance(ignore, (list, tuple, set)) or not all(isinstance(x, str) for x in ignore):
            raise UserError(f"ignore_labels must be a list of label names, got {ignore!r}")
        params["ignore_labels"] = set(ignore)
        window = self.max_length - 2
        stride = params["stride"]
        if stride is None:
            stride = window // 4
        if isinstance(stride, bool) or not isinstance(stride, int) or not 0 <= stride < window:
            raise UserError(f"stride must be an integer in [0, {window}) (the window holds {window} tokens), got {stride!r}")
        params["stride"] = stride
        return params

    def _normalize(self, item: Any, index: int) -> str:
        return as_text(item, index)

    def _encode(self, items: list[str], first: int, params: dict[str, Any]) -> list[Encoded]:
        # Word-pieces without special tokens, windows cut here: then a window's token j is
        # simply token start + j of the text, whatever the window.
        encoding = self.call_tokenizer(
            items,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_token_type_ids=False,
            return_attention_mask=False,
        )
        window = self.max_length - 2
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        encoded = []
        for i in range(len(items)):
            ids = encoding["input_ids"][i]
            starts = window_starts(len(ids), window, params["stride"])
            rows = []
            for start in starts:
                piece = ids[start : start + window]
                rows.append(Row([cls, *piece, sep], [0] * (len(piece) + 2)))
            meta = {
                "ids": ids,
                "offsets": [tuple(o) for o in encoding["offset_mapping"][i]],
                "special": encoding["special_tokens_mask"][i],
                "word_ids": encoding.word_ids(i),
                "starts": starts,
            }
            encoded.append(Encoded(rows, meta))
        return encoded

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        probs = self.model(**batch).logits.float().softmax(dim=-1).cpu().numpy()  # (rows, seq, labels)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [probs[r, 1 : n - 1] for r, n in enumerate(lengths)]  # drop [CLS] and [SEP]

    def _merge_windows(self, n_tokens: int, starts: list[int], outputs: list[np.ndarray]) -> np.ndarray:
        """(tokens, labels) scores: each token from the window where it is farthest from an edge."""
        scores = np.zeros((n_tokens, self.config.num_labels), dtype=np.float32)
        best = np.full(n_tokens, -1)
        for start, probs in zip(starts, outputs):
            m = len(probs)
            j = np.arange(m)
            context = np.minimum(j, m - 1 - j)
            better = context > best[start : start + m]
            scores[start : start + m][better] = probs[better]
            best[start : start + m][better] = context[better]
        return scores

    def _postprocess(self, item: str, encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        meta = encoded.meta
        ids = meta["ids"]
        scores = self._merge_windows(len(ids), meta["starts"], outputs)
        tokens = [self.tokenizer.convert_ids_to_tokens(i) for i in ids]  # one by one: the list form is slower
        unk = self.tokenizer.unk_token_id
        id2label = self.config.id2label
        pieces = []
        for p, (token_id, token) in enumerate(zip(ids, tokens)):
            if meta["special"][p]:
                continue
            start, end = meta["offsets"][p]
            label = int(scores[p].argmax())
            pieces.append(
                {
                    # An unknown piece shows the text it stands for, as transformers does.
                    "word": item[start:end] if token_id == unk else token,
                    "scores": scores[p],
                    "label": label,
                    "index": p + 1,  # position in [CLS] ... [SEP]
                    "start": start,
                    "end": end,
                    "word_id": meta["word_ids"][p],
                }
            )
        strategy = params["aggregation_strategy"]
        ignore = params["ignore_labels"]
        if strategy == "none":
            return [
                {
                    "entity": id2label[p["label"]],
                    "score": float(p["scores"][p["label"]]),
                    "index": p["index"],
                    "word": p["word"],
                    "start": p["start"],
                    "end": p["end"],
                }
                for p in pieces
                if id2label[p["label"]] not in ignore
            ]
        if strategy == "simple":
            units = [
                {"label": id2label[p["label"]], "score": float(p["scores"][p["label"]]), "words": [p["word"]],
                 "start": p["start"], "end": p["end"]}
                for p in pieces
            ]  # fmt: skip
        else:
            units = [self._word_unit(group, strategy) for group in self._words(pieces)]
        return [group for group in self._group(units) if group["entity_group"] not in ignore]

    @staticmethod
    def _words(pieces: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Consecutive pieces of the same word."""
        words: list[list[dict[str, Any]]] = []
        for piece in pieces:
            if words and piece["word_id"] is not None and piece["word_id"] == words[-1][-1]["word_id"]:
                words[-1].append(piece)
            else:
                words.append([piece])
        return words

    def _word_unit(self, pieces: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
        """One word's label and score under the "first", "average" or "max" rule."""
        if strategy == "first":
            scores = pieces[0]["scores"]
        elif strategy == "max":
            scores = max(pieces, key=lambda p: p["scores"].max())["scores"]
        else:
            scores = np.mean([p["scores"] for p in pieces], axis=0)
        label = int(scores.argmax())
        return {
            "label": self.config.id2label[label],
            "score": float(scores[label]),
            "words": [p["word"] for p in pieces],
            "start": pieces[0]["start"],
            "end": pieces[-1]["end"],
        }

    @staticmethod
    def _group(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """BIO grouping: a unit joins the previous group when it has the same tag and is not a B-."""
        groups: list[list[dict[str, Any]]] = []
        for unit in units:
            bi, tag = split_tag(unit["label"])
            if groups and bi != "B" and split_tag(groups[-1][-1]["label"])[1] == tag:
                groups[-1].append(unit)
            else:
                groups.append([unit])
        return [
            {
                "entity_group": split_tag(group[0]["label"])[1],
                "score": float(np.mean([u["score"] for u in group])),
                "word": tokens_to_text([w for u in group for w in u["words"]]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
            for group in groups
        ]
