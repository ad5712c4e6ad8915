"""One process per directory: an exclusive ``fcntl.flock`` on ``<dir>/.kdlab.lock``.

Run directories (finetune, distill, eval), the caches' builds (teacher-output cache, seqKD
responses) and sweep directories are each used by one process at a time. The lock is an
advisory ``flock`` on a lock file inside the directory:

- the operating system releases it when the process dies (SIGKILL, OOM, a pulled plug), so
  a killed run never leaves a stale lock behind; the file itself stays (deleting a lock file
  on release would let two processes lock two different files of the same name);
- the holder writes its PID, host and command into the file, so that a refused second
  process can say who holds it (``kdlab finetune: error: runs/x is in use by PID 4711 on
  host gpu3 (kdlab finetune, since 2025-01-01T10:00:00)``);
- ``flock`` locks are per open file, so a second lock in the *same* process conflicts too.
  A process never legitimately holds two handles on one directory (a stage runs to its end
  or raises), so a same-process acquire takes the lock over: the older handle's release
  becomes a no-op. This makes a stage that raised and was called again (a test, a sweep
  retry) work while the failed call's frames are still alive.

Only global rank 0 of a multi-process job (``torch.distributed.run``, ``accelerate
launch``: environment variable ``RANK``) takes a run directory's lock; the other ranks of the
same job share the directory and write nothing into it (:func:`is_main_rank`).

On a platform without ``fcntl`` (Windows) locking is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.errors import KdlabError

try:  # pragma: no cover - always present on POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: The lock file's name inside a locked directory (kdlab's own: never "user files").
LOCK_FILE = ".kdlab.lock"


class DirectoryBusyError(KdlabError):
    """Another process holds the directory's lock (exit code 2)."""


def is_main_rank() -> bool:
    """Whether this process is global rank 0 of its job (or not part of a multi-process job).

    Read from ``RANK``, which ``torch.distributed.run`` and ``accelerate launch`` set before
    the process starts (the accelerator does not exist yet when a run directory is prepared).
    """
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@dataclass
class _Held:
    """A lock this process holds: the open lock file and who last acquired it."""

    fd: int
    key: tuple[int, int]
    generation: int = 0


#: Locks held by this process, by the lock file's (device, inode).
_HELD: dict[tuple[int, int], _Held] = {}


class DirectoryLock:
    """A held lock on a directory (see the module docstring); :meth:`release` frees it."""

    def __init__(self, directory: Path, held: _Held | None, generation: int) -> None:
        self.directory = directory
        self._held = held
        self._generation = generation

    @property
    def held(self) -> bool:
        """Whether this handle still holds the lock (not released, not taken over)."""
        return (
            self._held is not None
            and _HELD.get(self._held.key) is self._held
            and self._held.generation == self._generation
        )

    def release(self) -> None:
        """Release the lock (a no-op when already released or taken over by a later acquire)."""
        held, self._held = self._held, None
        if held is None or _HELD.get(held.key) is not held or held.generation != self._generation:
            return
        del _HELD[held.key]
        with contextlib.suppress(OSError):
            os.close(held.fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *args: object) -> None:
        self.release()

    def __del__(self) -> None:  # a stage that raised: its lock goes with its frames
        with contextlib.suppress(Exception):
            self.release()


def _owner_text(path: Path) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    host = info.get("host")
    where = "" if not host or host == socket.gethostname() else f" on host {host}"
    details = ", ".join(str(info[key]) for key in ("command", "since") if info.get(key))
    return f"PID {info['pid']}{where}" + (f" ({details})" if details else "")


def _describe_self() -> dict[str, Any]:
    """PID, host, command (``kdlab finetune``) and start time of this process."""
    program = os.path.basename(sys.argv[0] or "python")
    if program in ("__main__.py", "-m", "-c", "kdlab"):
        program = "kdlab"
    words = [word for word in sys.argv[1:] if not word.startswith("-")][:1]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([program, *words]),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def lock_directory(
    directory: str | os.PathLike[str], *, what: str, wait: bool = False
) -> DirectoryLock:
    """Take the exclusive lock of ``directory`` (created if missing).

    Args:
        directory: the directory to lock.
        what: how errors name it ("run directory", "teacher cache", ...).
        wait: block until the holder is done (logging who it is) instead of refusing.

    Raises:
        DirectoryBusyError: another process holds it (only when ``wait`` is false), naming
            the PID holding it.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        return DirectoryLock(folder, None, 0)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        held = _HELD.get(key)
        if held is not None:  # this process holds it already: take it over
            os.close(fd)
            held.generation += 1
            return DirectoryLock(folder, held, held.generation)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise DirectoryBusyError(
                    f"{what} {folder} is in use by {_owner_text(path)}; wait for it to finish "
                    "or stop it (one process per directory)"
                ) from None
            logger.info("%s %s is in use by %s; waiting", what, folder, _owner_text(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != key:
            os.close(fd)  # the file was replaced while we waited: lock the new one
            continue
        record = (json.dumps(_describe_self()) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        held = _Held(fd, key)
        _HELD[key] = held
        return DirectoryLock(folder, held, 0)


def lock_holder(directory: str | os.PathLike[str]) -> str | None:
    """Who holds ``directory``'s lock now (``"PID 4711 (kdlab eval, since ...)"``), or None
    when nobody does (or this process does). Creates nothing."""
    path = Path(directory) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) in _HELD:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner_text(path)
        return None
    finally:
        os.close(fd)  # also releases the probe's own lock


__all__ = [
    "LOCK_FILE",
    "DirectoryBusyError",
    "DirectoryLock",
    "is_main_rank",
    "lock_directory",
    "lock_holder",
]
