"""The study's claims table, computed from what ``kdlab analyze`` wrote about planted runs.

Two run sets are planted (fake run directories with hand-built predictions, analysed by the
real analysis): one where every claim of the paper holds, one where most do not. The
claims must say so, and every number they print must be the analysis's own (read back
from its CSVs) or an independent scipy computation on those numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from scipy import stats

from kdlab.analysis import stage as analysis_stage
from kdlab.analysis.claims import (
    AGREEMENT_TITLE,
    CONTRADICTED,
    NOT_DETECTABLE,
    NOT_TESTED,
    SUPPORTED,
    claims_markdown,
    claims_table,
    compare_methods,
    evaluate_claims,
    paper_claims,
)
from kdlab.analysis.outputs import AnalysisOutputs
from kdlab.config.analysis import AnalyzeConfig

TEACHER = "Qwen/Qwen2.5-1.5B"
STUDENT = "Qwen/Qwen2.5-0.5B"
ITEMS = 40
TEACHER_CORRECT = range(30)
SEEDS = (6, 7, 8)


def predictions(correct: set[int], agree_wrong: int = 0, *, teacher: bool = False) -> list:
    """Records of one run on ``ITEMS`` items: right on ``correct``; elsewhere a wrong answer,
    the teacher's own wrong answer on the first ``agree_wrong`` items the teacher gets wrong
    (so that EM1 can move without accuracy)."""
    teacher_wrong = [index for index in range(ITEMS) if index not in TEACHER_CORRECT]
    copied = set(teacher_wrong[:agree_wrong])
    records = []
    for index in range(ITEMS):
        gold = index + 1
        if index in correct:
            answer = gold
        elif teacher or index in copied:
            answer = gold + 100
        else:
            answer = gold + 200
        records.append(
            {
                "index": index,
                "instruction": f"problem {index}",
                "gold": gold,
                "output": f"The answer is {answer}.",
                "extracted": answer,
                "correct": answer == gold,
            }
        )
    return records


def plant(
    root: Path,
    make_run: Callable[..., Path],
    *,
    sft: dict[int, int],
    forward: dict[int, int],
    reverse: dict[int, int],
    ablations: dict[str, int],
    agree_wrong: dict[tuple[str, int], int] | None = None,
) -> Path:
    """A teacher; SFT, forward KL, reverse KL per seed (counts of right items, the first
    ones from the seed's offset); forward KL at T = 5, with σ = 5, from the base teacher on
    seed 6. Returns the sweep root."""
    agree_wrong = agree_wrong or {}
    make_run(
        root, "teacher", model=TEACHER, role="teacher",
        predictions={"arithmetic": predictions(set(TEACHER_CORRECT), teacher=True)},
    )  # fmt: skip
    kd = {
        "model": STUDENT,
        "stage": "distill",
        "teacher": TEACHER,
        "teacher_run": "../../teacher",
        "temperature": 1.0,
    }
    for seed in SEEDS:
        offset = SEEDS.index(seed)

        def right(count: int, start: int = offset) -> set[int]:
            return set(range(start, start + count))

        make_run(
            root, f"students/sft_s{seed}", model=STUDENT, seed=seed,
            predictions={"arithmetic": predictions(right(sft[seed]))},
        )  # fmt: skip
        for method, counts in (("forward_kl", forward), ("reverse_kl", reverse)):
            records = predictions(right(counts[seed]), agree_wrong.get((method, seed), 0))
            make_run(
                root, f"students/{method}_s{seed}", method=method, seed=seed,
                predictions={"arithmetic": records}, **kd,
            )  # fmt: skip
    settings = {
        "t5": {"temperature": 5.0},
        "noise5": {"noise_std": 5.0},
        "base": {"base_teacher": True},
    }
    for name, count in ablations.items():
        make_run(
            root, f"students/{name}_s6", method="forward_kl", seed=6,
            predictions={"arithmetic": predictions(set(range(count)))},
            **{**kd, **settings[name]},
        )  # fmt: skip
    return root


def analyse(root: Path, out: Path) -> AnalysisOutputs:
    """The real analysis over the planted runs, with the pairs the claims need."""
    config = AnalyzeConfig(
        run_dirs=[str(root)],
        out_dir=str(out),
        compare_methods=compare_methods(paper_claims()),
        rouge_max_items=0,
        bootstrap_samples=2000,
    )
    analysis_stage.run(config)
    return AnalysisOutputs.read(out)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment, written out again (the test's own computation)."""
    order = sorted(range(len(p_values)), key=lambda index: p_values[index])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def paired_csv(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / "math" / "paired_average.csv")
    runs = pd.read_csv(out / "math" / "runs.csv").set_index("run_dir")["Method"]
    frame["A"] = frame["run A"].map(runs)
    frame["B"] = frame["run B"].map(runs)
    return frame


@pytest.fixture
def holding(tmp_path: Path, make_run: Callable[..., Path]) -> tuple[AnalysisOutputs, Path]:
    """Every claim holds: KD well above SFT on every seed, reverse above forward KL, the
    ablations collapse, EM1 scrambled against the gain."""
    root = plant(
        tmp_path / "runs",
        make_run,
        sft={6: 12, 7: 12, 8: 12},
        forward={6: 20, 7: 21, 8: 19},
        reverse={6: 22, 7: 24, 8: 23},
        ablations={"t5": 1, "noise5": 2, "base": 2},
        agree_wrong={
            ("forward_kl", 6): 8, ("forward_kl", 7): 0, ("forward_kl", 8): 5,
            ("reverse_kl", 6): 1, ("reverse_kl", 7): 0, ("reverse_kl", 8): 3,
        },
    )  # fmt: skip
    out = tmp_path / "analysis"
    return analyse(root, out), out


@pytest.fixture
def failing(tmp_path: Path, make_run: Callable[..., Path]) -> tuple[AnalysisOutputs, Path]:
    """Most claims fail: forward KL below SFT on every seed, reverse KL level with SFT, T = 5
    no different from T = 1, noise and the base teacher *better*; EM1 = accuracy."""
    root = plant(
        tmp_path / "runs",
        make_run,
        sft={6: 20, 7: 20, 8: 20},
        forward={6: 12, 7: 13, 8: 11},
        reverse={6: 21, 7: 19, 8: 20},
        ablations={"t5": 12, "noise5": 28, "base": 28},
    )
    out = tmp_path / "analysis"
    return analyse(root, out), out


def by_claim(results: list[Any]) -> dict[str, Any]:
    return {result.claim: result for result in results}


def test_claims_hold_where_the_planted_runs_say_so(holding) -> None:
    outputs, out = holding
    results = by_claim(evaluate_claims(outputs))
    claims = {claim.title: claim for claim in paper_claims()}
    verdicts = {title: result.verdict for title, result in results.items()}
    assert verdicts == {
        "KD ≥ SFT (forward KL)": SUPPORTED,
        "KD ≥ SFT (reverse KL)": SUPPORTED,
        "reverse KL ≥ forward KL": SUPPORTED,
        "T = 5 collapses": SUPPORTED,
        "σ = 5 collapses": SUPPORTED,
        "a task-unaware teacher hurts": SUPPORTED,
        AGREEMENT_TITLE: "consistent (no detectable correlation; a null result, not a proof)",
    }
    paired = paired_csv(out)
    p_values: list[float] = []
    for title in list(claims):
        claim, result = claims[title], results[title]
        rows = paired[
            ((paired["A"] == claim.first) & (paired["B"] == claim.second))
            | ((paired["A"] == claim.second) & (paired["B"] == claim.first))
        ]
        rows = rows[rows["column"] == "Average"].sort_values("seed")
        sign = [1.0 if a == claim.first else -1.0 for a in rows["A"]]
        deltas = [s * value for s, value in zip(sign, rows["Δ A−B (points)"], strict=True)]
        # the per-seed differences are the analysis's own, oriented first − second
        assert [row.difference for row in result.per_seed] == pytest.approx(deltas)
        assert [row.seed for row in result.per_seed] == list(rows["seed"])
        if len(deltas) > 1:
            assert result.test.unit == "seeds" and result.test.n == len(SEEDS) == 3
            oriented = [claim.direction * value for value in deltas]
            expected = stats.ttest_1samp(oriented, 0.0, alternative="greater")
            assert result.test.p_value == pytest.approx(expected.pvalue)
            assert result.difference == pytest.approx(sum(deltas) / len(deltas))
            half = stats.t.ppf(0.975, 2) * stats.tstd(deltas) / 3**0.5
            assert (result.low, result.high) == pytest.approx(
                (result.difference - half, result.difference + half)
            )
        else:
            assert result.test.unit == "items" and result.test.n == ITEMS
            assert result.test.p_value == pytest.approx(float(rows["McNemar p"].iloc[0]))
            low, high = rows["CI low"].iloc[0], rows["CI high"].iloc[0]
            assert (result.low, result.high) == pytest.approx(
                (low, high) if sign[0] > 0 else (-high, -low)
            )
        p_values.append(result.test.p_value)
    # one Holm family over the directional claims, the agreement claim left out
    expected_holm = holm(p_values)
    for title, p_holm in zip(claims, expected_holm, strict=True):
        assert results[title].test.p_holm == pytest.approx(p_holm)
        assert results[title].test.family_size == len(claims)
    agreement = results[AGREEMENT_TITLE].test
    assert agreement.unit == "KD runs" and agreement.n == 6 and agreement.p_holm is None
    gains = [20.0, 22.5, 17.5, 25.0, 30.0, 27.5]
    em1 = [70.0, 52.5, 60.0, 57.5, 60.0, 65.0]
    assert agreement.statistic == pytest.approx(stats.spearmanr(gains, em1).statistic)


def test_claims_that_do_not_hold_are_reported_as_measured(failing) -> None:
    outputs, _ = failing
    results = by_claim(evaluate_claims(outputs))
    forward = results["KD ≥ SFT (forward KL)"]
    assert forward.verdict == CONTRADICTED  # its t-interval lies wholly below 0
    assert forward.difference == pytest.approx(-20.0) and forward.high < 0
    assert results["KD ≥ SFT (reverse KL)"].verdict == NOT_DETECTABLE
    assert results["T = 5 collapses"].verdict == NOT_DETECTABLE
    assert results["T = 5 collapses"].test.p_value == 1.0
    for title in ("σ = 5 collapses", "a task-unaware teacher hurts"):
        assert results[title].verdict == CONTRADICTED, title
        assert results[title].difference > 0
    agreement = results[AGREEMENT_TITLE]
    assert agreement.verdict == CONTRADICTED and agreement.test.statistic == pytest.approx(1.0)
    table = claims_table(list(results.values()), outputs.alpha)
    assert list(table["verdict"]) == [result.verdict for result in results.values()]
    assert set(table["unit"]) == {"seeds", "items", "KD runs"}
    page = claims_markdown(list(results.values()), outputs.alpha, source="x")
    assert "seed 7: -17.5" in page  # forward KL − SFT on seed 7: 13 vs 20 of 40 items


def test_a_claim_without_its_runs_is_not_tested(tmp_path: Path, make_run) -> None:
    root = plant(
        tmp_path / "runs", make_run,
        sft={6: 12, 7: 12, 8: 12}, forward={6: 20, 7: 21, 8: 19}, reverse={6: 22, 7: 24, 8: 23},
        ablations={"t5": 1},
    )  # fmt: skip
    results = by_claim(evaluate_claims(analyse(root, tmp_path / "analysis")))
    assert results["σ = 5 collapses"].verdict == NOT_TESTED
    assert "no analysed run labelled forward_kl_T1_noise5" in results["σ = 5 collapses"].reason
    assert results["T = 5 collapses"].verdict == SUPPORTED


def test_the_summary_sentences_are_the_reports(holding) -> None:
    """The demo's summary lines carry, digit for digit, the report's numbers."""
    import re

    outputs, out = holding
    report = (out / "report.md").read_text(encoding="utf-8")
    pattern = re.compile(
        r"^- (?P<pair>\S+ − \S+) on Average \(.*seed (?P<seed>\d+)\): (?P<delta>\S+) points, "
        r"95 % CI \[(?P<low>\S+), (?P<high>\S+)\]; McNemar exact p = (?P<p>\S+) ",
        re.MULTILINE,
    )
    in_report = {(m["pair"], m["seed"]): m.groupdict() for m in pattern.finditer(report)}
    runs = [outputs.runs.loc[index, "run_dir"] for index in outputs.runs.index]
    lines = [line for line in outputs.summary_lines(runs) if line.startswith("- ")]
    assert len(lines) == len(in_report) == 17  # 9 KD vs SFT, 6 pairs × seeds of the claims
    summary = re.compile(
        r"^- (?P<pair>\S+ − \S+) \(seed (?P<seed>\d+)\) = (?P<delta>\S+) points, 95 % CI "
        r"\[(?P<low>\S+), (?P<high>\S+)\], McNemar p = (?P<p>[^\s;]+)"
    )
    for line in lines:
        found = summary.match(line)
        assert found is not None, line
        reported = in_report[(found["pair"], found["seed"])]
        for key in ("delta", "low", "high", "p"):
            assert found[key] == reported[key], (line, key)
    teacher = next(line for line in outputs.summary_lines(runs) if "| the teacher (" in line)
    assert "| 75.00 |" in teacher  # the teacher shown as the teacher, with its accuracy
