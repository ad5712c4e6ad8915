"""Run directories that never lose work: ownership, replace-on-start, resume checks, the lock.

Every stage that writes a run directory (``finetune``, ``distill``, ``eval``; the sweep and
the demo through them) goes through one mechanism:

1. :func:`prepare_run_dir` (training) / :func:`prepare_directory` (any layout) *before* any
   model is loaded: the directory is locked (:mod:`kdlab.utils.locking`: one process per
   directory, a second one exits 2 naming the PID), an interrupted replacement is undone,
   and the flags are checked:

   - an existing non-empty directory needs ``--resume`` or ``--overwrite``;
   - ``--overwrite`` may replace only a directory kdlab made (:class:`RunLayout`: its
     marker file, and nothing it does not know); anything else exits 2 naming what is
     there; a symbolic link is refused (replacing through a link is never what was meant);
   - ``--resume`` compares the saved ``config.yaml`` with the new resolved config and
     refuses any difference except the keys declared safe to change on resume
     (:data:`TRAINING_RESUME_SAFE`, :data:`EVAL_RESUME_SAFE`), and checks that the files it
     will read (``metrics.jsonl``, the latest checkpoint) are intact.

   Nothing is written into the directory here except the lock file.

2. :meth:`RunDirectory.start`, the *commit point*, once the stage has done everything that
   can fail for a bad input (data, weights, PEFT targets, teacher, adapter): training calls
   it right before the first optimizer step, evaluation once the model is loaded. Only
   then is an earlier run replaced (its entries are moved into ``.kdlab-replaced/`` inside
   the directory, ``DONE`` first, and deleted), and ``config.yaml`` (+ ``run.json``) written.
   A stage that fails before :meth:`~RunDirectory.start` leaves the earlier run byte for
   byte as it was, and a directory that held nothing still holds nothing but the lock file
   (so the corrected command needs no flag). A process killed while moving the old entries
   is undone by the next :func:`prepare_directory` on that directory (the old run is put
   back); killed after the move, the replacement completes.

3. :meth:`RunDirectory.close` releases the lock when the stage is done (the OS releases it
   when the process dies).

Under ``torch.distributed.run`` every rank prepares the same directory: only global rank 0
locks, checks and writes (:func:`kdlab.utils.locking.is_main_rank`); the other ranks get a
handle that does nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlab.config.core import to_dict
from kdlab.config.run_identity import RunIdentity
from kdlab.errors import DamagedFileError, RunDirError
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import (
    atomic_write_text,
    atomic_write_yaml,
    is_done,
    read_jsonl,
    recover_staging,
    staged_name,
)
from kdlab.utils.locking import (
    LOCK_FILE,
    DirectoryBusyError,
    DirectoryLock,
    is_main_rank,
    lock_directory,
    lock_holder,
)

logger = logging.getLogger(__name__)

#: Where :meth:`RunDirectory.start` moves an earlier run's entries before deleting them.
TRASH_DIR = ".kdlab-replaced"
#: Written into :data:`TRASH_DIR` once every old entry is in it: the replacement committed.
_TRASH_COMPLETE = ".complete"
#: Names kdlab keeps in any directory it locks (never "files kdlab did not write").
INTERNAL_NAMES = frozenset({LOCK_FILE, TRASH_DIR})


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class RunLayout:
    """What kdlab writes into one kind of directory: the only entries it may replace.

    ``markers``: one of them (a relative path) exists in every directory of this kind that
    kdlab made.
    ``files``/``folders``: top-level names (folders' contents are kdlab's as a whole).
    ``nested``: folders that are themselves directories of another layout (a training
    run's ``eval/``). ``item_folders``: when set, any other folder holding only these file
    names is kdlab's (an evaluation's task folders).
    """

    kind: str
    markers: tuple[str, ...]
    files: frozenset[str]
    folders: frozenset[str] = frozenset()
    nested: Mapping[str, RunLayout] = field(default_factory=dict)
    item_folders: frozenset[str] = frozenset()

    def known(self, name: str) -> bool:
        """Whether ``name`` is one of this layout's entry names (not checking its kind)."""
        return name in self.files or name in self.folders or name in self.nested


#: ``kdlab eval`` output directories (docs/run-layout.md).
EVAL_FILES = ("config.yaml", "run.json", "summary.csv", "summary.md", "DONE")
EVAL_LAYOUT = RunLayout(
    kind="kdlab evaluation",
    markers=("config.yaml",),
    files=frozenset({*EVAL_FILES, "FAILED.json"}),
    item_folders=frozenset({"predictions.jsonl", "metrics.json"}),
)
#: ``kdlab finetune`` / ``kdlab distill`` run directories (docs/run-layout.md). A stage
#: that writes a new entry into its run directory must add it here, or ``--overwrite``
#: will refuse to replace its runs.
TRAINING_LAYOUT = RunLayout(
    kind="kdlab training run",
    markers=("config.yaml", "run.json"),
    files=frozenset(
        {"config.yaml", "run.json", "metrics.jsonl", "train_summary.json", "DONE", "FAILED.json"}
    ),
    folders=frozenset(
        {"adapter", "model", "tokenizer", "checkpoints", "trackers", "tensorboard", "wandb"}
    ),
    nested={"eval": EVAL_LAYOUT},
)


def content_entries(directory: Path) -> list[Path]:
    """The entries of ``directory`` other than kdlab's lock file ([] when it is missing)."""
    if not directory.is_dir():
        return []
    return sorted(entry for entry in directory.iterdir() if entry.name != LOCK_FILE)


def unknown_entries(directory: Path, layout: RunLayout, prefix: str = "") -> list[str]:
    """Paths (relative to ``directory``) of the entries ``layout`` does not know.

    A symbolic link is never kdlab's. A nested folder is checked against its own layout.
    """
    unknown: list[str] = []
    for entry in content_entries(directory):
        name = entry.name
        shown = f"{prefix}{name}"
        if name in INTERNAL_NAMES:
            continue
        base = staged_name(name)  # a killed atomic writer's leftover: .NAME.XXXXXXXX.tmp
        if base is not None and (layout.known(base) or layout.item_folders):
            continue
        if entry.is_symlink():
            unknown.append(shown)
        elif (entry.is_file() and name in layout.files) or (
            entry.is_dir() and name in layout.folders
        ):
            continue
        elif entry.is_dir() and name in layout.nested:
            unknown += unknown_entries(entry, layout.nested[name], f"{shown}/")
        elif entry.is_dir() and layout.item_folders:
            strangers = [
                child.name
                for child in sorted(entry.iterdir())
                if child.is_symlink()
                or (staged_name(child.name) or child.name) not in layout.item_folders
            ]
            if strangers:  # one name per folder is enough to say it is not kdlab's
                unknown.append(f"{shown}/{strangers[0]}")
        else:
            unknown.append(shown)
    return unknown


def _describe_entries(names: Sequence[str], limit: int = 4) -> str:
    """The first ``limit`` names, those at the top of the directory first."""
    names = sorted(names, key=lambda name: ("/" in name, name))
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_owned(directory: Path, layout: RunLayout, *, what: str) -> None:
    """Refuse (exit 2) to replace ``directory`` unless it is a ``layout`` directory kdlab
    made: one of its markers exists, and every entry is one it knows."""
    unknown = unknown_entries(directory, layout)
    if unknown:
        raise RunDirError(
            f"{what} '{directory}' holds files kdlab did not write ({_describe_entries(unknown)}): "
            f"--overwrite replaces only a {layout.kind}; nothing was deleted — choose another "
            "directory or move those files away"
        )
    if not any((directory / marker).exists() for marker in layout.markers):
        raise RunDirError(
            f"{what} '{directory}' has no {' or '.join(layout.markers)}: it is not a "
            f"{layout.kind}, and --overwrite replaces nothing else; nothing was deleted"
        )


# --------------------------------------------------------------------------- resume rules


def _larger(old: Any, new: Any) -> bool:
    """A run made longer: both set (not -1) and the new value at least the old one."""
    numbers = (int, float)
    return isinstance(old, numbers) and isinstance(new, numbers) and 0 < old <= new


@dataclass(frozen=True)
class ResumeSafe:
    """A config key that may differ between a run and its ``--resume`` (and why)."""

    key: str
    why: str
    allows: Callable[[Any, Any], bool] | None = None
    """``(saved, new) -> bool``; None: any new value."""
    condition: str = ""
    """How :attr:`allows` reads, for messages and docs (``"grow"``: may only grow)."""


@dataclass(frozen=True)
class ResumeRules:
    """The keys a stage's ``--resume`` may change, and a phrase summing them up."""

    summary: str
    keys: tuple[ResumeSafe, ...]


#: Keys a training ``--resume`` may change (docs/reliability.md). Everything else must equal
#: the saved ``config.yaml``: a resume continues the run that was started.
TRAINING_RESUME_SAFE = ResumeRules(
    "logging, checkpointing, tracker, memory and device settings and a larger max_steps or "
    "num_epochs",
    (
        ResumeSafe("train.logging_steps", "how often metric lines are written"),
        ResumeSafe("train.save_steps", "how often checkpoints are written"),
        ResumeSafe("train.save_total_limit", "how many checkpoints are kept"),
        ResumeSafe("train.report_to", "where metrics are copied (tensorboard, wandb)"),
        ResumeSafe("train.max_skipped_fraction", "a threshold checked when the run ends"),
        ResumeSafe(
            "train.gradient_checkpointing", "recomputes activations: same values, less memory"
        ),
        ResumeSafe(
            "train.micro_batch_size",
            "exact means: a step's update does not depend on its split into micro-batches "
            "(dropout masks do)",
        ),
        ResumeSafe(
            "train.max_steps",
            "train longer (a linear/cosine schedule is stretched from the resumed step on)",
            _larger,
            "grow",
        ),
        ResumeSafe(
            "train.num_epochs",
            "train longer, when max_steps is -1 (the schedule is stretched likewise)",
            _larger,
            "grow",
        ),
        ResumeSafe("distill.chunk_size", "memory of the chunked loss: the same values"),
        ResumeSafe("model.device", "where the model runs"),
        ResumeSafe("student.device", "where the student runs"),
        ResumeSafe("teacher.model.device", "where the teacher runs"),
        ResumeSafe(
            "train.output_dir", "the run directory itself (the same one, maybe spelled otherwise)"
        ),
    ),
)
#: Keys an evaluation's ``--resume`` may change: each task's items are scored on their own,
#: so tasks may be added and ``limit`` raised; everything that changes a generated item
#: (model, adapter, template, scoring, generation, batch_size, backend, data) may not.
EVAL_RESUME_SAFE = ResumeRules(
    "tasks (added), a larger limit, skip_missing, name, data_dir and the device",
    (
        ResumeSafe("tasks", "each task's predictions stand on their own: tasks may be added"),
        ResumeSafe("limit", "more items of each task (earlier ones are kept)", _larger, "grow"),
        ResumeSafe("skip_missing", "whether a task without a data file is skipped"),
        ResumeSafe("name", "the label in summary tables"),
        ResumeSafe("data_dir", "where the task files are (their items are checked on resume)"),
        ResumeSafe("model.device", "where the model runs"),
        ResumeSafe("output_dir", "the output directory itself"),
    ),
)


def _same_value(saved: Any, new: Any) -> bool:
    if saved == new:
        return True
    if isinstance(saved, list) and isinstance(new, list):
        return len(saved) == len(new) and all(map(_same_value, saved, new))
    if isinstance(saved, str) and isinstance(new, str):
        # One path spelled two ways (relative/absolute, a trailing slash) is one path.
        with contextlib.suppress(OSError, ValueError):
            left, right = Path(saved).expanduser(), Path(new).expanduser()
            if left.exists() and right.exists():
                return left.resolve() == right.resolve()
    return False


@dataclass(frozen=True)
class ResumeDifference:
    """One key whose value differs between the saved config and the resumed one."""

    key: str
    saved: Any
    new: Any
    refusal: str | None
    """Why the difference is refused; None for an allowed one."""


def resume_differences(
    saved: Mapping[str, Any], new: Mapping[str, Any], safe: ResumeRules
) -> list[ResumeDifference]:
    """Every key present in both configs whose value differs, with whether it is allowed.

    A key only one side has (a field added or removed by another kdlab version) is not
    compared. Sections compare leaf by leaf; lists as wholes.
    """
    rules = {rule.key: rule for rule in safe.keys}
    differences: list[ResumeDifference] = []

    def compare(old: Any, value: Any, key: str) -> None:
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            for name in value:
                if name in old:
                    compare(old[name], value[name], f"{key}.{name}" if key else str(name))
            return
        if _same_value(old, value):
            return
        rule = rules.get(key)
        refusal = None
        if rule is None:
            refusal = "changes the run"
        elif rule.allows is not None and not rule.allows(old, value):
            refusal = f"may only {rule.condition} on resume"
        differences.append(ResumeDifference(key, old, value, refusal))

    compare(saved, new, "")
    return differences


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resume_config(
    directory: Path,
    config: Any,
    safe: ResumeRules,
    *,
    saved_file: str = "config.yaml",
    log: bool = True,
) -> list[ResumeDifference]:
    """Refuse (exit 2) a resume whose config differs from the saved one beyond ``safe``.

    Returns the allowed differences (logged). A missing saved config (a run killed before
    it started) is nothing to compare; a damaged one is an error naming the file.
    """
    file = directory / saved_file
    if not file.is_file():
        return []
    try:
        saved = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DamagedFileError(
            f"{file} is damaged ({type(error).__name__}); cannot compare it with this command: "
            "use --overwrite to start again"
        ) from None
    if not isinstance(saved, dict):
        raise DamagedFileError(f"{file} is damaged (not a mapping); use --overwrite to start again")
    differences = resume_differences(saved, to_dict(config), safe)
    refused = [item for item in differences if item.refusal]
    if refused:
        listed = "; ".join(
            f"{item.key}: {_short(item.saved)} → {_short(item.new)} ({item.refusal})"
            for item in refused[:6]
        )
        more = f"; and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise RunDirError(
            f"cannot resume '{directory}': {listed}{more}. A resume continues the run that was "
            f"started: only {safe.summary} may change (docs/reliability.md); use --overwrite "
            "to start again, or another output directory"
        )
    for item in differences if log else ():
        logger.info("--resume: %s %s → %s", item.key, _short(item.saved), _short(item.new))
    return differences


# --------------------------------------------------------------------------- resume files


def check_resumable(directory: Path) -> None:
    """Refuse (exit 2, naming the file) to resume from files that are damaged.

    Checks what :class:`~kdlab.training.loop.TrainingLoop` will read: every line of
    ``metrics.jsonl`` but a torn last one, and the latest checkpoint (``trainer_state.json``
    parses, ``trainable.safetensors`` is a complete safetensors file, ``optimizer.pt`` and
    ``scheduler.pt`` are complete torch archives). Cheap: headers and zip directories only.
    """
    metrics = directory / "metrics.jsonl"
    for number, record in enumerate(read_jsonl(metrics), start=1):  # damaged: DamagedFileError
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise DamagedFileError(
                f"{metrics} is damaged: record {number} has no integer 'step'; delete the file "
                "or use --overwrite to start again"
            )
    from kdlab.training.loop import list_checkpoints

    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return
    step, path = checkpoints[-1]
    advice = (
        f"delete {path.name} to resume from the checkpoint before it, or use --overwrite to "
        "start again"
    )
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        valid = isinstance(state, dict) and int(state["step"]) == step
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        valid = False
    if not valid:
        raise DamagedFileError(f"{state_file} is damaged (not the state of step {step}); {advice}")
    weights = path / "trainable.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except Exception as error:  # SafetensorError, OSError: a truncated or missing file
        raise DamagedFileError(
            f"{weights} is damaged ({' '.join(str(error).split())[:120]}); {advice}"
        ) from None
    for name in ("optimizer.pt", "scheduler.pt"):
        archive = path / name
        try:
            with zipfile.ZipFile(archive) as opened:
                opened.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise DamagedFileError(f"{archive} is damaged ({error}); {advice}") from None


# --------------------------------------------------------------------------- the handle


@dataclass
class RunDirectory:
    """A prepared run directory: :meth:`start` is the commit point, :meth:`close` the end.

    ``path`` is the directory itself (stages write there only after :meth:`start`).
    ``replaces``: an earlier run is replaced at :meth:`start` (``--overwrite``).
    """

    path: Path
    layout: RunLayout
    resume: bool = False
    replaces: bool = False
    lock: DirectoryLock | None = None
    main: bool = True
    started: bool = False
    what: str = "output directory"

    @property
    def name(self) -> str:
        return self.path.name

    def start(self, config: Any = None, identity: RunIdentity | None = None) -> Path:
        """The commit point: replace the earlier run (``--overwrite``), then write
        ``config.yaml`` (``to_dict(config)``) and ``run.json`` (``identity``) when given.

        Idempotent; a no-op on ranks other than 0.
        """
        if not self.main or self.started:
            return self.path
        if self.replaces:
            for name in self.layout.nested:  # e.g. an evaluation of the old run, running now
                holder = lock_holder(self.path / name)
                if holder is not None:
                    raise DirectoryBusyError(
                        f"cannot replace '{self.path}': its {name}/ is in use by {holder}; "
                        "nothing was replaced"
                    )
            check_owned(self.path, self.layout, what=self.what)  # unchanged since prepare?
            _replace_contents(self.path)
        if config is not None:
            atomic_write_yaml(self.path / "config.yaml", to_dict(config))
        if identity is not None:
            identity.write(self.path)
        self.started = True
        return self.path

    def close(self) -> None:
        """Release the directory's lock (the stage is done)."""
        if self.lock is not None:
            self.lock.release()


def _replace_contents(directory: Path) -> None:
    """Move every entry but the lock into :data:`TRASH_DIR` (``DONE`` first), mark the
    move complete, delete it. A kill in the middle is undone by :func:`_recover_replace`."""
    trash = directory / TRASH_DIR
    trash.mkdir()
    entries = [entry for entry in content_entries(directory) if entry.name != TRASH_DIR]
    entries.sort(key=lambda entry: entry.name != "DONE")  # never a "finished" half-run
    for entry in entries:
        os.replace(entry, trash / entry.name)
        maybe_fault("replace", entry.name)
    atomic_write_text(trash / _TRASH_COMPLETE, "")
    logger.info("overwrite: the earlier run in %s is replaced", directory)
    shutil.rmtree(trash)


def _recover_replace(directory: Path) -> None:
    """Finish or undo a replacement a killed process left (we hold the directory's lock)."""
    trash = directory / TRASH_DIR
    if not trash.is_dir() or trash.is_symlink():
        return
    if (trash / _TRASH_COMPLETE).is_file():
        shutil.rmtree(trash)  # the replacement had committed: the old entries were going
        return
    for entry in sorted(trash.iterdir()):
        target = directory / entry.name
        if target.exists():  # pragma: no cover - nothing new is written before the mark
            raise RunDirError(
                f"'{directory}': an interrupted --overwrite left {trash}, and {entry.name} exists "
                "in both; move what you need out of it and delete it"
            )
        os.replace(entry, target)
    trash.rmdir()
    logger.warning("%s: an interrupted --overwrite was undone (the earlier run is back)", directory)


# --------------------------------------------------------------------------- preparing


def prepare_directory(
    output_dir: str | os.PathLike[str],
    layout: RunLayout,
    *,
    resume: bool,
    overwrite: bool,
    what: str,
    config: Any = None,
    resume_safe: ResumeRules | None = None,
    nothing_to_lose: Callable[[Path], bool] | None = None,
    resume_finished: bool = False,
) -> RunDirectory:
    """Lock and check a run directory before a stage loads anything (module docstring).

    Args:
        output_dir: the directory (created if missing, with the lock file only).
        layout: what kdlab writes there (what ``--overwrite`` may replace).
        resume, overwrite: the flags.
        what: the config key naming the directory, for messages (``train.output_dir``).
        config: the new resolved config, compared with the saved one on ``resume``.
        resume_safe: the keys that may differ on resume.
        nothing_to_lose: whether existing content may be reused without a flag (an
            evaluation holding only ``config.yaml``: a model that failed to load).
        resume_finished: ``--resume`` of a finished directory is allowed (an evaluation
            resumed with more tasks); else it is refused (nothing would change).
    """
    if resume and overwrite:
        raise RunDirError("choose one of --resume and --overwrite")
    text = os.fspath(output_dir)
    if not str(text).strip():
        raise RunDirError(
            f"{what} is empty (that would be the current directory); name the run's directory"
        )
    directory = Path(text)
    if not is_main_rank():
        return RunDirectory(directory, layout, resume=resume, replaces=overwrite, main=False)
    if directory.is_symlink() and overwrite:
        raise RunDirError(
            f"{what} '{directory}' is a symbolic link (to {os.readlink(directory)}): --overwrite "
            "does not replace a directory through a link; name the directory itself"
        )
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{what} '{directory}' exists and is a file")
    check = _ContentCheck(
        layout, what, resume, overwrite, config, resume_safe, nothing_to_lose, resume_finished
    )
    if not (directory / TRASH_DIR).exists():
        check(directory, log=False)  # a refusal writes nothing, not even the lock file
    try:
        lock = lock_directory(directory, what=what)
    except OSError as error:
        raise RunDirError(f"{what} '{directory}': cannot create or lock it ({error})") from None
    try:
        _recover_replace(directory)
        replaces = check(directory, log=True)  # again, now that no other process can write
        handle = RunDirectory(
            directory, layout, resume=resume, replaces=replaces, lock=lock, what=what
        )
    except BaseException:
        lock.release()
        raise
    return handle


@dataclass(frozen=True)
class _ContentCheck:
    """What :func:`prepare_directory` checks of a directory's content; returns whether
    :meth:`RunDirectory.start` will replace it."""

    layout: RunLayout
    what: str
    resume: bool
    overwrite: bool
    config: Any
    resume_safe: ResumeRules | None
    nothing_to_lose: Callable[[Path], bool] | None
    resume_finished: bool

    def __call__(self, directory: Path, *, log: bool) -> bool:
        content = content_entries(directory)
        if content and self.nothing_to_lose is not None and self.nothing_to_lose(directory):
            content = []
        if not content:
            return False
        what = self.what
        if self.overwrite:
            check_owned(directory, self.layout, what=what)
            return True
        unknown = unknown_entries(directory, self.layout)
        if unknown:
            raise RunDirError(
                f"{what} '{directory}' holds files kdlab did not write "
                f"({_describe_entries(unknown)}); choose another directory"
            )
        if not self.resume:
            state = "a finished run" if is_done(directory) else "an unfinished run"
            raise RunDirError(
                f"{what} '{directory}' is not empty ({state}); pass --resume to continue "
                "it or --overwrite to replace it"
            )
        if is_done(directory) and not self.resume_finished:
            raise RunDirError(f"{what} '{directory}' holds a finished run (DONE exists)")
        if self.config is not None and self.resume_safe is not None:
            check_resume_config(directory, self.config, self.resume_safe, log=log)
        return False


def prepare_run_dir(
    output_dir: str | os.PathLike[str],
    *,
    resume: bool,
    overwrite: bool,
    config: Any = None,
) -> RunDirectory:
    """:func:`prepare_directory` for a finetune/distill run (``train.output_dir``).

    On ``resume`` the saved config must match ``config`` (:data:`TRAINING_RESUME_SAFE`),
    the files the loop reads must be intact (:func:`check_resumable`), and what a killed
    process left half-written is tidied (:func:`~kdlab.utils.io.recover_staging`).
    """
    handle = prepare_directory(
        output_dir,
        TRAINING_LAYOUT,
        resume=resume,
        overwrite=overwrite,
        what="train.output_dir",
        config=config,
        resume_safe=TRAINING_RESUME_SAFE,
    )
    if resume and handle.main:
        try:
            for folder in (handle.path, handle.path / "checkpoints"):
                recover_staging(folder)
            check_resumable(handle.path)
        except BaseException:
            handle.close()
            raise
    return handle


__all__ = [
    "EVAL_LAYOUT",
    "EVAL_RESUME_SAFE",
    "TRAINING_LAYOUT",
    "TRAINING_RESUME_SAFE",
    "ResumeRules",
    "ResumeSafe",
    "RunDirectory",
    "RunLayout",
    "check_owned",
    "check_resumable",
    "check_resume_config",
    "content_entries",
    "prepare_directory",
    "prepare_run_dir",
    "resume_differences",
    "unknown_entries",
]
