"""Find the shard files of a Megatron-LM checkpoint: an NGC zip, one ``.pt`` file, or a save folder.

A Megatron-LM save folder looks like::

    latest_checkpointed_iteration.txt      # "release" or an iteration number, e.g. "2000"
    iter_0002000/   (or release/)
        mp_rank_00/model_optim_rng.pt      # tensor-parallel rank 0 (no pipeline parallelism)
        mp_rank_01/model_optim_rng.pt
      or
        mp_rank_00_000/model_optim_rng.pt  # tensor rank 00, pipeline rank 000
        mp_rank_00_001/model_optim_rng.pt

NVIDIA's NGC zips (``megatron_bert_345m_v0_1_{cased,uncased}.zip``) hold
``release/mp_rank_00/model_optim_rng.pt``. Zip members are checked (no absolute paths, no
``..``) and only the checkpoint files are extracted, into a scratch folder the caller owns.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from megabert.errors import UserError

__all__ = ["CHECKPOINT_NAME", "TRACKER_NAME", "ShardSet", "find_shards", "safe_zip_members"]

CHECKPOINT_NAME = "model_optim_rng.pt"
TRACKER_NAME = "latest_checkpointed_iteration.txt"

# mp_rank_XX (tensor rank) or mp_rank_XX_YYY (tensor rank, pipeline rank)
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")
_RANK_DIR_ANY = re.compile(r"^mp_rank_\d+(?:_\d+)*$")
_ITER_DIR = re.compile(r"^(release|iter_\d+)$")


@dataclass
class ShardSet:
    """The checkpoint files of one saved iteration, by (pipeline rank, tensor rank)."""

    files: dict[tuple[int, int], Path]
    tensor_parallel: int
    pipeline_parallel: int
    where: str  # what the user pointed at, for messages
    single_file: bool = False  # SRC was one .pt file (not a folder or zip)

    def rank_name(self, pp: int, tp: int) -> str:
        """The folder name Megatron-LM gives this rank."""
        return f"mp_rank_{tp:02d}" if self.pipeline_parallel == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def safe_zip_members(archive: zipfile.ZipFile, zip_path: Path) -> list[str]:
    """All member names of ``archive``, after refusing any that could escape the extraction folder.

    Refused: absolute paths (``/x``, ``C:\\x``), ``..`` components, and backslashes (Windows
    separators that would hide a ``..``).
    """
    names = archive.namelist()
    for name in names:
        parts = PurePosixPath(name).parts
        if (
            name.startswith(("/", "\\"))
            or re.match(r"^[A-Za-z]:", name)
            or "\\" in name
            or ".." in parts
        ):
            raise UserError(
                f"refusing to read {zip_path}: zip entry {name!r} has an absolute path or '..' "
                "(it would write outside the extraction folder)"
            )
    return names


def _extract_zip(zip_path: Path, scratch: Path) -> Path:
    """Extract the checkpoint files of ``zip_path`` under ``scratch``; return the folder to search."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{zip_path} is not a valid zip archive ({exc})") from None
    with archive:
        names = safe_zip_members(archive, zip_path)
        wanted = [
            n for n in names
            if not n.endswith("/") and PurePosixPath(n).name in (CHECKPOINT_NAME, TRACKER_NAME)
        ]
        if not any(PurePosixPath(n).name == CHECKPOINT_NAME for n in wanted):
            shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            raise UserError(
                f"{zip_path} holds no Megatron checkpoint: no {CHECKPOINT_NAME} inside "
                f"(it has: {shown or 'nothing'})"
            )
        root = scratch / "unzipped"
        for name in wanted:
            target = root.joinpath(*PurePosixPath(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Streamed copy: a 700 MB member never sits in memory.
            with archive.open(name) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, length=16 << 20)
    # The NGC zip has one top folder (or none); search from the shallowest tracker/rank level.
    return root


def _iteration_folder(folder: Path) -> Path:
    """The folder holding the mp_rank_* folders, following the tracker file when there is one."""
    tracker = folder / TRACKER_NAME
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8", errors="replace").strip()
        if text == "release":
            chosen = folder / "release"
        elif text.isdigit():
            chosen = folder / f"iter_{int(text):07d}"
        else:
            raise UserError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
        if not chosen.is_dir():
            raise UserError(f"{tracker} names iteration {text!r}, but {chosen} does not exist")
        return chosen
    if (folder / CHECKPOINT_NAME).is_file() or any(
        _RANK_DIR_ANY.match(p.name) for p in folder.iterdir() if p.is_dir()
    ):
        return folder
    candidates = sorted(
        p for p in folder.iterdir()
        if p.is_dir() and _ITER_DIR.match(p.name) and any(_RANK_DIR_ANY.match(q.name) for q in p.iterdir())
    )
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:5])
        raise UserError(
            f"{folder} holds several iterations ({names}) and no {TRACKER_NAME}: point SRC at one of them"
        )
    # Searching one level down covers an unzipped NGC archive with a top folder.
    nested = [p for p in folder.iterdir() if p.is_dir()]
    if len(nested) == 1:
        return _iteration_folder(nested[0])
    raise UserError(
        f"no Megatron checkpoint in {folder}: expected {TRACKER_NAME}, iter_*/ or release/ folders, "
        f"mp_rank_* folders, or a {CHECKPOINT_NAME} file"
    )


def _shards_in(iteration: Path, where: str) -> ShardSet:
    if (iteration / CHECKPOINT_NAME).is_file():  # SRC was an mp_rank folder itself
        return ShardSet({(0, 0): iteration / CHECKPOINT_NAME}, 1, 1, where)
    if any(iteration.glob("*.distcp")) or (iteration / ".metadata").exists():
        # convert_megatron_to_hf reads these (torch_dist.py) when SRC is the iteration folder or
        # its save folder; reached only from somewhere else (inside a zip, one level down).
        raise UserError(
            f"{iteration} is a distributed (torch_dist) checkpoint: point SRC at {iteration} itself "
            "or at the save folder holding latest_checkpointed_iteration.txt"
        )
    ranks: dict[tuple[int, int], Path] = {}
    styles: set[bool] = set()
    for sub in sorted(iteration.iterdir()):
        if not sub.is_dir() or not _RANK_DIR_ANY.match(sub.name):
            continue
        match = _RANK_DIR.match(sub.name)
        if match is None:
            raise UserError(
                f"{sub}: rank folders with more than two numbers (expert parallelism) are not supported"
            )
        tp, pp = int(match.group(1)), int(match.group(2) or 0)
        styles.add(match.group(2) is not None)
        ranks[(pp, tp)] = sub
    if not ranks:
        raise UserError(f"no mp_rank_* folders in {iteration}")
    if len(styles) > 1:
        raise UserError(f"{iteration} mixes mp_rank_XX and mp_rank_XX_YYY folders; it is not one checkpoint")
    tp_size = 1 + max(tp for _, tp in ranks)
    pp_size = 1 + max(pp for pp, _ in ranks)
    shards = ShardSet({}, tp_size, pp_size, where)
    missing = [
        shards.rank_name(pp, tp) for pp in range(pp_size) for tp in range(tp_size) if (pp, tp) not in ranks
    ]
    if missing:
        raise UserError(
            f"{iteration} is missing rank folder(s) {', '.join(missing[:6])} "
            f"(found {len(ranks)} of {tp_size} tensor x {pp_size} pipeline ranks)"
        )
    for key, sub in ranks.items():
        path = sub / CHECKPOINT_NAME
        if not path.is_file():
            raise UserError(f"{sub} has no {CHECKPOINT_NAME}: that rank's shard is missing")
        shards.files[key] = path
    return shards


def find_shards(src: str | Path, scratch: Path) -> ShardSet:
    """Locate every shard of the checkpoint at ``src`` (zip, ``.pt`` file, or folder).

    A zip is extracted under ``scratch`` (which the caller removes). Raises :class:`UserError`
    (or FileNotFoundError) with the path and the problem for anything that is not one
    complete checkpoint.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"Megatron checkpoint {src} does not exist")
    where = str(src)
    if src.is_file():
        if zipfile.is_zipfile(src) and not _is_torch_zip(src):
            return _shards_in(_iteration_folder(_extract_zip(src, scratch)), where)
        return ShardSet({(0, 0): src}, 1, 1, where, single_file=True)
    return _shards_in(_iteration_folder(src), where)


def _is_torch_zip(path: Path) -> bool:
    """True for a ``torch.save`` file (itself a zip whose records include ``data.pkl``)."""
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
