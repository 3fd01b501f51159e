"""The reference implementation the parity tests run against: transformers 4.37.2 or 5.x.

`make test` runs the whole suite beside transformers 4.37.2 (the documented version), then the
tests marked ``reference`` again beside the newest 5.x (a second virtual environment). The
helpers here hide the places where the two generations' APIs differ, so that one test body
serves both; features 5.x removed are skipped there with :data:`only_v4`.
"""

from __future__ import annotations

import pytest
import torch
import transformers

TRANSFORMERS_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])
V5 = TRANSFORMERS_VERSION >= (5, 0)


def only_v4(feature: str) -> pytest.MarkDecorator:
    """Skip under transformers 5.x, which removed ``feature`` (the test still runs on 4.37)."""
    return pytest.mark.skipif(V5, reason=f"transformers 5.x removed {feature}; checked against 4.37.2")


def reference_tokenizer(vocab_file, **kwargs):
    """transformers' fast BERT tokenizer over a vocab.txt.

    4.x takes the file as ``vocab_file=``; 5.x takes it as ``vocab=`` and silently ignores
    ``vocab_file=`` (every token then becomes [UNK]). 5.x built this way also stopped cleaning up
    decoded spaces ("don ' t"); 4.37's BERT default (True) is what megabert documents, and what a
    saved tokenizer_config.json asks for in both generations.
    """
    if V5:
        kwargs.setdefault("clean_up_tokenization_spaces", True)
        return transformers.BertTokenizerFast(vocab=str(vocab_file), **kwargs)
    return transformers.BertTokenizerFast(vocab_file=str(vocab_file), **kwargs)


def legacy_cache(past):
    """The reference's ``past_key_values`` as 4.x's nested tuples of tensors, per layer.

    5.x returns a Cache object (an EncoderDecoderCache for cross-attention decoders); 4.x and
    megabert return ((self key, self value[, cross key, cross value]), ...).
    """
    if past is None or isinstance(past, tuple):
        return past
    self_cache = getattr(past, "self_attention_cache", past)
    cross_cache = getattr(past, "cross_attention_cache", None)
    layers = []
    for index, layer in enumerate(self_cache.layers):
        entry = (layer.keys, layer.values)
        if cross_cache is not None and index < len(cross_cache.layers) and cross_cache.layers[index].keys is not None:
            entry = entry + (cross_cache.layers[index].keys, cross_cache.layers[index].values)
        layers.append(entry)
    return tuple(layers)


def to_tuple(output) -> tuple:
    """A reference output as a tuple, caches as legacy tuples (see :func:`legacy_cache`)."""
    items = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output)
    return tuple(legacy_cache(item) if not isinstance(item, (torch.Tensor, tuple)) else item for item in items)
