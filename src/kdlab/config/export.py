"""``kdlab export`` configuration: which run, where to, merged or not, which hub repo.

``kdlab export RUN_DIR --out DIR [--merge] [--push-to-hub REPO_ID [--private]]`` is
``ExportConfig(run_dir=RUN_DIR, out_dir=DIR, merge=..., push_to_hub=..., private=...)``
(:mod:`kdlab.models.export` runs it). This module imports nothing heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdlab.config.core import check, config_field

#: ``owner/name`` or ``name`` (the hub then puts it under the logged-in user).
_REPO_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ExportConfig:
    """``kdlab export``: a run's trained model as a standalone folder (and hub repo)."""

    run_dir: str = config_field("", help="A finished finetune/distill run directory.")
    out_dir: str = config_field(
        "",
        help="The folder written: weights, tokenizer and README.md (the model card). An "
        "existing one is replaced only with --overwrite and only if it holds an export.",
    )
    merge: bool = config_field(
        False,
        help="Merge the run's adapter into its base model (a plain transformers model). "
        "Runs that saved model/ (full fine-tunes, sliced students) are already standalone.",
    )
    push_to_hub: str | None = config_field(
        None, help="Upload out_dir to this hub model repo (owner/name) with huggingface_hub."
    )
    private: bool = config_field(
        False,
        help="Create the hub repo private (push_to_hub only; an existing repo keeps its "
        "visibility).",
    )

    def __post_init__(self) -> None:
        check(bool(self.run_dir.strip()), "run_dir", "must name a run directory")
        check(bool(self.out_dir.strip()), "out_dir", "must name the folder to write (--out)")
        check(
            self.push_to_hub is None or bool(_REPO_ID.match(self.push_to_hub)),
            "push_to_hub",
            "must be a hub repo id: owner/name (letters, digits, '.', '_', '-')",
        )
        check(not self.private or self.push_to_hub is not None, "private", "needs push_to_hub")
