"""Weight init, from_pretrained and save_pretrained, in the file layout `transformers` uses.

A model folder holds ``config.json`` and the weights as ``model.safetensors`` (or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``); reading also
accepts ``pytorch_model.bin`` and its sharded index. Pickled ``.bin`` files are read with
the restricted unpickler of :mod:`megabert.safe_pickle`, which refuses to run code
stored in the file.

Every reader of a model folder (``from_pretrained``, ``megabert info``, ``convert
to-megatron``, the prediction commands, ``finetune --init``) goes through the checked loader
here (:func:`weight_files`, :func:`read_state_dict`, :func:`read_tensor_shapes`): a damaged
file, a shard named outside the folder, a refused pickle or a non-finite weight is one
:class:`CheckpointError` line naming the file (and the tensor).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from megabert.config import MegatronBertConfig, check_pruned_heads
from megabert.devices import resolve_dtype
from megabert.errors import UserError
from megabert.fast_paths import apply_cpu_fast_paths
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


class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded (missing or damaged files, shapes that don't fit)."""


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GIB", 2**30), ("MIB", 2**20)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


# safetensors' reasons, in words (the library's own text is kept in parentheses).
_SAFETENSORS_REASONS = (
    ("header too small", "the file is too short to hold a safetensors header (empty or cut off)"),
    ("incomplete metadata", "the file is shorter than its header says (truncated download?)"),
    ("invalid JSON", "its header is not valid (the file is damaged or not safetensors)"),
    ("header too large", "its header is not valid (the file is damaged or not safetensors)"),
)


def _safetensors_error(path: Path, exc: BaseException) -> CheckpointError:
    raw = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raw = raw.removeprefix("Error while deserializing header: ")
    reason = next((words for key, words in _SAFETENSORS_REASONS if key.lower() in raw.lower()), "it cannot be read")
    return CheckpointError(f"{path} is not a readable safetensors file: {reason} ({raw}); re-download or re-save it")


def _shard_path(folder: Path, index_path: Path, name: Any) -> Path:
    """The path of a shard an index names; it must be a relative path inside ``folder``.

    Checked by name, not by resolving links: the Hugging Face cache keeps a folder's files as
    links into a blob store beside it, which is fine; a name like ``../outside.safetensors``
    or ``/etc/x`` is not, whatever is there.
    """
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise CheckpointError(f"{index_path}: the weight_map names a shard {name!r}, which is not a file name")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise CheckpointError(
            f"{index_path}: the weight_map names shard {name!r}, which is outside the model folder {folder}; "
            "shards must be files inside the folder (e.g. model-00001-of-00002.safetensors)"
        )
    return folder / name


def _read_index(index_path: Path, folder: Path) -> list[Path]:
    """The shard files of an index, each checked to be inside ``folder`` and present."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} is not a valid shard index (its weight_map is not a non-empty object)")
    shards: dict[str, Path] = {}
    for name in weight_map.values():
        path = _shard_path(folder, index_path, name)
        if name not in shards:
            if not path.is_file():
                raise CheckpointError(f"shard {name} named in {index_path} is missing")
            shards[name] = path
    return sorted(shards.values())


def weight_files(folder: str | os.PathLike) -> tuple[str, list[Path]]:
    """("safetensors" or "bin", the weight files) of a model folder, in the order they are read.

    One file, or the shards its index names (each checked to lie inside the folder). Raises
    :class:`CheckpointError` when the folder holds no weights.
    """
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return "safetensors", [folder / SAFE_WEIGHTS_NAME]
    for index_name, kind in ((SAFE_WEIGHTS_INDEX_NAME, "safetensors"), (WEIGHTS_INDEX_NAME, "bin")):
        if (folder / index_name).is_file():
            return kind, _read_index(folder / index_name, folder)
    if (folder / WEIGHTS_NAME).is_file():
        return "bin", [folder / WEIGHTS_NAME]
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} "
        f"or {WEIGHTS_INDEX_NAME}"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise _safetensors_error(path, exc) from None


_LOAD_ANYWAY = "(from Python, from_pretrained(..., check_finite=False) loads it anyway)"


def check_finite_weights(
    state: dict[str, torch.Tensor], source: str | os.PathLike, advice: str = _LOAD_ANYWAY
) -> None:
    """Raise CheckpointError naming the first tensor of ``state`` that holds NaN or inf.

    One vectorised pass per floating-point tensor: cheap next to reading the file. A damaged
    file whose header is intact, or a model saved from a diverged run, loads otherwise and
    silently gives NaN outputs. ``advice`` ends the message.
    """
    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor.numel() - int(finite.sum())
            raise CheckpointError(
                f"{source}: weight {key} holds {bad} non-finite value(s) (NaN or inf) out of {tensor.numel()}: "
                f"the file is damaged, or was saved from a run that diverged {advice}"
            )


def read_state_dict(folder: str | os.PathLike, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a model folder, from whichever weight files it has, checked.

    A damaged or truncated file, a shard outside the folder, a pickle that is refused (see
    :mod:`megabert.safe_pickle`) and, unless ``check_finite=False``, a tensor holding
    NaN or inf raise :class:`CheckpointError` naming the file (and the tensor).
    """
    kind, files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = _load_safetensors(path) if kind == "safetensors" else _load_bin(path)
        if check_finite:
            check_finite_weights(part, path)
        state.update(part)
    return state


def read_tensor_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor, from the safetensors headers (``.bin`` files are loaded).

    Reads no tensor data from safetensors files, so it is quick on large models; a damaged
    header is a :class:`CheckpointError` as in :func:`read_state_dict`.
    """
    kind, files = weight_files(folder)
    if kind == "bin":
        return {key: tuple(t.shape) for path in files for key, t in _load_bin(path).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise _safetensors_error(path, exc) from None
    return shapes


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded without running any code the file may carry.

    The same restricted unpickler as the Megatron converter's (:func:`~megabert.safe_pickle.safe_load`):
    its error says in plain words what was refused and why.
    """
    from megabert.safe_pickle import safe_load

    try:
        state = safe_load(path)
    except UserError as exc:
        raise CheckpointError(str(exc)) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _resized_rows(old: torch.Tensor, size: int, mean_resizing: bool, std: float) -> nn.Parameter:
    """``old`` (rows, ...) cut or extended to ``size`` rows, as a new Parameter (same requires_grad).

    Added rows: with ``mean_resizing``, transformers 5.x's rule (a new token starts as an
    average one, so predictions over the old vocabulary barely move): drawn from
    N(mean, 1e-9 * covariance) of the old rows when that covariance is positive definite, else
    the mean; a bias (1-D) from N(mean, (1e-9 * std)^2). Without it, normal(0, ``std``).
    """
    rows = old.shape[0]
    new = old.new_empty((size, *old.shape[1:]))
    kept = min(rows, size)
    new[:kept] = old[:kept]
    added = size - rows
    if added > 0:
        if not mean_resizing and std > 0:
            new[rows:].normal_(0.0, std)
        elif not mean_resizing:
            new[rows:].zero_()
        elif old.dim() == 1:
            values = old.float()
            spread = 1e-9 * float(values.std()) if rows > 1 else 0.0
            new[rows:] = torch.randn(added, device=old.device) * spread + values.mean()
        else:
            values = old.float()
            mean = values.mean(0)
            centred = values - mean
            covariance = 1e-9 * (centred.T @ centred) / rows
            factor, info = torch.linalg.cholesky_ex(covariance)
            if int(info) == 0:  # positive definite: a distribution to sample from
                noise = torch.randn(added, mean.shape[0], device=old.device) @ factor.T
                new[rows:] = mean + noise
            else:
                new[rows:] = mean
    return nn.Parameter(new, requires_grad=old.requires_grad)


@dataclass
class LoadReport:
    """What :meth:`MegatronBertPreTrainedModel.load_checkpoint_state` found: keys the model had to
    initialise itself (``missing_keys``) and checkpoint keys it did not use (``unexpected_keys``)."""

    model_name: str
    source: str
    missing_keys: list[str]
    unexpected_keys: list[str]

    def missing_message(self) -> str | None:
        if not self.missing_keys:
            return None
        missing = self.missing_keys
        return (
            f"{self.model_name}: weights not in {self.source} were newly initialised: "
            + ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            + ". Train the model before using it for predictions."
        )

    def unexpected_message(self) -> str | None:
        if not self.unexpected_keys:
            return None
        unexpected = self.unexpected_keys
        return (
            f"{self.model_name}: {len(unexpected)} weights in {self.source} were not used: "
            + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        )

    def warn(self, stacklevel: int = 2) -> None:
        """Issue both messages as warnings (those that apply)."""
        for message in (self.missing_message(), self.unexpected_message()):
            if message is not None:
                warnings.warn(message, stacklevel=stacklevel + 1)


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
        """Prune the heads ``config.pruned_heads`` names (so a pruned folder's weights fit), then initialise and tie."""
        if self.config.pruned_heads:
            self.prune_heads(self.config.pruned_heads)
        self.apply(self._init_weights)
        self.tie_weights()

    def post_init(self) -> None:
        """Called at the end of every model's __init__: initialise, tie, and apply ``config.cpu_fast_paths``."""
        self.init_weights()
        apply_cpu_fast_paths(self, self.config.cpu_fast_paths)

    def _base_model(self) -> nn.Module:
        """The bare encoder: ``self.bert`` in the head models, the model itself in MegatronBertModel."""
        return getattr(self, self.base_model_prefix, self)

    def get_output_embeddings(self) -> nn.Linear | None:
        """The MLM decoder (vocabulary projection) of the models that have one; None for the others."""
        return None

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the MLM decoder; only the models with an MLM head have one."""
        raise UserError(f"{type(self).__name__} has no output embeddings (no MLM decoder) to replace")

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embeddings (vocab_size, hidden_size) of the encoder."""
        return self._base_model().embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the encoder's word embeddings (a tied decoder follows at the next tie_weights)."""
        self._base_model().embeddings.word_embeddings = value

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

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once), as in `transformers`.

        ``only_trainable``: those with requires_grad only; ``exclude_embeddings``: leave out the
        weights of every nn.Embedding (word, position, token type, relative distance).
        """
        seen: set[int] = set()
        total = 0
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for param in self.parameters():
            if id(param) in seen or (exclude_embeddings and id(param) in embeddings):
                continue
            if only_trainable and not param.requires_grad:
                continue
            seen.add(id(param))
            total += param.numel()
        return total

    # ------------------------------------------------------ vocabulary size
    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Give the model ``new_num_tokens`` word embeddings (rounded up to ``pad_to_multiple_of``).

        The input embeddings, the MLM decoder (tied or not) and its bias are cut or extended at
        the end; the rows of the tokens kept are unchanged, and ``config.vocab_size`` follows.
        Added rows are initialised as `transformers` 5.x does: with ``mean_resizing`` (default)
        near the mean of the old rows (the decoder bias of an untied decoder near its mean;
        that of a tied one with zeros); without it from normal(0, initializer_range), bias 0.
        Returns the input embedding module (the same module, holding the new weight);
        with neither argument, it is returned unchanged. A tied decoder stays tied.
        """
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        for name, value in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"resize_token_embeddings: {name} must be a positive integer (>= 1), got {value!r}")
        size = embeddings.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        pad = self.config.pad_token_id
        if pad is not None and pad >= size:
            # transformers drops the padding index then, and leaves a config that names a token
            # outside the vocabulary (which megabert's config refuses): refuse it here instead.
            raise UserError(
                f"resize_token_embeddings: {size} tokens would leave out the padding token "
                f"(config.pad_token_id = {pad}); keep at least {pad + 1} tokens or change pad_token_id"
            )
        decoder = self.get_output_embeddings()
        tied = decoder is not None and decoder.weight is embeddings.weight
        std = self.config.initializer_range
        with torch.no_grad():
            embeddings.weight = _resized_rows(embeddings.weight, size, mean_resizing, std)
            embeddings.num_embeddings = size
            if decoder is not None:
                if not tied:  # a tied decoder gets the new embedding weight from tie_weights below
                    decoder.weight = _resized_rows(decoder.weight, size, mean_resizing, std)
                if decoder.bias is not None:
                    # transformers 5.x pads a tied decoder's bias with zeros when it re-ties, and
                    # mean-resizes an untied one's.
                    decoder.bias = _resized_rows(decoder.bias, size, mean_resizing and not tied, std=0.0)
                decoder.out_features = size
                self.set_output_embeddings(decoder)  # re-points cls.predictions.bias at the new bias
        self.config.vocab_size = size
        self.tie_weights()
        return embeddings

    # --------------------------------------------------------------- pruning
    def prune_heads(self, heads_to_prune: dict[int, list[int]]) -> None:
        """Remove attention heads: ``{layer: [head, ...]}``, heads by their original numbers.

        Each head's rows of the Q, K and V projections and its input columns of the attention
        output projection are removed, so the layer computes what the unpruned one does under a
        head_mask zeroing those heads. ``config.pruned_heads`` records every head pruned so far
        (merged with earlier calls), so that a saved pruned model reloads; heads pruned before
        are skipped. Only self-attention is pruned (cross-attention keeps its heads), as in
        `transformers` 4.x. A head_mask stays indexed by original head numbers. A layer or head
        out of range, or leaving a layer without heads, is a UserError naming it.
        """
        layers = self._base_model().encoder.layer
        heads_per_layer = self.config.num_attention_heads
        requested = check_pruned_heads(heads_to_prune, len(layers), heads_per_layer, "prune_heads")
        for layer, heads in requested.items():
            attention = layers[layer].attention
            if set(attention.self.kept_heads) <= set(heads):
                raise UserError(
                    f"prune_heads: pruning heads {heads} of layer {layer} would remove all its remaining heads "
                    f"({sorted(attention.self.kept_heads)}; {sorted(attention.pruned_heads)} were pruned before); "
                    "keep at least one"
                )
        for layer, heads in requested.items():
            layers[layer].attention.prune_heads(heads)
            pruned = set(self.config.pruned_heads.get(layer, [])) | set(heads)
            self.config.pruned_heads[layer] = sorted(pruned)
        apply_cpu_fast_paths(self, self.config.cpu_fast_paths)  # to the Linears pruning made

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
        cpu_fast_paths: Any = None,
        config: MegatronBertConfig | None = None,
        check_finite: bool = True,
        output_loading_info: bool = False,
        **config_overrides: Any,
    ) -> ModelT | tuple[ModelT, dict[str, list[str]]]:
        """Load a model folder written by megabert or `transformers`.

        ``dtype``: e.g. ``torch.bfloat16`` or ``"auto"`` (the dtype the folder records);
        ``device``: where the weights go; ``attn_implementation``: "sdpa" (default) or "eager";
        ``unpad_inputs``: run padded batches on real tokens only (outputs at pad positions are
        then zeros). The default (None) does so in eval mode, the mode ``from_pretrained``
        returns, and runs padded in training mode; ``True``: always; ``False``: never, which
        gives the reference's values at every position, pads included.
        ``cpu_fast_paths``: "auto" (default), "off" or a mapping of options
        (:class:`megabert.fast_paths.CpuFastPaths`): faster CPU modules, same weights.
        ``check_finite``: refuse weights holding NaN or inf (a :class:`CheckpointError` naming
        the tensor); ``False`` loads them as they are.
        Any other keyword overrides a config field (e.g. ``num_labels=3``). Weights of a head
        the checkpoint lacks are initialised and named in a warning. ``output_loading_info``:
        return ``(model, info)`` as `transformers` does, ``info`` holding ``missing_keys``,
        ``unexpected_keys``, ``mismatched_keys`` and ``error_msgs``; the caller then decides
        what to say about them (no warning is issued).
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
        if cpu_fast_paths is not None:
            config_overrides["cpu_fast_paths"] = cpu_fast_paths
        if config is None:
            config = MegatronBertConfig.from_pretrained(folder, **config_overrides)
        elif config_overrides:
            config = config.copy(**config_overrides)
        torch_dtype = resolve_dtype(dtype, recorded=config.torch_dtype or "")
        state = read_state_dict(folder, check_finite=check_finite)

        model = cls(config)
        report = model.load_checkpoint_state(state, source=str(folder), warn=not output_loading_info)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device is not None:
            model = model.to(device)
        model.eval()
        if output_loading_info:
            info = {"missing_keys": report.missing_keys, "unexpected_keys": report.unexpected_keys,
                    "mismatched_keys": [], "error_msgs": []}  # shape mismatches are a CheckpointError here
            return model, info
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
    def load_checkpoint_state(
        self, state: dict[str, torch.Tensor], source: str = "checkpoint", warn: bool = True
    ) -> "LoadReport":
        """Copy ``state`` into the model, checking shapes; report (and unless ``warn=False``, warn about) missing and unexpected keys."""
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
        report = LoadReport(type(self).__name__, source, missing, unexpected)
        if warn:
            report.warn(stacklevel=4)
        return report

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
