"""megabert: NVIDIA's MegatronBERT family in plain PyTorch.

The public API is re-exported here and imported lazily, so ``import megabert`` stays fast
and a command that needs only the tokenizer does not pay for the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MegatronBertConfig": "megabert.config",
    "MegatronBertModel": "megabert.modeling.model",
    "MegatronBertPreTrainedModel": "megabert.modeling.pretrained",
    "MegatronBertForPreTraining": "megabert.modeling.heads",
    "MegatronBertForMaskedLM": "megabert.modeling.heads",
    "MegatronBertForCausalLM": "megabert.modeling.heads",
    "MegatronBertForNextSentencePrediction": "megabert.modeling.heads",
    "MegatronBertForSequenceClassification": "megabert.modeling.heads",
    "MegatronBertForMultipleChoice": "megabert.modeling.heads",
    "MegatronBertForTokenClassification": "megabert.modeling.heads",
    "MegatronBertForQuestionAnswering": "megabert.modeling.heads",
    "model_class_for": "megabert.modeling.heads",
    "MegatronBertTokenizer": "megabert.tokenization",
    "train_tokenizer": "megabert.tokenization",
    "train_tokenizer_from_iterator": "megabert.tokenization",
    "IndexedDataset": "megabert.data.indexed",
    "PretrainingDataset": "megabert.data.pretraining",
    "preprocess_corpus": "megabert.data.preprocess",
    "read_examples": "megabert.data.tasks",
    "encode_examples": "megabert.data.features",
    "compute_metrics": "megabert.train.jobs.metrics",
    "pipeline": "megabert.inference.pipelines",
    "convert_megatron_to_hf": "megabert.convert.megatron_lm",
    "convert_hf_to_megatron": "megabert.convert.megatron_lm",
    "convert_nemo_to_hf": "megabert.convert.nemo",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'megabert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
