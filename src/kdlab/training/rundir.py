"""Run directories: refuse to clobber, write the resolved config and the run identity."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdlab.config.core import to_dict
from kdlab.config.run_identity import RunIdentity
from kdlab.errors import RunDirError
from kdlab.utils.io import atomic_write_yaml, is_done, recover_staging


def prepare_run_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create ``output_dir`` or check it may be reused.

    An existing non-empty directory is refused unless ``resume`` (continue it) or
    ``overwrite`` (delete it first) is given. Resuming a finished run is refused too:
    nothing would change.
    """
    directory = Path(output_dir)
    if resume and overwrite:
        raise RunDirError("choose one of --resume and --overwrite")
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"output directory '{directory}' exists and is a file")
    non_empty = directory.is_dir() and any(directory.iterdir())
    if non_empty and overwrite:
        shutil.rmtree(directory)
    elif non_empty and not resume:
        state = "a finished run" if is_done(directory) else "an unfinished run"
        raise RunDirError(
            f"output directory '{directory}' is not empty ({state}); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    elif resume and is_done(directory):
        raise RunDirError(f"output directory '{directory}' holds a finished run (DONE exists)")
    directory.mkdir(parents=True, exist_ok=True)
    if resume:  # a killed run may have left half-written files (never read, but large)
        for folder in (directory, directory / "checkpoints"):
            recover_staging(folder)
    return directory


def write_run_files(directory: Path, config: Any, identity: RunIdentity) -> None:
    """``config.yaml`` (every field, defaults included) and ``run.json``."""
    atomic_write_yaml(directory / "config.yaml", to_dict(config))
    identity.write(directory)
