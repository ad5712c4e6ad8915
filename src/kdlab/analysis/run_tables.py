"""Tables in the paper's layouts built from run directories.

For one task family: the accuracy table (Teacher, Student, Method, tasks..., Average; seeds
of the same configuration averaged), the pair tables EM1 (student vs teacher answers), EM2
(KD student vs SFT student answers), BLEU and ROUGE-L (student vs teacher rationales), and a
per-run table with the identity of every run and its averages (one point per run in plots).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kdlab.analysis.agreement import answer_agreement
from kdlab.analysis.fidelity import aligned_outputs, mean_rouge_l, reasoning_fidelity
from kdlab.analysis.paper_tables import AVERAGE, METHOD, STUDENT, TEACHER
from kdlab.analysis.plots import LOSS_PANELS, LossCurve
from kdlab.analysis.runs import Run, RunCollection, student_size_billions

logger = logging.getLogger(__name__)

PAIR_METRICS = ("EM1", "EM2", "BLEU", "ROUGE-L")


@dataclass
class PairScores:
    """Agreement and fidelity of one run against its references, per task."""

    em1: dict[str, float] = field(default_factory=dict)
    em2: dict[str, float] = field(default_factory=dict)
    bleu: dict[str, float] = field(default_factory=dict)
    rouge_l: dict[str, float] = field(default_factory=dict)

    def by_metric(self, metric: str) -> dict[str, float]:
        """The per-task values of ``EM1``, ``EM2``, ``BLEU`` or ``ROUGE-L``."""
        return {"EM1": self.em1, "EM2": self.em2, "BLEU": self.bleu, "ROUGE-L": self.rouge_l}[
            metric
        ]


@dataclass
class FamilyTables:
    """Every table of one task family."""

    family: str
    tasks: list[str]
    runs: list[Run]
    accuracy: pd.DataFrame
    per_run: pd.DataFrame
    pairs: dict[str, pd.DataFrame]
    student_sizes: dict[str, float]


def _mean(values: Sequence[float]) -> float:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return float(np.mean(finite)) if finite else math.nan


def _registry_order() -> list[str]:
    """Task names in the paper's column order, from the evaluation task registry."""
    try:
        from kdlab.evaluation.tasks import list_tasks
    except ImportError:  # pragma: no cover - the registry is part of kdlab
        return []
    return [name.lower() for name in list_tasks()]


def _task_order(runs: Sequence[Run]) -> list[str]:
    """The tasks of ``runs``: registered ones in the paper's order, then the others."""
    tasks: list[str] = []
    for run in runs:
        for task in run.tasks:
            if task not in tasks:
                tasks.append(task)
    order = _registry_order()

    def key(task: str) -> tuple[int, int]:
        lowered = task.lower()
        if lowered in order:
            return (0, order.index(lowered))
        return (1, tasks.index(task))

    return sorted(tasks, key=key)


def _kind(run: Run) -> str:
    if run.is_base:
        return "base"
    if run.is_teacher:
        return "teacher"
    if run.is_sft:
        return "sft"
    return "kd" if run.is_kd else "other"


def _sort_key(row: pd.Series) -> tuple[Any, ...]:
    method = str(row[METHOD])
    order = {"BaseModel": 0, "Teacher": 1, "SFT": 2}.get(method, 3)
    size = row.get("_size")
    size_key = size if isinstance(size, float) and math.isfinite(size) else math.inf
    return (order, str(row[TEACHER]), size_key, str(row[STUDENT]), method)


def _compare(
    run: Run,
    reference: Run,
    tasks: Sequence[str],
    *,
    rouge_max_items: int | None,
    with_fidelity: bool,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per-task EM, BLEU and ROUGE-L of ``run`` against ``reference``."""
    agreement: dict[str, float] = {}
    bleu: dict[str, float] = {}
    rouge_l: dict[str, float] = {}
    for task in tasks:
        if task not in run.tasks or task not in reference.tasks:
            continue
        predictions = run.tasks[task].predictions()
        reference_predictions = reference.tasks[task].predictions()
        result = answer_agreement(predictions, reference_predictions)
        if result.agreement is not None:
            agreement[task] = result.agreement
        if not with_fidelity:
            continue
        fidelity = reasoning_fidelity(predictions, reference_predictions, rouge=False)
        if fidelity.bleu is not None:
            bleu[task] = fidelity.bleu
        if rouge_max_items != 0:
            hypotheses, references = aligned_outputs(predictions, reference_predictions)
            if rouge_max_items is not None:
                hypotheses, references = (
                    hypotheses[:rouge_max_items],
                    references[:rouge_max_items],
                )
            rouge = mean_rouge_l(hypotheses, references)
            if rouge is not None:
                rouge_l[task] = rouge
    return agreement, bleu, rouge_l


def pair_scores(
    collection: RunCollection, run: Run, tasks: Sequence[str], *, rouge_max_items: int | None
) -> PairScores:
    """EM1, BLEU, ROUGE-L against the teacher and EM2 against the SFT baseline of a KD run."""
    links = collection.links_of(run)
    scores = PairScores()
    if links.teacher is not None and links.teacher.tasks:
        scores.em1, scores.bleu, scores.rouge_l = _compare(
            run, links.teacher, tasks, rouge_max_items=rouge_max_items, with_fidelity=True
        )
    if links.sft_baseline is not None and links.sft_baseline.tasks:
        scores.em2, _, _ = _compare(
            run, links.sft_baseline, tasks, rouge_max_items=rouge_max_items, with_fidelity=False
        )
    return scores


def build_family_tables(
    collection: RunCollection, family: str, *, rouge_max_items: int | None = None
) -> FamilyTables:
    """All tables for the evaluated runs of one task family."""
    runs = [run for run in collection.evaluated if run.task_family == family]
    tasks = _task_order(runs)
    sizes: dict[str, float] = {}
    per_run_rows: list[dict[str, Any]] = []
    pair_rows: dict[str, list[dict[str, Any]]] = {metric: [] for metric in PAIR_METRICS}
    sft_pairs_done: set[tuple[Any, Any]] = set()

    def add_pair_rows(teacher_label: str, run: Run, method: str, scores: PairScores) -> None:
        for metric in PAIR_METRICS:
            values = scores.by_metric(metric)
            if not values:
                continue
            row: dict[str, Any] = {TEACHER: teacher_label, STUDENT: run.student_label}
            row[METHOD] = method
            row.update({task: values.get(task, math.nan) for task in tasks})
            row[AVERAGE] = _mean(list(values.values()))
            pair_rows[metric].append(row)

    for run in runs:
        size = student_size_billions(run)
        if size is not None:
            sizes.setdefault(run.student_label, size)
        accuracies = {task: run.tasks[task].accuracy for task in tasks if task in run.tasks}
        missing = [task for task in tasks if task not in run.tasks]
        if missing:
            logger.warning(
                "%s lacks task(s) %s: its Average covers the others only",
                run.describe(),
                ", ".join(missing),
            )
        links = collection.links_of(run)
        # The teacher's own label (as its SFT row shows it), so H2 finds its SFT score.
        teacher_label = (
            links.teacher.student_label
            if run.is_kd and links.teacher is not None and not run.base_teacher
            else run.teacher_label
        )
        scores = (
            pair_scores(collection, run, tasks, rouge_max_items=rouge_max_items)
            if run.is_kd
            else PairScores()
        )
        if run.is_kd:
            add_pair_rows(teacher_label, run, run.method_label, scores)
            teacher, baseline = links.teacher, links.sft_baseline
            if teacher is not None and baseline is not None and teacher.tasks:
                key = (teacher.run_dir, baseline.run_dir)
                if key not in sft_pairs_done:
                    sft_pairs_done.add(key)
                    em1, bleu, rouge_l = _compare(
                        baseline,
                        teacher,
                        tasks,
                        rouge_max_items=rouge_max_items,
                        with_fidelity=True,
                    )
                    sft_scores = PairScores(em1=em1, bleu=bleu, rouge_l=rouge_l)
                    add_pair_rows(teacher_label, baseline, "SFT", sft_scores)
        row: dict[str, Any] = {
            TEACHER: teacher_label,
            STUDENT: run.student_label,
            METHOD: run.method_label,
            **{task: accuracies.get(task, math.nan) for task in tasks},
            AVERAGE: _mean(list(accuracies.values())),
            "EM1": _mean(list(scores.em1.values())),
            "EM2": _mean(list(scores.em2.values())),
            "BLEU": _mean(list(scores.bleu.values())),
            "ROUGE-L": _mean(list(scores.rouge_l.values())),
            "kind": _kind(run),
            "method": run.method or None,
            "temperature": run.temperature,
            "noise_std": run.noise_std,
            "base_teacher": run.base_teacher,
            "seed": run.seed,
            "model": run.model,
            "model_params": run.model_params,
            "name": run.name,
            "run_dir": str(run.run_dir),
            "teacher_run_dir": str(links.teacher.run_dir) if links.teacher else None,
            "sft_run_dir": str(links.sft_baseline.run_dir) if links.sft_baseline else None,
            "_size": size if size is not None else math.nan,
        }
        per_run_rows.append(row)

    per_run = pd.DataFrame.from_records(per_run_rows)
    if not per_run.empty:
        order = sorted(range(len(per_run)), key=lambda i: _sort_key(per_run.iloc[i]))
        per_run = per_run.iloc[order].reset_index(drop=True)
    accuracy = _average_seeds(per_run, [*tasks, AVERAGE])
    per_run = per_run.drop(columns=["_size"], errors="ignore")
    pairs = {
        metric: _average_seeds(pd.DataFrame.from_records(rows), [*tasks, AVERAGE])
        for metric, rows in pair_rows.items()
    }
    return FamilyTables(
        family=family,
        tasks=tasks,
        runs=runs,
        accuracy=accuracy,
        per_run=per_run,
        pairs=pairs,
        student_sizes=sizes,
    )


def _average_seeds(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per (Teacher, Student, Method): the mean over seeds, in first-seen order."""
    layout = [TEACHER, STUDENT, METHOD, *columns]
    if table.empty:
        return pd.DataFrame(columns=layout)
    grouped = table.groupby([TEACHER, STUDENT, METHOD], sort=False)[list(columns)].mean()
    counts = table.groupby([TEACHER, STUDENT, METHOD], sort=False).size()
    if (counts > 1).any():
        logger.info("averaged over seeds: %d configurations had several runs", (counts > 1).sum())
    return grouped.reset_index()[layout]


def _logged_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def loss_curves(runs: Sequence[Run]) -> list[LossCurve]:
    """The training curves (``metrics.jsonl``) of the runs that have one.

    Labels are the Method and student (and the seed, when the runs have several seeds).
    """
    seeds = {run.seed for run in runs}
    curves: list[LossCurve] = []
    for run in runs:
        log = run.training_log()
        if not log:
            continue
        label = f"{run.method_label} ({run.student_label}"
        label += f", seed {run.seed})" if len(seeds) > 1 else ")"
        values = {
            key: tuple(_logged_float(record.get(key)) for record in log) for key, _ in LOSS_PANELS
        }
        steps = tuple(float(record["step"]) for record in log)
        curves.append(LossCurve(label=label, steps=steps, values=values))
    return curves
