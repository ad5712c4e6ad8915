"""The paper's statistics re-computed from its published tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kdlab.analysis.paper_tables import (
    combine_results_tables,
    load_pair_table,
    load_results_table,
)
from kdlab.analysis.statistics import build_improvements, run_statistics
from kdlab.errors import DataError


def analyse(directory: Path, main: str, llama: str, em1: str, bleu: str | None):
    results = combine_results_tables(
        load_results_table(directory / main), [load_results_table(directory / llama)]
    )
    agreement = load_pair_table(directory / em1)
    fidelity = load_pair_table(directory / bleu) if bleu else None
    improvements = build_improvements(results, agreement=agreement, fidelity=fidelity)
    statistics = run_statistics(
        improvements, include_agreement=True, include_fidelity=fidelity is not None
    )
    return results, improvements, {(s.hypothesis, s.group, s.column): s for s in statistics}


def test_math_tables(paper_results: Path) -> None:
    results, improvements, stats = analyse(
        paper_results, "math_results_main.csv", "llama_math_results.csv", "EM1.csv", "BLEU.csv"
    )
    assert "BaseModel" in set(results["Method"])  # main table keeps its base rows...
    assert not (
        (results["Method"] == "BaseModel") & results["Student"].str.startswith("Llama")
    ).any()
    average = improvements[improvements["column"] == "Average"].set_index(
        ["Teacher", "Student", "Method"]
    )
    assert len(average) == 33  # 11 teacher-student pairs x 3 methods
    # Hand-checked: Qwen2.5-7B -> 0.5B RevKD: max(63.08, 62.72, 3.0) - 52.84.
    assert average.loc[("Qwen2.5-7B", "Qwen2.5-0.5B", "RevKD"), "improvement"] == pytest.approx(
        10.24
    )
    # "Qwen2.5-3B_ckpt2400" rows merge with "Qwen2.5-3B": SeqKD max is 58.90 at T=2.
    assert average.loc[("Qwen2.5-3B", "Qwen2.5-0.5B", "SeqKD"), "kd_best"] == pytest.approx(58.9)
    assert average.loc[("Qwen2.5-7B", "Qwen2.5-0.5B", "SeqKD"), "teacher_sft"] == pytest.approx(
        77.81
    )
    em1 = pd.read_csv(paper_results / "EM1.csv")
    row = em1[(em1["Pair"] == "Qwen2.5-7B -> Qwen2.5-0.5B") & (em1["Method"] == "KD")]
    tasks = [c for c in em1.columns if c not in ("Teacher", "Student", "Pair", "Method")]
    assert average.loc[("Qwen2.5-7B", "Qwen2.5-0.5B", "GKD"), "agreement"] == pytest.approx(
        float(row[tasks].mean(axis=1).iloc[0])
    )
    assert average["fidelity"].notna().all() and average["agreement"].notna().all()
    # Per-task columns use the matching EM1 column.
    gsm8k = improvements[improvements["column"] == "gsm8k"].set_index(
        ["Teacher", "Student", "Method"]
    )
    assert gsm8k.loc[("Qwen2.5-7B", "Qwen2.5-0.5B", "GKD"), "agreement"] == pytest.approx(
        float(row["gsm8k"].iloc[0])
    )
    h1 = stats[("H1", "all", "Average")]
    assert h1.n == 33 and h1.statistic == pytest.approx(8.47, abs=0.01) and h1.p_value < 1e-8
    assert all(stats[("H1", family, "Average")].n == 11 for family in ("SeqKD", "RevKD", "GKD"))
    assert stats[("H1-ANOVA", "SeqKD, RevKD, GKD", "Average")].p_value > 0.05
    size = stats[("H3", "all", "Average")]
    assert size.statistic == pytest.approx(-0.66, abs=0.01) and size.p_value < 0.001
    assert stats[("H4", "all", "Average")].statistic == pytest.approx(-0.52, abs=0.01)
    assert stats[("H5", "all", "Average")].n == 33
    # Statistics exist for every task column too.
    assert stats[("H1", "all", "gsm8k")].n == 33


def test_commonsense_tables(paper_results: Path) -> None:
    _, improvements, stats = analyse(
        paper_results, "cs_results_main.csv", "llama_cs_results.csv", "EM1_cs.csv", None
    )
    average = improvements[improvements["column"] == "Average"].set_index(
        ["Teacher", "Student", "Method"]
    )
    assert len(average) == 33
    # The collapsed RevKD runs of 3B -> 1.5B: best is T=2 at 59.16 vs SFT 69.68.
    assert average.loc[("Qwen2.5-3B", "Qwen2.5-1.5B", "RevKD"), "improvement"] == pytest.approx(
        -10.52
    )
    h1 = stats[("H1", "all", "Average")]
    assert h1.n == 33 and h1.statistic == pytest.approx(3.86, abs=0.01) and h1.p_value < 0.001
    assert stats[("H1", "RevKD", "Average")].p_value > 0.05
    assert stats[("H3", "all", "Average")].statistic == pytest.approx(-0.54, abs=0.01)
    assert ("H5", "all", "Average") not in stats
    assert stats[("H4", "all", "Average")].n == 33


def test_bad_tables_raise_data_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    with pytest.raises(DataError, match="does not exist"):
        load_results_table(missing)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("Model,Score\nx,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="Teacher"):
        load_results_table(wrong)
    text = tmp_path / "text.csv"
    text.write_text("Teacher,Student,Method,gsm8k,Average\n-,S,SFT,abc,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="non-numeric"):
        load_results_table(text)
    no_tasks = tmp_path / "no_tasks.csv"
    no_tasks.write_text("Teacher,Student,Pair,Method\nT,S,T -> S,KD\n", encoding="utf-8")
    with pytest.raises(DataError, match="no task columns"):
        load_pair_table(no_tasks)
