"""Load pickled PyTorch checkpoints (Megatron-LM's ``model_optim_rng.pt``) without running their code.

A pickle is a small program: its ``GLOBAL``/``REDUCE`` instructions import and call whatever
the file names, which is how a malicious checkpoint runs code on ``torch.load``. We load with
torch's restricted unpickler (``torch.load(weights_only=True)``), which only resolves names on
an allowlist and never imports a module on the file's behalf. Its default list covers tensors,
storages (CPU and CUDA, new zip and legacy formats), dtypes, ``torch.Size``/``device``,
``OrderedDict``, sets and bytes; this module adds what Megatron-LM checkpoints also hold:

* ``argparse.Namespace`` (the training ``args``);
* numpy arrays, dtypes and scalars (the saved ``np_rng_state``), under both numpy 1 and 2 names;
* ``io.BytesIO`` (Transformer Engine's ``_extra_state`` in older releases);
* any name under ``megatron.`` (e.g. ``args.model_type = ModelType.encoder_or_decoder``) is
  replaced by an inert :class:`MegatronObject` that only records its name and arguments, so
  Megatron-LM need not be installed and none of its code runs.

Anything else stops the load with a :class:`~megabert.errors.UserError` that names the global,
even if another library in the process has widened torch's global allowlist: the load uses
this module's list only.
Files in the zip format are memory-mapped, so a tensor's bytes are read only when used.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megabert.errors import UserError

__all__ = ["MegatronObject", "check_torch_file", "describe_load_error", "globals_in_checkpoint", "safe_load"]

# Globals that are allowed beyond torch's own weights-only list, as (object, pickled name).
# numpy moved `numpy.core` to `numpy._core` in 2.0; old files use the first name, new the second.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # type: ignore[attr-defined]
_EXTRA_GLOBALS: list[tuple[Any, str]] = [
    (argparse.Namespace, "argparse.Namespace"),
    (io.BytesIO, "_io.BytesIO"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
]
for _prefix in ("numpy.core", "numpy._core"):
    _EXTRA_GLOBALS.append((_NUMPY_CORE.multiarray._reconstruct, f"{_prefix}.multiarray._reconstruct"))
    _EXTRA_GLOBALS.append((_NUMPY_CORE.multiarray.scalar, f"{_prefix}.multiarray.scalar"))
# numpy >= 1.25 pickles a dtype's class (e.g. numpy.dtypes.UInt32DType) next to the dtype.
for _code in "?bBhHiIlLqQefdgFDGSUV":
    _dtype_class = type(np.dtype(_code))
    _EXTRA_GLOBALS.append((_dtype_class, f"numpy.dtypes.{_dtype_class.__name__}"))

# Names replaced by inert placeholders instead of being imported.
_PLACEHOLDER_PREFIXES = ("megatron.",)

_ALLOWED_SUMMARY = (
    "a checkpoint may only hold tensors, storages, containers, numbers, strings, "
    "argparse.Namespace, numpy arrays and Megatron enums"
)


class MegatronObject:
    """Stand-in for an object of a Megatron-LM class (usually an enum member in ``args``).

    It runs no Megatron code: it keeps the class name (:attr:`megatron_name`) and whatever the
    pickle passed to build it, which is enough to print or compare it.
    """

    megatron_name = "megatron.<unknown>"
    # Class-level defaults: a pickle may build one without calling __init__ (NEWOBJ).
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """The first constructor argument: an enum member's value."""
        return self.args[0] if self.args else None

    def __repr__(self) -> str:
        inner = ", ".join(repr(a) for a in self.args)
        return f"<{self.megatron_name}({inner})>"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MegatronObject)
            and other.megatron_name == self.megatron_name
            and other.args == self.args
        )

    def __hash__(self) -> int:
        return hash((self.megatron_name, self.args))


def _placeholder_class(full_name: str) -> type[MegatronObject]:
    """A MegatronObject subclass that remembers ``full_name`` (one class per pickled name)."""
    short = full_name.rsplit(".", 1)[-1]
    return type(short, (MegatronObject,), {"megatron_name": full_name, "__module__": __name__})


def globals_in_checkpoint(path: str | os.PathLike) -> list[str]:
    """The ``module.name`` globals a checkpoint's pickle refers to, found without unpickling it.

    Reads opcodes only (``pickletools.genops`` never imports or calls anything). Zip format:
    the ``data.pkl`` record. Legacy format: the file starts with four pickles (magic number,
    protocol, system info, the object) before the storage keys and raw tensor bytes.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        found: list[str] = []
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("data.pkl"):
                    found.extend(_scan_globals(io.BytesIO(archive.read(name)), count=1))
        return found
    with open(path, "rb") as handle:
        return _scan_globals(handle, count=4)


def _scan_globals(handle: io.BufferedIOBase | io.BytesIO, count: int) -> list[str]:
    names: list[str] = []
    for _ in range(count):
        strings: list[str] = []
        try:
            for opcode, arg, _pos in pickletools.genops(handle):
                if opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
        except (ValueError, EOFError):
            break  # not a pickle (or the end): the load itself reports what is wrong
    return names


def _placeholders_for(names: list[str]) -> list[tuple[type[MegatronObject], str]]:
    wanted = sorted({n for n in names if n.startswith(_PLACEHOLDER_PREFIXES)})
    return [(_placeholder_class(name), name) for name in wanted]


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")
_OPCODE_IN_MESSAGE = re.compile(r"Unsupported operand (\d+)")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Lines of torch's messages that are advice about loading the file unsafely, or about torch
# itself: never passed on (megabert does not load a refused file with weights_only=False).
_TORCH_ADVICE = ("weights_only", "add_safe_globals", "safe_globals(", "file an issue", "documentation of torch.load",
                 "can still be loaded", "Alternatively")


def _plain(text: str) -> str:
    """``text`` without terminal escape codes (torch puts bold ANSI codes into some messages)."""
    return _ANSI_ESCAPE.sub("", text)


def describe_load_error(path: str | os.PathLike, exc: BaseException) -> str:
    """One plain-text line for a failed ``torch.load(weights_only=True)``: what was refused and why.

    Names the global (or pickle instruction) the restricted unpickler refused, and says that
    the file is not loaded because unpickling it could run code. Terminal escape codes and
    torch's advice to retry with ``weights_only=False`` are dropped.
    """
    text = _plain(str(exc))
    match = _GLOBAL_IN_MESSAGE.search(text)
    if match:
        return (
            f"refusing to load {path}: its pickle refers to {match.group(1)}, which is not allowed "
            f"({_ALLOWED_SUMMARY}); it is not loaded because unpickling it would import and run code "
            "that the file names, so the file may be malicious or is not a plain checkpoint"
        )
    match = _OPCODE_IN_MESSAGE.search(text)
    if match:
        return (
            f"refusing to load {path}: its pickle uses instruction {match.group(1)}, which the safe loader "
            "does not run (it is not a file torch.save wrote, or a damaged one)"
        )
    lines = [
        line.strip() for line in text.splitlines()
        if line.strip() and not any(advice in line for advice in _TORCH_ADVICE)
    ]  # fmt: skip
    detail = next((line for line in reversed(lines) if "WeightsUnpickler error" in line), "")
    if detail:
        detail = detail.replace("WeightsUnpickler error:", "").strip().rstrip(".")
        return f"refusing to load {path}: {detail} ({_ALLOWED_SUMMARY})"
    last = lines[-1] if lines else type(exc).__name__
    return f"{path} is not a readable PyTorch checkpoint ({last})"


def _starts_with_torch_magic(handle: io.BufferedIOBase) -> bool:
    """Whether the first pickle of a file is torch's legacy-format magic number (read as opcodes only)."""
    try:
        for opcode, arg, _pos in pickletools.genops(handle):
            if opcode.name in ("LONG1", "LONG4", "INT", "LONG"):
                return arg == torch.serialization.MAGIC_NUMBER
            if opcode.name not in ("PROTO", "FRAME"):
                return False
    except (ValueError, EOFError):
        return False
    return False


def check_torch_file(path: str | os.PathLike) -> bool:
    """Raise UserError unless ``path`` looks like a file ``torch.save`` wrote; return whether it is a zip.

    ``torch.save`` writes a zip archive (or, in the legacy format, a pickle of its magic number
    first). A bare pickle (``pickle.dump``) is refused here, before any unpickling: torch cannot
    read it anyway, and unpickling arbitrary pickles runs code stored in them.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        head = handle.read(2)
        handle.seek(0)
        legacy = head[:1] == b"\x80" and _starts_with_torch_magic(handle)  # type: ignore[arg-type]
    if not head:
        raise UserError(f"{path} is empty (0 bytes): it is not a PyTorch checkpoint (truncated download?)")
    if head == b"PK":
        raise UserError(f"{path} is a damaged zip archive (truncated download?): it cannot be read")
    if head[:1] != b"\x80":
        raise UserError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    if not legacy:
        raise UserError(
            f"refusing to load {path}: it is a bare pickle, not a file torch.save wrote (a zip archive); "
            "it is not loaded because unpickling a bare pickle can run any code stored in it; "
            "re-save the weights with torch.save() or as safetensors"
        )
    return False


def safe_load(path: str | os.PathLike, mmap: bool | None = None) -> Any:
    """Unpickle a ``torch.save`` file without executing code from it; tensors land on the CPU.

    ``mmap`` (default: whenever the file is in the zip format) maps the file instead of
    reading it, so memory grows only with the tensors actually touched. Raises
    :class:`UserError` naming the offending global for anything outside the allowlist (see the
    module docstring), and for files that are not PyTorch checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    is_zip = check_torch_file(path)
    if mmap is None:
        mmap = is_zip
    allowed: list[Any] = list(_EXTRA_GLOBALS)
    try:
        allowed.extend(_placeholders_for(globals_in_checkpoint(path)))
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    # Exactly our allowlist: other libraries in the process may have widened torch's global one
    # (megatron-core allowlists pathlib paths and its own classes, for instance).
    try:
        with _only_safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=bool(mmap and is_zip))
    except pickle.UnpicklingError as exc:
        raise UserError(describe_load_error(path, exc)) from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        first = _plain(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first})") from None


@contextlib.contextmanager
def _only_safe_globals(allowed: list) -> Iterator[None]:
    """torch's weights-only global allowlist set to exactly ``allowed`` inside the block, restored after."""
    others = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        torch.serialization.add_safe_globals(allowed)
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(others)


def safe_load_tensor_bytes(data: bytes, where: str) -> torch.Tensor:
    """One tensor from the bytes of a ``torch.save`` record (a torch_dist chunk), without running code.

    Only torch's own weights-only list applies (tensors and storages); anything else, or a
    record that is not a single tensor, is a :class:`UserError` naming ``where``.
    """
    try:
        with _only_safe_globals([]):
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(describe_load_error(where, exc)) from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        first = _plain(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where} is not a readable tensor record ({first})") from None
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{where} holds a {type(value).__name__}, not a tensor")
    return value


# Modules whose classes a torch.distributed.checkpoint `.metadata` pickle names: plain
# dataclasses and enums that only hold numbers, names and sizes.
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a torch_dist ``.metadata`` file needs; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        import importlib

        full = f"{module}.{name}"
        if module in _DCP_MODULES:
            value = getattr(importlib.import_module(module), name, None)
            if isinstance(value, type):  # classes (dataclasses, enums) only, never functions
                return value
        elif module == "torch":
            value = getattr(torch, name, None)
            if name == "Size" or isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
                return value
        elif full == "torch.serialization._get_layout":
            return torch.serialization._get_layout
        elif full in ("collections.OrderedDict", "builtins.set", "builtins.frozenset"):
            return {"collections.OrderedDict": __import__("collections").OrderedDict,
                    "builtins.set": set, "builtins.frozenset": frozenset}[full]  # fmt: skip
        raise pickle.UnpicklingError(f"GLOBAL {full} is not allowed in a checkpoint's .metadata")


def safe_load_dcp_metadata(path: str | os.PathLike) -> Any:
    """The ``Metadata`` of a torch.distributed.checkpoint folder (its ``.metadata`` pickle), read safely.

    Only the checkpoint-metadata dataclasses of ``torch.distributed.checkpoint``, ``torch.Size``,
    dtypes and layouts are resolved; any other global stops the load with a UserError naming it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        match = _GLOBAL_IN_MESSAGE.search(str(exc))
        if match:
            raise UserError(
                f"refusing to load {path}: its pickle refers to {match.group(1)}, which is not allowed "
                "(a .metadata file may only hold torch.distributed.checkpoint metadata, sizes and dtypes); "
                "unpickling it would import and run code that the file names"
            ) from None
        raise UserError(f"{path} is not a readable torch_dist .metadata file ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path} is not a readable torch_dist .metadata file ({type(exc).__name__}: {exc})") from None
