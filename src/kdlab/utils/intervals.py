"""Binomial confidence intervals for accuracies (one helper for the whole project).

An accuracy over ``n`` scored items is a binomial proportion. kdlab reports, next to it:

- the **Wilson score interval** (:func:`wilson_interval`): unlike the normal
  approximation it stays inside [0, 1] and is not degenerate at 0 % or 100 %, which
  matters at the small ``limit`` values used for smoke evaluations (16 items);
- the **standard error** (:func:`binomial_stderr`) exactly as lm-evaluation-harness prints
  it (``± stderr``): the sample standard deviation of the 0/1 scores divided by ``√n``,
  i.e. ``sqrt(p (1 - p) / (n - 1))``.

:func:`accuracy_fields` packs both, in percent, under the key names metrics.json uses.

>>> lo, hi = wilson_interval(8, 16)
>>> round(lo, 4), round(hi, 4)
(0.28, 0.72)
>>> accuracy_fields(8, 16, digits=2)["accuracy_ci95"]
[28.0, 72.0]
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

#: The confidence level of every reported interval.
CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(
    successes: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / n`` as fractions in [0, 1].

    Returns ``None`` when ``n == 0`` (no items: no interval). Raises ``ValueError`` for
    counts outside ``0 <= successes <= n``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp rounding noise at the edges (successes = 0 or n gives exactly 0 or 1).
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_stderr(successes: int, n: int) -> float | None:
    """Standard error of the mean of ``n`` 0/1 scores (lm-evaluation-harness's ``± stderr``).

    ``sqrt(p (1 - p) / (n - 1))`` with the sample (``n - 1``) variance; ``None`` for
    ``n < 2``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n < 2:
        return None
    p = successes / n
    return math.sqrt(p * (1 - p) / (n - 1))


def accuracy_fields(
    successes: int, n: int, prefix: str = "accuracy", *, digits: int = 4
) -> dict[str, Any]:
    """``{prefix, prefix_ci95, prefix_stderr}`` in percent (``None`` where undefined).

    ``prefix`` is the metric's name in metrics.json (``accuracy``, ``accuracy_paper_rule``,
    ``acc_norm``, ...).
    """
    interval = wilson_interval(successes, n)
    stderr = binomial_stderr(successes, n)
    return {
        prefix: round(100.0 * successes / n, digits) if n else None,
        f"{prefix}_ci95": None
        if interval is None
        else [round(100.0 * interval[0], digits), round(100.0 * interval[1], digits)],
        f"{prefix}_stderr": None if stderr is None else round(100.0 * stderr, digits),
    }
