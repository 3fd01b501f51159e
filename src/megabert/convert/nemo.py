"""NeMo ``.nemo`` archives of MegatronBERT -> Hugging Face model folder, without NeMo.

A ``.nemo`` file is a tar archive (plain or gzip) of::

    model_config.yaml               # the model's config (hidden_size, num_layers, tokenizer, ...)
    model_weights.ckpt              # torch.save of the state dict, keys under `model.` (TP = 1)
      or mp_rank_00/model_weights.ckpt, mp_rank_01/...   (one per tensor-parallel rank)
      or model_weights/             # later NeMo: a torch_dist folder (see torch_dist.py)
    abc123_vocab.txt                # tokenizer files, their names prefixed with a hash

NeMo's MegatronBertModel keeps Megatron-LM's legacy names under a ``model.`` prefix
(``model.language_model.embedding.word_embeddings.weight``, ``model.lm_head.*``,
``model.binary_head.*``), so after dropping the prefix the legacy converter does the rest
(tensor-parallel ranks merged as legacy shards are).

Safety: every member is checked before anything is read (no absolute paths, no ``..``, no
links, devices or FIFOs); only the members needed are copied out, under names chosen here,
into a scratch folder inside the (temporary) output folder; the weights go through the
allow-list unpickler; the YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from megabert.errors import UserError, require_file
from megabert.utils import atomic_folder

__all__ = ["convert_nemo_to_hf", "config_args", "safe_tar_members"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
_SCRATCH = ".nemo-source"
_RANK_WEIGHTS = re.compile(r"^mp_rank_(\d+)/" + re.escape(WEIGHTS_NAME) + "$")
_PP_RANK_WEIGHTS = re.compile(r"^(?:tp_rank_\d+_pp_rank_\d+|mp_rank_\d+_\d+)/" + re.escape(WEIGHTS_NAME) + "$")
# NeMo: --activation gelu (erf); the tanh approximations under their names.
_TANH_GELUS = ("fast-gelu", "approx-gelu", "openai-gelu", "gelu_new")


def _normalised(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def safe_tar_members(archive: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """Regular-file members of ``archive`` by normalised name, after refusing any unsafe member.

    Refused before anything is read: absolute paths, ``..`` components, backslashes, and members
    that are not regular files or folders (symbolic and hard links, devices, FIFOs).
    """
    files: dict[str, tarfile.TarInfo] = {}
    for member in archive.getmembers():
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name or ".." in parts:
            raise UserError(
                f"refusing to read {path}: tar member {name!r} has an absolute path or '..' "
                "(it would write outside the output folder)"
            )
        if member.issym() or member.islnk():
            raise UserError(f"refusing to read {path}: tar member {name!r} is a link (to {member.linkname!r})")
        if not (member.isfile() or member.isdir()):
            raise UserError(f"refusing to read {path}: tar member {name!r} is a device, FIFO or other special file")
        if member.isfile():
            files[_normalised(name)] = member
    return files


def _copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    source = archive.extractfile(member)
    if source is None:
        raise UserError(f"cannot read tar member {member.name!r}")
    with source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, length=16 << 20)
    return target


def _load_yaml(text: bytes, where: str) -> dict:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise UserError("reading .nemo archives needs PyYAML (pip install pyyaml)") from None
    try:
        config = yaml.safe_load(text.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: {CONFIG_NAME} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: {CONFIG_NAME} is not a mapping")
    return config


def config_args(config: dict, where: str) -> dict[str, Any]:
    """Megatron-style ``args`` (a dict; see :func:`megatron_args.arg`) from NeMo's model config."""
    activation = str(config.get("activation", "gelu")).lower()
    openai_gelu = bool(config.get("openai_gelu", False))
    if activation in _TANH_GELUS:
        openai_gelu = True
    elif activation != "gelu":
        raise UserError(f"{where}: activation {activation!r} has no MegatronBERT equivalent (gelu or fast-gelu)")
    normalization = config.get("normalization", "layernorm")
    tokenizer = config.get("tokenizer") or {}
    tokenizer_type = tokenizer.get("type") if isinstance(tokenizer, dict) else None
    args: dict[str, Any] = {
        "num_layers": config.get("num_layers"),
        "hidden_size": config.get("hidden_size"),
        "num_attention_heads": config.get("num_attention_heads"),
        "ffn_hidden_size": config.get("ffn_hidden_size"),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "layernorm_epsilon": config.get("layernorm_epsilon"),
        "openai_gelu": openai_gelu,
        "bert_binary_head": config.get("bert_binary_head"),
        "tensor_model_parallel_size": config.get("tensor_model_parallel_size"),
        "pipeline_model_parallel_size": config.get("pipeline_model_parallel_size"),
        "normalization": "LayerNorm" if str(normalization).lower() == "layernorm" else normalization,
        "hidden_dropout": config.get("hidden_dropout"),
        "attention_dropout": config.get("attention_dropout"),
        "init_method_std": config.get("init_method_std"),
        "tokenizer_type": tokenizer_type if isinstance(tokenizer_type, str) else None,
    }
    for key in ("apply_residual_connection_post_layernorm", "position_embedding_type", "num_query_groups"):
        if config.get(key) is not None:
            args[key] = config[key]
    if config.get("bias_activation_fusion") and not openai_gelu:
        logger.info("%s was trained with bias_activation_fusion (tanh-approximated GELU in the fused kernel)", where)
    return args


def _lowercase(config: dict) -> bool | None:
    tokenizer = config.get("tokenizer") or {}
    if not isinstance(tokenizer, dict):
        return None
    if isinstance(tokenizer.get("do_lower_case"), bool):
        return tokenizer["do_lower_case"]
    name = str(tokenizer.get("type") or "") + " " + str(tokenizer.get("model") or "")
    if "LowerCase" in name or "uncased" in name:
        return True
    if "Case" in name or "cased" in name:
        return False
    return None


def _vocab_member(files: dict[str, tarfile.TarInfo], config: dict) -> str | None:
    tokenizer = config.get("tokenizer") or {}
    named = tokenizer.get("vocab_file") if isinstance(tokenizer, dict) else None
    if isinstance(named, str):
        named = named.split("nemo:", 1)[-1]
        if _normalised(named) in files:
            return _normalised(named)
    vocabs = sorted(n for n in files if PurePosixPath(n).name == "vocab.txt" or PurePosixPath(n).name.endswith("_vocab.txt"))
    return vocabs[0] if vocabs else None


def convert_nemo_to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vocab_file: str | os.PathLike | None = None,
    lowercase: bool | None = None,
    num_attention_heads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a NeMo MegatronBERT ``.nemo`` archive into a Hugging Face model folder at ``out``.

    The tokenizer is written from the vocabulary inside the archive (or ``vocab_file``), its
    casing from ``lowercase``, else the archive's tokenizer config. The folder appears only when
    complete. Returns ``out``.
    """
    from megabert.convert.hf_folder import write_hf_folder
    from megabert.convert.reader import LoadedCheckpoint, _flatten, _layout_of
    from megabert.safe_pickle import safe_load
    from megabert.convert.torch_dist import load_torch_dist

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"NeMo archive {src} does not exist")
    if vocab_file is not None:
        vocab_file = require_file(vocab_file, "vocabulary file", expected_name="vocab.txt")
    try:
        archive = tarfile.open(src, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{src} is not a .nemo archive (a tar file, plain or gzip): {exc}") from None
    where = str(src)
    with archive:
        files = safe_tar_members(archive, src)
        if CONFIG_NAME not in files:
            shown = ", ".join(sorted(files)[:6])
            raise UserError(f"{src} has no {CONFIG_NAME} (it holds: {shown or 'nothing'}): not a .nemo archive")
        config_file = archive.extractfile(files[CONFIG_NAME])
        config = _load_yaml(config_file.read() if config_file else b"", where)
        target = str(config.get("target") or config.get("_target_") or "")
        if target and "Bert" not in target:
            raise UserError(f"{src} is a {target.rsplit('.', 1)[-1]} model, not a MegatronBERT")
        args = config_args(config, where)
        ranks = {int(m.group(1)): n for n in files if (m := _RANK_WEIGHTS.match(n))}
        dist = sorted(n for n in files if n.startswith("model_weights/"))
        if any(_PP_RANK_WEIGHTS.match(n) for n in files):
            raise UserError(f"{src} is split over pipeline-parallel ranks; only tensor-parallel .nemo archives are supported")

        with atomic_folder(out, overwrite=overwrite) as tmp:
            scratch = tmp / _SCRATCH
            vocab_name = _vocab_member(files, config) if vocab_file is None else None
            if vocab_name is not None:
                vocab_file = _copy_member(archive, files[vocab_name], scratch / "vocab.txt")
            if WEIGHTS_NAME in files:
                weight_files = {0: _copy_member(archive, files[WEIGHTS_NAME], scratch / "rank_00.ckpt")}
            elif ranks:
                missing = [r for r in range(max(ranks) + 1) if r not in ranks]
                if missing:
                    raise UserError(f"{src} lacks mp_rank_{missing[0]:02d}/{WEIGHTS_NAME} (has {len(ranks)} ranks)")
                weight_files = {r: _copy_member(archive, files[n], scratch / f"rank_{r:02d}.ckpt") for r, n in sorted(ranks.items())}
            elif dist:
                for name in dist:
                    relative = PurePosixPath(name).relative_to("model_weights")
                    _copy_member(archive, files[name], scratch.joinpath("model_weights", *relative.parts))
                weight_files = {}
            else:
                raise UserError(f"{src} holds no weights ({WEIGHTS_NAME}, mp_rank_XX/{WEIGHTS_NAME} or model_weights/)")

            if weight_files:
                flats, labels = [], []
                for rank, path in sorted(weight_files.items()):
                    label = f"{src}:{'mp_rank_%02d/' % rank if ranks else ''}{WEIGHTS_NAME}"
                    try:
                        state = safe_load(path)
                    except UserError as exc:  # name the archive member, not the scratch copy
                        raise UserError(str(exc).replace(str(path), label)) from None
                    if not isinstance(state, dict):
                        raise UserError(f"{label} holds a {type(state).__name__}, not a state dict")
                    state = state.get("state_dict", state)
                    flat = _flatten(state)
                    if not all(k.startswith("model.") for k in flat):
                        odd = next(k for k in flat if not k.startswith("model."))
                        raise UserError(f"{label}: key {odd!r} is not under model.*: not a NeMo MegatronBERT state dict")
                    flats.append({k[len("model."):]: v for k, v in flat.items()})
                    labels.append(label)
                ckpt = LoadedCheckpoint(
                    stages=[flats], files=[labels], tensor_parallel=len(flats), args=args, version=3.0,
                    iteration=None, layout=_layout_of(sorted(flats[0]), where), where=where,
                )  # fmt: skip
                tp = args.get("tensor_model_parallel_size")
                if isinstance(tp, int) and tp != len(flats):
                    raise UserError(f"{src}: the config says tensor_model_parallel_size={tp}, but {len(flats)} rank(s) are stored")
            else:
                ckpt = load_torch_dist(scratch / "model_weights", where, key_prefix="model.")
                ckpt.args = {**args, **({} if ckpt.args is None else dict(vars(ckpt.args)) if hasattr(ckpt.args, "__dict__") else ckpt.args)}
            if lowercase is None:
                lowercase = _lowercase(config)
            write_hf_folder(ckpt, tmp, src, vocab_file=vocab_file, lowercase=lowercase, num_attention_heads=num_attention_heads)
            del ckpt
            shutil.rmtree(scratch, ignore_errors=True)
    return out
