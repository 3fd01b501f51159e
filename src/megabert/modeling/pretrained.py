"""Weight init, from_pretrained and save_pretrained, in the file layout `transformers` uses.

A model folder holds ``config.json`` and the weights as ``model.safetensors`` (or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``); reading also
accepts ``pytorch_model.bin`` and its sharded index. Pickled ``.bin`` files are read with
``torch.load(weights_only=True)``, which refuses to run code stored in the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from megabert.config import MegatronBertConfig
from megabert.utils import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# Keys that may be absent from a checkpoint without being "missing": tied or aliased tensors.
_DERIVED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Keys old checkpoints carry that are not weights (buffers the model rebuilds itself).
_IGNORED_KEY_SUFFIXES = (".position_ids",)

# The weight file names this module writes (single, shards, indexes): only these are replaced.
_WEIGHT_FILE = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)|(model\.safetensors|pytorch_model\.bin)\.index\.json"
)

ModelT = TypeVar("ModelT", bound="MegatronBertPreTrainedModel")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (missing files, shapes that don't fit)."""


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GIB", 2**30), ("MIB", 2**20)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _resolve_dtype(dtype: torch.dtype | str | None, config: MegatronBertConfig) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = config.torch_dtype or "float32"
    name = str(dtype).replace("torch.", "")
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. float32, bfloat16, float16)")
    return resolved


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder, from whichever weight files it has."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return load_safetensors(str(folder / SAFE_WEIGHTS_NAME))
    for index_name, loader in ((SAFE_WEIGHTS_INDEX_NAME, "safetensors"), (WEIGHTS_INDEX_NAME, "bin")):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path} is not a valid shard index ({exc})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise CheckpointError(f"shard {shard} named in {index_path} is missing")
                state.update(load_safetensors(str(shard_path)) if loader == "safetensors" else _load_bin(shard_path))
            return state
    if (folder / WEIGHTS_NAME).is_file():
        return _load_bin(folder / WEIGHTS_NAME)
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} "
        f"or {WEIGHTS_INDEX_NAME}"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded without running any code the file may carry."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint ({first_line})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


class MegatronBertPreTrainedModel(nn.Module):
    """Base of every MegatronBERT model: config, weight init, tying, checkpoint I/O."""

    base_model_prefix = "bert"

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        if not isinstance(config, MegatronBertConfig):
            raise TypeError(f"config must be a MegatronBertConfig, got {type(config).__name__}")
        self.config = config

    # ------------------------------------------------------------------- init
    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) for Linear/Embedding weights, zero biases, LayerNorm 1/0."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    def post_init(self) -> None:
        """Called at the end of every model's __init__: initialise and tie."""
        self.init_weights()

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    def get_input_embeddings(self) -> nn.Embedding:
        base = getattr(self, self.base_model_prefix, self)
        return base.embeddings.word_embeddings

    def tie_weights(self) -> None:
        """Share the word embeddings with the MLM decoder when config.tie_word_embeddings."""
        output = self.get_output_embeddings()
        if output is not None and self.config.tie_word_embeddings:
            output.weight = self.get_input_embeddings().weight

    # -------------------------------------------------------------- utilities
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.get_default_dtype()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for param in self.parameters():
            if id(param) in seen or (exclude_embeddings and id(param) in embeddings):
                continue
            seen.add(id(param))
            total += param.numel()
        return total

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward (less memory, same gradients)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls: type[ModelT],
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
        unpad_inputs: bool | None = None,
        config: MegatronBertConfig | None = None,
        **config_overrides: Any,
    ) -> ModelT:
        """Load a model folder written by megabert or `transformers`.

        ``dtype``: e.g. ``torch.bfloat16`` or ``"auto"`` (the dtype the folder records);
        ``device``: where the weights go; ``attn_implementation``: "sdpa" (default) or "eager";
        ``unpad_inputs``: run padded batches on real tokens only (outputs at pad positions are
        then zeros); None does so in eval mode only; ``False`` gives the reference's values at
        every position.
        Any other keyword overrides a config field (e.g. ``num_labels=3``). Weights of a head
        the checkpoint lacks are initialised and named in a warning.
        """
        if "torch_dtype" in config_overrides:
            dtype = config_overrides.pop("torch_dtype")
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        if not folder.is_dir():
            raise NotADirectoryError(f"model path {folder} is not a folder (expected config.json + weights)")
        if attn_implementation is not None:
            config_overrides["attn_implementation"] = attn_implementation
        if unpad_inputs is not None:
            config_overrides["unpad_inputs"] = unpad_inputs
        if config is None:
            config = MegatronBertConfig.from_pretrained(folder, **config_overrides)
        elif config_overrides:
            config = config.copy(**config_overrides)
        torch_dtype = _resolve_dtype(dtype, config)
        state = read_state_dict(folder)

        model = cls(config)
        model.load_checkpoint_state(state, source=str(folder))
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device is not None:
            model = model.to(device)
        model.eval()
        return model

    def _adapt_prefix(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a base-model checkpoint onto a head model and the other way round."""
        prefix = self.base_model_prefix + "."
        own_keys = set(self.state_dict().keys())
        has_base = hasattr(self, self.base_model_prefix)
        ckpt_prefixed = any(k.startswith(prefix) for k in state)
        if has_base and not ckpt_prefixed:
            return {(prefix + k if (prefix + k) in own_keys else k): v for k, v in state.items()}
        if not has_base and ckpt_prefixed:
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
        return state

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy ``state`` into the model, checking shapes; warn about missing and unexpected keys."""
        state = self._adapt_prefix(state)
        own = self.state_dict()
        problems = []
        for key, tensor in state.items():
            if key in own and tuple(own[key].shape) != tuple(tensor.shape):
                problems.append(
                    f"{key}: checkpoint shape {tuple(tensor.shape)} does not fit the model's {tuple(own[key].shape)}"
                )
        if problems:
            raise CheckpointError(
                f"{source} does not fit its config: " + "; ".join(problems[:5])
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            )
        loadable = {k: v for k, v in state.items() if k in own}
        unexpected = sorted(
            k for k in state if k not in own and not k.endswith(_IGNORED_KEY_SUFFIXES)
        )
        tied = self.config.tie_word_embeddings and self.get_output_embeddings() is not None
        derived = set(_DERIVED_KEYS if tied else _DERIVED_KEYS[1:])
        missing = sorted(k for k in own if k not in state and k not in derived)
        if "cls.predictions.decoder.bias" in loadable:
            # The two bias names are one Parameter here. The decoder's is the one the reference
            # adds in its forward: transformers 5.x keeps them apart when the decoder is untied.
            loadable["cls.predictions.bias"] = loadable.pop("cls.predictions.decoder.bias")
        self.load_state_dict(loadable, strict=False)
        self.tie_weights()
        if missing:
            warnings.warn(
                f"{type(self).__name__}: weights not in {source} were newly initialised: "
                + ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
                + ". Train the model before using it for predictions.",
                stacklevel=3,
            )
        if unexpected:
            warnings.warn(
                f"{type(self).__name__}: {len(unexpected)} weights in {source} were not used: "
                + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""),
                stacklevel=3,
            )

    # ------------------------------------------------------------- saving
    def _unique_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with tied/aliased tensors stored once (the first name wins)."""
        seen: set[tuple[int, tuple[int, ...]]] = set()
        unique: dict[str, torch.Tensor] = {}
        for key, tensor in self.state_dict().items():
            ident = (tensor.data_ptr(), tuple(tensor.shape))
            if ident in seen:
                continue
            seen.add(ident)
            unique[key] = tensor.detach().contiguous().cpu()
        return unique

    def save_pretrained(
        self, path: str | os.PathLike, max_shard_size: int | str = "5GB", safe_serialization: bool = True
    ) -> Path:
        """Write ``config.json`` and the weights into ``path`` (created if needed).

        Each file is written atomically; weights above ``max_shard_size`` are split into shards
        with an index, as `transformers` does. ``safe_serialization=False`` writes
        ``pytorch_model.bin`` instead of safetensors.
        """
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot save into {folder}: it is a file")
        folder.mkdir(parents=True, exist_ok=True)
        state = self._unique_state_dict()
        if "cls.predictions.bias" in state and not self.config.tie_word_embeddings:
            # transformers 5.x ties the decoder bias to cls.predictions.bias only when the decoder is
            # tied: an untied folder must carry it under the decoder's name too (4.x reads either).
            state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
        config = self.config.copy()
        config.architectures = [type(self).__name__]
        config.torch_dtype = str(self.dtype).replace("torch.", "")

        limit = _parse_size(max_shard_size)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes

        single_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
        index_name = SAFE_WEIGHTS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME
        stem, ext = single_name.rsplit(".", 1) if safe_serialization else ("pytorch_model", "bin")
        written: list[str] = []
        if len(shards) == 1:
            names = [single_name]
        else:
            names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            with atomic_path(folder / name) as tmp:
                if safe_serialization:
                    save_safetensors(shard, str(tmp), metadata={"format": "pt"})
                else:
                    torch.save(shard, tmp)
            written.append(name)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
            }
            atomic_write_text(folder / index_name, json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.append(index_name)
        # Remove weight files of an earlier save that this one replaces, so loaders are not confused.
        for old in folder.iterdir():
            if _WEIGHT_FILE.fullmatch(old.name) and old.name not in written:
                old.unlink()
        config.save_pretrained(folder)
        return folder
