"""Statistics of comparisons: two runs on the same items, runs over seeds, families of tests.

Pure numpy/scipy, no run directories (those are :mod:`kdlab.analysis.comparisons`).

- :func:`mcnemar_exact`: McNemar's exact test of two runs scored on the same items. Of the
  items where exactly one run is right (b: only the first, c: only the second), the
  two-sided p-value is that of a binomial test of b successes in b + c trials with
  probability 1/2: ``min(1, 2 * P(X <= min(b, c)))`` (as statsmodels' ``mcnemar(exact=True)``).
  With no discordant item the two runs cannot be told apart: p = 1.
- :func:`paired_bootstrap`: a percentile interval of the accuracy difference (points),
  per task and of the Average (the mean over tasks, as kdlab's Average), resampling items
  with replacement within each task (stratified by task), one shared generator with a fixed
  seed. An item's difference is +100, 0 or -100, so a resample's mean depends only on how
  many +100 and -100 items it drew, and those counts of n draws with replacement from n
  items are exactly multinomial: the procedure draws the counts instead of the n indices
  (the same distribution as index resampling, which a test checks; O(samples) per task
  instead of O(samples · n)). The exact procedure, which a test repeats by hand::

      rng = numpy.random.default_rng(seed)
      for each task, in order:                    # tasks with at least one item
          n, wins, losses = items, items only the first run gets right, only the second
          counts = rng.multinomial(n, [wins / n, losses / n, 1 - (wins + losses) / n],
                                   size=samples)
          replicate[task] = 100 * (counts[:, 0] - counts[:, 1]) / n
      average = mean over tasks of replicate[task]          # replicate by replicate
      interval = numpy.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])

- :func:`t_interval`: mean ± t(1 - alpha/2, n - 1) · s / √n across seeds.
- :func:`holm_adjust`: Holm's step-down adjustment of one family of p-values.

Every result says its n; a statistic that cannot be computed carries a one-line ``reason``
instead of a number; a degenerate one (zero width) carries a ``note``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from kdlab.analysis.numbers import count_text


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's exact test on items scored by two runs."""

    n_items: int
    both_correct: int
    first_only: int
    """b: items only the first run gets right."""
    second_only: int
    """c: items only the second run gets right."""
    both_wrong: int
    p_value: float | None
    reason: str | None = None
    """Why there is no p-value (no shared item)."""
    note: str | None = None

    @property
    def discordant(self) -> int:
        """Items where exactly one run is right (b + c)."""
        return self.first_only + self.second_only

    @property
    def statistic(self) -> int:
        """min(b, c), the statistic of the exact test (as statsmodels reports it)."""
        return min(self.first_only, self.second_only)


def _as_bool(values: Sequence[bool] | np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-d sequence of correct flags, got shape {array.shape}")
    return array.astype(bool)


def mcnemar_exact(
    first_correct: Sequence[bool] | np.ndarray, second_correct: Sequence[bool] | np.ndarray
) -> McNemarResult:
    """McNemar's exact (binomial) test; the two sequences are aligned item by item."""
    first, second = _as_bool(first_correct), _as_bool(second_correct)
    if first.shape != second.shape:
        raise ValueError(f"mcnemar_exact needs aligned items, got {first.size} and {second.size}")
    n = int(first.size)
    both = int(np.sum(first & second))
    first_only = int(np.sum(first & ~second))
    second_only = int(np.sum(~first & second))
    neither = n - both - first_only - second_only
    if n == 0:
        return McNemarResult(0, 0, 0, 0, 0, None, reason="no item was scored by both runs")
    discordant = first_only + second_only
    if discordant == 0:
        return McNemarResult(
            n, both, 0, 0, neither, 1.0,
            note="no discordant item: both runs are right on the same items",
        )  # fmt: skip
    tail = float(stats.binom.cdf(min(first_only, second_only), discordant, 0.5))
    return McNemarResult(n, both, first_only, second_only, neither, min(1.0, 2.0 * tail))


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval, its n and its unit."""

    estimate: float | None
    low: float | None
    high: float | None
    n: int
    unit: str
    reason: str | None = None
    """Why there is no interval (too few items or seeds)."""
    note: str | None = None
    """A caveat (a zero-width interval)."""

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


@dataclass(frozen=True)
class PairedBootstrap:
    """Percentile intervals of the accuracy difference, per task and of the Average."""

    per_task: dict[str, Interval]
    average: Interval
    samples: int
    seed: int
    confidence: float


def _replicate_means(
    first: np.ndarray, second: np.ndarray, samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Mean difference (points) of ``samples`` resamples of the n items (see the module)."""
    n = first.size
    wins = int(np.sum(first & ~second))
    losses = int(np.sum(~first & second))
    counts = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=samples)
    return 100.0 * (counts[:, 0] - counts[:, 1]) / n


def _percentile_interval(replicates: np.ndarray, estimate: float, n: int, alpha: float) -> Interval:
    low, high = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    note = None
    if float(np.ptp(replicates)) == 0.0:
        note = "every resample gives the same difference: the interval has zero width"
    return Interval(estimate, float(low), float(high), n, "items", note=note)


def paired_bootstrap(
    tasks: Mapping[str, tuple[Sequence[bool] | np.ndarray, Sequence[bool] | np.ndarray]],
    *,
    samples: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedBootstrap:
    """Paired, task-stratified bootstrap of the accuracy difference first − second (points).

    Args:
        tasks: per task, the two runs' correct flags on the same items (aligned).
        samples: bootstrap replicates.
        seed: seed of the one generator all draws come from.
        alpha: the intervals are ``1 - alpha`` percentile intervals.

    Returns:
        Per task (tasks with items) and for the Average: the observed difference, the
        interval (``None`` with a reason for fewer than 2 items) and n in items.
    """
    rng = np.random.default_rng(seed)
    per_task: dict[str, Interval] = {}
    replicates: list[np.ndarray] = []
    estimates: list[float] = []
    total = 0
    for task, (first_correct, second_correct) in tasks.items():
        first, second = _as_bool(first_correct), _as_bool(second_correct)
        if first.shape != second.shape:
            raise ValueError(f"{task}: items not aligned ({first.size} vs {second.size})")
        n = int(first.size)
        if n == 0:
            per_task[task] = Interval(
                None, None, None, 0, "items", reason="no item was scored by both runs"
            )
            continue
        differences = 100.0 * (first.astype(float) - second.astype(float))
        estimate = float(differences.mean())
        task_replicates = _replicate_means(first, second, samples, rng)
        replicates.append(task_replicates)
        estimates.append(estimate)
        total += n
        if n < 2:
            per_task[task] = Interval(
                estimate, None, None, n, "items",
                reason="1 item: a bootstrap interval needs at least 2",
            )  # fmt: skip
        else:
            per_task[task] = _percentile_interval(task_replicates, estimate, n, alpha)
    if not replicates:
        average = Interval(None, None, None, 0, "items", reason="no item was scored by both runs")
    elif total < 2:
        average = Interval(
            float(np.mean(estimates)), None, None, total, "items",
            reason="1 item: a bootstrap interval needs at least 2",
        )  # fmt: skip
    else:
        average_replicates = np.mean(np.vstack(replicates), axis=0)
        average = _percentile_interval(average_replicates, float(np.mean(estimates)), total, alpha)
    return PairedBootstrap(per_task, average, samples, seed, 1 - alpha)


def t_interval(
    values: Sequence[float] | np.ndarray, *, alpha: float = 0.05, unit: str = "seeds"
) -> Interval:
    """Mean ± t(1 - alpha/2, n - 1) · s / √n (NaNs dropped); no interval for n < 2."""
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    n = int(data.size)
    if n == 0:
        return Interval(None, None, None, 0, unit, reason=f"no value (0 {unit})")
    mean = float(data.mean())
    if n < 2:
        return Interval(mean, None, None, 1, unit, reason=f"{count_text(1, unit)}: no interval")
    sem = float(data.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * sem
    note = f"identical across {unit}: the interval has zero width" if sem == 0 else None
    return Interval(mean, mean - half, mean + half, n, unit, note=note)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, the i-th (from 0) of m becomes ``max_{j <= i} min(1, (m - j) p_(j))``.
    """
    values = [float(value) for value in p_values]
    m = len(values)
    order = sorted(range(m), key=lambda index: values[index])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted
