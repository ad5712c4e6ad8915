"""The run identity: what every stage writes to ``run.json`` and analysis and sweeps read.

One dataclass, :class:`RunIdentity`, is the whole contract (``docs/run-layout.md``). Stages
build it, :meth:`RunIdentity.write` writes it atomically, :func:`read_run_identity` reads
it back strictly: unknown keys, wrong types and a newer schema are errors naming the file
and the key. Files written before the schema was versioned (no ``schema_version``) are
read as version 0, whose missing keys take the defaults below — the only place where a
missing key gets a value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.config.core import FieldError, check, from_mapping, to_dict
from kdlab.errors import ConfigError, RunDirError
from kdlab.utils.io import atomic_write_json

__all__ = ["RUN_FILE", "SCHEMA_VERSION", "RunIdentity", "read_run_identity"]

RUN_FILE = "run.json"
#: Bumped when a field changes meaning or is removed (adding an optional field is not).
SCHEMA_VERSION = 1

STAGES = ("finetune", "distill", "eval")
ROLES = ("teacher", "student", "base")


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is: the model it trained or evaluated, how, and from which teacher.

    Attributes:
        stage: ``finetune``, ``distill`` or ``eval`` (a standalone evaluation).
        role: ``teacher``, ``student`` or ``base`` (an evaluated model without training).
        name: human-readable run name (the directory name by default).
        model: identity of the trained/evaluated model (hub id, path or alias, ``@slice``).
        model_params: its parameter count (frozen base included, adapters excluded).
        student_layers: layers kept by a sliced model, or None.
        quantization, teacher_quantization: how the model / the teacher was loaded
            (:func:`kdlab.models.quantization.quantization_identity`), None unquantized.
        adapter: the adapter a standalone evaluation loaded, or None.
        teacher, teacher_adapter, teacher_run: the teacher's model identity, adapter path
            and finetune run directory (None for a fine-tune; ``teacher_adapter`` None for
            the task-unaware base teacher).
        method: ``sft``, a distillation method (:mod:`kdlab.config.methods`) or ``base``.
        divergence: the KD divergence used, None without a KD term.
        temperature, noise_std, kd_weight: the KD settings (None/0 without a teacher).
        base_teacher: the teacher is the pretrained model without its task adapter.
        seed: the training seed (None for a standalone evaluation).
        task_family: ``math``, ``commonsense`` or ``custom``.
        peft: the PEFT method (``lora``, ``full``, ...), None for an evaluation.
        num_processes: processes the run trained with (data parallel).
        schema_version: the ``run.json`` schema this identity follows.
    """

    stage: str
    role: str
    name: str
    model: str
    model_params: int | None = None
    student_layers: int | None = None
    quantization: dict[str, Any] | None = None
    adapter: str | None = None
    teacher: str | None = None
    teacher_adapter: str | None = None
    teacher_run: str | None = None
    teacher_quantization: dict[str, Any] | None = None
    method: str = "sft"
    divergence: str | None = None
    temperature: float | None = None
    noise_std: float = 0.0
    base_teacher: bool = False
    kd_weight: float | None = None
    seed: int | None = None
    task_family: str = "custom"
    peft: str | None = None
    num_processes: int = 1
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check(self.stage in STAGES, "stage", f"must be one of {', '.join(STAGES)}")
        check(self.role in ROLES, "role", f"must be one of {', '.join(ROLES)}")
        check(self.num_processes >= 1, "num_processes", "must be >= 1")
        check(
            self.schema_version <= SCHEMA_VERSION,
            "schema_version",
            f"is newer than this kdlab reads ({SCHEMA_VERSION}): upgrade kdlab",
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON view (every field, in declaration order)."""
        return to_dict(self)

    def write(self, directory: str | Path) -> Path:
        """Write ``<directory>/run.json`` atomically; returns its path."""
        return atomic_write_json(Path(directory) / RUN_FILE, self.to_dict())

    def replace(self, **changes: Any) -> RunIdentity:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Any, *, source: str) -> RunIdentity:
        """Build from a parsed ``run.json``; errors name ``source`` and the key."""
        if not isinstance(data, dict):
            raise RunDirError(f"{source}: expected a JSON object, got {type(data).__name__}")
        mapping = dict(data)
        if "schema_version" not in mapping:
            mapping["schema_version"] = 0  # written before versioning: defaults fill the gaps
        try:
            return from_mapping(cls, mapping, source=source)
        except (ConfigError, FieldError) as error:
            raise RunDirError(str(error)) from None


def read_run_identity(directory: str | Path) -> RunIdentity | None:
    """The identity in ``<directory>/run.json``; None when the file does not exist."""
    file = Path(directory) / RUN_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirError(f"{file}: invalid JSON ({error})") from None
    return RunIdentity.from_mapping(data, source=str(file))
