"""``kdlab study``: the paper's directional claims, tested at small scale on the embedded model.

The study is the demo grid (``configs/study/study.yaml`` extends ``configs/demo/demo.yaml``)
grown along two axes, planned with the sweep planner's own run builders
(:class:`~kdlab.sweep.grid.GridPlanner`) and run by the sweep runner (resumable, changed
settings refused, ``--dry-run``):

- **seeds**: SFT, forward KL and reverse KL (T = 1) of the student on every seed of the
  grid (6, 7, 8), all distilled from **one** teacher, the first seed's: the paper fixes its
  teachers, and one teacher means one teacher-output cache for every seed's students. The
  first seed's runs are exactly the demo's (the same planner calls, the same directories):
  in the demo's directory (the default) they are reused, not trained again;
- **ablations** (on ``ablation_seeds``, the first seed by default): forward KL at T = 5,
  forward KL with teacher-logit noise σ = 5 (both with the live teacher: the cache serves
  T = 1 without noise), and forward KL from the base model without its task adapter (the
  task-unaware teacher). Which runs these are comes from the claims themselves
  (:func:`kdlab.analysis.claims.ablation_kinds`).

The analysis (``<out>/study-analysis``) covers the study's runs only and compares, besides
every KD run with its SFT run, the pairs the claims need (``compare_methods``). Then
:mod:`kdlab.analysis.claims` reads its tables and writes ``<out>/claims.md`` (and ``.csv``,
``.tex``): for each claim what the data says, the test, the interval and n, whatever the
outcome. See ``docs/study.md``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from kdlab.config.analysis import AnalyzeConfig, options_of
from kdlab.config.demo import StudyConfig
from kdlab.config.methods import get_method
from kdlab.config.sweep import SweepConfig
from kdlab.errors import ConfigError, RunDirError
from kdlab.sweep import design
from kdlab.sweep.demo import (
    add_grid_command_arguments,
    describe,
    wall_time_rows,
)
from kdlab.sweep.demo import flag_overrides as demo_flag_overrides
from kdlab.sweep.grid import GridPlanner, PlannedRun, SweepPlan, estimate_plan
from kdlab.utils.io import atomic_write_text

ANALYSIS_DIR = design.STUDY_ANALYSIS_DIR
CLAIMS_STEM = "claims"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--quick``, ``--model`` (config keys) and ``--dry-run``."""
    add_grid_command_arguments(parser, "study")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--out``, ``--quick``, ``--model`` as the config overrides they stand for."""
    return demo_flag_overrides(args)


def main(args: argparse.Namespace) -> int:
    """``kdlab study``: ``args.config`` is the loaded :class:`StudyConfig`."""
    return design.grid_command_main(args, "study", plan=study_plan, describe=describe, run=run)


# --------------------------------------------------------------------------- planning


def _refuse(source: str, message: str) -> None:
    raise ConfigError(f"{source}: kdlab study: {message}")


def check_study_grid(grid: SweepConfig, source: str) -> None:
    """The grid shapes the study's claims can read: one family, teacher and student; SFT,
    forward KL and reverse KL; the axes the study sets itself left at their defaults."""
    from kdlab.analysis.claims import FORWARD_KL, REVERSE_KL

    if len(grid.selected_families) != 1:
        _refuse(source, "the claims are about one task family; select one (task_families)")
    if len(grid.teachers) != 1 or len(grid.students) != 1:
        _refuse(source, "the claims compare one student's runs of one teacher; the grid has "
                f"{len(grid.teachers)} teacher(s) and {len(grid.students)} student(s)")  # fmt: skip
    specs = [grid.method_spec(name) for name in grid.methods]
    kinds = [None if not spec.needs_teacher else spec.name for spec in specs]
    if sorted(kinds, key=str) != sorted([None, FORWARD_KL, REVERSE_KL], key=str):
        _refuse(source, "methods must be one SFT entry, forward_kl and reverse_kl (the grid "
                f"has {', '.join(grid.methods)}); run other methods with kdlab sweep")  # fmt: skip
    if [float(value) for value in grid.temperatures] != [1.0]:
        _refuse(source, "temperatures must be [1.0]: the study adds T = 5 itself")
    if [float(value) for value in grid.noise_stds] != [0.0]:
        _refuse(source, "noise_stds must be [0.0]: the study adds σ = 5 itself")
    if list(grid.base_teacher) != [False]:
        _refuse(source, "base_teacher must be [false]: the study adds the base teacher itself")
    if grid.analysis.compare_methods:
        _refuse(source, "analysis.compare_methods is set by the study (the pairs its claims "
                "compare); leave it empty")  # fmt: skip


def _method_entry(grid: SweepConfig, method: str | None) -> str:
    """The grid's method entry for ``method`` (None: SFT), the first one listed."""
    for name in grid.methods:
        spec = grid.method_spec(name)
        if (method is None and not spec.needs_teacher) or (
            method is not None and spec is get_method(method)
        ):
            return name
    raise ConfigError(f"no method entry for {method or 'SFT'}")  # checked before: a bug


def plan_study(
    grid: SweepConfig, grid_path: str, *, seeds: list[int], ablation_seeds: list[int]
) -> SweepPlan:
    """Every run of the study (see the module docstring), with cache-aware cost estimates."""
    from kdlab.analysis.claims import ablation_kinds, compare_methods, paper_claims

    check_study_grid(grid, grid_path)
    outside = [seed for seed in ablation_seeds if seed not in seeds]
    if outside:
        raise ConfigError(
            f"ablation_seeds: {outside[0]} is not a seed of the main grid ({seeds}); an "
            "ablation is compared with the forward-KL and SFT runs of its own seed"
        )
    first = replace(grid, seeds=[seeds[0]])
    planner = GridPlanner(first, grid_path=grid_path)
    demo = planner.plan()  # validates the grid; its training runs are the demo's
    training = [run for run in demo.runs if run.stage in ("finetune", "distill")]
    (teacher_run,) = [run for run in training if run.stage == "finetune"]
    (family,) = grid.selected_families
    (student,) = grid.students
    (teacher,) = grid.teachers
    common = {"student": student, "family": family}
    kd = {"teacher": teacher, "teacher_dir": teacher_run.run_dir}
    for seed in seeds[1:]:
        for method in grid.methods:
            if grid.method_spec(method).needs_teacher:
                training.append(
                    planner.student_run(**common, **kd, method=method, seed=seed, temperature=1.0)
                )
            else:
                training.append(planner.student_run(**common, method=method, seed=seed))
    claims = paper_claims()
    for seed in ablation_seeds:
        for kind in ablation_kinds(claims):
            training.append(
                planner.student_run(
                    **common, **kd, method=_method_entry(grid, kind.method), seed=seed,
                    temperature=kind.temperature, noise_std=kind.noise_std,
                    base_teacher=kind.base_teacher,
                )
            )  # fmt: skip
    weights = {run.config.distill.kd_weight for run in training if run.kind == "kd"}
    if weights - {1.0}:
        _refuse(grid_path, f"the paper's claims are at kd_weight 1 (pure KD); the grid sets "
                f"{sorted(weights - {1.0})}")  # fmt: skip
    evaluations = [planner.eval_run(run) for run in training if run.reuses is None]
    analysis_dir = Path(grid.out_dir) / ANALYSIS_DIR
    options = {**options_of(grid.analysis), "compare_methods": compare_methods(claims)}
    analysis = PlannedRun(
        stage="analysis",
        kind="analysis",
        name="analysis",
        run_dir=analysis_dir,
        config=AnalyzeConfig(
            run_dirs=[str(run.reuses or run.run_dir) for run in training],
            out_dir=str(analysis_dir),
            **options,
        ),
    )
    plan = SweepPlan(
        replace(grid, seeds=list(seeds)),
        Path(grid.out_dir),
        [*training, *evaluations, analysis],
        grid_path,
        [
            *demo.notes,
            f"one teacher ({teacher_run.name}) for the students of every seed; ablations "
            f"on seed(s) {', '.join(map(str, ablation_seeds)) or 'none'}",
        ],
    )
    estimate_plan(plan, planner)
    return plan


def study_plan(config: StudyConfig) -> SweepPlan:
    """The study's plan: its grid (``out``, ``model``, seeds applied; ``plan.config``)."""
    grid, grid_path = design.load_grid(config, "study")
    seeds = list(dict.fromkeys(config.seeds if config.seeds is not None else grid.seeds))
    ablation_seeds = list(config.ablation_seeds) if config.ablation_seeds is not None else seeds[:1]
    return plan_study(grid, grid_path, seeds=seeds, ablation_seeds=ablation_seeds)


# --------------------------------------------------------------------------- claims


def write_claims(plan: SweepPlan) -> str:
    """``claims.md`` / ``.csv`` / ``.tex`` from the study's analysis; returns the Markdown."""
    from kdlab.analysis.claims import claims_markdown, claims_table, evaluate_claims
    from kdlab.analysis.outputs import AnalysisOutputs
    from kdlab.analysis.report import latex_table

    analysis_dir = next(run.run_dir for run in plan.runs if run.stage == "analysis")
    out = plan.out_dir
    try:
        outputs = AnalysisOutputs.read(analysis_dir)
    except RunDirError as error:
        text = f"# The paper's claims, tested at small scale\n\nNo results: {error.one_line()}\n"
        atomic_write_text(out / f"{CLAIMS_STEM}.md", text)
        return text
    results = evaluate_claims(outputs)
    table = claims_table(results, outputs.alpha)
    atomic_write_text(out / f"{CLAIMS_STEM}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{CLAIMS_STEM}.tex", latex_table(table.drop(columns=["per seed"])))
    text = claims_markdown(results, outputs.alpha, source=str(analysis_dir))
    text += "\n## Wall time (measured, `timings.json`)\n\n"
    text += design.budget_markdown(wall_time_rows(plan, out), remaining=False)
    atomic_write_text(out / f"{CLAIMS_STEM}.md", text)
    return text


# --------------------------------------------------------------------------- entry points


class StudyResult(design.CommandResult):
    """What :func:`run` did: the plan, the sweep's outcome, the claims page (``page``)."""


def run(config: StudyConfig, *, resume: bool = False, overwrite: bool = False) -> StudyResult:
    """The stage contract (:mod:`kdlab.stages`): run the study; returns what it did.

    Always continues (``resume`` changes nothing); ``overwrite`` empties the output
    directory first (the demo's runs too when it is the demo's), and only when a demo or a
    study made it (:func:`kdlab.sweep.design.owned_output`).
    """
    del resume  # always on
    plan = study_plan(config)
    with design.owned_output(plan, overwrite=overwrite) as out:
        outcome = design.execute(
            plan, extra_files={"study.config.yaml": design.config_record(config)}
        )
        text = write_claims(plan)
    return StudyResult(plan, outcome, text, out / f"{CLAIMS_STEM}.md")


__all__ = [
    "StudyResult",
    "add_arguments",
    "check_study_grid",
    "flag_overrides",
    "main",
    "plan_study",
    "run",
    "study_plan",
    "write_claims",
]
