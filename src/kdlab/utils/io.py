"""Crash-safe file writes.

Every result, checkpoint and report is written to a temporary name in the same directory
and renamed into place (``os.replace`` is atomic on POSIX when source and target share a
file system), so a reader never sees half a file and a killed process leaves either the old
file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kdlab.errors import DamagedFileError, RunDirError
from kdlab.utils.faults import maybe_fault


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp/mkdtemp create private (0600/0700) entries; results get the modes a plain
#: ``open``/``mkdir`` would give them, so that other users can read shared run directories.
_UMASK = _read_umask()
#: Names a killed atomic writer can leave behind: ``.NAME.XXXXXXXX.tmp`` and ``.NAME.old``.
_STAGING = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old$")


def staged_name(name: str) -> str | None:
    """The target name of a killed atomic writer's leftover (``.NAME.XXXXXXXX.tmp`` or
    ``.NAME.old`` → ``NAME``), or None for any other name."""
    match = _STAGING.match(name) or _OLD.match(name)
    return match.group("name") if match else None


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        maybe_fault("atomic_write", target.name)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as YAML atomically (keys in insertion order)."""
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place on success.

    An existing directory at ``path`` is replaced only once the new one is complete.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_UMASK)
        yield staging
        maybe_fault("atomic_directory", target.name)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_staging(directory: str | os.PathLike[str]) -> list[str]:
    """Tidy what killed atomic writers left in ``directory``; return the names handled.

    A staging entry (``.NAME.XXXXXXXX.tmp``) is an unfinished write: it is deleted. A
    ``.NAME.old`` directory is the previous version of ``NAME`` moved aside by
    :func:`atomic_directory`: if the kill came before the new version was renamed into
    place, ``NAME`` is missing and the old version is put back; otherwise it is deleted.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    handled: list[str] = []
    for entry in sorted(folder.iterdir()):
        old = _OLD.match(entry.name)
        if old and entry.is_dir():
            target = folder / old.group("name")
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, target)
            handled.append(entry.name)
        elif _STAGING.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            handled.append(entry.name)
    return handled


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk.

    A process killed mid-write can leave at most one partial last line; :func:`read_jsonl`
    drops such a line, so appended logs stay readable after a crash.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike[str], *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a JSON-lines file, dropping a torn last line (left by a killed writer).

    With ``repair=True`` the file is rewritten without the torn line, so later appends
    start on a clean line. A damaged line before the last one (or bytes that are not UTF-8)
    is a :class:`~kdlab.errors.DamagedFileError` naming the file and the line: it is never
    skipped silently.
    """
    target = Path(path)
    if not target.exists():
        return []
    records: list[dict[str, Any]] = []
    try:
        raw = target.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DamagedFileError(f"{target} is damaged (not UTF-8 at byte {error.start})") from None
    lines = raw.split("\n")
    torn = False
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines) - 1 or all(not rest.strip() for rest in lines[number + 1 :]):
                torn = True
                break
            raise DamagedFileError(
                f"{target} is damaged: line {number + 1} is not JSON (a line before the last "
                "cannot be a torn write)"
            ) from None
        if not isinstance(record, dict):  # a torn object line never parses as another value
            raise DamagedFileError(f"{target} is damaged: line {number + 1} is not a JSON object")
        records.append(record)
    if torn and repair:
        atomic_write_text(
            target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
    return records


def is_done(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a run directory carries its ``DONE`` marker (written last)."""
    return (Path(run_dir) / "DONE").is_file()


def mark_done(run_dir: str | os.PathLike[str], info: dict[str, Any] | None = None) -> None:
    """Write the ``DONE`` marker: the last file a successful run writes."""
    atomic_write_json(Path(run_dir) / "DONE", info or {})


def read_run_config(run_dir: str | os.PathLike[str]) -> Any:
    """The parsed ``config.yaml`` of a run directory (``{}`` when empty; any YAML value).

    Raises :class:`~kdlab.errors.RunDirError` when the file is missing (not a kdlab run) or
    is not valid YAML; what the value must hold is the caller's check.
    """
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        raise RunDirError(f"run directory '{run_dir}' has no config.yaml (not a kdlab run)")
    try:
        return yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RunDirError(f"{config_file}: invalid YAML: {error}") from None
