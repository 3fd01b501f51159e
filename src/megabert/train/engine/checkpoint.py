"""Training checkpoints: written atomically, the last K kept, found again by ``--resume auto``.

Layout of one checkpoint, ``OUT/checkpoints/step-00000100/``::

    model/               the model as a Hugging Face folder (config.json + model.safetensors),
                         plus whatever the job adds (the tokenizer files for pretraining)
    trainer_state.pt     optimizer, LR scheduler, grad scaler, RNG states (python, numpy, torch,
                         CUDA) per rank, and the data position (micro-batches / samples consumed)
    trainer_state.json   the same position in readable form, the model config and the run's
                         signature (settings a resume must not change); written last

The folder is assembled under a temporary name and renamed into place only when complete
(:func:`megabert.utils.atomic_folder`), so a process killed at any moment (SIGKILL included)
leaves either the new checkpoint or none, never a half-written one; :func:`list_checkpoints`
also ignores any folder that lacks ``trainer_state.json``. Old checkpoints are removed by a
rename to a hidden name first, so a kill during deletion cannot leave a broken one visible.

One capability serves one process and many: a :class:`CheckpointManager` (a run's checkpoint
config, its output folder and its process layout) saves, finds, resumes and prunes. The
Trainer hands it a :class:`TrainingSnapshot` of its state; the on-disk format behind it is the
layout's (``DistributedHooks.checkpoint_format()``): :class:`SingleProcessFormat` here, the
sharded DCP format of :mod:`megabert.train.distributed.distributed_checkpoint` under torchrun.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from megabert.errors import UserError
from megabert.utils import atomic_folder

if TYPE_CHECKING:
    from megabert.train.engine.trainer import DistributedHooks

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.pt"
INFO_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")
FORMAT_VERSION = 1
# Config keys that describe how a model is run or saved, not what it is: a resume may change them.
_RUNTIME_CONFIG_KEYS = ("architectures", "torch_dtype", "return_dict", "output_attentions", "output_hidden_states", "use_cache")
# Config keys a model fills in on its first forward pass when unset (a classification head sets
# problem_type from its labels): a checkpoint may hold them where a fresh model does not yet.
_FIRST_FORWARD_CONFIG_KEYS = ("problem_type",)


class IncompatibleCheckpoint(UserError):
    """A checkpoint that is whole but was written for another model, run or layout."""


@dataclass
class CheckpointConfig:
    """When to write checkpoints and where to resume from."""

    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end / on a signal)
    keep_last: int = 3  # how many checkpoints to keep (older ones are deleted)
    resume: str | None = None  # a checkpoint folder, an output folder, or "auto" (latest in OUT)
    save_on_signal: bool = True  # SIGINT/SIGTERM: finish the step, checkpoint, stop
    save_at_end: bool = True  # a checkpoint when max_steps / the time limit is reached

    def validate(self) -> None:
        if self.save_every < 0:
            raise UserError(f"save every must be >= 0 steps, got {self.save_every}")
        if self.keep_last < 1:
            raise UserError(f"keep last must be >= 1 checkpoint, got {self.keep_last}")


@dataclass
class TrainState:
    """Where the run is: restored exactly by a resume."""

    step: int = 0  # optimizer updates done
    micro_batches: int = 0  # micro-batches consumed from the batch source (the data position)
    samples: int = 0  # examples consumed (all ranks)
    tokens: int = 0  # real tokens consumed (all ranks)
    train_seconds: float = 0.0  # time spent in the loop, over all sessions


@dataclass
class TrainingSnapshot:
    """What a checkpoint takes from a run and gives back (from :meth:`Trainer.snapshot`).

    The objects are the run's own: a save reads them, a load restores them in place (and the
    RNG states) and returns the restored position.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler (state_dict / load_state_dict)
    scaler: Any | None  # torch.amp.GradScaler under fp16, else None
    position: TrainState
    precision: str
    model_config: dict[str, Any] | None  # model_config_record(model): what a resume must match
    signature: dict[str, Any]  # the run settings a resume must not change
    grad_accum: int
    micro_batch_samples: int | None = None  # samples per micro-batch over all DP ranks, if the source says
    save_extras: Callable[[Path], None] | None = None  # adds files beside the weights (the tokenizer)


def model_config_record(model: nn.Module) -> dict[str, Any] | None:
    """The model config as a checkpoint records it (what a resume must match), or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    values = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_CONFIG_KEYS}
    return json.loads(json.dumps(values, default=str))  # the form it has after a JSON round trip


def snapshot_info(snapshot: Any) -> dict[str, Any]:
    """What a checkpoint's info record says of the run (both formats): position, precision, config, signature."""
    position = snapshot.position
    return {
        "micro_batches": position.micro_batches,
        "samples": position.samples,
        "tokens": position.tokens,
        "train_seconds": position.train_seconds,
        "precision": snapshot.precision,
        "model_config": snapshot.model_config,
        "signature": snapshot.signature,
    }


def position_record(position: TrainState) -> dict[str, int]:
    """The data position as trainer_state.pt stores it."""
    return {
        "step": position.step,
        "micro_batches": position.micro_batches,
        "samples": position.samples,
        "tokens": position.tokens,
    }


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose last-written file exists (the atomic rename guarantees the rest)."""
    return (folder / INFO_FILE).is_file() and (folder / STATE_FILE).is_file() and (folder / MODEL_DIR).is_dir()


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (``OUT/checkpoints``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def clean_partial(root: str | os.PathLike) -> None:
    """Remove the temp folders a killed save or prune left behind (``.step-*.partial``, ``.step-*.deleting``)."""
    root = Path(root)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(".step-") and child.name.endswith((".partial", ".deleting")):
            shutil.rmtree(child, ignore_errors=True)


def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """``relative path -> bytes`` of every file under a checkpoint folder but its INFO_FILE.

    Recorded in trainer_state.json when the checkpoint is written, so that a file truncated or
    lost afterwards (a full disk during a copy, a partial rsync) is found before loading.
    """
    folder = Path(folder)
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != INFO_FILE:
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def _safetensors_damage(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (its header says more bytes than it has), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors header"
            length = int.from_bytes(head, "little")
            if length > size - 8:
                return f"{path.name} is {size:,} bytes, shorter than its own header says ({length:,} header bytes)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{path.name}: unreadable safetensors header ({exc})"
    if not isinstance(header, dict):
        return f"{path.name}: unreadable safetensors header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{path.name} is {size:,} bytes, its header needs {expected:,} (truncated)"
    return None


def checkpoint_damage(folder: str | os.PathLike) -> str | None:
    """What is wrong with a complete-looking checkpoint folder, or None when it looks intact.

    Cheap checks, no tensors loaded: trainer_state.json parses; every file it lists has the
    size it had when saved (checkpoints written since sizes are recorded); trainer_state.pt is
    a whole zip (its directory is at the end, so a truncated file fails); each safetensors
    file holds the bytes its header promises.
    """
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{INFO_FILE} is not readable ({exc})"
    if not isinstance(info, dict):
        return f"{INFO_FILE} is not a JSON object"
    for name, size in sorted((info.get("files") or {}).items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual:,} bytes, {size:,} when it was saved"
    import zipfile

    try:
        with zipfile.ZipFile(folder / STATE_FILE):
            pass
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{STATE_FILE} is not a whole torch file ({exc})"
    for path in sorted((folder / MODEL_DIR).glob("*.safetensors")):
        problem = _safetensors_damage(path)
        if problem is not None:
            return f"{MODEL_DIR}/{problem}"
    return None


def resolve_resume(
    spec: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    on_damaged: Callable[[Path, str, Path | None], None] | None = None,
) -> Path | None:
    """The checkpoint folder ``--resume`` names, or None to start fresh.

    ``auto``: the latest intact checkpoint in ``OUT/checkpoints`` (None if there is none, so
    the same command starts or continues a run). A damaged one (:func:`checkpoint_damage`) is
    passed over for the one before it, and ``on_damaged(damaged, why, used_instead)`` says so;
    when every checkpoint is damaged it is a UserError naming the latest. A path: a checkpoint
    folder, or an output folder whose latest checkpoint is taken; a damaged one is a UserError
    that names it and offers the previous intact one. Anything else is a UserError saying what
    was found.
    """
    if spec is None or spec == "":
        return None
    if str(spec) == "auto":
        found = [folder for _, folder in reversed(list_checkpoints(Path(output_dir) / CHECKPOINTS_DIR))]
        damaged: list[tuple[Path, str]] = []
        for folder in found:
            why = checkpoint_damage(folder)
            if why is None:
                for bad, reason in damaged:
                    if on_damaged is not None:
                        on_damaged(bad, reason, folder)
                return folder
            damaged.append((folder, why))
        if damaged:
            bad, reason = damaged[0]
            raise UserError(
                f"--resume auto: the latest checkpoint {bad} is damaged ({reason}), and so "
                f"{'is every earlier one' if len(damaged) > 1 else 'there is no earlier one'}: nothing to resume "
                "from; start a new run in another output folder"
            )
        return None
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--resume {path}: no such checkpoint folder")
    chosen = None
    if path.is_dir() and is_complete(path):
        chosen = path
    else:
        for root in (path / CHECKPOINTS_DIR, path):
            chosen = latest_checkpoint(root)
            if chosen is not None:
                break
    if chosen is None:
        raise UserError(
            f"--resume {path}: not a complete checkpoint (expected {MODEL_DIR}/, {STATE_FILE} and {INFO_FILE}, "
            f"or an output folder with {CHECKPOINTS_DIR}/step-N inside)"
        )
    why = checkpoint_damage(chosen)
    if why is not None:
        earlier = previous_checkpoint(chosen)
        offer = f"; the previous intact one is {earlier}: pass --resume {earlier}" if earlier is not None else ""
        raise UserError(f"--resume {path}: checkpoint {chosen} is damaged ({why}){offer}")
    return chosen


def previous_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The intact checkpoint before ``folder`` in the same checkpoints folder, or None."""
    folder = Path(folder)
    earlier = [f for _, f in list_checkpoints(folder.parent) if f.name < folder.name]
    for candidate in reversed(earlier):
        if checkpoint_damage(candidate) is None:
            return candidate
    return None


# ----------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, in tensors and plain types only.

    (numpy's key array is stored as a tensor so that the file loads with ``weights_only``.)
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- model files
def save_model(model: nn.Module, folder: Path) -> None:
    """The model's weights into ``folder``: ``save_pretrained`` (HF layout) when it has one."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        from safetensors.torch import save_model as save_safetensors_model

        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors_model(model, str(folder / "model.safetensors"))


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load weights written by :func:`save_model` into ``model`` (in place, shapes checked)."""
    if hasattr(model, "load_checkpoint_state"):
        from megabert.modeling.pretrained import read_state_dict

        model.load_checkpoint_state(read_state_dict(folder), source=str(folder))
    else:
        from safetensors.torch import load_model as load_safetensors_model

        load_safetensors_model(model, str(folder / "model.safetensors"))


# ------------------------------------------------------------------------ save and load
def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    state: Mapping[str, Any],
    info: Mapping[str, Any],
    save_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; returns its folder.

    ``state`` (tensors, optimizer state...) goes to trainer_state.pt, ``info`` (JSON-able) to
    trainer_state.json; ``save_extras(model_folder)`` may add files beside the weights.
    An existing checkpoint of the same step is replaced only once the new one is complete.
    """
    target = Path(root) / checkpoint_name(step)
    with atomic_folder(target, overwrite=True) as tmp:
        model_dir = tmp / MODEL_DIR
        save_model(model, model_dir)
        if save_extras is not None:
            save_extras(model_dir)
        torch.save(dict(state), tmp / STATE_FILE)
        record = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(), **info}
        record["files"] = file_sizes(tmp)  # checked by checkpoint_damage on resume
        (tmp / INFO_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return target


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The readable part of a checkpoint (step, data position, model config, run signature)."""
    path = Path(folder) / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {folder}: cannot read {INFO_FILE} ({exc})") from None


def load_state(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The tensors part of a checkpoint (trainer_state.pt), loaded without running pickled code."""
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {folder}: cannot load {STATE_FILE} ({first})") from None


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns what was removed."""
    removed = []
    found = list_checkpoints(root)
    for _, folder in found[: max(0, len(found) - keep_last)]:
        # Hide it first: a kill during rmtree then leaves a hidden leftover, not a broken checkpoint.
        hidden = folder.with_name(f".{folder.name}.deleting")
        os.replace(folder, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        removed.append(folder)
    return removed


# Signature keys added after FORMAT_VERSION 1 checkpoints were first written: a checkpoint
# without one was made before megabert recorded it, and resumes (nothing to compare with).
ADDED_SIGNATURE_KEYS = ("data",)


def _comparable(value: Any) -> Any:
    """A setting as compared on resume: a located one (a dict with a "prefix") by its contents only.

    So that a dataset copied elsewhere (node-local disk, another mount) resumes, while another
    dataset under any name does not.
    """
    if isinstance(value, Mapping) and "prefix" in value:
        return {k: v for k, v in value.items() if k != "prefix"}
    return value


def _shown(value: Any) -> str:
    if isinstance(value, Mapping) and "prefix" in value:
        rest = ", ".join(str(v) for k, v in sorted(value.items()) if k != "prefix")
        return f"{value['prefix']} ({rest})" if rest else str(value["prefix"])
    return repr(value)


def describe_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], added: tuple[str, ...] = ()
) -> list[str]:
    """``key: saved -> current`` for every key whose value differs (missing keys count).

    Keys in ``added`` that ``saved`` lacks are skipped (settings recorded only by newer versions).
    A located setting (a dict with a ``prefix``) differs when its other entries do.
    """
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in added and key not in saved:
            continue
        a, b = saved.get(key), current.get(key)
        if _comparable(a) != _comparable(b):
            diffs.append(f"{key}: {_shown(a)} in the checkpoint, {_shown(b)} now")
    return diffs


def check_compatible(
    folder: Path, info: Mapping[str, Any], model_config: Mapping[str, Any] | None, signature: Mapping[str, Any]
) -> None:
    """Raise UserError when a checkpoint was made for another model config or run signature."""
    problems = []
    if model_config is not None and info.get("model_config") is not None:
        problems += describe_differences(info["model_config"], model_config)
    problems += describe_differences(info.get("signature") or {}, dict(signature), ADDED_SIGNATURE_KEYS)
    if problems:
        shown = "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        raise IncompatibleCheckpoint(
            f"cannot resume from {folder}: it was written for a different configuration ({shown}). "
            "Resume with the same settings, or start a new run in another output folder."
        )


# ------------------------------------------------------------------- formats and manager
class CheckpointFormat(Protocol):
    """How one process layout writes a checkpoint folder and reads one back."""

    def save(self, snapshot: TrainingSnapshot, target: Path) -> Path | None:
        """Write checkpoint folder ``target`` (every rank calls it); the folder on the main rank, else None."""
        ...

    def load(self, folder: Path, snapshot: TrainingSnapshot) -> TrainState:
        """Restore ``snapshot``'s objects and the RNG states from ``folder`` (every rank); the saved position."""
        ...


class SingleProcessFormat:
    """The layout of this module's docstring: the main rank writes everything, the others wait.

    ``hooks`` (the run's :class:`DistributedHooks`) gathers every rank's RNG state and
    (de)serialises the optimizer. A load accepts only a checkpoint of the same model and
    signature (world size and grad accum included).
    """

    def __init__(self, hooks: "DistributedHooks") -> None:
        self.hooks = hooks

    def save(self, snapshot: TrainingSnapshot, target: Path) -> Path | None:
        hooks, position = self.hooks, snapshot.position
        rng_states = hooks.gather_object(capture_rng_state())
        state = {
            "optimizer": hooks.optimizer_state_dict(snapshot.optimizer),
            "scheduler": snapshot.scheduler.state_dict(),
            "scaler": snapshot.scaler.state_dict() if snapshot.scaler is not None else None,
            "rng": rng_states,
            "position": position_record(position),
        }
        if not hooks.is_main:
            return None
        return save_checkpoint(
            target.parent, position.step, snapshot.model, state, snapshot_info(snapshot), snapshot.save_extras
        )

    def load(self, folder: Path, snapshot: TrainingSnapshot) -> TrainState:
        info = read_info(folder)
        current = snapshot.model_config
        saved_config = info.get("model_config")
        if current is not None and isinstance(saved_config, dict):
            for key in _FIRST_FORWARD_CONFIG_KEYS:
                if current.get(key) is None or saved_config.get(key) is None:
                    info = {**info, "model_config": {**saved_config, key: current.get(key)}}
                    saved_config = info["model_config"]
        check_compatible(folder, info, current, snapshot.signature)
        load_model_weights(snapshot.model, folder / MODEL_DIR)
        state = load_state(folder)
        self.hooks.load_optimizer_state_dict(snapshot.optimizer, state["optimizer"])
        snapshot.scheduler.load_state_dict(state["scheduler"])
        if snapshot.scaler is not None and state.get("scaler"):
            snapshot.scaler.load_state_dict(state["scaler"])
        rng_states, rank = state["rng"], self.hooks.rank
        restore_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
        return saved_position(state["position"], info)


def saved_position(position: Mapping[str, Any], info: Mapping[str, Any], micro_batches: int | None = None) -> TrainState:
    """The TrainState a checkpoint recorded (``micro_batches``: the data position converted to this layout)."""
    return TrainState(
        step=int(position["step"]),
        micro_batches=int(position["micro_batches"]) if micro_batches is None else micro_batches,
        samples=int(position["samples"]),
        tokens=int(position["tokens"]),
        train_seconds=float(info.get("train_seconds", 0.0)),
    )


class CheckpointManager:
    """The checkpoints of one run, for one process or many: save, load, latest, resume.

    ``OUT/checkpoints`` holds them; ``layout`` (the run's :class:`DistributedHooks`) says which
    rank writes and, through ``layout.checkpoint_format()``, the on-disk format. It works on a
    :class:`TrainingSnapshot`, never on the Trainer.
    """

    def __init__(self, config: CheckpointConfig, output_dir: str | os.PathLike, layout: "DistributedHooks") -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / CHECKPOINTS_DIR
        self.layout = layout
        self.format: CheckpointFormat = layout.checkpoint_format()

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.folder)

    def clean_partial(self) -> None:
        """Remove what a killed save or prune left behind (the main rank calls it)."""
        clean_partial(self.folder)

    def save(self, snapshot: TrainingSnapshot) -> Path | None:
        """Write checkpoint ``snapshot.position.step`` and keep the last ``keep_last`` (every rank calls it).

        Returns the folder on the main rank, None on the others; all ranks return once it is in place.
        """
        folder = self.format.save(snapshot, self.folder / checkpoint_name(snapshot.position.step))
        if self.layout.is_main:
            prune_checkpoints(self.folder, self.config.keep_last)
        self.layout.barrier()
        return folder

    def load(self, folder: str | os.PathLike, snapshot: TrainingSnapshot) -> TrainState:
        """Restore ``snapshot`` from ``folder`` (every rank calls it); returns the saved position."""
        return self.format.load(Path(folder), snapshot)

    def resume(self, snapshot: TrainingSnapshot) -> tuple[Path, TrainState] | None:
        """Restore ``snapshot`` from the checkpoint ``config.resume`` names; (folder, position), or None.

        None is a fresh start, refused when ``OUT/checkpoints`` already holds a run's checkpoints.
        ``--resume auto`` passes over damaged checkpoints (:func:`resolve_resume`) and says so.
        """
        folder = resolve_resume(self.config.resume, self.output_dir, self._on_damaged)
        if folder is None:
            existing = self.latest()
            if existing is not None:
                raise UserError(
                    f"{self.output_dir} already holds checkpoints of a run (latest {existing.name}): pass "
                    "--resume auto to continue it, or choose another output folder"
                )
            return None
        try:
            return folder, self.load(folder, snapshot)
        except IncompatibleCheckpoint:
            raise
        except UserError as exc:
            # A file that passed the cheap checks but does not load (garbled contents): name an
            # older checkpoint to try. Not tried here: the failed load may have changed some state.
            earlier = previous_checkpoint(folder)
            if earlier is None:
                raise
            raise UserError(f"{exc}; the checkpoint before it, {earlier}, looks intact: resume from it with --resume {earlier}") from None

    def _on_damaged(self, damaged: Path, why: str, instead: Path | None) -> None:
        """``--resume auto`` passes over a damaged checkpoint: say which, why, and what is used instead."""
        if self.layout.is_main:
            print(
                f"warning: checkpoint {damaged} is damaged ({why}); resuming from the previous intact one, "
                f"{instead}, instead (the steps after it are trained again)",
                file=sys.stderr,
                flush=True,
            )
