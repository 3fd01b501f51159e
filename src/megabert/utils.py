"""Small helpers shared across the package: atomic file and folder writes, the run lock.

Temp names. Every atomic writer works under ``.NAME.TAG.XXXXXXXX.tmp`` (a folder:
``.NAME.TAG.XXXXXXXX.partial``) beside its target ``NAME``, where ``TAG`` is
``<host hash>-<pid>`` of the writing process. A writer stopped by an exception, Ctrl-C or
SIGTERM removes its own temp; one killed outright (SIGKILL, a crash, the OOM killer) cannot,
so the next atomic write of the same target removes the leftovers whose writer is gone: same
host, and no process with that pid (:func:`remove_dead_temps`). A temp of a live process --
or of another host on a shared file system, or without a tag -- is never touched.

Write errors. A full disk, a quota, a read-only file system or a missing permission while an
atomic writer runs is raised as :class:`WriteError` naming the target file (the OS error of a
bare ``write()`` names no file, and torch / safetensors report it as their own errors).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, NoReturn

# OS errors that mean "this output cannot be written here" (not a bug): reported in one line.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


class WriteError(OSError):
    """An output file could not be written (disk full, read-only, no permission); names the target."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write_error(
    exc: BaseException,
    target: str | os.PathLike,
    probe_dir: str | os.PathLike | None = None,
    temp: str | os.PathLike | None = None,
) -> WriteError | None:
    """``exc`` as a :class:`WriteError` naming ``target`` when it is a disk/permission failure, else None.

    Recognised: an OSError with one of :data:`WRITE_ERRNOS`; a library error whose text carries
    the OS error (safetensors: "os error 28"); and a torch RuntimeError that carries none
    ("unexpected pos", "file write failed"), in which case a small probe write into
    ``probe_dir`` asks the file system itself (call it before the partial output is removed,
    while the disk is still as full as the writer left it). A file name the error carries that
    lies in the writer's ``temp`` file or folder is given as the same name under ``target``.
    """
    named = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if named and temp is not None:
        with contextlib.suppress(ValueError):
            relative = Path(named).relative_to(temp)
            named = str(Path(target) / relative) if str(relative) != "." else str(target)
    if isinstance(exc, WriteError):
        return exc if named == exc.filename else WriteError(exc.errno, exc.strerror, named)
    code = None
    if isinstance(exc, OSError):
        code = exc.errno
    elif isinstance(exc, Exception) and not isinstance(exc, ValueError):  # ValueError: megabert's UserError
        match = _OS_ERROR_IN_TEXT.search(str(exc))
        if match:
            code = int(match.group(1) or match.group(2))
        elif isinstance(exc, RuntimeError) and probe_dir is not None:
            code = _probe_write(Path(probe_dir))
    if code not in WRITE_ERRNOS:
        return None
    return WriteError(code, os.strerror(code), named or str(target))


def _probe_write(folder: Path) -> int | None:
    """The errno a 64 KiB write into ``folder`` fails with now (None: it succeeds)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".megabert-probe.", dir=folder)
    except OSError as exc:
        return exc.errno
    try:
        os.write(fd, b"\0" * 65536)
        os.fsync(fd)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None


# --------------------------------------------------------------------------------- temp names
def _writer_tag() -> str:
    """``<hash of the host name>-<pid>``: who writes a temp file (see the module docstring)."""
    host = zlib.crc32(socket.gethostname().encode("utf-8", "replace")) & 0xFFFFFFFF
    return f"{host:08x}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_dead_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files/folders of ``path`` left by writers that are gone; returns what was removed.

    Only names of this module's pattern (``.NAME.<host>-<pid>.XXXXXXXX.tmp`` / ``.partial``)
    whose host hash is this host's and whose pid no longer exists are removed, so a temp that
    a running process (here, or on another host sharing the folder) is writing is left alone.
    A reused pid keeps a leftover (safe side); the next write after that process ends removes it.
    """
    path = Path(path)
    host = _writer_tag().split("-")[0]
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.([0-9a-f]{{8}})-(\d+)\.[^./]+\.(tmp|partial)$")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or match.group(1) != host or _pid_alive(int(match.group(2))):
            continue
        target = Path(entry.path)
        if match.group(3) == "partial" and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                target.unlink()
        removed.append(target)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_writer_tag()}."


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from None


def _raise_for_temp(exc: OSError, path: Path) -> None:
    """Creating the temp of ``path`` failed: a WriteError naming ``path`` (not the temp name) if it is one."""
    error = write_error(exc, path, temp=exc.filename if exc.filename else None)
    if error is not None:
        raise error from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_permissions(path: str | os.PathLike, folder: bool = False) -> None:
    """Temp files/folders are created private (0600/0700); give them what open()/mkdir() would."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    A reader never sees a half-written file: it sees the old file or the new one.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it onto ``path``, on error delete it.

    For writers that need a file name (``torch.save``, ``safetensors.save_file``).
    """
    path = Path(path)
    _make_parent(path)
    remove_dead_temps(path)
    tmp_path = _new_temp(path)
    try:
        yield tmp_path
        _open_permissions(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as exc:
        _drop_temp_and_reraise(exc, path, tmp_path)
    _fsync_dir(path.parent)


def _drop_temp_and_reraise(exc: BaseException, path: Path, tmp_path: Path) -> NoReturn:
    """Remove the temp of a write to ``path`` that failed with ``exc``; raise its one-line error (or ``exc``)."""
    # Probe while the partial file still fills the disk (removing it frees the space).
    error = write_error(exc, path, probe_dir=path.parent, temp=tmp_path)
    with contextlib.suppress(OSError):
        tmp_path.unlink()
    if error is not None and error is not exc:
        raise error from exc
    raise exc


def _new_temp(path: Path) -> Path:
    """An empty temp file beside ``path``, named so that remove_dead_temps knows whose it is."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _raise_for_temp(exc, path)
        raise
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def scratch_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp file next to ``path``, and remove it when the block ends, however it ends.

    For a part of ``path`` written on the side (one rank's share of a file command's output).
    It is named like the atomic writers' temps, so if its process is killed outright, the next
    atomic write of ``path`` removes the leftover (see :func:`remove_dead_temps`).
    """
    path = Path(path)
    _make_parent(path)
    tmp_path = _new_temp(path)
    try:
        yield tmp_path
    except BaseException as exc:
        _drop_temp_and_reraise(exc, path, tmp_path)
    with contextlib.suppress(OSError):
        tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; it becomes ``path`` only if the block succeeds.

    A failed or interrupted write leaves nothing at ``path`` (and no temp folder behind).
    With ``overwrite``, an existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists (pass overwrite to replace it)")
    _make_parent(path)
    remove_dead_temps(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".partial", dir=path.parent))
    except OSError as exc:
        _raise_for_temp(exc, path)
        raise
    try:
        yield tmp
        _open_permissions(tmp, folder=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        error = write_error(exc, path, probe_dir=tmp, temp=tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None and error is not exc:
            raise error from exc
        raise
    _fsync_dir(path.parent)



# ------------------------------------------------------------------------------------ run lock
LOCK_FILE = ".megabert.lock"


class OutputLock:
    """An exclusive lock on an output folder, held by this process until :meth:`release` (or its death).

    The lock is ``flock`` on ``FOLDER/.megabert.lock``: the kernel drops it when the process
    ends in any way (SIGKILL included), so a killed run never blocks the next one. The file
    holds the holder's pid, host and command, for the message another run gets. Release
    deletes it while still holding the lock (a waiting opener then sees a replaced inode and
    retries, see :func:`lock_output_folder`), and the folder too when the lock made it and the
    run left nothing else there (a run that failed on its inputs leaves no empty folder).
    """

    def __init__(self, folder: Path, fd: int | None, created: bool = False) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._fd = fd
        self._created = created

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (False after release, or where flock is unsupported)."""
        return self._fd is not None

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)  # closing the only descriptor drops the flock
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output_folder(folder: str | os.PathLike, command: str = "megabert", option: str = "--output") -> OutputLock:
    """Take the exclusive lock of ``folder`` (created if missing) for a run that writes into it.

    Another process holding it is a UserError naming the folder and the holder's pid, at once
    (no waiting). A file system without ``flock`` support (some network file systems) gives
    a warning and an unlocked run rather than no run.
    """
    import sys

    from megabert.errors import UserError

    folder = Path(folder)
    created = not folder.exists()
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no flock
        folder.mkdir(parents=True, exist_ok=True)
        return OutputLock(folder, None)
    path = folder / LOCK_FILE
    for _ in range(5):  # a holder releasing right now deletes the file: open the new one
        _make_parent(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # the folder was removed by a releasing holder
        except OSError as exc:
            error = write_error(exc, path)
            if error is None:
                raise
            raise error from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise UserError(
                f"{option} {folder} is in use by another run ({_describe_holder(holder)}; lock file {path}): "
                f"wait for it to end, or choose another {option}"
            ) from None
        except OSError as exc:
            os.close(fd)
            print(
                f"warning: cannot lock {path} ({exc.strerror}); nothing stops a second run from writing "
                f"into {folder} at the same time",
                file=sys.stderr,
            )
            return OutputLock(folder, None)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if not same:  # locked a file its holder deleted on release: lock the current one
            os.close(fd)
            continue
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} command={command}\n".encode(), 0)
        return OutputLock(folder, fd, created)
    raise UserError(f"{option} {folder}: could not take the lock {path} (other runs keep starting and ending there)")


def _describe_holder(text: str) -> str:
    """"pid 123, `megabert pretrain`" from a lock file's ``pid=... host=... command=...``."""
    fields = dict(field.split("=", 1) for field in text.split() if "=" in field)
    if "pid" not in fields:
        return "a process that has not written its pid yet"
    who = f"pid {fields['pid']}"
    if fields.get("host") and fields["host"] != socket.gethostname():
        who += f" on {fields['host']}"
    if fields.get("command"):
        who += f", `megabert {fields['command']}`"
    return who
