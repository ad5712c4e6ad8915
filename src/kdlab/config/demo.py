"""``kdlab demo`` and ``kdlab study`` configuration: which grid, where, which model, seeds.

Both commands run a sweep grid shipped with kdlab (``configs/demo/``, ``configs/study/``;
see ``docs/demo.md`` and ``docs/study.md``) through the sweep planner and runner. These
configs only choose the grid and override its output directory, model and seeds; every
size (problems, steps, learning rates, evaluation items) lives in the grid file.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.core import check, config_field

#: Output directories when ``out`` is not given (the study's default is the demo's: its
#: seed-6 runs *are* the demo's runs, which it then reuses).
DEMO_OUT = "runs/demo"
DEMO_QUICK_OUT = "runs/demo-quick"


@dataclass
class _GridCommandConfig:
    """The keys the demo and the study share."""

    out: str = config_field(
        DEMO_OUT,
        help=f"Output directory (replaces the grid's out_dir). With quick, the default "
        f"{DEMO_OUT} becomes {DEMO_QUICK_OUT}, so that the tiny runs never meet the real ones.",
    )
    quick: bool = config_field(
        False, help="The packaged quick grid: a first look in a few minutes (tiny sizes)."
    )
    grid: str | None = config_field(
        None,
        help="A grid file of your own instead of the packaged one (it may `extends:` it); "
        "not with quick.",
    )
    model: str | None = config_field(
        None,
        help="The model of the teacher and of the student slice (default: the grid's, the "
        "embedded smollm2-135m).",
    )

    def __post_init__(self) -> None:
        check(bool(self.out.strip()), "out", "must not be empty")
        check(self.model is None or bool(self.model.strip()), "model", "must not be empty")
        check(self.grid is None or bool(self.grid.strip()), "grid", "must not be empty")
        check(
            not (self.quick and self.grid),
            "quick",
            "selects the packaged quick grid; with grid=FILE set the sizes in that file",
        )

    @property
    def out_dir(self) -> str:
        """``out``; with quick, the default directory is the quick one."""
        return DEMO_QUICK_OUT if self.quick and self.out == DEMO_OUT else self.out


@dataclass
class DemoConfig(_GridCommandConfig):
    """``kdlab demo``: the paper's pipeline in miniature on the embedded SmolLM2-135M."""


@dataclass
class StudyConfig(_GridCommandConfig):
    """``kdlab study``: the paper's directional claims tested on the embedded model."""

    seeds: list[int] | None = config_field(
        None,
        help="Seeds of the main grid (SFT, forward KL, reverse KL); default: the grid's "
        "(6, 7, 8). The claims across seeds need at least 3.",
    )
    ablation_seeds: list[int] | None = config_field(
        None,
        help="Seeds of the ablations (T = 5, teacher noise σ = 5, the base-model teacher); "
        "default: the first main seed; [] = no ablation.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seeds is not None:
            check(bool(self.seeds), "seeds", "must list at least one seed (or be null)")
            check(len(set(self.seeds)) == len(self.seeds), "seeds", "lists a seed twice")
        if self.ablation_seeds is not None:
            check(
                len(set(self.ablation_seeds)) == len(self.ablation_seeds),
                "ablation_seeds",
                "lists a seed twice",
            )


__all__ = ["DEMO_OUT", "DEMO_QUICK_OUT", "DemoConfig", "StudyConfig"]
