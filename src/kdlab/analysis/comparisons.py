"""Comparisons of runs that a reviewer can check: the same items, the same seeds.

For the runs of one task family (:mod:`kdlab.analysis.run_tables`):

- **KD vs SFT on the same items.** Every KD run against its SFT baseline (the same student,
  the same seed where one exists: :func:`kdlab.analysis.runs.find_sft_baseline`): per task
  and on the Average, the accuracy difference (points) with a paired, task-stratified
  bootstrap interval and McNemar's exact test (:mod:`kdlab.analysis.paired`). Items are
  matched by ``index``; items only one run has are left out (and counted). The Average's
  McNemar test pools the items of every task; its difference is the mean of the per-task
  differences (kdlab's Average). The tests of one column form one family (Holm).
- **Methods the config names** (``compare_methods``): every pair A, B of the names, their
  runs paired when they share student, teacher and seed (and, when both names are methods
  rather than Method labels, temperature, noise, base-teacher and KD-weight settings), the
  same tests; one family per pair and column.
- **Across seeds.** Runs that differ only by seed (same Teacher, Student, Method) as mean ±
  t-interval over seeds, with the per-seed values; and each KD configuration's per-seed
  difference to the SFT run of the same seed, as mean ± t-interval with a two-sided t-test
  (one family per column, Holm).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from kdlab.analysis.agreement import index_predictions
from kdlab.analysis.numbers import count_text, format_p, format_percent_level, format_signed
from kdlab.analysis.paired import Interval, mcnemar_exact, paired_bootstrap, t_interval
from kdlab.analysis.paper_tables import AVERAGE, METHOD, STUDENT, TEACHER
from kdlab.analysis.runs import Run, RunCollection
from kdlab.analysis.statistics import NOT_ENOUGH_DATA, StatResult, apply_holm

logger = logging.getLogger(__name__)

QUESTION_KD_SFT = "KD vs SFT"
PAIRED_TEST = "McNemar exact + paired bootstrap"
SEEDS_TEST = "two-sided t-test across seeds"


@dataclass(frozen=True)
class RunPair:
    """Two runs compared item by item: ``first`` − ``second``."""

    question: str
    """The family of tests this pair belongs to (``KD vs SFT``, ``forward_kl vs reverse_kl``)."""
    first: Run
    second: Run

    @property
    def first_label(self) -> str:
        return self.first.method_label

    @property
    def second_label(self) -> str:
        return "SFT" if self.question == QUESTION_KD_SFT else self.second.method_label

    @property
    def context(self) -> str:
        """Student, teacher and seed(s), for sentences."""
        parts = [self.first.student_label]
        if self.first.is_kd:
            parts.append(f"teacher {self.first.teacher_label}")
        seeds = (self.first.seed, self.second.seed)
        if seeds[0] == seeds[1]:
            parts.append(f"seed {seeds[0]}" if seeds[0] is not None else "no seed recorded")
        else:
            parts.append(f"seeds {seeds[0]} vs {seeds[1]}")
        return ", ".join(parts)


@dataclass
class ComparisonTables:
    """What the comparisons give for one section: results, tables and notes."""

    results: list[StatResult] = field(default_factory=list)
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)
    seeds: pd.DataFrame = field(default_factory=pd.DataFrame)
    seed_differences: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- items


def correct_by_index(predictions: Iterable[Mapping[str, Any]]) -> dict[Any, bool]:
    """Each item's ``correct`` flag, keyed by ``index`` (as EM1 matches items)."""
    return {
        key: bool(record.get("correct")) for key, record in index_predictions(predictions).items()
    }


def aligned_correct(first: Run, second: Run, task: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Both runs' correct flags on the items of ``task`` they share, and the unshared counts.

    Returns ``(first_correct, second_correct, only_first, only_second)``; the shared items
    are in the first run's order.
    """
    if task not in first.tasks or task not in second.tasks:
        return np.zeros(0, bool), np.zeros(0, bool), 0, 0
    mine = correct_by_index(first.tasks[task].predictions())
    theirs = correct_by_index(second.tasks[task].predictions())
    shared = [key for key in mine if key in theirs]
    first_correct = np.array([mine[key] for key in shared], dtype=bool)
    second_correct = np.array([theirs[key] for key in shared], dtype=bool)
    return first_correct, second_correct, len(mine) - len(shared), len(theirs) - len(shared)


# --------------------------------------------------------------------------- which pairs


def kd_sft_pairs(collection: RunCollection, runs: Sequence[Run]) -> list[RunPair]:
    """Every KD run (ablations included) with its SFT baseline."""
    pairs = []
    for run in runs:
        if not run.is_kd:
            continue
        baseline = collection.links_of(run).sft_baseline
        if baseline is not None and baseline.tasks:
            pairs.append(RunPair(QUESTION_KD_SFT, run, baseline))
    return pairs


def _match(run: Run, name: str) -> tuple[bool, str] | None:
    """Whether ``run`` is one of ``name``'s runs: ``(by method, label suffix)`` or ``None``.

    A name matches a run whose Method label is the name (``forward_kl_T2``, ``SFT``), or a
    KD run whose method is the name (``forward_kl``; the suffix ``_T2`` is then kept).
    """
    label = run.method_label
    if label.lower() == name.lower():
        return (False, "")
    if run.is_kd and run.method == name.lower() and label.startswith(run.method):
        return (True, label[len(run.method) :])
    if name.lower() == "sft" and run.is_sft and not run.is_teacher:
        return (False, "")
    return None


def method_pairs(runs: Sequence[Run], names: Sequence[str]) -> tuple[list[RunPair], list[str]]:
    """Runs of every pair of ``names`` that differ only by method, and notes on the rest."""
    pairs: list[RunPair] = []
    notes: list[str] = []
    candidates = [run for run in runs if run.tasks and not run.is_base]
    matched = {name: [(run, _match(run, name)) for run in candidates] for name in names}
    matched = {
        name: [(run, m) for run, m in items if m is not None] for name, items in matched.items()
    }
    absent = [name for name, items in matched.items() if not items]
    if absent:
        notes.append(f"compare_methods: no evaluated run of {', '.join(absent)} in this family.")
    for first_name, second_name in combinations(names, 2):
        question = f"{first_name} vs {second_name}"
        found = 0
        unpaired: list[str] = []
        for run, (by_method, suffix) in matched[first_name]:
            partners = []
            for other, (other_by_method, other_suffix) in matched[second_name]:
                if other is run or other.student_label != run.student_label:
                    continue
                if other.seed != run.seed:
                    continue
                if run.is_kd and other.is_kd and run.teacher_label != other.teacher_label:
                    continue
                if by_method and other_by_method and suffix != other_suffix:
                    continue
                partners.append(other)
            if not partners:
                unpaired.append(f"{run.method_label} ({run.student_label}, seed {run.seed})")
                continue
            partners.sort(key=lambda other: str(other.run_dir))
            if len(partners) > 1:
                logger.warning(
                    "%s: %d runs of %s match; comparing with %s",
                    run.describe(), len(partners), second_name, partners[0].run_dir,
                )  # fmt: skip
            pairs.append(RunPair(question, run, partners[0]))
            found += 1
        if unpaired and matched[second_name]:
            notes.append(
                f"{question}: no {second_name} run with the same student, teacher, seed and "
                f"settings for {'; '.join(unpaired)}."
            )
        if not found and matched[first_name] and matched[second_name]:
            notes.append(f"{question}: no pair of runs that differ only by method.")
    return pairs, notes


# --------------------------------------------------------------------------- paired tests


def _paired_sentence(
    pair: RunPair, column: str, difference: Interval, test: Any, alpha: float
) -> str:
    head = f"{pair.first_label} − {pair.second_label} on {column} ({pair.context})"
    if test.p_value is None:
        return f"{head}: {NOT_ENOUGH_DATA}: {test.reason}"
    text = f"{head}: {format_signed(difference.estimate)} points"
    if difference.has_interval:
        text += (
            f", {format_percent_level(alpha)} CI [{format_signed(difference.low)}, "
            f"{format_signed(difference.high)}]"
        )
    else:
        text += f", no interval ({difference.reason})"
    text += (
        f"; McNemar exact p = {format_p(test.p_value)} ({test.first_only} vs "
        f"{test.second_only} discordant; n = {count_text(test.n_items, 'items')})"
    )
    return text


def compare_pair(
    pair: RunPair, tasks: Sequence[str], *, samples: int, seed: int, alpha: float
) -> tuple[list[dict[str, Any]], list[StatResult]]:
    """Per task and on the Average: difference, bootstrap interval, McNemar (rows + results)."""
    aligned: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    unshared: dict[str, tuple[int, int]] = {}
    for task in tasks:
        first, second, only_first, only_second = aligned_correct(pair.first, pair.second, task)
        if first.size or only_first or only_second:
            aligned[task] = (first, second)
            unshared[task] = (only_first, only_second)
    bootstrap = paired_bootstrap(aligned, samples=samples, seed=seed, alpha=alpha)
    rows: list[dict[str, Any]] = []
    results: list[StatResult] = []
    columns: list[tuple[str, tuple[np.ndarray, np.ndarray], Interval, tuple[int, int]]] = []
    for task, (first, second) in aligned.items():
        columns.append((task, (first, second), bootstrap.per_task[task], unshared[task]))
    if not aligned:
        nothing = np.zeros(0, dtype=bool)
        reason = "no task was evaluated by both runs"
        empty = Interval(None, None, None, 0, "items", reason=reason)
        columns.append((AVERAGE, (nothing, nothing), empty, (0, 0)))
    else:
        pooled = (
            np.concatenate([first for first, _ in aligned.values()]),
            np.concatenate([second for _, second in aligned.values()]),
        )
        missing = (sum(a for a, _ in unshared.values()), sum(b for _, b in unshared.values()))
        columns.insert(0, (AVERAGE, pooled, bootstrap.average, missing))
    for column, (first, second), difference, (only_first, only_second) in columns:
        test = mcnemar_exact(first, second)
        if column == AVERAGE:
            per_task = [(100 * a.mean(), 100 * b.mean()) for a, b in aligned.values() if a.size]
            first_accuracy = float(np.mean([a for a, _ in per_task])) if per_task else math.nan
            second_accuracy = float(np.mean([b for _, b in per_task])) if per_task else math.nan
        else:
            first_accuracy = 100 * float(first.mean()) if first.size else math.nan
            second_accuracy = 100 * float(second.mean()) if second.size else math.nan
        notes = [note for note in (test.note, difference.note) if note]
        if only_first or only_second:
            notes.append(
                f"{only_first} item(s) only in {pair.first_label}, {only_second} only in "
                f"{pair.second_label}: left out"
            )
        reason = test.reason or (difference.reason if not difference.has_interval else None)
        result = StatResult(
            hypothesis=f"paired: {pair.question}",
            test=PAIRED_TEST,
            column=column,
            group=f"{pair.first_label} vs {pair.second_label} ({pair.context})",
            statistic=None if test.p_value is None else float(test.statistic),
            p_value=test.p_value,
            n=test.n_items,
            sentence=_paired_sentence(pair, column, difference, test, alpha),
            mean=difference.estimate,
            unit="items",
            reason=reason,
            ci_low=difference.low,
            ci_high=difference.high,
            family=f"{pair.question} on {column}",
        )
        results.append(result)
        rows.append(
            {
                "question": pair.question,
                "comparison": f"{pair.first_label} − {pair.second_label}",
                TEACHER: pair.first.teacher_label,
                STUDENT: pair.first.student_label,
                "seed": pair.first.seed,
                "other seed": pair.second.seed,
                "column": column,
                "n": test.n_items,
                "unit": "items",
                "accuracy A (%)": first_accuracy,
                "accuracy B (%)": second_accuracy,
                "Δ A−B (points)": difference.estimate,
                "CI low": difference.low,
                "CI high": difference.high,
                "only A right": test.first_only,
                "only B right": test.second_only,
                "McNemar p": test.p_value,
                "Holm p": None,
                "m": None,
                "note": "; ".join(notes) if notes else (reason or ""),
                "run A": str(pair.first.run_dir),
                "run B": str(pair.second.run_dir),
            }
        )
    return rows, results


def compare_pairs(
    pairs: Sequence[RunPair], tasks: Sequence[str], *, samples: int, seed: int, alpha: float
) -> tuple[pd.DataFrame, list[StatResult]]:
    """Every pair's paired tests, Holm-adjusted per family; the table and the results."""
    rows: list[dict[str, Any]] = []
    results: list[StatResult] = []
    for pair in pairs:
        pair_rows, pair_results = compare_pair(pair, tasks, samples=samples, seed=seed, alpha=alpha)
        rows += pair_rows
        results += pair_results
    results = apply_holm(results)
    for row, result in zip(rows, results, strict=True):
        row["Holm p"] = result.p_holm
        row["m"] = result.family_size
    return pd.DataFrame.from_records(rows), results


# --------------------------------------------------------------------------- seeds


def _per_seed_text(seeds: Sequence[Any], values: Sequence[float], signed: bool = False) -> str:
    shown = [
        f"{seed}: {format_signed(value) if signed else f'{value:.1f}'}"
        for seed, value in zip(seeds, values, strict=True)
        if math.isfinite(value)
    ]
    return "; ".join(shown)


def _seed_interval_columns(
    group: tuple[str, str, str], column: str, mean_name: str, interval: Interval
) -> dict[str, Any]:
    """The leading columns of a row of :func:`seed_table` and :func:`seed_differences`, in
    the tables' order: (Teacher, Student, Method) ``group``, the ``column`` (task) and the
    t-interval over seeds, its estimate under ``mean_name``."""
    teacher, student, method = group
    return {
        TEACHER: teacher,
        STUDENT: student,
        METHOD: method,
        "column": column,
        "n": interval.n,
        "unit": "seeds",
        mean_name: interval.estimate,
        "CI low": interval.low,
        "CI high": interval.high,
    }


def seed_table(per_run: pd.DataFrame, columns: Sequence[str], *, alpha: float) -> pd.DataFrame:
    """Mean ± t-interval over seeds of each (Teacher, Student, Method) with several runs."""
    rows: list[dict[str, Any]] = []
    if per_run.empty:
        return pd.DataFrame()
    for (teacher, student, method), group in per_run.groupby(
        [TEACHER, STUDENT, METHOD], sort=False
    ):
        if len(group) < 2:
            continue
        seeds = list(group["seed"])
        duplicated = len(set(seeds)) < len(seeds)
        for column in columns:
            values = [float(value) for value in group[column]]
            interval = t_interval(values, alpha=alpha, unit="seeds")
            note = interval.note or interval.reason or ""
            if duplicated:
                note = "several runs share a seed: they differ by more than the seed" + (
                    f"; {note}" if note else ""
                )
            rows.append(
                {
                    **_seed_interval_columns((teacher, student, method), column, "mean", interval),
                    "per seed": _per_seed_text(seeds, values),
                    "note": note,
                }
            )
    return pd.DataFrame.from_records(rows)


def seed_differences(
    collection: RunCollection,
    runs: Sequence[Run],
    per_run: pd.DataFrame,
    columns: Sequence[str],
    *,
    alpha: float,
) -> tuple[pd.DataFrame, list[StatResult]]:
    """KD − SFT per seed (SFT run of the same seed), as mean ± t-interval and a t-test.

    Only for KD configurations (Teacher, Student, Method) with runs on several seeds; a KD
    run whose SFT baseline has another seed is left out (n counts the seeds paired).
    """
    if per_run.empty:
        return pd.DataFrame(), []
    by_dir = {str(run.run_dir): run for run in runs}
    scores = per_run.set_index("run_dir")
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run_dir, row in scores.iterrows():
        run = by_dir.get(str(run_dir))
        if run is None or not run.is_kd:
            continue
        groups.setdefault((row[TEACHER], row[STUDENT], row[METHOD]), []).append(run)
    rows: list[dict[str, Any]] = []
    results: list[StatResult] = []
    for (teacher, student, method), members in groups.items():
        if len(members) < 2:
            continue
        for column in columns:
            seeds: list[Any] = []
            differences: list[float] = []
            baselines: set[str] = set()
            for run in sorted(members, key=lambda item: (item.seed is None, item.seed or 0)):
                baseline = collection.links_of(run).sft_baseline
                if baseline is None or baseline.seed != run.seed:
                    continue
                kd_score = float(scores.loc[str(run.run_dir), column])
                sft_key = str(baseline.run_dir)
                if sft_key not in scores.index:
                    continue
                difference = kd_score - float(scores.loc[sft_key, column])
                if math.isfinite(difference):
                    seeds.append(run.seed)
                    differences.append(difference)
                    baselines.add(sft_key)
            interval = t_interval(differences, alpha=alpha, unit="seeds")
            subject = f"{method} − SFT on {column} across seeds ({student}, teacher {teacher})"
            statistic = p_value = None
            reason = interval.reason
            if reason is None and len(set(differences)) == 1:
                reason = f"the difference is {format_signed(differences[0])} on every seed"
            if reason is None:
                test = stats.ttest_1samp(differences, 0.0)
                statistic, p_value = float(test.statistic), float(test.pvalue)
            per_seed = _per_seed_text(seeds, differences, signed=True)
            if p_value is None:
                sentence = (
                    f"{subject}: {NOT_ENOUGH_DATA}: {reason or 'no SFT run of the same seed'}"
                    f" (n = {count_text(interval.n, 'seeds')})"
                )
            else:
                sentence = (
                    f"{subject}: mean {format_signed(interval.estimate)} points, "
                    f"{format_percent_level(alpha)} t-interval [{format_signed(interval.low)}, "
                    f"{format_signed(interval.high)}]; t = {statistic:.2f}, p = "
                    f"{format_p(p_value)} ({SEEDS_TEST}, mean difference ≠ 0; n = "
                    f"{count_text(interval.n, 'seeds')}: {per_seed})"
                )
            results.append(
                StatResult(
                    hypothesis="seeds: KD vs SFT",
                    test=SEEDS_TEST,
                    column=column,
                    group=f"{method} vs SFT ({student}, teacher {teacher})",
                    statistic=statistic,
                    p_value=p_value,
                    n=interval.n,
                    sentence=sentence,
                    mean=interval.estimate,
                    unit="seeds",
                    reason=reason if p_value is None else None,
                    ci_low=interval.low,
                    ci_high=interval.high,
                    family=f"KD vs SFT across seeds on {column}",
                )
            )
            rows.append(
                {
                    **_seed_interval_columns(
                        (teacher, student, method), column, "mean Δ KD−SFT (points)", interval
                    ),
                    "t": statistic,
                    "p": p_value,
                    "Holm p": None,
                    "m": None,
                    "per seed": per_seed,
                    "note": reason or interval.note or "",
                }
            )
    results = apply_holm(results)
    for row, result in zip(rows, results, strict=True):
        row["Holm p"] = result.p_holm
        row["m"] = result.family_size
    return pd.DataFrame.from_records(rows), results


# --------------------------------------------------------------------------- one section


def compare_family(
    collection: RunCollection,
    runs: Sequence[Run],
    tasks: Sequence[str],
    per_run: pd.DataFrame,
    *,
    compare_methods: Sequence[str] = (),
    samples: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
) -> ComparisonTables:
    """Every comparison of one task family's runs (see the module)."""
    outcome = ComparisonTables()
    pairs = kd_sft_pairs(collection, runs)
    kd_runs = [run for run in runs if run.is_kd]
    if kd_runs and not pairs:
        outcome.notes.append("No KD run has an SFT run of the same student: no paired test.")
    if compare_methods:
        more, notes = method_pairs(runs, compare_methods)
        pairs += more
        outcome.notes += notes
    if pairs:
        outcome.paired, results = compare_pairs(
            pairs, tasks, samples=samples, seed=seed, alpha=alpha
        )
        outcome.results += results
    columns = [AVERAGE, *tasks]
    outcome.seeds = seed_table(per_run, columns, alpha=alpha)
    if outcome.seeds.empty and not per_run.empty:
        outcome.notes.append(
            "One seed per configuration: no interval across seeds (the paired tests above "
            "are over items)."
        )
    outcome.seed_differences, results = seed_differences(
        collection, runs, per_run, columns, alpha=alpha
    )
    outcome.results += results
    return outcome
