"""What the statistics report beyond the headline p-value (issue 21, mutation survivors).

``make mutate`` showed these parts of :mod:`kdlab.analysis.statistics`,
:mod:`kdlab.analysis.paired` and :mod:`kdlab.analysis.agreement` could be changed without
a failing test: the H4/H5 pair lookups, which rows each per-method test reads, the cells of
McNemar's table, the n and unit of every interval and refusal, the Holm bookkeeping, the
edge cases of answer equality. Each is checked here against a hand computation or scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from kdlab.analysis.agreement import answer_agreement, answers_equal, index_predictions
from kdlab.analysis.paired import mcnemar_exact, paired_bootstrap, t_interval
from kdlab.analysis.statistics import (
    NOT_ENOUGH_DATA,
    StatResult,
    apply_holm,
    build_improvements,
    classify_method,
    display_family,
    normalize_teacher,
    one_sided_ttest,
    one_way_anova,
    run_statistics,
    spearman,
    statistics_table,
)

# --------------------------------------------------------------------------- improvements


def results_table() -> pd.DataFrame:
    """Two students, one teacher (also fine-tuned: its Teacher row is its SFT score), KD
    at two temperatures, a reverse-KL run, a noise ablation, a student without SFT row."""
    rows = [
        ("-", "S-1B", "SFT", 50.0, 40.0),
        ("-", "S-1B", "SFT", 52.0, 44.0),  # two SFT rows: their mean is the baseline
        ("-", "S-3B", "SFT", 60.0, 58.0),
        ("-", "T-7B", "Teacher", 80.0, 70.0),
        ("T-7B", "S-1B", "forward_kl_T1", 55.0, 41.0),
        ("T-7B", "S-1B", "forward_kl_T2", 53.0, 49.0),
        ("T-7B", "S-1B", "reverse_kl_T1", 40.0, 45.0),
        ("T-7B", "S-1B", "forward_kl_T1_noise2", 99.0, 99.0),
        ("T-7B_ckpt9", "S-3B", "forward_kl_T1", 58.0, 66.0),
        ("T-7B", "S-9B", "forward_kl_T1", 10.0, 10.0),  # no SFT row for S-9B
    ]
    table = pd.DataFrame(rows, columns=["Teacher", "Student", "Method", "task1", "task2"])
    table["Average"] = (table["task1"] + table["task2"]) / 2
    return table


def pair_table(values: dict[tuple[str, str, str], float], column: str = "Average"):
    return pd.DataFrame(
        [{"Teacher": t, "Student": s, "Method": m, column: v} for (t, s, m), v in values.items()]
    )


def test_improvements_per_column_with_baselines_sizes_and_pair_lookups() -> None:
    agreement = pair_table(
        {
            ("T-7B", "S-1B", "forward_kl_T2"): 61.0,  # the best Average run of forward_kl
            ("T-7B", "S-1B", "KD"): 11.0,  # the pair's fallback row
            ("T-7B_ckpt9", "S-3B", "forward_kl_T1"): 62.0,  # teacher name normalised
        }
    )
    fidelity = pair_table({("T-7B", "S-1B", "KD"): 0.25}, column="average")  # any case
    improvements = build_improvements(
        results_table(),
        agreement=agreement,
        fidelity=fidelity,
        student_sizes={"S-3B": 2.5},
    )
    table = improvements.set_index(["Student", "Method", "column"])
    assert set(improvements["Student"]) == {"S-1B", "S-3B"}  # S-9B has no SFT row
    assert set(improvements["Method"]) == {"forward_kl", "reverse_kl"}  # no ablation
    assert set(improvements["Teacher"]) == {"T-7B"}
    assert len(improvements) == 3 * 3
    row = table.loc[("S-1B", "forward_kl", "task1")]
    assert (row["kd_best"], row["best_method"], row["sft"]) == (55.0, "forward_kl_T1", 51.0)
    assert row["improvement"] == pytest.approx(4.0)
    assert row["teacher_sft"] == 80.0 and row["student_size"] == 1.0
    row = table.loc[("S-1B", "forward_kl", "task2")]
    assert (row["kd_best"], row["best_method"], row["sft"]) == (49.0, "forward_kl_T2", 42.0)
    row = table.loc[("S-1B", "forward_kl", "Average")]
    assert row["best_method"] == "forward_kl_T2" and row["improvement"] == pytest.approx(4.5)
    assert row["agreement"] == 61.0  # looked up by the run that gave the maximum
    assert row["fidelity"] == 0.25  # no row for that run: the pair's KD row
    assert math.isnan(table.loc[("S-1B", "forward_kl", "task1"), "agreement"])  # no column
    row = table.loc[("S-1B", "reverse_kl", "Average")]
    assert row["improvement"] == pytest.approx(42.5 - 46.5)
    assert row["agreement"] == 11.0  # the KD row
    row = table.loc[("S-3B", "forward_kl", "Average")]
    assert row["student_size"] == 2.5  # given sizes win over the parsed name
    assert row["agreement"] == 62.0 and row["improvement"] == pytest.approx(62.0 - 59.0)
    assert math.isnan(row["fidelity"])
    only = build_improvements(results_table(), columns=["task2"])
    assert set(only["column"]) == {"task2"}
    assert only["agreement"].isna().all() and only["fidelity"].isna().all()


def test_a_column_without_kd_values_is_left_out() -> None:
    table = results_table()
    table.loc[table["Method"].str.startswith("reverse"), "task1"] = np.nan
    improvements = build_improvements(table)
    reverse = improvements[improvements["Method"] == "reverse_kl"]
    assert sorted(reverse["column"]) == ["Average", "task2"]


def test_normalize_teacher_and_classify() -> None:
    known = {"T-7B", "S-1B"}
    assert normalize_teacher("T-7B_ckpt_9", known) == "T-7B"
    assert normalize_teacher("T-7B", known) == "T-7B"
    assert normalize_teacher("S-1B", known | {"S"}) == "S-1B"
    assert normalize_teacher("x_y", known | {"x_y", "x"}) == "x_y"  # a known name is kept
    assert normalize_teacher("other_T-7B", known) == "other_T-7B"
    teacher = classify_method("Teacher")
    assert (teacher.kind, teacher.family) == ("sft", "Teacher")
    assert display_family("SeqKD") == "SeqKD (token-level forward KL)"
    assert display_family("forward_kl") == "forward_kl"


# --------------------------------------------------------------------------- the tests


def improvement_rows(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for column, offset in (("task1", 0.0), ("Average", 1.0)):
        for student in range(6):
            for family, shift in (("RevKD", 2.0), ("GKD", -0.5), ("SeqKD", 1.0)):
                rows.append(
                    {
                        "Teacher": "T",
                        "Student": f"S{student}",
                        "Method": family,
                        "column": column,
                        "improvement": offset + shift + rng.normal(),
                        "teacher_sft": 50 + rng.normal(),
                        "student_size": rng.choice([0.5, 1.5, 3.0]),
                        "agreement": rng.uniform(20, 90),
                        "fidelity": rng.uniform(0, 1),
                    }
                )
    return pd.DataFrame(rows)


def test_every_test_of_run_statistics_reads_its_own_rows_and_fields() -> None:
    improvements = improvement_rows()
    results = run_statistics(improvements)
    # Average first (whatever the table's order), then the task columns
    assert results[0].column == "Average"
    assert results[-1].column == "task1"
    for column in ("Average", "task1"):
        subset = improvements[improvements["column"] == column]
        mine = [r for r in results if r.column == column]
        assert [(r.hypothesis, r.group) for r in mine] == [
            ("H1", "all"),
            ("H1", "RevKD"),
            ("H1", "GKD"),
            ("H1", "SeqKD"),
            ("H1-ANOVA", "RevKD, GKD, SeqKD"),
            ("H2", "all"),
            ("H3", "all"),
            ("H4", "all"),
            ("H5", "all"),
        ]
        overall = stats.ttest_1samp(subset["improvement"], 0.0, alternative="greater")
        assert mine[0].statistic == pytest.approx(overall.statistic)
        assert mine[0].mean == pytest.approx(subset["improvement"].mean())
        assert mine[0].n == 18 and mine[0].family == "" and mine[0].p_holm is None
        assert "mean improvement of the best KD run over SFT > 0" in mine[0].sentence
        raw = []
        for result, family in zip(mine[1:4], ("RevKD", "GKD", "SeqKD"), strict=True):
            values = subset.loc[subset["Method"] == family, "improvement"]
            expected = stats.ttest_1samp(values, 0.0, alternative="greater")
            assert result.statistic == pytest.approx(expected.statistic)
            assert result.p_value == pytest.approx(expected.pvalue)
            assert result.n == 6 and result.mean == pytest.approx(values.mean())
            assert result.family == f"H1 per method on {column}"
            raw.append(expected.pvalue)
        holm = multipletests(raw, method="holm")[1]
        assert [r.p_holm for r in mine[1:4]] == pytest.approx(list(holm))
        anova = stats.f_oneway(
            *(subset.loc[subset["Method"] == f, "improvement"] for f in ("RevKD", "GKD", "SeqKD"))
        )
        assert mine[4].statistic == pytest.approx(anova.statistic)
        assert mine[4].p_value == pytest.approx(anova.pvalue) and mine[4].n == 18
        for result, field_name in zip(
            mine[5:], ("teacher_sft", "student_size", "agreement", "fidelity"), strict=True
        ):
            expected = stats.spearmanr(subset["improvement"], subset[field_name])
            assert result.statistic == pytest.approx(expected.statistic), field_name
            assert result.p_value == pytest.approx(expected.pvalue), field_name
    without = run_statistics(improvements, include_agreement=False, include_fidelity=False)
    assert {r.hypothesis for r in without} == {"H1", "H1-ANOVA", "H2", "H3"}
    no_fidelity = run_statistics(improvements, include_fidelity=False)
    assert "H4" in {r.hypothesis for r in no_fidelity}
    assert "H5" not in {r.hypothesis for r in no_fidelity}
    picked = run_statistics(improvements, columns=["task1"])
    assert {r.column for r in picked} == {"task1"}


def test_run_statistics_of_an_empty_table_refuses_on_average() -> None:
    empty = build_improvements(results_table().iloc[:3])  # SFT rows only: no KD row
    assert empty.empty
    results = run_statistics(empty)
    assert results and all(r.column == "Average" and not r.enough_data for r in results)
    assert [r.hypothesis for r in results] == ["H1", "H1-ANOVA", "H2", "H3", "H4", "H5"]


def test_refusals_carry_their_identity_and_reason() -> None:
    refused = one_sided_ttest(
        [1.5], subject="s", hypothesis="Hx", column="c", group="g", unit="seeds", family="f"
    )
    assert (refused.hypothesis, refused.test, refused.column, refused.group) == (
        "Hx",
        "one-sided t-test",
        "c",
        "g",
    )
    assert (refused.n, refused.mean, refused.unit, refused.family) == (1, 1.5, "seeds", "f")
    assert refused.reason == "a one-sample t-test needs n >= 3, got 1"
    assert refused.sentence == (
        "s: not enough data: a one-sample t-test needs n >= 3, got 1 (n = 1 seed)"
    )
    constant = one_sided_ttest([2.0, 2.0, 2.0, np.nan], subject="s", family="f", group="g")
    assert constant.reason == "every value is 2.00: no spread to test"
    assert (constant.n, constant.mean, constant.family, constant.group) == (3, 2.0, "f", "g")
    overflow = one_sided_ttest([1e308, 1e308, -1e308], subject="s", family="f")
    assert overflow.reason == "the t statistic is not finite" and overflow.family == "f"
    empty = one_sided_ttest([], subject="s")
    assert empty.mean is None and empty.n == 0


def test_anova_refusals_and_labels() -> None:
    flat = one_way_anova({"a": [1.0, 1.0], "b": [1.0, 1.0]}, subject="s", column="c")
    assert flat.reason == "every value is the same" and flat.group == "a, b"
    assert (flat.test, flat.column, flat.n, flat.hypothesis) == ("one-way ANOVA", "c", 4, "H1")
    no_spread = one_way_anova({"a": [1.0, 1.0], "b": [2.0, 2.0]}, subject="s")
    assert no_spread.reason == "the F statistic is not finite (no spread within the groups)"
    one_group = one_way_anova({"a": [1.0, 2.0], "b": [np.nan]}, subject="s")
    assert one_group.reason == "an ANOVA needs at least two groups, got 1"
    assert one_group.group == "a" and one_group.n == 2
    assert one_way_anova({}, subject="s").group == "all"
    few = one_way_anova({"a": [1.0], "b": [2.0]}, subject="s")
    assert few.reason == "an ANOVA of 2 groups needs more than 2 values"
    ran = one_way_anova({"a": [1.0, 2.0], "b": [3.0, 5.0]}, subject="s", unit="seeds")
    assert ran.sentence.endswith("(one-way ANOVA across 2 methods; n = 4 seeds)")


def test_spearman_refusals_name_the_constant_variable() -> None:
    first = spearman([3, 3, 3], [1, 2, 3], subject="s", hypothesis="H3", group="g", column="c")
    assert first.reason == "the first variable is constant (3.00)"
    assert (first.test, first.group, first.column, first.n) == ("Spearman", "g", "c", 3)
    second = spearman([1, 2, 3], [4, 4, 4], subject="s", hypothesis="H3")
    assert second.reason == "the second variable is constant (4.00)"
    ran = spearman([1, 2, 3, 4], [1, 3, 2, 4], subject="s", hypothesis="H3", unit="items")
    assert ran.sentence.endswith("(n = 4 items)") and ran.hypothesis == "H3"


def test_significance_uses_holm_where_there_is_a_family() -> None:
    def result(p_value: float | None, p_holm: float | None = None) -> StatResult:
        return StatResult("H1", "t", "Average", "all", 1.0, p_value, 5, "s", p_holm=p_holm)

    assert result(0.04).significant() and not result(0.04).significant(0.01)
    assert not result(0.05).significant(0.05)  # strictly below alpha
    assert not result(0.01, p_holm=0.2).significant()
    assert result(0.2, p_holm=0.01).significant()
    assert not result(None).significant()
    row = result(0.04).as_row()
    assert row["status"] == "ok" and row["significant"] is True
    assert result(0.04).as_row(alpha=0.01)["significant"] is False
    refused = StatResult("H1", "t", "Average", "all", None, None, 1, "s")
    assert refused.as_row()["status"] == NOT_ENOUGH_DATA and refused.as_row()["significant"] is None
    table = statistics_table([result(0.04), refused])
    assert list(table["status"]) == ["ok", NOT_ENOUGH_DATA]


def test_holm_families_are_adjusted_separately_and_refusals_are_left_out() -> None:
    def result(p_value: float | None, family: str) -> StatResult:
        return StatResult("H1", "t", "c", "g", None, p_value, 3, "base", family=family)

    results = [
        result(0.01, "a"),
        result(0.04, "b"),
        result(0.03, "a"),
        result(None, "a"),
        result(0.02, ""),
    ]
    adjusted = apply_holm(results)
    assert adjusted[0].p_holm == pytest.approx(0.02) and adjusted[2].p_holm == pytest.approx(0.03)
    assert adjusted[0].family_size == adjusted[2].family_size == 2
    assert adjusted[1].p_holm == pytest.approx(0.04) and adjusted[1].family_size == 1
    assert adjusted[3] == results[3] and adjusted[4] == results[4]
    assert adjusted[0].sentence == "base; Holm p = 0.020 (m = 2)"


# --------------------------------------------------------------------------- paired


def test_mcnemar_reports_every_cell() -> None:
    first = [True, True, True, False, False, True, False]
    second = [True, False, True, True, False, False, False]
    result = mcnemar_exact(first, second)
    assert (result.n_items, result.both_correct, result.first_only, result.second_only) == (
        7,
        2,
        2,
        1,
    )
    assert result.both_wrong == 2 and result.discordant == 3 and result.statistic == 1
    same = mcnemar_exact([True, False, False], [True, False, False])
    assert (same.n_items, same.both_correct, same.both_wrong, same.p_value) == (3, 1, 2, 1.0)
    assert same.note == "no discordant item: both runs are right on the same items"
    empty = mcnemar_exact([], [])
    assert (empty.n_items, empty.both_correct, empty.first_only, empty.second_only) == (0,) * 4
    assert empty.both_wrong == 0 and empty.reason == "no item was scored by both runs"
    with pytest.raises(ValueError, match=r"expected a 1-d sequence of correct flags, got shape"):
        mcnemar_exact([[True]], [[True]])


def test_bootstrap_intervals_carry_n_unit_and_reasons() -> None:
    result = paired_bootstrap(
        {"a": ([True, False, True], [False, False, True]), "b": ([], []), "c": ([True], [True])},
        samples=300,
        seed=4,
        alpha=0.2,
    )
    assert (result.samples, result.seed) == (300, 4)
    assert result.confidence == pytest.approx(0.8)
    a, b, c = result.per_task["a"], result.per_task["b"], result.per_task["c"]
    assert (a.n, a.unit, a.estimate) == (3, "items", pytest.approx(100 / 3))
    assert a.note is None and a.has_interval
    assert (b.n, b.unit, b.estimate) == (0, "items", None)
    assert b.reason == "no item was scored by both runs"
    assert (c.n, c.unit, c.estimate, c.low) == (1, "items", 0.0, None)
    assert c.reason == "1 item: a bootstrap interval needs at least 2"
    assert result.average.n == 4 and result.average.unit == "items"
    two = paired_bootstrap({"t": ([True, False], [False, False])}, samples=100)
    assert two.per_task["t"].has_interval and two.per_task["t"].n == 2
    one = paired_bootstrap({"t": ([True], [False])}, samples=100)
    assert (one.average.n, one.average.unit, one.average.estimate) == (1, "items", 100.0)
    assert one.average.reason == "1 item: a bootstrap interval needs at least 2"
    nothing = paired_bootstrap({"t": ([], [])})
    assert (nothing.average.n, nothing.average.unit) == (0, "items")
    assert nothing.average.reason == "no item was scored by both runs"
    assert (nothing.samples, nothing.seed, nothing.confidence) == (10_000, 0, pytest.approx(0.95))
    with pytest.raises(ValueError, match=r"t: items not aligned \(2 vs 1\)"):
        paired_bootstrap({"t": ([True, False], [True])})


def test_bootstrap_default_seed_is_zero() -> None:
    tasks = {"t": ([True, False, True, True, False], [False, False, True, False, True])}
    assert paired_bootstrap(tasks, samples=50) == paired_bootstrap(tasks, samples=50, seed=0)


def test_t_interval_fields() -> None:
    empty = t_interval([], unit="runs")
    assert (empty.n, empty.unit, empty.reason) == (0, "runs", "no value (0 runs)")
    one = t_interval([3.0, np.nan], unit="runs")
    assert (one.n, one.unit, one.estimate, one.reason) == (1, "runs", 3.0, "1 run: no interval")
    spread = t_interval([1.0, 2.0, 4.0])
    assert spread.note is None
    low, high = stats.t.interval(0.95, 2, loc=np.mean([1, 2, 4]), scale=stats.sem([1, 2, 4]))
    assert (spread.low, spread.high) == pytest.approx((low, high))
    assert t_interval([1, 2, 4]).low == pytest.approx(low)  # integers are numbers too


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize(
    ("first", "second", "equal"),
    [
        (None, "None", False),
        ("None", None, False),
        (float("nan"), float("nan"), False),
        (float("nan"), 3, False),
        ("nan", "nan", False),
        (1e12, 1e12 + 1, True),  # relative tolerance 1e-9
        (1e-12, 2e-12, True),  # absolute tolerance 1e-9
        (1000.0, 1000.001, False),
        ("12", "12.5", False),
        ("A", 1, False),
        (True, "True", True),  # booleans are not numbers: compared as text
    ],
)
def test_answers_equal_edges(first: object, second: object, equal: bool) -> None:
    assert answers_equal(first, second) is equal


def test_predictions_without_index_are_keyed_by_position() -> None:
    indexed = index_predictions([{"extracted": 1}, {"extracted": 2}, {"index": 7, "extracted": 3}])
    assert sorted(indexed) == [0, 1, 7]
    result = answer_agreement([{"extracted": "5"}, {"extracted": 6}], [{"extracted": 5}])
    assert (result.n_items, result.n_agree, result.agreement) == (1, 1, 100.0)
