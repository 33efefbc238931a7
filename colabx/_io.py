"""Safe files and folders.

* Every file colabx writes (preprocessed arrays, plans, predictions, checkpoints, logs, figures)
  goes through :func:`atomic_write`, so a failure never leaves a half-written file and the
  previous version stays valid. A write that fails for lack of space or another OS reason raises
  an ``OSError`` naming the file; temporaries left by a killed writer are removed by
  :func:`remove_stale_temporaries` the next time colabx opens the folder.
* Output folders carry a marker file (:func:`mark_output_folder`): colabx writes into an empty
  folder, or one that holds its own marker, and refuses any other non-empty folder unless told to
  overwrite (:func:`check_output_folder`), so a user's own files are never replaced.
* A folder being written by one colabx process is locked (:func:`lock_folder`), so that a second
  process started on the same folder stops with an error instead of interleaving its files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["FolderLock", "OutputFolderError", "atomic_write", "atomic_write_text",
           "check_output_folder", "json_safe", "lock_folder", "mark_output_folder",
           "remove_stale_temporaries"]

#: The lock file of :func:`lock_folder`; not a file of the folder's contents.
LOCK_FILE = ".colabx.lock"
#: flock's errors on file systems without locks (some NFS, FUSE and Lustre mounts)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}

_TMP_RE = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class OutputFolderError(ValueError):
    """An output folder cannot be used (it holds files colabx did not write); names the folder."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None],
                 mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` (its folder created if needed),
    flush it to disk, then move it to ``path`` with ``os.replace``; on any error the temporary
    file is removed and ``path`` is untouched.

    Raises:
        OSError: the file cannot be written (disk full, permissions, ...): the message names
            ``path`` and says that its previous version is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None:
            raise
        kept = "its previous version is kept" if path.exists() else "nothing was written"
        raise OSError(cause.errno, f"{path}: cannot write ({cause.strerror or cause}); "
                      f"{kept}") from e


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (torch.save wraps a failed write in a RuntimeError)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def json_safe(x: Any) -> Any:
    """``x`` with NaN and infinities as None, for strict JSON (``allow_nan=False``)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Delete the temporaries of :func:`atomic_write` whose writer process no longer runs (left
    by a writer that was killed); a live writer's temporary is left alone.

    Returns:
        The files removed.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for p in (root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")):
        m = _TMP_RE.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_output_folder(folder: str | os.PathLike[str], marker: str, what: str, *,
                        overwrite: bool = False, accept: Iterable[str] = ()) -> None:
    """Refuse ``folder`` as an output folder unless it does not exist, is empty, or holds
    ``marker`` or one of the ``accept`` files (an earlier colabx output of the same kind).

    Raises:
        OutputFolderError: it is a file, or a non-empty folder of other files and not
            ``overwrite``.
    """
    out = Path(folder)
    _refuse_file(out)
    if not out.is_dir() or overwrite:
        return
    entries = {p.name for p in out.iterdir()} - {LOCK_FILE}
    if entries and not {marker, *accept} & entries:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputFolderError(
            f"{out}: folder is not empty and is not a colabx {what} (it holds {shown}); choose "
            "an empty or new folder, or pass --overwrite to write into it")


def _refuse_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out}: exists and is not a folder")


def _make_folder(out: Path) -> Path | None:
    """Create ``out`` and missing parents; returns the outermost folder created, or None.

    Raises:
        OutputFolderError: ``out`` is a file.
    """
    _refuse_file(out)
    created = None
    for p in (out, *out.absolute().parents):
        if p.exists():
            break
        created = p
    out.mkdir(parents=True, exist_ok=True)
    return created


def mark_output_folder(folder: str | os.PathLike[str], marker: str,
                       info: dict[str, Any] | None = None) -> Path | None:
    """Create ``folder`` (and missing parents) if needed and write ``marker`` (JSON of ``info``)
    into it.

    Returns:
        The outermost folder this call created (``folder`` or one of its parents), for the
        caller to remove again on failure; None when ``folder`` existed.
    """
    out = Path(folder)
    created = _make_folder(out)
    atomic_write_text(out / marker, json.dumps(info or {}, indent=1) + "\n")
    return created


class FolderLock:
    """An exclusive ``flock`` on a folder's :data:`LOCK_FILE`, held until :meth:`release` or the
    process ends (the kernel drops it on any exit, ``kill -9`` included, so no stale lock is
    left). ``created`` is the outermost folder that locking created, or None; ``new_file``
    whether locking created the lock file."""

    def __init__(self, fd: int | None, path: Path, created: Path | None,
                 new_file: bool) -> None:
        self._fd: int | None = fd
        self.path, self.created, self.new_file = path, created, new_file

    def release(self, undo: bool = False) -> None:
        """Drop the lock. ``undo`` (a start that failed): also remove what locking created, the
        lock file and, innermost first, those of the folders it created that are empty (never
        what another step or run wrote into them)."""
        if undo and self.new_file:
            self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if undo and self.created is not None:
            for folder in (self.path.parent.absolute(), *self.path.parent.absolute().parents):
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == self.created.absolute():
                    break

    def __del__(self) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike[str], what: str) -> FolderLock:
    """Create ``folder`` if needed and take its lock for this process. On a file system
    without ``flock`` (some NFS, FUSE and Lustre mounts) it warns and returns a lock that
    holds nothing.

    Raises:
        OutputFolderError: another process holds the lock (the message names the folder, the
            holder's process id and ``what`` the folder is for), or ``folder`` is a file.
    """
    out = Path(folder)
    created = _make_folder(out)
    path = out / LOCK_FILE
    new_file = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        writable = True
    except PermissionError:  # another user's lock file in a shared folder: flock needs no write
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputFolderError(f"{out}: another colabx process (pid {holder}) is writing this "
                                f"{what}; wait for it to finish, stop it, or choose another "
                                "folder") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_FLOCK:
            raise
        warnings.warn(f"{out}: this file system does not support locking ({e.strerror}); "
                      f"nothing stops a second colabx process from writing this {what}",
                      RuntimeWarning, stacklevel=2)
        return FolderLock(None, path, created, new_file)
    except BaseException:
        os.close(fd)
        raise
    if writable:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return FolderLock(fd, path, created, new_file)
