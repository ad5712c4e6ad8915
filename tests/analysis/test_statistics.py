"""Statistical helpers: scipy agreement, small-n handling, method classification."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from kdlab.analysis.runs import parse_size_billions
from kdlab.analysis.statistics import (
    NOT_ENOUGH_DATA,
    build_improvements,
    classify_method,
    format_p,
    method_temperature,
    normalize_teacher,
    one_sided_ttest,
    one_way_anova,
    run_statistics,
    spearman,
)


def test_ttest_matches_scipy_and_reads_plainly() -> None:
    values = [1.2, 0.4, 2.5, -0.3, 1.1]
    result = one_sided_ttest(values, subject="KD improves over SFT on Average")
    expected = stats.ttest_1samp(values, 0.0, alternative="greater")
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.n == 5 and result.unit == "teacher-student-method rows"
    assert result.sentence == (
        f"KD improves over SFT on Average: t = {expected.statistic:.2f}, "
        f"p = {expected.pvalue:.3f} (one-sided t-test, mean > 0; n = 5 teacher-student-method "
        "rows)"
    )


def test_anova_and_spearman_match_scipy() -> None:
    groups = {"a": [1.0, 2.0, 3.0], "b": [2.0, 4.0, 5.0], "c": [0.0, 1.0]}
    result = one_way_anova(groups, subject="differs")
    expected = stats.f_oneway(*groups.values())
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.n == 8
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    correlation = spearman(x, y, subject="x vs y", hypothesis="H3")
    expected_rho = stats.spearmanr(x, y)
    assert correlation.statistic == pytest.approx(expected_rho.statistic)
    assert correlation.p_value == pytest.approx(expected_rho.pvalue)
    assert "rho = 0.80" in correlation.sentence


@pytest.mark.parametrize(
    "values",
    [[], [1.0], [2.0, 2.0, 2.0], [np.nan, 1.0], [np.inf, np.nan]],
)
def test_ttest_with_too_little_data_is_marked_not_crashing(values: list[float]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = one_sided_ttest(values, subject="KD improves over SFT on Average")
    assert not result.enough_data
    assert result.statistic is None and result.p_value is None
    assert NOT_ENOUGH_DATA in result.sentence
    assert result.as_row()["status"] == NOT_ENOUGH_DATA


def test_spearman_and_anova_small_or_constant_inputs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not spearman([1, 2], [3, 4], subject="s", hypothesis="H3").enough_data
        assert not spearman([1, 2, 3], [5, 5, 5], subject="s", hypothesis="H3").enough_data
        assert not spearman(
            [1, np.nan, 3, 4], [1, 2, np.nan, 4], subject="s", hypothesis="H3"
        ).enough_data
        assert not one_way_anova({"a": [1.0, 2.0]}, subject="a").enough_data
        assert not one_way_anova({"a": [1.0], "b": [2.0]}, subject="a").enough_data
        assert not one_way_anova({"a": [1.0, 1.0], "b": [1.0]}, subject="a").enough_data
        assert not one_way_anova({}, subject="a").enough_data
    with pytest.raises(ValueError, match="aligned"):
        spearman([1, 2, 3], [1, 2], subject="s", hypothesis="H3")


@pytest.mark.parametrize(
    ("method", "kind", "family"),
    [
        ("SFT", "sft", "SFT"),
        ("BaseModel", "base", "BaseModel"),
        ("student_KD_temp_2.0", "kd", "SeqKD"),
        ("student_RevKD_temp_1.0", "kd", "RevKD"),
        ("student_GKD_temp_1.0", "kd", "GKD"),
        ("student_KD_base_teacher_temp_1.0", "ablation", "SeqKD"),
        ("forward_kl_T2", "kd", "forward_kl"),
        ("reverse_kl_T0.5", "kd", "reverse_kl"),
        ("seqkd", "kd", "seqkd"),
        ("forward_kl_T1_noise2", "ablation", "forward_kl_noise2"),
        ("forward_kl_T1_base_teacher", "ablation", "forward_kl_base_teacher"),
        ("forward_kl_T2_w0.5", "kd", "forward_kl_w0.5"),
    ],
)
def test_classify_method(method: str, kind: str, family: str) -> None:
    classified = classify_method(method)
    assert (classified.kind, classified.family) == (kind, family)


def test_method_temperature_and_sizes_and_teacher_names() -> None:
    assert method_temperature("forward_kl_T2") == 2.0
    assert method_temperature("student_KD_temp_5.0") == 5.0
    assert method_temperature("SFT") is None
    assert parse_size_billions("Qwen2.5-0.5B") == 0.5
    assert parse_size_billions("Qwen/Qwen2.5-14B-Instruct") == 14.0
    assert parse_size_billions("Llama-3.1-8B") == 8.0
    assert parse_size_billions("SmolLM2-135M-Instruct") == pytest.approx(0.135)
    assert parse_size_billions("gpt2") is None
    known = {"Qwen2.5-3B", "Qwen2.5-0.5B"}
    assert normalize_teacher("Qwen2.5-3B_ckpt2400", known) == "Qwen2.5-3B"
    assert normalize_teacher("my_teacher", known) == "my_teacher"
    assert format_p(0.0021) == "0.002"
    assert format_p(5.7e-10) == "5.7e-10"


def tiny_results() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Teacher": ["-", "-", "T-7B_ckpt1", "T-7B", "T-7B", "T-7B"],
            "Student": ["S-1B", "T-7B", "S-1B", "S-1B", "S-1B", "S-1B"],
            "Method": [
                "SFT",
                "SFT",
                "student_KD_temp_1.0",
                "student_KD_temp_2.0",
                "student_RevKD_temp_1.0",
                "student_KD_base_teacher_temp_1.0",
            ],
            "task1": [50.0, 80.0, 55.0, 52.0, 40.0, 99.0],
            "task2": [40.0, 70.0, 41.0, 49.0, 45.0, 99.0],
            "Average": [45.0, 75.0, 48.0, 50.5, 42.5, 99.0],
        }
    )


def test_improvement_takes_column_wise_maxima_and_skips_ablations() -> None:
    improvements = build_improvements(tiny_results())
    table = improvements.set_index(["Method", "column"])
    # SeqKD: max over both temperatures, per column independently.
    assert table.loc[("SeqKD", "task1"), "improvement"] == pytest.approx(5.0)
    assert table.loc[("SeqKD", "task2"), "improvement"] == pytest.approx(9.0)
    assert table.loc[("SeqKD", "Average"), "improvement"] == pytest.approx(5.5)
    assert table.loc[("SeqKD", "Average"), "best_method"] == "student_KD_temp_2.0"
    assert table.loc[("RevKD", "Average"), "improvement"] == pytest.approx(-2.5)
    assert set(improvements["Teacher"]) == {"T-7B"}
    assert table.loc[("SeqKD", "Average"), "teacher_sft"] == pytest.approx(75.0)
    assert table.loc[("SeqKD", "Average"), "student_size"] == pytest.approx(1.0)
    assert len(improvements) == 2 * 3  # no base-teacher ablation row


def test_statistics_on_two_rows_refuse_with_a_reason_and_no_warnings() -> None:
    # The demo's case: "KD improves over SFT: t = -5.00, p = 0.937 (n = 2)" was a t-test
    # with one degree of freedom; it is refused now, and says why.
    improvements = build_improvements(tiny_results())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = run_statistics(improvements, include_agreement=False, include_fidelity=False)
    average = [result for result in results if result.column == "Average"]
    assert [result.hypothesis for result in average] == ["H1", "H1", "H1", "H1-ANOVA", "H2", "H3"]
    overall = average[0]
    assert not overall.enough_data and overall.n == 2 and overall.p_value is None
    assert overall.sentence == (
        "KD improves over SFT on Average: not enough data: a one-sample t-test needs n >= 3, "
        "got 2 (n = 2 teacher-student-method rows)"
    )
    per_method = average[1]
    assert not per_method.enough_data and "(n = 1 teacher-student-method row)" in (
        per_method.sentence
    )
    assert per_method.sentence.startswith("SeqKD (token-level forward KL) improves over SFT")
    assert "needs at least two groups" not in average[3].reason  # two methods: too few values
    assert "more than 2 values" in average[3].reason
    assert average[-1].reason == "a rank correlation needs n >= 3 pairs, got 2"


def test_three_rows_run_the_t_test_and_constant_rows_say_so() -> None:
    values = [-3.0, -5.0, -7.0]
    result = one_sided_ttest(values, subject="KD improves over SFT on Average")
    expected = stats.ttest_1samp(values, 0.0, alternative="greater")
    assert result.p_value == pytest.approx(expected.pvalue) and result.n == 3
    constant = one_sided_ttest([2.0, 2.0, 2.0], subject="s")
    assert "every value is 2.00: no spread to test" in constant.sentence


def test_per_method_tests_are_holm_corrected_as_one_family() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for student in range(6):
        for family, shift in (("RevKD", 2.0), ("GKD", 0.5), ("SeqKD", 1.0)):
            rows.append(
                {"Teacher": "T-7B", "Student": f"S{student}", "Method": family, "column": "Average",
                 "improvement": shift + rng.normal(), "student_size": student + 1.0,
                 "teacher_sft": 70.0, "agreement": np.nan, "fidelity": np.nan}
            )  # fmt: skip
    results = run_statistics(pd.DataFrame(rows), include_agreement=False, include_fidelity=False)
    per_method = [r for r in results if r.hypothesis == "H1" and r.group != "all"]
    raw = [r.p_value for r in per_method]
    expected = multipletests(raw, method="holm")[1]
    assert [r.p_holm for r in per_method] == pytest.approx(list(expected))
    assert all(r.family_size == 3 and "; Holm p = " in r.sentence for r in per_method)
    overall = next(r for r in results if r.hypothesis == "H1" and r.group == "all")
    assert overall.p_holm is None  # a question of its own
    significant = [r.significant(0.05) for r in per_method]
    assert significant == [p < 0.05 for p in expected]
