"""``kdlab sweep GRID.yaml [key=value ...]``: run a grid of teachers, students and methods.

Examples::

    kdlab sweep configs/paper/qwen_math.yaml --dry-run
    kdlab sweep configs/paper/qwen_math.yaml out_dir=/scratch/paper eval.data_dir=/data/eval
    kdlab sweep configs/paper/qwen_math.yaml --executor submitit \\
        executor.submitit.parameters.slurm_partition=gpu

Running the same command again skips every completed run (its ``DONE`` marker), retries
failed ones and continues interrupted ones. See ``docs/sweeps.md``.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdlab.config.core import to_dict
from kdlab.config.evaluation import CustomTaskConfig
from kdlab.config.sweep import SweepConfig
from kdlab.errors import ConfigError, DataError
from kdlab.evaluation.tasks import default_data_source, expand_task_names, get_task
from kdlab.sweep.executors import make_executor
from kdlab.sweep.grid import plan_sweep
from kdlab.sweep.runner import SweepOutcome, SweepRunner
from kdlab.sweep.status import changed_keys, disk_state, run_state
from kdlab.utils.io import atomic_write_json, atomic_write_yaml
from kdlab.utils.locking import lock_directory

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kdlab sweep`` (the grid file and overrides are ``kdlab.cli``'s)."""
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Print every run (stage, state, directory) and the estimated cost; run nothing.",
    )
    parser.add_argument(
        "--only-plan",
        action="store_true",
        help="Write <out_dir>/sweep_plan.<name>.json (every run with its resolved config and "
        "dependencies) and stop; run nothing.",
    )
    parser.add_argument(
        "--executor",
        choices=("local", "submitit"),
        default=None,
        help="local: sequential in this process (default); submitit: one job per run "
        "(SLURM on clusters). Overrides executor.name.",
    )
    parser.add_argument(
        "--allow-changed",
        action="store_true",
        help="Keep existing runs whose settings differ from the grid's (default: refuse).",
    )
    parser.add_argument("--no-eval", action="store_true", help="Train only: skip evaluations.")
    parser.add_argument(
        "--no-analysis", action="store_true", help="Skip `kdlab analyze` at the end."
    )


# --------------------------------------------------------------------------- formatting


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _work(run: Any) -> str:
    if run.estimate.steps is not None:
        return f"{run.estimate.steps} st"
    if run.estimate.items is not None:
        return f"{run.estimate.items} it"
    return "-" if run.stage == "analysis" or run.reuses is not None else "?"


def _sum(values: list[float | None]) -> tuple[float, bool]:
    """Sum of the known values, and whether every value was known."""
    known = [value for value in values if value is not None]
    return float(sum(known)), len(known) == len(values)


def describe_plan(plan: Any) -> str:
    """The dry-run report: one line per run with its state, then totals and the cost."""
    config = plan.config
    lines = [
        f"sweep {plan.name}: {plan.grid_path or '(no file)'} → {plan.out_dir}",
        f"families: {', '.join(config.selected_families)} · seeds: "
        f"{', '.join(map(str, config.seeds))} · teachers: {', '.join(config.teachers) or '-'}"
        f" · students: {', '.join(config.students)} · methods: {', '.join(config.methods)}",
        "",
    ]
    rows = []
    states: dict[str, str] = {}
    changes = {run.key: changed_keys(run) for run in plan.runs}
    for run in plan.runs:
        state = run_state(run, plan.out_dir)
        states[run.key] = state
        shown = state
        if run.reuses is not None:
            shown = "reused"
        elif changes[run.key]:
            shown = f"{state}*"
        where = str(run.run_dir)
        if run.reuses is not None:
            where += f" = {run.reuses}"
        cost = "-" if run.stage == "analysis" or run.reuses else _hours(run.estimate.seconds)
        rows.append((run.stage, run.kind, shown, _work(run), cost, where))
    header = ("STAGE", "KIND", "STATE", "WORK", "EST", "DIRECTORY")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        cells = [row[i].ljust(widths[i]) for i in range(5)]
        lines.append("  ".join([*cells, row[5]]).rstrip())
    lines.append("")
    training = [run for run in plan.runs if run.stage in ("finetune", "distill")]
    kinds = Counter(run.kind for run in training if run.reuses is None)
    reused = sum(1 for run in training if run.reuses is not None)
    evals = [run for run in plan.runs if run.stage == "eval"]
    base = sum(1 for run in evals if run.kind == "base")
    summary = (
        f"runs: {len(training) - reused} training ({kinds.get('teacher', 0)} teachers, "
        f"{kinds.get('sft', 0)} SFT students, {kinds.get('kd', 0)} KD students)"
    )
    if reused:
        summary += f", {reused} SFT student(s) reusing a teacher run"
    summary += f"; {len(evals)} evaluations"
    if base:
        summary += f" ({base} of base models)"
    summary += f"; {sum(1 for run in plan.runs if run.stage == 'analysis')} analysis"
    lines.append(summary)
    for label, group in (("training", training), ("evaluations", evals)):
        counts = Counter(states[run.key] for run in group if run.reuses is None)
        if group:
            lines.append(
                f"state of {label}: "
                + ", ".join(f"{counts.get(state, 0)} {state}" for state in ("done", "failed",
                                                                           "partial", "todo"))
            )  # fmt: skip
    changed = [run for run in plan.runs if run.reuses is None and changes[run.key]]
    if changed:
        lines.append(
            f"* {len(changed)} existing run(s) were made with other settings "
            f"(e.g. {changed[0].run_dir}: {', '.join(changes[changed[0].key][:4])}); "
            "the sweep refuses to start unless --allow-changed"
        )
    steps, steps_known = _sum([run.estimate.steps for run in training if run.reuses is None])
    items, items_known = _sum([run.estimate.items for run in evals])
    train_s, train_known = _sum([run.estimate.seconds for run in training if run.reuses is None])
    eval_s, eval_known = _sum([run.estimate.seconds for run in evals])
    remaining, remaining_known = _sum(
        [
            run.estimate.seconds
            for run in training + evals
            if run.reuses is None and states[run.key] != "done"
        ]
    )

    def total(value: float, known: bool) -> str:
        return f"{value:,.0f}{'' if known else '+ (some unknown)'}"

    lines.append(
        f"estimated cost (rough, one accelerator; model in docs/sweeps.md): training "
        f"{total(steps, steps_known)} steps ≈ {_hours(train_s)}{'' if train_known else '+'}"
        f"; evaluation {total(items, items_known)} items ≈ {_hours(eval_s)}"
        f"{'' if eval_known else '+'}; remaining ≈ {_hours(remaining)}"
        f"{'' if remaining_known else '+'}"
    )
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def plan_as_dict(plan: Any) -> dict[str, Any]:
    """Every run with its resolved config, dependencies and estimate (``--only-plan``)."""
    return {
        "name": plan.name,
        "grid": plan.grid_path,
        "out_dir": str(plan.out_dir),
        "notes": plan.notes,
        "runs": [
            {
                "stage": run.stage,
                "kind": run.kind,
                "name": run.name,
                "family": run.family,
                "run_dir": str(run.run_dir),
                "depends_on": [str(path) for path in run.depends_on],
                "reuses": str(run.reuses) if run.reuses else None,
                "params": run.params,
                "estimate": asdict(run.estimate),
                "config": to_dict(run.config),
            }
            for run in plan.runs
        ],
    }


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class MissingInput:
    """A data path of the plan that does not exist on this machine."""

    what: str
    """The key that names it (``data.train_files``, ``eval.data_dir``, ...)."""
    path: str
    runs: int
    """How many planned runs need it."""

    def describe(self) -> str:
        return f"{self.what} {self.path} (needed by {self.runs} run{'s' * (self.runs != 1)})"


def _is_local(source: Any) -> bool:
    """A source that names a file or folder here (not a hub id, not a generator spec)."""
    return not str(source).startswith(("hf:", "hub:", "generated:"))


def _train_inputs(config: Any) -> list[tuple[str, str]]:
    """(key, path) of the training files of a finetune/distill config that are missing."""
    inputs = []
    for entry in config.data.train_files:
        source = entry.get("path") if isinstance(entry, Mapping) else entry
        if source is not None and _is_local(source) and not Path(source).expanduser().exists():
            inputs.append(("data.train_files", str(source)))
    return inputs


def _eval_inputs(config: Any) -> list[tuple[str, str]]:
    """(key, path) of the missing things an evaluation reads: a missing ``data_dir`` stands
    for its task files; with ``skip_missing`` only a task list with no file left counts."""
    sources: list[str | None] = []  # None: a registered task's file under a null data_dir
    for entry in config.tasks:
        if isinstance(entry, CustomTaskConfig) and entry.path is not None:
            sources.append(entry.path)
            continue
        custom = isinstance(entry, CustomTaskConfig)
        for name in [entry.name] if custom else expand_task_names(entry):
            # a registered task may have its own source (a hub id); a custom type has none
            source = None if custom and entry.type is not None else get_task(name).source
            if source is None and config.data_dir is not None:
                source = default_data_source(name, config.data_dir)
            sources.append(source)
    missing = [
        source
        for source in sources
        if source is None or (_is_local(source) and not Path(source).expanduser().exists())
    ]
    inputs: list[tuple[str, str]] = []
    if missing and (not config.skip_missing or len(missing) == len(sources)):
        data_dir = config.data_dir
        if data_dir is None or not Path(data_dir).expanduser().is_dir():
            inputs.append(("eval.data_dir", str(data_dir)))
            # the files under a missing data_dir are not listed one by one
            missing = [
                source
                for source in missing
                if source is not None
                and (data_dir is None or not Path(source).is_relative_to(data_dir))
            ]  # fmt: skip
        inputs.extend(("eval task data", source) for source in missing if source is not None)
    for source in config.decontaminate_against or []:
        if _is_local(source) and not Path(source).expanduser().exists():
            inputs.append(("eval.decontaminate_against", str(source)))
    return inputs


def missing_inputs(plan: Any, *, run_eval: bool = True) -> list[MissingInput]:
    """Every data path of the unfinished runs of ``plan`` (training files, eval data) that
    does not exist here, with the number of runs needing it."""
    counts: Counter[tuple[str, str]] = Counter()
    for run in plan.runs:
        if run.reuses is not None or disk_state(run.run_dir) == "done":
            continue  # a finished run reads nothing any more
        if run.stage in ("finetune", "distill"):
            inputs = _train_inputs(run.config)
        elif run.stage == "eval" and run_eval:
            inputs = _eval_inputs(run.config)
        else:
            continue
        for what, path in dict.fromkeys(inputs):
            counts[(what, path)] += 1
    return [MissingInput(what, path, runs) for (what, path), runs in counts.items()]


def refuse_missing_inputs(plan: Any, missing: list[MissingInput]) -> None:
    """One line naming the plan's data paths that do not exist (DataError), if any."""
    if missing:
        shown = "; ".join(item.describe() for item in missing[:3])
        more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(
            f"sweep {plan.name}: {len(missing)} input path(s) do not exist here: {shown}{more} "
            "(override them, e.g. eval.data_dir=/data/eval, "
            "families.<family>.defaults.data.train_files=[/data/train.json])"
        )


# --------------------------------------------------------------------------- entry point


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--executor NAME`` is ``executor.name=NAME``."""
    return [f"executor.name={args.executor}"] if args.executor else []


def run(
    config: SweepConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    grid_path: str | None = None,
    allow_changed: bool = False,
    run_eval: bool = True,
    run_analysis: bool = True,
) -> SweepOutcome:
    """Run a sweep (the stage contract, :mod:`kdlab.stages`); returns its outcome.

    A sweep always continues where it stopped (``resume`` changes nothing) and never deletes
    a run (``overwrite`` is refused). Missing data paths are refused before anything runs.
    """
    del resume  # always on: completed runs are skipped, interrupted ones continued
    if overwrite:
        raise ConfigError(
            "kdlab sweep never deletes runs: --overwrite is refused (choose another out_dir, "
            "or delete the runs to redo)"
        )
    plan = plan_sweep(config, grid_path=grid_path)
    refuse_missing_inputs(plan, missing_inputs(plan, run_eval=run_eval))
    executor = make_executor(config.executor, plan.out_dir, plan.name)
    runner = SweepRunner(
        plan,
        executor,
        allow_changed=allow_changed,
        run_eval=run_eval,
        run_analysis=run_analysis,
    )
    runner.check_changed()
    # One sweep process per directory (sweep_status.json and the runs are shared); the
    # runs' own locks keep a stage and a user's command off one run directory.
    with lock_directory(plan.out_dir, what="sweep directory"):
        atomic_write_yaml(plan.out_dir / "sweep_grids" / f"{plan.name}.yaml", to_dict(config))
        return runner.run()


def main(args: argparse.Namespace) -> int:
    """Run ``kdlab sweep``; returns 0 when every planned run is complete, 1 otherwise."""
    config: SweepConfig = args.config
    grid_path = None if args.config_file is None else str(args.config_file)
    if args.overwrite:
        run(config, overwrite=True)  # refused, before a plan is printed
    plan = plan_sweep(config, grid_path=grid_path)
    if args.dry_run:
        print(describe_plan(plan), end="")
        missing = missing_inputs(plan, run_eval=not args.no_eval)
        for item in missing:
            print(f"missing: {item.describe()}")
        refuse_missing_inputs(plan, missing)
        return 0
    if args.only_plan:
        path = plan.out_dir / f"sweep_plan.{plan.name}.json"
        atomic_write_json(path, plan_as_dict(plan))
        print(f"plan of {len(plan.runs)} runs written to {path}")
        return 0
    outcome = run(
        config,
        resume=args.resume,
        grid_path=grid_path,
        allow_changed=args.allow_changed,
        run_eval=not args.no_eval,
        run_analysis=not args.no_analysis,
    )
    counts = ", ".join(f"{count} {status}" for status, count in sorted(outcome.counts.items()))
    print(f"sweep {plan.name}: {counts}")
    for entry in outcome.unfinished:
        detail = entry.get("reason") or (
            f"{entry.get('error_type')}: {entry.get('message')}" if entry.get("error_type") else ""
        )
        print(f"  {entry['status']:<11} {entry['stage']:<9} {entry['run_dir']}  {detail}".rstrip())
    print(f"status: {outcome.status_file}")
    return 0 if outcome.ok else 1


__all__ = [
    "MissingInput",
    "add_arguments",
    "describe_plan",
    "flag_overrides",
    "main",
    "missing_inputs",
    "plan_as_dict",
    "run",
]
