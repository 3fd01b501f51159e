"""MegatronBertConfig: the model's hyper-parameters, validated, with HF-compatible config.json in/out.

The field names and defaults are those of `transformers`' MegatronBertConfig (model_type
"megatron-bert"), so a folder written by either library loads in the other. Keys this class
does not know (written by newer or other tools) are kept in ``extra`` and written back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from megabert.errors import UserError
from megabert.fast_paths import CpuFastPaths

MODEL_TYPE = "megatron-bert"
CONFIG_NAME = "config.json"

# Names accepted for `hidden_act`; the functions live in modeling/layers.py.
ACTIVATION_NAMES = (
    "gelu",
    "gelu_python",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
)
POSITION_EMBEDDING_TYPES = ("absolute", "relative_key", "relative_key_query")
# Fields that choose how the model runs here, not what it is: kept out of config.json.
RUNTIME_FIELDS = ("attn_implementation", "unpad_inputs", "cpu_fast_paths")
# Weight dtypes a config.json may record ("dtype" / "torch_dtype").
SAVED_DTYPES = ("float32", "float16", "bfloat16", "float64")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Fields that must be JSON true/false: a string "false" would be truthy.
_BOOL_FIELDS = (
    "use_cache", "is_decoder", "add_cross_attention", "tie_word_embeddings",
    "output_attentions", "output_hidden_states", "return_dict",
)  # fmt: skip


def _short(value: Any) -> str:
    """repr of a config value, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any, low: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN or inf would pass a range check by accident."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_id(value: Any) -> Any:
    """A label id from config.json: an int, or a str of one (JSON object keys are strings); else as is."""
    if isinstance(value, str) and value.strip().lstrip("-").isascii() and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def check_pruned_heads(heads: Any, num_layers: int, num_heads: int, name: str) -> dict[int, list[int]]:
    """``heads`` ({layer: [head, ...]}) checked and normalised to int layers -> sorted, distinct heads.

    Layers must be in [0, num_layers) and heads in [0, num_heads) (original head numbers);
    a layer must keep at least one head. JSON object keys (strings of digits) are accepted as
    layer numbers. Raises UserError naming ``name``, the layer or head and the limit.
    """
    if not isinstance(heads, dict):
        raise UserError(f"{name} must be a mapping of layer -> list of heads, got {_short(heads)}")
    out: dict[int, list[int]] = {}
    for key, layer_heads in heads.items():
        layer = _as_id(key)
        if not _is_int(layer):
            raise UserError(f"{name}: layer {_short(key)} is not a layer number (an integer)")
        if not 0 <= layer < num_layers:
            raise UserError(
                f"{name}: layer {layer} does not exist: the model has {num_layers} layers (0 to {num_layers - 1})"
            )
        if isinstance(layer_heads, (str, bytes)) or not hasattr(layer_heads, "__iter__"):
            raise UserError(f"{name}: layer {layer} must map to a list of head indices, got {_short(layer_heads)}")
        chosen = set(out.get(layer, []))
        for head in layer_heads:
            if not _is_int(head):
                raise UserError(f"{name}: layer {layer}: head {_short(head)} is not a head index (an integer)")
            if not 0 <= head < num_heads:
                raise UserError(
                    f"{name}: head {head} of layer {layer} is out of range: layers have {num_heads} heads "
                    f"(0 to {num_heads - 1})"
                )
            chosen.add(head)
        if len(chosen) == num_heads:
            raise UserError(
                f"{name}: pruning heads {sorted(chosen)} of layer {layer} would remove all {num_heads} heads of "
                "that layer; keep at least one"
            )
        if chosen:
            out[layer] = sorted(chosen)
    return out


# Keys `transformers` writes that describe the file, not the model: read, not kept as fields.
_BOOKKEEPING_KEYS = ("model_type", "transformers_version", "_name_or_path", "megabert_version")


@dataclass(init=False, repr=False)
class MegatronBertConfig:
    """Hyper-parameters of a MegatronBERT model (defaults: NVIDIA's 345M cased model).

    Construct with keyword arguments (``MegatronBertConfig(hidden_size=768, ...)``), or
    read a folder's ``config.json`` with :meth:`from_pretrained`. Unknown keyword arguments
    are kept in :attr:`extra` and written back by :meth:`save_pretrained`.
    """

    vocab_size: int = 29056
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    use_cache: bool = True
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    # Attention heads removed by prune_heads: layer -> original head indices. The model re-prunes
    # itself from this at construction, so a pruned folder's weights fit. None reads as {}.
    pruned_heads: dict[int, list[int]] | None = None
    # Task-head settings shared by all `transformers` configs.
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    architectures: list[str] | None = None
    # The dtype the weights were saved in ("float32", "bfloat16", ...). transformers 4.x writes
    # it as "torch_dtype", 5.x as "dtype": both are read, and both are written.
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Which attention code runs: "sdpa" (default) or "eager"; not written to config.json.
    attn_implementation: str | None = None
    # Drop padding tokens after the embeddings and compute real tokens only (fast; outputs at
    # pad positions are then zero instead of the reference's values). None (the default): unpad
    # in eval mode, where nobody reads pad positions, and run padded in training mode, where the
    # losses then equal the reference's. True / False: always / never (False: the reference's
    # values at every position). Not written to config.json.
    unpad_inputs: bool | None = None
    # The CPU fast paths the model applies to itself when built (megabert.fast_paths): None or
    # "auto" (all on), "off" (plain PyTorch modules), or a mapping such as
    # {"half_matmul": "native", "fused_qkv": False}. Not written to config.json.
    cpu_fast_paths: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __init__(self, **kwargs: Any) -> None:
        known = {f.name for f in fields(self)} - {"extra"}
        # transformers 5.x's name for torch_dtype; an explicit torch_dtype wins.
        saved_dtype = kwargs.pop("dtype", None)
        if kwargs.get("torch_dtype") is None and saved_dtype is not None:
            kwargs["torch_dtype"] = saved_dtype
        for f in fields(self):
            if f.name == "extra":
                continue
            setattr(self, f.name, kwargs.pop(f.name, f.default))
        for key in _BOOKKEEPING_KEYS:
            kwargs.pop(key, None)
        extra = kwargs.pop("extra", None) or {}
        if not isinstance(extra, dict):
            raise UserError(f"config.extra must be an object of extra keys, got {_short(extra)}")
        extra = dict(extra)
        extra.update({k: v for k, v in kwargs.items() if k not in known})
        self.extra = extra
        self._normalise_labels()
        self.validate()

    # ------------------------------------------------------------------ labels
    def _normalise_labels(self) -> None:
        """Make num_labels, id2label and label2id agree (JSON keys are strings; ids are ints)."""
        if self.num_labels is not None and not _is_int(self.num_labels, low=1):
            raise UserError(f"config.num_labels must be a positive integer, got {_short(self.num_labels)}")
        for name in ("id2label", "label2id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise UserError(f"config.{name} must be an object (a mapping), got {_short(value)}")
        if self.id2label is not None:
            bad = [k for k in self.id2label if not _is_int(_as_id(k), low=0)]
            if bad:
                raise UserError(f"config.id2label keys must be label ids (0, 1, ...), got {_short(bad[0])}")
            self.id2label = {_as_id(k): str(v) for k, v in self.id2label.items()}
        if self.label2id is not None:
            bad = [v for v in self.label2id.values() if not _is_int(_as_id(v), low=0)]
            if bad:
                raise UserError(f"config.label2id values must be label ids (0, 1, ...), got {_short(bad[0])}")
            self.label2id = {str(k): _as_id(v) for k, v in self.label2id.items()}
        if self.id2label is None and self.label2id is not None:
            self.id2label = {v: k for k, v in self.label2id.items()}
        if self.num_labels is None:
            self.num_labels = len(self.id2label) if self.id2label else 2
        if self.id2label is None or len(self.id2label) != self.num_labels:
            if self.id2label is not None and len(self.id2label) != self.num_labels:
                # An explicit num_labels wins over a stale label map (as in `transformers`).
                self.id2label = None
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {name: i for i, name in self.id2label.items()}

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise UserError (a ValueError) naming the field, its value and the rule, for an impossible config."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"config.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(
                f"config.hidden_size ({self.hidden_size}) must be divisible by "
                f"config.num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise UserError(f"config.{name} must be in [0, 1), got {value!r}")
        if not _is_number(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            raise UserError(f"config.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise UserError(f"config.initializer_range must be a number >= 0, got {self.initializer_range!r}")
        if self.hidden_act not in ACTIVATION_NAMES:
            raise UserError(
                f"config.hidden_act {self.hidden_act!r} is not supported; choose one of {', '.join(ACTIVATION_NAMES)}"
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise UserError(
                f"config.position_embedding_type {self.position_embedding_type!r} is not supported; "
                f"choose one of {', '.join(POSITION_EMBEDDING_TYPES)}"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise UserError(
                f"config.problem_type {self.problem_type!r} is not supported; choose one of {', '.join(PROBLEM_TYPES)}"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise UserError(f"config.{name} must be a token id (an integer) or null, got {_short(value)}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"config.{name} must be true or false, got {_short(getattr(self, name))}")
        if self.architectures is not None and (
            not isinstance(self.architectures, list) or not all(isinstance(a, str) for a in self.architectures)
        ):
            raise UserError(f"config.architectures must be a list of class names, got {_short(self.architectures)}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise UserError(
                f"config.pad_token_id ({self.pad_token_id}) must be inside the vocabulary [0, {self.vocab_size})"
            )
        pruned = {} if self.pruned_heads is None else self.pruned_heads
        self.pruned_heads = check_pruned_heads(
            pruned, self.num_hidden_layers, self.num_attention_heads, "config.pruned_heads"
        )
        if self.add_cross_attention and not self.is_decoder:
            raise UserError("config.add_cross_attention=True needs config.is_decoder=True")
        if self.torch_dtype is not None:
            if not isinstance(self.torch_dtype, str) and type(self.torch_dtype).__name__ != "dtype":
                raise UserError(f"config dtype must be a name like 'float32', got {_short(self.torch_dtype)}")
            # A torch.dtype or "torch.bfloat16" is kept as the bare name config.json holds.
            self.torch_dtype = str(self.torch_dtype).removeprefix("torch.")
            if self.torch_dtype not in SAVED_DTYPES:
                raise UserError(
                    f"config dtype {self.torch_dtype!r} is not a floating-point torch dtype; "
                    f"expected one of {', '.join(SAVED_DTYPES)}"
                )
        if self.unpad_inputs not in (None, True, False):
            raise UserError(f"unpad_inputs must be True, False or None (auto), got {self.unpad_inputs!r}")
        CpuFastPaths.parse(self.cpu_fast_paths)  # a UserError naming the bad value
        if self.attn_implementation not in (None, "sdpa", "eager"):
            raise UserError(
                f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}"
            )

    # ------------------------------------------------------------ conveniences
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    def unpads(self, training: bool) -> bool:
        """Whether padded batches run on real tokens only, for a model in ``training`` mode."""
        return (not training) if self.unpad_inputs is None else bool(self.unpad_inputs)

    def __getattr__(self, name: str) -> Any:
        # Unknown keys from a config.json stay reachable as attributes, as in `transformers`.
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"MegatronBertConfig has no attribute {name!r}")

    def copy(self, **overrides: Any) -> "MegatronBertConfig":
        """A new config with the same values, some of them replaced."""
        values = self.to_dict(include_runtime=True)
        if "num_labels" in overrides and "id2label" not in overrides:
            values.pop("id2label", None)
            values.pop("label2id", None)
        values.update(overrides)
        return MegatronBertConfig(**values)

    # ----------------------------------------------------------------- in/out
    def to_dict(self, include_runtime: bool = False) -> dict[str, Any]:
        """The config as config.json holds it (model_type included, extra keys merged in)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("extra",) + RUNTIME_FIELDS and not include_runtime:
                continue
            if f.name == "extra":
                continue
            out[f.name] = getattr(self, f.name)
        # A copy, so that pruning one model does not change another built from this config.
        out["pruned_heads"] = {layer: list(heads) for layer, heads in self.pruned_heads.items()}
        if not include_runtime:
            if out["pruned_heads"]:
                out["pruned_heads"] = {str(k): v for k, v in out["pruned_heads"].items()}  # JSON keys
            else:
                del out["pruned_heads"]  # as transformers writes it: only when something was pruned
        if out.get("id2label") is not None:
            out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
        if include_runtime:
            out["extra"] = dict(self.extra)
        else:
            out.update(self.extra)
            out["model_type"] = MODEL_TYPE
            out["dtype"] = out["torch_dtype"]  # the key transformers 5.x reads
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides: Any) -> "MegatronBertConfig":
        """A config from the values config.json holds (``overrides`` replace some of them)."""
        if not isinstance(values, dict):
            raise UserError(f"a config must be an object of settings, got {type(values).__name__}")
        bad_key = next((k for k in values if not isinstance(k, str)), None)
        if bad_key is not None:
            raise UserError(f"config keys must be strings, got {bad_key!r}")
        values = dict(values)
        model_type = values.get("model_type")
        if model_type is not None and model_type != MODEL_TYPE:
            raise UserError(f"config model_type is {model_type!r}; megabert reads {MODEL_TYPE!r} configs only")
        if "num_labels" in overrides and "id2label" not in overrides:
            values.pop("id2label", None)
            values.pop("label2id", None)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "MegatronBertConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): not a config.json") from None
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path} must hold a JSON object, found {type(values).__name__}")
        return cls.from_dict(values, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "MegatronBertConfig":
        """Read ``config.json`` from a folder (or a path to the json file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
            if not path.is_file():
                raise FileNotFoundError(f"no {CONFIG_NAME} in {path.parent}: is this a model folder?")
        elif not path.exists():
            raise FileNotFoundError(f"model path {path} does not exist")
        return cls.from_json_file(path, **overrides)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``folder`` (created if needed), atomically."""
        from megabert.utils import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / CONFIG_NAME
        atomic_write_text(target, self.to_json_string())
        return target

    def __repr__(self) -> str:
        return f"MegatronBertConfig({json.dumps(self.to_dict(), sort_keys=True)})"
