"""Paired and seed statistics against independent computations (scipy, statsmodels, by hand)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW

from kdlab.analysis.numbers import count_text, format_signed, format_value
from kdlab.analysis.paired import holm_adjust, mcnemar_exact, paired_bootstrap, t_interval


def flags(both: int, first_only: int, second_only: int, neither: int) -> tuple[list, list]:
    """Correct flags of two runs with the given cell counts (in a shuffled order)."""
    first = [True] * both + [True] * first_only + [False] * second_only + [False] * neither
    second = [True] * both + [False] * first_only + [True] * second_only + [False] * neither
    order = np.random.default_rng(both + 7 * first_only).permutation(len(first))
    return [first[i] for i in order], [second[i] for i in order]


@pytest.mark.parametrize(
    "cells",
    [(5, 3, 1, 2), (0, 7, 0, 0), (10, 0, 6, 4), (3, 4, 4, 3), (40, 12, 25, 23), (0, 1, 0, 0)],
)
def test_mcnemar_matches_statsmodels_and_scipy(cells: tuple[int, int, int, int]) -> None:
    both, first_only, second_only, neither = cells
    first, second = flags(*cells)
    result = mcnemar_exact(first, second)
    reference = mcnemar([[both, first_only], [second_only, neither]], exact=True)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert result.statistic == reference.statistic
    binomial = stats.binomtest(first_only, first_only + second_only, 0.5).pvalue
    assert result.p_value == pytest.approx(binomial, rel=1e-12)
    assert (result.first_only, result.second_only, result.n_items) == (
        first_only, second_only, sum(cells),
    )  # fmt: skip


def test_mcnemar_degenerate_cases() -> None:
    identical = mcnemar_exact([True, False, True], [True, False, True])
    assert identical.p_value == 1.0 and identical.discordant == 0
    assert "no discordant item" in identical.note
    # All items discordant, one way: the exact p is 2 * 0.5^n.
    all_discordant = mcnemar_exact([True] * 6, [False] * 6)
    assert all_discordant.p_value == pytest.approx(2 * 0.5**6)
    one_item = mcnemar_exact([True], [False])
    assert one_item.p_value == 1.0 and one_item.n_items == 1
    empty = mcnemar_exact([], [])
    assert empty.p_value is None and "no item" in empty.reason
    with pytest.raises(ValueError, match="aligned"):
        mcnemar_exact([True, False], [True])


def hand_bootstrap(tasks, samples: int, seed: int, alpha: float):
    """The documented procedure (kdlab.analysis.paired), one replicate at a time."""
    rng = np.random.default_rng(seed)
    per_task = {}
    for task, (first, second) in tasks.items():
        n = len(first)
        wins = sum(1 for a, b in zip(first, second, strict=True) if a and not b)
        losses = sum(1 for a, b in zip(first, second, strict=True) if b and not a)
        means = []
        for _ in range(samples):
            drawn_wins, drawn_losses, _ = rng.multinomial(
                n, [wins / n, losses / n, (n - wins - losses) / n]
            )
            means.append(100.0 * (drawn_wins - drawn_losses) / n)
        per_task[task] = means
    average = [sum(per_task[task][b] for task in per_task) / len(per_task) for b in range(samples)]
    bounds = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    intervals = {task: np.percentile(values, bounds) for task, values in per_task.items()}
    return intervals, np.percentile(average, bounds)


def index_bootstrap(first, second, samples: int, seed: int) -> np.ndarray:
    """The textbook bootstrap: resample the n items' indices with replacement."""
    rng = np.random.default_rng(seed)
    d = 100.0 * (np.asarray(first, float) - np.asarray(second, float))
    return d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)


def test_bootstrap_equals_the_hand_computed_procedure() -> None:
    first_a, second_a = flags(6, 4, 2, 3)
    first_b, second_b = flags(2, 1, 3, 1)
    tasks = {"gsm8k": (first_a, second_a), "SVAMP": (first_b, second_b)}
    result = paired_bootstrap(tasks, samples=700, seed=11, alpha=0.1)
    intervals, average = hand_bootstrap(tasks, samples=700, seed=11, alpha=0.1)
    for task in tasks:
        interval = result.per_task[task]
        assert (interval.low, interval.high) == pytest.approx(tuple(intervals[task]), abs=1e-9)
    assert (result.average.low, result.average.high) == pytest.approx(tuple(average), abs=1e-9)
    expected = (100 * (4 - 2) / 15 + 100 * (1 - 3) / 7) / 2
    assert result.average.estimate == pytest.approx(expected)
    assert result.average.n == 15 + 7 and result.average.unit == "items"
    again = paired_bootstrap(tasks, samples=700, seed=11, alpha=0.1)
    assert again.average == result.average
    other = paired_bootstrap(tasks, samples=700, seed=12, alpha=0.1)
    assert (other.average.low, other.average.high) != (result.average.low, result.average.high)


def test_count_draws_give_the_distribution_of_index_resampling() -> None:
    first, second = flags(9, 7, 4, 5)  # 25 items
    ours = paired_bootstrap({"t": (first, second)}, samples=200_000, seed=1).per_task["t"]
    textbook = index_bootstrap(first, second, samples=200_000, seed=2)
    for level, bound in ((2.5, ours.low), (97.5, ours.high)):
        assert bound == pytest.approx(np.percentile(textbook, level), abs=100 / 25)
    quick = paired_bootstrap({"t": (first, second)}, samples=200_000, seed=1, alpha=0.5)
    assert (quick.per_task["t"].low, quick.per_task["t"].high) == pytest.approx(
        tuple(np.percentile(textbook, [25, 75])), abs=100 / 25
    )


def test_bootstrap_agrees_with_scipy_bootstrap_on_one_task() -> None:
    rng = np.random.default_rng(3)
    first = rng.random(80) < 0.6
    second = rng.random(80) < 0.45
    ours = paired_bootstrap({"t": (first, second)}, samples=20000, seed=1).per_task["t"]
    reference = stats.bootstrap(
        (first.astype(float), second.astype(float)),
        lambda a, b, axis=-1: 100 * (np.mean(a, axis=axis) - np.mean(b, axis=axis)),
        paired=True, vectorized=True, n_resamples=20000, method="percentile",
        confidence_level=0.95, rng=np.random.default_rng(2),
    )  # fmt: skip
    step = 100 / 80  # the resampled difference moves in steps of one item
    assert ours.low == pytest.approx(reference.confidence_interval.low, abs=1.5 * step)
    assert ours.high == pytest.approx(reference.confidence_interval.high, abs=1.5 * step)


def test_exhaustive_bootstrap_of_three_items() -> None:
    # d = (+100, 0, -100): the 27 equally likely resamples give the exact distribution.
    first, second = [True, True, False], [False, True, True]
    means = sorted(
        np.mean([[100.0, 0.0, -100.0][i] for i in draw])
        for draw in itertools.product(range(3), repeat=3)
    )

    def quantile(level: float) -> float:  # of the exact distribution: first x with CDF >= level
        return next(x for k, x in enumerate(means) if (k + 1) / len(means) >= level)

    ours = paired_bootstrap({"t": (first, second)}, samples=60000, seed=5).per_task["t"]
    assert ours.estimate == 0.0
    # P(mean = -100) = 1/27 > 2.5 %: both bounds are the extremes, not -66.7 / +66.7.
    assert (quantile(0.025), quantile(0.975)) == (-100.0, 100.0)
    assert (ours.low, ours.high) == (quantile(0.025), quantile(0.975))
    narrow = paired_bootstrap({"t": (first, second)}, samples=60000, seed=5, alpha=0.2)
    assert narrow.per_task["t"].low == pytest.approx(quantile(0.1))  # -66.7: CDF 4/27 >= 0.1


def test_bootstrap_is_stratified_by_task() -> None:
    # A task of 2 items both won by the first run, and one of 200 ties: stratified, every
    # resample keeps 2 and 200 items, so the Average (mean of the tasks) is always 50.
    tasks = {"small": ([True, True], [False, False]), "large": ([True] * 200, [True] * 200)}
    result = paired_bootstrap(tasks, samples=500, seed=0)
    assert (result.average.estimate, result.average.low, result.average.high) == (50, 50, 50)
    assert "zero width" in result.average.note


def test_bootstrap_degenerate_cases() -> None:
    identical = paired_bootstrap({"t": ([True, False, True], [True, False, True])}, samples=200)
    assert (identical.average.low, identical.average.high) == (0.0, 0.0)
    assert "zero width" in identical.per_task["t"].note
    discordant = paired_bootstrap({"t": ([True] * 5, [False] * 5)}, samples=200)
    assert (discordant.per_task["t"].low, discordant.per_task["t"].high) == (100.0, 100.0)
    one = paired_bootstrap({"t": ([True], [False])}, samples=200)
    assert one.per_task["t"].estimate == 100.0 and not one.per_task["t"].has_interval
    assert "1 item" in one.per_task["t"].reason and "1 item" in one.average.reason
    empty = paired_bootstrap({"t": ([], [])}, samples=200)
    assert empty.average.estimate is None and "no item" in empty.average.reason


def test_t_interval_matches_scipy_and_statsmodels() -> None:
    values = [61.0, 57.5, 66.25, 59.0]
    interval = t_interval(values, alpha=0.05)
    low, high = stats.t.interval(
        0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values)
    )
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)
    assert (interval.low, interval.high) == pytest.approx(
        DescrStatsW(values).tconfint_mean(alpha=0.05), rel=1e-12
    )
    assert interval.n == 4 and interval.unit == "seeds" and interval.estimate == np.mean(values)
    narrower = t_interval(values, alpha=0.2)
    assert narrower.high - narrower.low < interval.high - interval.low
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = t_interval([50.0])
        same = t_interval([50.0, 50.0, 50.0])
    assert one.estimate == 50.0 and not one.has_interval and one.reason == "1 seed: no interval"
    assert (same.low, same.high) == (50.0, 50.0) and "zero width" in same.note
    assert t_interval([np.nan, 1.0, 3.0]).n == 2
    assert t_interval([]).reason.startswith("no value")


@pytest.mark.parametrize(
    "p_values",
    [
        [0.01, 0.04, 0.03, 0.5],
        [0.2, 0.2, 0.01],
        [0.9, 0.95],
        [0.001],
        list(np.random.default_rng(4).random(12) ** 3),
    ],
)
def test_holm_matches_statsmodels(p_values: list[float]) -> None:
    _, expected, _, _ = multipletests(p_values, method="holm")
    assert holm_adjust(p_values) == pytest.approx(list(expected), rel=1e-12)


def test_holm_edge_cases() -> None:
    assert holm_adjust([]) == []
    assert holm_adjust([0.6, 0.7]) == [1.0, 1.0]  # capped at 1


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (7.0e-06, "7.0e-06"),
        (-0.0032, "-3.2e-03"),
        (0.5, "0.500"),
        (0.0125, "0.013"),
        (87.5, "87.50"),
        (-10.24, "-10.24"),
        (0.0, "0"),
        (float("nan"), "–"),
    ],
)
def test_numbers_are_formatted_by_magnitude(value: float, text: str) -> None:
    assert format_value(value) == text


def test_signed_and_counted_numbers() -> None:
    assert (format_signed(4.25), format_signed(-12.5), format_signed(0.0)) == (
        "+4.2", "-12.5", "0.0",
    )  # fmt: skip
    assert (count_text(1, "items"), count_text(8, "items"), count_text(1, "seeds")) == (
        "1 item", "8 items", "1 seed",
    )  # fmt: skip
