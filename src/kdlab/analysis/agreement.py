"""Answer agreement between two models on the same items (the paper's EM1 and EM2).

EM1 is the share of test items where the student's extracted answer equals the teacher's;
EM2 is the same between a KD student and the SFT student of the same size. Items are
matched by their ``index``; an item where either model has no extracted answer (``None``)
never counts as agreement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AgreementResult:
    """How often two models give the same extracted answer."""

    agreement: float | None
    """Percentage (0-100) of shared items with equal answers, ``None`` with no shared item."""
    n_items: int
    """Items present in both prediction sets."""
    n_agree: int
    """Shared items with equal (non-``None``) answers."""
    n_missing: int
    """Shared items where at least one model has no extracted answer."""


def index_predictions(predictions: Iterable[Mapping[str, Any]]) -> dict[Any, Mapping[str, Any]]:
    """Predictions keyed by their ``index`` (falling back to their position in the list)."""
    indexed: dict[Any, Mapping[str, Any]] = {}
    for position, record in enumerate(predictions):
        key = record.get("index", position)
        indexed[key] = record
    return indexed


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        try:
            return float(text)
        except ValueError:
            return None
    return None


def answers_equal(first: Any, second: Any) -> bool:
    """Whether two extracted answers are the same; ``None`` never equals anything.

    Numbers (or numeric strings) are compared as numbers (``"18"`` equals ``18.0``), other
    values as stripped strings.
    """
    if first is None or second is None:
        return False
    first_number, second_number = _as_number(first), _as_number(second)
    if first_number is not None and second_number is not None:
        if math.isnan(first_number) or math.isnan(second_number):
            return False
        return math.isclose(first_number, second_number, rel_tol=1e-9, abs_tol=1e-9)
    return str(first).strip() == str(second).strip()


def answer_agreement(
    predictions: Iterable[Mapping[str, Any]], reference: Iterable[Mapping[str, Any]]
) -> AgreementResult:
    """Agreement (in %) of the ``extracted`` answers of two prediction sets, matched by index."""
    first = index_predictions(predictions)
    second = index_predictions(reference)
    shared = [key for key in first if key in second]
    n_agree = 0
    n_missing = 0
    for key in shared:
        answer, reference_answer = first[key].get("extracted"), second[key].get("extracted")
        if answer is None or reference_answer is None:
            n_missing += 1
        elif answers_equal(answer, reference_answer):
            n_agree += 1
    agreement = 100.0 * n_agree / len(shared) if shared else None
    return AgreementResult(
        agreement=agreement, n_items=len(shared), n_agree=n_agree, n_missing=n_missing
    )
