"""fill-mask: the most likely tokens for each ``[MASK]`` of a text."""

from __future__ import annotations

from typing import Any

import torch

from megabert.errors import UserError
from megabert.inference.base import Encoded, InputError, Pipeline, as_text, check_bool, check_top_k, tokens_to_text


class FillMaskPipeline(Pipeline):
    """Top-k tokens and their probabilities for every ``[MASK]`` token of each text.

    Call parameters: ``top_k`` (5), ``targets`` (None: the whole vocabulary; else a list of
    vocabulary tokens to score, e.g. ``["paris", "london"]``), ``truncation`` (False: a text
    longer than the model is an error; True: cut it, as long as every mask stays in).

    Result per text, as in ``transformers``: for one mask a list of ``top_k`` dicts
    ``{"score", "token", "token_str", "sequence"}`` (best first); for several masks a list of
    such lists, one per mask in text order. ``sequence`` is the text with that mask filled
    (other masks stay ``[MASK]``), without ``[CLS]``/``[SEP]``.
    """

    task = "fill-mask"
    call_defaults = {"top_k": 5, "targets": None, "truncation": False}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        check_top_k(params["top_k"])
        check_bool("truncation", params["truncation"])
        targets = params["targets"]
        if targets is not None:
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
                raise UserError(f"targets must be a non-empty list of tokens, got {params['targets']!r}")
            vocab = self.tokenizer.get_vocab()
            ids = []
            for target in targets:
                if target not in vocab:
                    pieces = self.tokenizer.tokenize(target)
                    raise UserError(
                        f"target {target!r} is not a token of the vocabulary (it splits into {pieces}); "
                        "targets must be single vocabulary tokens"
                    )
                if vocab[target] >= self._candidate_rows:
                    raise UserError(
                        f"target {target!r} has id {vocab[target]}, but the model has only "
                        f"{self.config.vocab_size} vocabulary rows"
                    )
                if vocab[target] not in ids:
                    ids.append(vocab[target])
            params["targets"] = torch.tensor(ids, dtype=torch.long)
        return params

    @property
    def _candidate_rows(self) -> int:
        """How many vocabulary rows are tokens: the tokenizer's size, at most the model's rows."""
        return min(len(self.tokenizer), int(self.config.vocab_size))

    def _normalize(self, item: Any, index: int) -> str:
        return as_text(item, index)

    def _encode(self, items: list[str], first: int, params: dict[str, Any]) -> list[Encoded]:
        indices = range(first, first + len(items))
        mask_id = self.tokenizer.mask_token_id
        encoded = []
        if params["truncation"]:
            # Truncation must not drop a mask: check against the untruncated encoding.
            full = self.call_tokenizer(items, return_token_type_ids=False, return_attention_mask=False)
            cut = self._tokenize(items, None, indices, truncation=True)
            for index, all_ids, ids in zip(indices, full["input_ids"], cut["input_ids"]):
                if all_ids.count(mask_id) != ids.count(mask_id):
                    raise InputError(
                        index,
                        f"a [MASK] lies beyond the model's {self.max_length} tokens; truncation would drop it",
                    )
            encoding = cut
        else:
            encoding = self._tokenize(items, None, indices, truncation=False)
        for index, row in zip(indices, self._rows(encoding)):
            positions = [i for i, token in enumerate(row.input_ids) if token == mask_id]
            if not positions:
                raise InputError(
                    index, f"no {self.tokenizer.mask_token} token in the text (fill-mask needs at least one)"
                )
            encoded.append(Encoded([row], {"positions": positions}))
        return encoded

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        # Run the encoder, then the vocabulary projection on the mask positions only: the
        # (tokens x vocab) logits of every other position would be computed for nothing.
        hidden = self.model.bert(**batch, return_dict=True).last_hidden_state  # (rows, seq, hidden)
        is_mask = batch["input_ids"] == self.tokenizer.mask_token_id  # (rows, seq)
        logits = self.model.cls.predictions(hidden[is_mask]).float()  # (masks, vocab rows)
        # Converted models pad the vocabulary rows past the tokenizer (to a multiple of 128 x TP,
        # e.g. 30592 rows for 30522 tokens): padding rows are no tokens, so never candidates.
        # They are cut after the softmax, so each score is the one transformers gives.
        probs = logits.softmax(dim=-1)[:, : self._candidate_rows]
        targets = params["targets"]
        if targets is not None:
            probs = probs[:, targets.to(probs.device)]  # (masks, targets)
        k = min(params["top_k"], probs.shape[-1])
        values, indices = probs.topk(k, dim=-1)  # (masks, k)
        if targets is not None:
            indices = targets.to(indices.device)[indices]
        values, indices = values.cpu().tolist(), indices.cpu().tolist()
        counts = is_mask.sum(dim=1).tolist()
        results, start = [], 0
        for count in counts:
            results.append(list(zip(values[start : start + count], indices[start : start + count])))
            start += count
        return results

    def _postprocess(self, item: str, encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        (per_mask,) = outputs
        tokenizer = self.tokenizer
        ids = encoded.rows[0].input_ids
        tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids]
        # The sequences drop special tokens but keep the other masks visible.
        dropped = set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}
        answers = []
        for position, (values, token_ids) in zip(encoded.meta["positions"], per_mask):
            row = []
            for score, token_id in zip(values, token_ids):
                token = tokenizer.convert_ids_to_tokens(token_id)
                filled = [
                    token if i == position else t
                    for i, (t, original) in enumerate(zip(tokens, ids))
                    if (token_id if i == position else original) not in dropped
                ]
                # token_str: decoding one token gives the token itself ("##s" stays "##s").
                row.append({"score": score, "token": token_id, "token_str": token, "sequence": tokens_to_text(filled)})
            answers.append(row)
        return answers[0] if len(answers) == 1 else answers
