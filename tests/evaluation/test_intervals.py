"""kdlab.utils.intervals: Wilson intervals and standard errors against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kdlab.utils.intervals import accuracy_fields, binomial_stderr, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n"), [(0, 16), (1, 16), (8, 16), (15, 16), (16, 16), (3, 7), (412, 1319), (1, 1)]
)
def test_wilson_equals_scipy(successes: int, n: int) -> None:
    reference = stats.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(reference.low, abs=1e-12)
    assert high == pytest.approx(reference.high, abs=1e-12)
    assert 0.0 <= low <= successes / n <= high <= 1.0


@pytest.mark.parametrize(("successes", "n"), [(0, 16), (5, 16), (16, 16), (412, 1319), (1, 2)])
def test_stderr_is_the_sample_stderr_of_the_scores(successes: int, n: int) -> None:
    scores = np.array([1.0] * successes + [0.0] * (n - successes))
    expected = scores.std(ddof=1) / math.sqrt(n)
    assert binomial_stderr(successes, n) == pytest.approx(expected, abs=1e-12)


def test_stderr_matches_lm_eval_when_installed() -> None:
    metrics = pytest.importorskip("lm_eval.api.metrics", reason="lm_eval is not installed")
    scores = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]
    assert binomial_stderr(sum(scores), len(scores)) == pytest.approx(metrics.mean_stderr(scores))


def test_undefined_cases_and_percent_fields() -> None:
    assert wilson_interval(0, 0) is None
    assert binomial_stderr(1, 1) is None
    assert accuracy_fields(0, 0) == {
        "accuracy": None,
        "accuracy_ci95": None,
        "accuracy_stderr": None,
    }
    fields = accuracy_fields(3, 4, "acc_norm")
    assert fields["acc_norm"] == 75.0
    low, high = wilson_interval(3, 4)
    assert fields["acc_norm_ci95"] == [round(100 * low, 4), round(100 * high, 4)]
    assert fields["acc_norm_stderr"] == round(100 * math.sqrt(0.75 * 0.25 / 3), 4)
    with pytest.raises(ValueError, match=r"need 0 <= successes <= n, got 5 of 4"):
        wilson_interval(5, 4)
