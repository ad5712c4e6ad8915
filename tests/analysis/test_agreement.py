"""Answer agreement (EM1/EM2) on hand-built predictions."""

from __future__ import annotations

import pytest

from kdlab.analysis.agreement import answer_agreement, answers_equal
from kdlab.analysis.run_tables import build_family_tables
from kdlab.analysis.runs import collect_runs


def records(*answers: object, start: int = 0) -> list[dict[str, object]]:
    return [{"index": start + i, "extracted": answer} for i, answer in enumerate(answers)]


def test_agreement_counts_equal_answers() -> None:
    result = answer_agreement(records(1, 2, 3, 4), records(1, 2, 0, 4))
    assert result.agreement == pytest.approx(75.0)
    assert (result.n_items, result.n_agree, result.n_missing) == (4, 3, 0)


def test_none_never_agrees_even_with_none() -> None:
    result = answer_agreement(records(None, "A", None), records(None, "A", "B"))
    assert result.agreement == pytest.approx(100 / 3)
    assert result.n_missing == 2


def test_items_are_matched_by_index_not_position() -> None:
    first = [{"index": 2, "extracted": 5}, {"index": 0, "extracted": 1}]
    second = [
        {"index": 0, "extracted": 1},
        {"index": 1, "extracted": 9},
        {"index": 2, "extracted": 5},
    ]
    result = answer_agreement(first, second)
    assert result.n_items == 2
    assert result.agreement == pytest.approx(100.0)


def test_no_shared_items_gives_none() -> None:
    result = answer_agreement(records(1, 2), records(1, 2, start=10))
    assert result.agreement is None
    assert result.n_items == 0


@pytest.mark.parametrize(
    ("first", "second", "equal"),
    [
        (18, 18.0, True),
        ("18", 18, True),
        ("1,000", 1000, True),
        (0.1 + 0.2, 0.3, True),
        (3, 4, False),
        ("A", "A ", True),
        ("A", "B", False),
        ("true", "true", True),
        (None, None, False),
        (None, 1, False),
    ],
)
def test_answers_equal(first: object, second: object, equal: bool) -> None:
    assert answers_equal(first, second) is equal


def test_em1_em2_of_fake_sweep(fake_sweep) -> None:
    collection = collect_runs([fake_sweep.root])
    tables = build_family_tables(collection, "math")
    em1 = tables.pairs["EM1"].set_index("Method")
    em2 = tables.pairs["EM2"].set_index("Method")
    # Hand-computed from GSM8K_ANSWERS / SVAMP_ANSWERS in conftest.py.
    assert em1.loc["forward_kl_T1", "gsm8k"] == pytest.approx(75.0)
    assert em1.loc["forward_kl_T1", "SVAMP"] == pytest.approx(75.0)
    assert em1.loc["forward_kl_T2", "gsm8k"] == pytest.approx(75.0)
    assert em1.loc["forward_kl_T2", "SVAMP"] == pytest.approx(25.0)
    assert em1.loc["forward_kl_T2", "Average"] == pytest.approx(50.0)
    assert em2.loc["forward_kl_T1", "gsm8k"] == pytest.approx(50.0)
    assert em2.loc["forward_kl_T2", "gsm8k"] == pytest.approx(25.0)
    assert em2.loc["forward_kl_T2", "SVAMP"] == pytest.approx(75.0)
    # The SFT student against the teacher: gsm8k 1/4 (9, None, 4≠5), SVAMP 2/4.
    assert em1.loc["SFT", "gsm8k"] == pytest.approx(25.0)
    assert em1.loc["SFT", "SVAMP"] == pytest.approx(25.0)
    assert "SFT" not in em2.index
