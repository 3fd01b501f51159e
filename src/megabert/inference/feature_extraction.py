"""feature-extraction: token vectors, or one vector per text, from the encoder's last layer."""

from __future__ import annotations

from typing import Any

import torch

from megabert.errors import UserError
from megabert.inference.base import Encoded, TextPairPipeline, check_bool, check_choice

POOLINGS = (None, "cls", "pooler", "mean")


class FeatureExtractionPipeline(TextPairPipeline):
    """Vectors from the encoder's final hidden states (after MegatronBERT's final LayerNorm).

    Inputs: a str, or a pair as for text-classification. Call parameters:

    - ``pooling``: None (default) gives the vector of every token, ``[CLS]`` and ``[SEP]``
      included (``transformers``' feature-extraction output, without its batch axis of 1);
      ``"cls"`` the ``[CLS]`` vector; ``"pooler"`` the pooler's ``tanh(dense(h[CLS]))`` (needs a
      checkpoint with pooler weights); ``"mean"`` the mean over the text's tokens (special tokens
      included, padding excluded).
    - ``normalize``: scale each returned vector to unit L2 norm.
    - ``return_tensors``: return float32 CPU tensors instead of nested lists of floats.
    - ``truncation``: False (a too-long text is an error) or True.
    """

    task = "feature-extraction"
    call_defaults = {"pooling": None, "normalize": False, "return_tensors": False, "truncation": False}

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, has_pooler: bool = True, **kwargs: Any) -> None:
        self.has_pooler = has_pooler and getattr(model, "pooler", None) is not None
        super().__init__(model, tokenizer, **kwargs)

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        check_choice("pooling", params["pooling"], POOLINGS)
        for name in ("normalize", "return_tensors", "truncation"):
            check_bool(name, params[name])
        if params["pooling"] == "pooler" and not self.has_pooler:
            raise UserError('pooling="pooler" needs pooler weights, and this checkpoint has none; use "cls" or "mean"')
        return params

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        out = self.model(**batch)
        hidden = out.last_hidden_state.float()  # (rows, seq, hidden)
        mask = batch["attention_mask"]
        pooling = params["pooling"]
        if pooling is None:
            vectors = hidden
        elif pooling == "cls":
            vectors = hidden[:, 0]  # (rows, hidden)
        elif pooling == "pooler":
            vectors = out.pooler_output.float()
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)  # (rows, seq, 1)
            vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        if params["normalize"]:
            vectors = torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
        vectors = vectors.cpu()
        if pooling is None:
            lengths = mask.sum(dim=1).tolist()
            return [vectors[r, :n] for r, n in enumerate(lengths)]
        return list(vectors)

    def _postprocess(self, item: Any, encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        (vectors,) = outputs
        return vectors.clone() if params["return_tensors"] else vectors.tolist()
