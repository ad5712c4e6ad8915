"""The paper's statistics: does KD improve over SFT, and what does the improvement track?

Procedure (``shared/docs/paper-spec.md``, "The analysis the paper reports"):

1. Drop ablation rows (a Method containing ``base_teacher``, or kdlab's ``_noise``); extra
   tables are concatenated without their BaseModel rows (see :mod:`paper_tables`).
2. SFT rows (``Method == "SFT"``) are the baselines, keyed by Student. KD rows: for the
   paper's Methods (containing ``student``) the method is RevKD if it contains ``RevKD``, GKD
   if ``GKD``, else SeqKD; for kdlab's (``forward_kl_T2``) the method is the name without its
   temperature. The Teacher name is cut at its first ``_`` (``Qwen2.5-3B_ckpt2400``) when the
   part before is a known model.
3. For each (Teacher, Student, method) take, per task column and for Average independently,
   the maximum over its rows (the temperature runs).
4. Improvement = that maximum − the same Student's SFT score.
5. H1: one-sided one-sample t-test that improvement > 0, over all rows and per method, and a
   one-way ANOVA of improvement across methods. Spearman correlations of improvement with
   H2 the teacher's own SFT score, H3 the student's size (billions), H4 teacher-student
   agreement (EM1) and H5 reasoning fidelity (BLEU) of the pair's KD row.

Every test yields a :class:`StatResult` with statistic, p-value, n, its unit (here
"teacher-student-method rows") and one plain sentence that says what is tested; with too
little data (n below :data:`MIN_TTEST_N` for a t-test, constant input) it is marked "not
enough data" with its reason instead. The per-method H1 tests of a column form one family:
their Holm-adjusted p-values are reported next to the raw ones. In kdlab's own tables a
teacher's fine-tune is the Method ``Teacher``: an SFT row (its score is H2's "teacher's SFT
score"), shown as what it is.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from kdlab.analysis.numbers import count_text, format_p, format_value
from kdlab.analysis.paired import holm_adjust
from kdlab.analysis.paper_tables import (
    AVERAGE,
    BASE_METHOD,
    METHOD,
    SFT_METHOD,
    STUDENT,
    TEACHER,
    TEACHER_METHOD,
    find_column,
    metric_columns,
)
from kdlab.analysis.runs import parse_size_billions

logger = logging.getLogger(__name__)

NOT_ENOUGH_DATA = "not enough data"
KD_METHOD = "KD"

KIND_SFT = "sft"
KIND_BASE = "base"
KIND_KD = "kd"
KIND_ABLATION = "ablation"

_NATIVE_TEMPERATURE = re.compile(r"_T(\d+(?:\.\d+)?)(?=_|$)")
_PAPER_TEMPERATURE = re.compile(r"temp_(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class MethodClass:
    """What a Method label stands for."""

    kind: str
    """``sft``, ``base``, ``kd`` or ``ablation``."""
    family: str
    """The method without its temperature: ``SeqKD``, ``RevKD``, ``GKD``, ``forward_kl``..."""


def classify_method(method: str) -> MethodClass:
    """Classify a Method label of a results table (the paper's or kdlab's)."""
    label = str(method).strip()
    if label == SFT_METHOD:
        return MethodClass(KIND_SFT, SFT_METHOD)
    if label == TEACHER_METHOD:
        return MethodClass(KIND_SFT, TEACHER_METHOD)
    if label == BASE_METHOD:
        return MethodClass(KIND_BASE, BASE_METHOD)
    if "student" in label:
        if "RevKD" in label:
            family = "RevKD"
        elif "GKD" in label:
            family = "GKD"
        else:
            family = "SeqKD"
        kind = KIND_ABLATION if "base_teacher" in label else KIND_KD
        return MethodClass(kind, family)
    family = _NATIVE_TEMPERATURE.sub("", label)
    if "base_teacher" in label or "_noise" in label:
        return MethodClass(KIND_ABLATION, family)
    return MethodClass(KIND_KD, family)


def method_temperature(method: str) -> float | None:
    """The temperature in a Method label (``forward_kl_T2`` → 2, ``..._temp_1.0`` → 1)."""
    for pattern in (_NATIVE_TEMPERATURE, _PAPER_TEMPERATURE):
        match = pattern.search(str(method))
        if match:
            return float(match.group(1))
    return None


def normalize_teacher(name: str, known_models: set[str]) -> str:
    """Cut a Teacher name at its first ``_`` when the part before is a known model."""
    text = str(name).strip()
    if "_" in text and text not in known_models:
        prefix = text.split("_", 1)[0]
        if prefix in known_models:
            return prefix
    return text


# --------------------------------------------------------------------------- improvements


def _pair_lookup(
    table: pd.DataFrame | None, known_models: set[str]
) -> dict[tuple[str, str, str], pd.Series]:
    if table is None:
        return {}
    lookup: dict[tuple[str, str, str], pd.Series] = {}
    for _, row in table.iterrows():
        key = (
            normalize_teacher(row[TEACHER], known_models),
            str(row[STUDENT]),
            str(row[METHOD]),
        )
        lookup[key] = row
    return lookup


def _pair_value(
    lookup: Mapping[tuple[str, str, str], pd.Series],
    table: pd.DataFrame | None,
    teacher: str,
    student: str,
    best_method: str,
    column: str,
) -> float:
    if table is None:
        return math.nan
    name = find_column(table, column)
    if name is None:
        return math.nan
    for method in (best_method, KD_METHOD):
        row = lookup.get((teacher, student, method))
        if row is not None:
            value = row[name]
            return float(value) if pd.notna(value) else math.nan
    return math.nan


def build_improvements(
    results: pd.DataFrame,
    *,
    agreement: pd.DataFrame | None = None,
    fidelity: pd.DataFrame | None = None,
    student_sizes: Mapping[str, float] | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Improvement of the best KD run over SFT, one row per (Teacher, Student, Method, column).

    Args:
        results: a results table (paper layout).
        agreement: an EM1 pair table; a pair's value is looked up by (Teacher, Student, the
            Method that gave the maximum), else by the pair's ``KD`` row.
        fidelity: a BLEU pair table, looked up the same way.
        student_sizes: size in billions per Student name; names not in it are parsed.
        columns: the metric columns to use (default: every task column and Average).

    Returns:
        A long table with Teacher, Student, Method (the method family), column, kd_best,
        best_method, sft, improvement, teacher_sft, student_size, agreement, fidelity.
    """
    columns = list(columns) if columns is not None else metric_columns(results)
    table = results.copy()
    classes = [classify_method(method) for method in table[METHOD]]
    table["_kind"] = [item.kind for item in classes]
    table["_family"] = [item.family for item in classes]
    sft_rows = table[table["_kind"] == KIND_SFT]
    known_models = set(sft_rows[STUDENT]) | set(table[STUDENT])
    table["_teacher"] = [normalize_teacher(name, known_models) for name in table[TEACHER]]
    sft_scores = sft_rows.groupby(STUDENT)[columns].mean()
    ignored = sorted(set(table.loc[table["_kind"] == KIND_ABLATION, METHOD]))
    if ignored:
        logger.info("left out of the statistics (ablations): %s", ", ".join(ignored))
    kd_rows = table[table["_kind"] == KIND_KD]
    agreement_lookup = _pair_lookup(agreement, known_models)
    fidelity_lookup = _pair_lookup(fidelity, known_models)
    sizes = dict(student_sizes or {})
    records: list[dict[str, object]] = []
    missing_sft: set[str] = set()
    for (teacher, student, family), group in kd_rows.groupby(
        ["_teacher", STUDENT, "_family"], sort=False
    ):
        if student not in sft_scores.index:
            missing_sft.add(student)
            continue
        size = sizes.get(student)
        if size is None:
            size = parse_size_billions(student)
        for column in columns:
            values = group[column]
            if values.notna().sum() == 0:
                continue
            best_position = values.idxmax()
            kd_best = float(values.loc[best_position])
            best_method = str(group.loc[best_position, METHOD])
            sft = float(sft_scores.loc[student, column])
            teacher_sft = (
                float(sft_scores.loc[teacher, column]) if teacher in sft_scores.index else math.nan
            )
            records.append(
                {
                    TEACHER: teacher,
                    STUDENT: student,
                    METHOD: family,
                    "column": column,
                    "kd_best": kd_best,
                    "best_method": best_method,
                    "sft": sft,
                    "improvement": kd_best - sft,
                    "teacher_sft": teacher_sft,
                    "student_size": math.nan if size is None else float(size),
                    "agreement": _pair_value(
                        agreement_lookup, agreement, teacher, student, best_method, column
                    ),
                    "fidelity": _pair_value(
                        fidelity_lookup, fidelity, teacher, student, best_method, column
                    ),
                }
            )
    if missing_sft:
        logger.warning(
            "no SFT row for student(s) %s: their KD rows are left out",
            ", ".join(sorted(missing_sft)),
        )
    frame = pd.DataFrame.from_records(
        records,
        columns=[
            TEACHER,
            STUDENT,
            METHOD,
            "column",
            "kd_best",
            "best_method",
            "sft",
            "improvement",
            "teacher_sft",
            "student_size",
            "agreement",
            "fidelity",
        ],
    )
    return frame


def improvement_wide(improvements: pd.DataFrame, value: str = "improvement") -> pd.DataFrame:
    """One row per (Teacher, Student, Method), one column per metric column."""
    if improvements.empty:
        return pd.DataFrame(columns=[TEACHER, STUDENT, METHOD])
    order = list(dict.fromkeys(improvements["column"]))
    wide = improvements.pivot_table(
        index=[TEACHER, STUDENT, METHOD], columns="column", values=value, sort=False
    )
    wide = wide.reindex(columns=order).reset_index()
    wide.columns.name = None
    return wide


# --------------------------------------------------------------------------- tests

#: The unit of the paper's tests: one improvement per (Teacher, Student, method) row.
UNIT_ROWS = "teacher-student-method rows"
#: Fewest values a one-sample t-test across rows runs on: with 2 it has one degree of
#: freedom and its p-value says next to nothing (the demo's "t = -5.00, p = 0.937 (n = 2)").
MIN_TTEST_N = 3
#: Fewest pairs a Spearman correlation runs on.
MIN_SPEARMAN_N = 3

#: The paper's "SeqKD" is not sequence-level KD (paper-spec: ``kd_loss: kld``).
SEQKD_CAVEAT = (
    "SeqKD is the paper's label for token-level forward KL (its kd_loss `kld`), not "
    "sequence-level KD; kdlab's forward_kl is the same objective, kdlab's seqkd is real "
    "sequence-level KD."
)


def display_family(family: str) -> str:
    """A method family for sentences and legends; the paper's SeqKD carries its caveat."""
    return "SeqKD (token-level forward KL)" if family == "SeqKD" else family


@dataclass(frozen=True)
class StatResult:
    """One statistical test (or estimate), ready to print.

    ``n`` counts ``unit`` (items, seeds, teacher-student-method rows). A test that could not
    run has ``statistic`` and ``p_value`` ``None`` and says why in ``reason``. Tests of one
    question (the same ``family``) get Holm-adjusted p-values (:func:`apply_holm`).
    """

    hypothesis: str
    test: str
    column: str
    group: str
    statistic: float | None
    p_value: float | None
    n: int
    sentence: str
    mean: float | None = None
    """The estimate: mean improvement, accuracy difference (points) or mean across seeds."""
    unit: str = ""
    reason: str | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    family: str = ""
    """The question whose tests are corrected together ("" = a family of its own)."""
    p_holm: float | None = None
    family_size: int | None = None

    @property
    def enough_data(self) -> bool:
        """False when the test could not be run (too few or constant values)."""
        return self.p_value is not None

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether p < ``alpha``, Holm-adjusted p where the test belongs to a family."""
        p_value = self.p_holm if self.p_holm is not None else self.p_value
        return p_value is not None and p_value < alpha

    def as_row(self, alpha: float = 0.05) -> dict[str, object]:
        """A flat dict for tables."""
        row = asdict(self)
        row["status"] = "ok" if self.enough_data else NOT_ENOUGH_DATA
        row["significant"] = self.significant(alpha) if self.enough_data else None
        return row


def apply_holm(results: Sequence[StatResult]) -> list[StatResult]:
    """Holm-adjust the p-values of each family (tests that ran), next to the raw ones.

    The sentence of each adjusted test gets ``"; Holm p = … (m = …)"``.
    """
    by_family: dict[str, list[int]] = {}
    for index, result in enumerate(results):
        if result.family and result.p_value is not None:
            by_family.setdefault(result.family, []).append(index)
    adjusted = list(results)
    for indices in by_family.values():
        values = holm_adjust([results[index].p_value for index in indices])  # type: ignore[misc]
        for index, p_holm in zip(indices, values, strict=True):
            result = results[index]
            sentence = f"{result.sentence}; Holm p = {format_p(p_holm)} (m = {len(indices)})"
            adjusted[index] = replace(
                result, p_holm=p_holm, family_size=len(indices), sentence=sentence
            )
    return adjusted


def _clean(values: Sequence[float] | pd.Series | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[np.isfinite(array)]


def _is_constant(values: np.ndarray) -> bool:
    return values.size == 0 or bool(np.all(values == values[0]))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _statistic_and_p(
    refusal: str | None, not_finite: str, test: Callable[..., Any], *args: Any, **keywords: Any
) -> tuple[float, float] | str:
    """(statistic, p-value) of the scipy ``test(*args, **keywords)``, or why there is none.

    ``refusal`` (a reason found in the data beforehand): returned, the test is not run.
    Otherwise the test runs with its warnings on degenerate data silenced, and ``not_finite``
    is returned when the statistic or the p-value is NaN or infinite.
    """
    if refusal is not None:
        return refusal
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = test(*args, **keywords)
    statistic, p_value = float(result.statistic), float(result.pvalue)
    return (statistic, p_value) if _finite(statistic) and _finite(p_value) else not_finite


def _refused(
    hypothesis: str, test: str, column: str, group: str, n: int, subject: str, reason: str,
    *, unit: str, mean: float | None = None, family: str = "",
) -> StatResult:  # fmt: skip
    sentence = f"{subject}: {NOT_ENOUGH_DATA}: {reason} (n = {count_text(n, unit)})"
    return StatResult(
        hypothesis, test, column, group, None, None, n, sentence, mean,
        unit=unit, reason=reason, family=family,
    )  # fmt: skip


def one_sided_ttest(
    values: Sequence[float] | pd.Series | np.ndarray,
    *,
    subject: str,
    hypothesis: str = "H1",
    column: str = AVERAGE,
    group: str = "all",
    unit: str = UNIT_ROWS,
    tested: str = "mean > 0",
    family: str = "",
) -> StatResult:
    """One-sample t-test that the mean of ``values`` is > 0 (NaNs dropped).

    The sentence reads ``"<subject>: t = 3.21, p = 0.002 (one-sided t-test, mean > 0; n = 24
    teacher-student-method rows)"``. Fewer than :data:`MIN_TTEST_N` values, or constant
    ones, give a refusal with its reason.
    """
    test = "one-sided t-test"
    data = _clean(values)
    n = int(data.size)
    mean = float(data.mean()) if n else None
    reason = None
    if n < MIN_TTEST_N:
        reason = f"a one-sample t-test needs n >= {MIN_TTEST_N}, got {n}"
    elif _is_constant(data):
        reason = f"every value is {format_value(data[0])}: no spread to test"
    computed = _statistic_and_p(
        reason, "the t statistic is not finite", stats.ttest_1samp, data, 0.0, alternative="greater"
    )
    if isinstance(computed, str):
        return _refused(hypothesis, test, column, group, n, subject, computed, unit=unit,
                        mean=mean, family=family)  # fmt: skip
    statistic, p_value = computed
    sentence = (
        f"{subject}: t = {statistic:.2f}, p = {format_p(p_value)} ({test}, {tested}; "
        f"n = {count_text(n, unit)})"
    )
    return StatResult(
        hypothesis, test, column, group, statistic, p_value, n, sentence, mean,
        unit=unit, family=family,
    )  # fmt: skip


def one_way_anova(
    groups: Mapping[str, Sequence[float] | pd.Series | np.ndarray],
    *,
    subject: str,
    hypothesis: str = "H1",
    column: str = AVERAGE,
    unit: str = UNIT_ROWS,
) -> StatResult:
    """One-way ANOVA across ``groups`` (NaNs and empty groups dropped)."""
    test = "one-way ANOVA"
    cleaned = {name: _clean(values) for name, values in groups.items()}
    cleaned = {name: values for name, values in cleaned.items() if values.size}
    n = int(sum(values.size for values in cleaned.values()))
    label = "all" if not cleaned else ", ".join(cleaned)
    everything = np.concatenate(list(cleaned.values())) if cleaned else np.array([])
    reason = None
    if len(cleaned) < 2:
        reason = f"an ANOVA needs at least two groups, got {len(cleaned)}"
    elif n <= len(cleaned):
        reason = f"an ANOVA of {len(cleaned)} groups needs more than {len(cleaned)} values"
    elif _is_constant(everything):
        reason = "every value is the same"
    not_finite = "the F statistic is not finite (no spread within the groups)"
    computed = _statistic_and_p(reason, not_finite, stats.f_oneway, *cleaned.values())
    if isinstance(computed, str):
        return _refused(hypothesis, test, column, label, n, subject, computed, unit=unit)
    statistic, p_value = computed
    sentence = (
        f"{subject}: F = {statistic:.2f}, p = {format_p(p_value)} ({test} across "
        f"{len(cleaned)} methods; n = {count_text(n, unit)})"
    )
    return StatResult(hypothesis, test, column, label, statistic, p_value, n, sentence, unit=unit)


def spearman(
    first: Sequence[float] | pd.Series | np.ndarray,
    second: Sequence[float] | pd.Series | np.ndarray,
    *,
    subject: str,
    hypothesis: str,
    column: str = AVERAGE,
    group: str = "all",
    unit: str = UNIT_ROWS,
) -> StatResult:
    """Spearman rank correlation of two aligned sequences (pairs with a NaN dropped)."""
    test = "Spearman"
    x = np.asarray(first, dtype=float)
    y = np.asarray(second, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs aligned inputs, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    reason = None
    if n < MIN_SPEARMAN_N:
        reason = f"a rank correlation needs n >= {MIN_SPEARMAN_N} pairs, got {n}"
    elif _is_constant(x):
        reason = f"the first variable is constant ({format_value(x[0])})"
    elif _is_constant(y):
        reason = f"the second variable is constant ({format_value(y[0])})"
    computed = _statistic_and_p(reason, "the correlation is not finite", stats.spearmanr, x, y)
    if isinstance(computed, str):
        return _refused(hypothesis, test, column, group, n, subject, computed, unit=unit)
    statistic, p_value = computed
    sentence = (
        f"{subject}: rho = {statistic:.2f}, p = {format_p(p_value)} (n = {count_text(n, unit)})"
    )
    return StatResult(hypothesis, test, column, group, statistic, p_value, n, sentence, unit=unit)


CORRELATES = (
    ("H2", "teacher_sft", "the teacher's SFT score"),
    ("H3", "student_size", "student size (B)"),
    ("H4", "agreement", "teacher-student agreement (EM1)"),
    ("H5", "fidelity", "reasoning fidelity (BLEU)"),
)


def run_statistics(
    improvements: pd.DataFrame,
    *,
    columns: Sequence[str] | None = None,
    include_agreement: bool = True,
    include_fidelity: bool = True,
) -> list[StatResult]:
    """All the paper's tests on a long improvement table (:func:`build_improvements`).

    Average comes first, then the task columns. H4/H5 are left out when not asked for
    (no agreement or fidelity table), and reported as "not enough data" when asked for but
    nothing matched. The per-method H1 tests of one column are one family (Holm).
    """
    available = list(dict.fromkeys(improvements["column"])) if not improvements.empty else []
    if columns is None:
        columns = ([AVERAGE] if AVERAGE in available else []) + [
            column for column in available if column != AVERAGE
        ]
        if not columns:
            columns = [AVERAGE]
    results: list[StatResult] = []
    families = list(dict.fromkeys(improvements[METHOD])) if not improvements.empty else []
    tested = "mean improvement of the best KD run over SFT > 0"
    for column in columns:
        subset = improvements[improvements["column"] == column]
        improvement = subset["improvement"]
        results.append(
            one_sided_ttest(improvement, subject=f"KD improves over SFT on {column}",
                            column=column, tested=tested)
        )  # fmt: skip
        for family in families:
            values = subset.loc[subset[METHOD] == family, "improvement"]
            results.append(
                one_sided_ttest(
                    values,
                    subject=f"{display_family(family)} improves over SFT on {column}",
                    column=column,
                    group=family,
                    tested=tested,
                    family=f"H1 per method on {column}",
                )
            )
        groups = {
            family: subset.loc[subset[METHOD] == family, "improvement"] for family in families
        }
        results.append(
            one_way_anova(
                groups,
                subject=f"Improvement on {column} differs across methods",
                hypothesis="H1-ANOVA",
                column=column,
            )
        )
        for hypothesis, field_name, description in CORRELATES:
            if field_name == "agreement" and not include_agreement:
                continue
            if field_name == "fidelity" and not include_fidelity:
                continue
            results.append(
                spearman(
                    improvement,
                    subset[field_name],
                    subject=f"Improvement on {column} vs {description}",
                    hypothesis=hypothesis,
                    column=column,
                )
            )
    return apply_holm(results)


STATISTICS_COLUMNS = [
    "hypothesis",
    "test",
    "column",
    "group",
    "statistic",
    "p_value",
    "p_holm",
    "family_size",
    "n",
    "unit",
    "mean",
    "ci_low",
    "ci_high",
    "status",
    "significant",
    "reason",
    "family",
    "sentence",
]


def statistics_table(results: Sequence[StatResult], alpha: float = 0.05) -> pd.DataFrame:
    """The results as a table (one row per test)."""
    rows = [result.as_row(alpha) for result in results]
    return pd.DataFrame.from_records(rows, columns=STATISTICS_COLUMNS)
