"""How the report writes numbers: by magnitude, so that small values keep their digits.

A fixed ``.2f`` turns a token KL of ``7.0e-06`` into ``"0.00"``; here every value keeps two
significant figures at least:

=================  ==============  =========================
value              rule            example
=================  ==============  =========================
0                  ``0``           ``0``
``|x| >= 1``       2 decimals      ``87.50``, ``-10.24``
``0.01 <= |x|``    3 decimals      ``0.500``, ``0.013``
smaller            ``.1e``         ``7.0e-06``, ``-3.2e-03``
=================  ==============  =========================

p-values have their own rule (:func:`format_p`). Integers (counts) stay integers.
"""

from __future__ import annotations

import math


def format_value(value: float) -> str:
    """A number for tables and sentences, with precision by magnitude (see the module)."""
    number = float(value)
    if math.isnan(number):
        return "–"
    if math.isinf(number):
        return "∞" if number > 0 else "-∞"
    magnitude = abs(number)
    if magnitude == 0:
        return "0"
    if magnitude >= 1:
        return f"{number:.2f}"
    if magnitude >= 0.01:
        return f"{number:.3f}"
    return f"{number:.1e}"


def format_signed(value: float, digits: int = 1) -> str:
    """A difference with its sign, in points: ``+4.2``, ``-12.5``, ``0.0``."""
    number = float(value)
    if number == 0:
        return f"{0:.{digits}f}"
    return f"{number:+.{digits}f}"


def format_p(p_value: float) -> str:
    """``0.0021`` → ``"0.002"``; below 0.001 in scientific notation (``"1.2e-05"``)."""
    if p_value >= 0.001:
        return f"{p_value:.3f}"
    return f"{p_value:.1e}"


def format_percent_level(alpha: float) -> str:
    """The confidence level of ``1 - alpha`` intervals: ``0.05`` → ``"95 %"``."""
    return f"{100 * (1 - alpha):g} %"


def count_text(n: int, unit: str) -> str:
    """``n`` with its unit, singular for one: ``8 items``, ``1 item``, ``3 seeds``."""
    if n == 1 and unit.endswith("s"):
        unit = unit[:-1]
    return f"{n} {unit}"
