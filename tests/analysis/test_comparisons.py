"""Paired comparisons and seed aggregation on run directories, checked against scipy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from kdlab.analysis.comparisons import compare_family
from kdlab.analysis.run_tables import build_family_tables
from kdlab.analysis.runs import collect_runs

TEACHER = "Qwen/Qwen2.5-1.5B"
STUDENT = "Qwen/Qwen2.5-0.5B"


def records(correct: Sequence[bool], *, order: Sequence[int] | None = None) -> list[dict]:
    """predictions.jsonl records with the given correct flags (gold = index)."""
    rows = []
    for index in order if order is not None else range(len(correct)):
        right = bool(correct[index])
        rows.append(
            {
                "index": index, "instruction": f"q{index}", "gold": index,
                "output": f"The answer is {index if right else -1}.",
                "extracted": index if right else -1, "correct": right,
            }
        )  # fmt: skip
    return rows


def pattern(n: int, accuracy: float, seed: int) -> list[bool]:
    return list(np.random.default_rng(seed).random(n) < accuracy)


def family_of(root: Path, **options: Any):
    collection = collect_runs([root])
    tables = build_family_tables(collection, "math")
    outcome = compare_family(
        collection, tables.runs, tables.tasks, tables.per_run,
        samples=options.pop("samples", 500), **options,
    )  # fmt: skip
    return tables, outcome


def kd_run(make_run, root: Path, name: str, predictions: dict, **identity: Any) -> Path:
    settings = {
        "model": STUDENT, "stage": "distill", "method": "forward_kl", "temperature": 1.0,
        "teacher": TEACHER, "teacher_run": "../teacher", **identity,
    }  # fmt: skip
    return make_run(root, name, predictions=predictions, **settings)


def test_kd_vs_sft_on_the_fake_sweep(fake_sweep) -> None:
    _, outcome = family_of(fake_sweep.root)
    paired = outcome.paired.set_index(["comparison", "column"])
    t1 = paired.loc[("forward_kl_T1 − SFT", "Average")]
    # gsm8k: the T=1 student is right on items 1, 2 where SFT is not; SVAMP: +1 and -1.
    assert (t1["only A right"], t1["only B right"], t1["n"]) == (3, 1, 8)
    assert t1["McNemar p"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)
    assert t1["Δ A−B (points)"] == pytest.approx(25.0)  # mean of +50 (gsm8k) and 0 (SVAMP)
    assert (t1["accuracy A (%)"], t1["accuracy B (%)"]) == (87.5, 62.5)
    gsm8k = paired.loc[("forward_kl_T1 − SFT", "gsm8k")]
    assert (gsm8k["only A right"], gsm8k["only B right"], gsm8k["n"]) == (2, 0, 4)
    assert gsm8k["McNemar p"] == pytest.approx(0.5)
    # The two KD runs form one family per column: Holm over their McNemar p-values.
    average = outcome.paired[outcome.paired["column"] == "Average"]
    expected = multipletests(list(average["McNemar p"]), method="holm")[1]
    assert list(average["Holm p"]) == pytest.approx(list(expected))
    assert set(average["m"]) == {2}
    results = [r for r in outcome.results if r.column == "Average"]
    assert {r.hypothesis for r in results} == {"paired: KD vs SFT"}
    assert all(r.unit == "items" and r.n == 8 for r in results)
    first = next(r for r in results if r.group.startswith("forward_kl_T1"))
    assert first.sentence.startswith(
        "forward_kl_T1 − SFT on Average (Qwen2.5-0.5B, teacher Qwen2.5-1.5B, seed 6): +25.0 "
        "points, 95 % CI ["
    )
    assert "McNemar exact p = 0.625 (3 vs 1 discordant; n = 8 items); Holm p = 1.000 (m = 2)" in (
        first.sentence
    )
    assert first.ci_low <= 25.0 <= first.ci_high
    assert outcome.seeds.empty and outcome.seed_differences.empty
    assert any("One seed per configuration" in note for note in outcome.notes)


def test_items_are_matched_by_index_and_unshared_items_left_out(tmp_path, make_run) -> None:
    root = tmp_path / "runs"
    make_run(root, "teacher", model=TEACHER, role="teacher",
             predictions={"gsm8k": records([True] * 6)})  # fmt: skip
    sft = [True, False, False, True, False, True]
    make_run(root, "sft", model=STUDENT, predictions={"gsm8k": records(sft)})
    kd = [True, True, True, True, False, False, True]
    # The KD run's file is in another order and has one item more (index 6).
    kd_run(make_run, root, "kd", {"gsm8k": records(kd, order=[6, 5, 4, 3, 2, 1, 0])})
    _, outcome = family_of(root)
    row = outcome.paired[outcome.paired["column"] == "gsm8k"].iloc[0]
    assert (row["n"], row["only A right"], row["only B right"]) == (6, 2, 1)
    assert "1 item(s) only in forward_kl_T1, 0 only in SFT: left out" in row["note"]
    assert row["Δ A−B (points)"] == pytest.approx(100 * (4 - 3) / 6)


def test_identical_runs_and_a_run_with_no_shared_item(tmp_path, make_run) -> None:
    root = tmp_path / "runs"
    make_run(root, "teacher", model=TEACHER, role="teacher",
             predictions={"gsm8k": records([True] * 4)})  # fmt: skip
    same = [True, False, True, False]
    make_run(root, "sft", model=STUDENT, predictions={"gsm8k": records(same)})
    kd_run(make_run, root, "kd", {"gsm8k": records(same)})
    _, outcome = family_of(root)
    row = outcome.paired[outcome.paired["column"] == "Average"].iloc[0]
    assert row["McNemar p"] == 1.0 and (row["CI low"], row["CI high"]) == (0.0, 0.0)
    assert "no discordant item" in row["note"] and "zero width" in row["note"]


def seeded_family(root: Path, make_run) -> dict[str, dict[int, list[bool]]]:
    """A teacher, SFT and forward-KL runs on seeds 6, 7, 8 (20 items each)."""
    make_run(root, "teacher", model=TEACHER, role="teacher",
             predictions={"gsm8k": records([True] * 20)})  # fmt: skip
    flags: dict[str, dict[int, list[bool]]] = {"sft": {}, "kd": {}}
    for seed, (sft_accuracy, kd_accuracy) in zip((6, 7, 8), ((0.4, 0.6), (0.5, 0.55), (0.45, 0.7))):
        flags["sft"][seed] = pattern(20, sft_accuracy, seed)
        flags["kd"][seed] = pattern(20, kd_accuracy, 100 + seed)
        make_run(root, f"sft_s{seed}", model=STUDENT, seed=seed,
                 predictions={"gsm8k": records(flags["sft"][seed])})  # fmt: skip
        kd_run(make_run, root, f"kd_s{seed}", {"gsm8k": records(flags["kd"][seed])}, seed=seed)
    return flags


def test_seeds_are_aggregated_with_a_t_interval_and_per_seed_values(tmp_path, make_run) -> None:
    root = tmp_path / "runs"
    flags = seeded_family(root, make_run)
    _, outcome = family_of(root)
    seeds = outcome.seeds.set_index(["Method", "column"])
    sft_scores = [100 * np.mean(flags["sft"][seed]) for seed in (6, 7, 8)]
    row = seeds.loc[("SFT", "Average")]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(sft_scores), scale=stats.sem(sft_scores))
    assert (row["n"], row["unit"]) == (3, "seeds")
    assert (row["mean"], row["CI low"], row["CI high"]) == pytest.approx(
        (np.mean(sft_scores), low, high)
    )
    assert row["per seed"] == "; ".join(
        f"{seed}: {score:.1f}" for seed, score in zip((6, 7, 8), sft_scores)
    )
    # KD − SFT of the same seed, across seeds: a two-sided t-test of the mean difference.
    differences = [
        100 * (np.mean(flags["kd"][seed]) - np.mean(flags["sft"][seed])) for seed in (6, 7, 8)
    ]
    reference = stats.ttest_1samp(differences, 0.0)
    table = outcome.seed_differences.set_index("column")
    assert table.loc["Average", "mean Δ KD−SFT (points)"] == pytest.approx(np.mean(differences))
    assert table.loc["Average", "t"] == pytest.approx(reference.statistic)
    assert table.loc["Average", "p"] == pytest.approx(reference.pvalue)
    result = next(
        r for r in outcome.results if r.hypothesis == "seeds: KD vs SFT" and r.column == "Average"
    )
    assert result.n == 3 and result.unit == "seeds" and "n = 3 seeds: 6: " in result.sentence
    # Item-level tests pair each KD seed with the SFT run of the same seed.
    paired = outcome.paired[outcome.paired["column"] == "Average"]
    assert list(paired["seed"]) == list(paired["other seed"]) and len(paired) == 3
    assert set(paired["m"]) == {3}


def test_one_kd_seed_with_an_sft_of_another_seed(tmp_path, make_run) -> None:
    root = tmp_path / "runs"
    make_run(root, "teacher", model=TEACHER, role="teacher",
             predictions={"gsm8k": records([True] * 4)})  # fmt: skip
    make_run(root, "sft", model=STUDENT, seed=6, predictions={"gsm8k": records([True] * 4)})
    for seed in (7, 8):
        kd_run(make_run, root, f"kd{seed}", {"gsm8k": records([False] * 4)}, seed=seed)
    _, outcome = family_of(root)
    sentences = [r.sentence for r in outcome.results if r.column == "Average"]
    assert any("seeds 7 vs 6" in sentence for sentence in sentences)
    # No SFT run of seed 7 or 8: no difference across seeds can be formed.
    table = outcome.seed_differences
    assert table.loc[table["column"] == "Average", "n"].item() == 0
    refused = next(r for r in outcome.results if r.hypothesis == "seeds: KD vs SFT")
    assert not refused.enough_data and "not enough data" in refused.sentence


def test_methods_named_in_the_config_are_compared_pairwise(tmp_path, make_run) -> None:
    root = tmp_path / "runs"
    make_run(root, "teacher", model=TEACHER, role="teacher",
             predictions={"gsm8k": records([True] * 10)})  # fmt: skip
    make_run(root, "sft", model=STUDENT, predictions={"gsm8k": records(pattern(10, 0.5, 1))})
    for method in ("forward_kl", "reverse_kl"):
        for temperature in (1.0, 2.0):
            kd_run(
                make_run, root, f"{method}_T{temperature:g}",
                {"gsm8k": records(pattern(10, 0.6, int(temperature) + len(method)))},
                method=method, temperature=temperature,
            )  # fmt: skip
    _, outcome = family_of(root, compare_methods=["forward_kl", "reverse_kl", "jsd"])
    pairs = outcome.paired[outcome.paired["question"] == "forward_kl vs reverse_kl"]
    assert sorted(set(pairs["comparison"])) == [
        "forward_kl_T1 − reverse_kl_T1", "forward_kl_T2 − reverse_kl_T2",
    ]  # fmt: skip
    assert set(pairs.loc[pairs["column"] == "Average", "m"]) == {2}
    assert any("no evaluated run of jsd" in note for note in outcome.notes)
    _, labels = family_of(root, compare_methods=["forward_kl_T1", "reverse_kl_T2"])
    assert set(labels.paired.loc[labels.paired["question"] != "KD vs SFT", "comparison"]) == {
        "forward_kl_T1 − reverse_kl_T2"
    }


def test_paired_table_in_the_report(fake_sweep, analyze, tmp_path) -> None:
    out = tmp_path / "out"
    analyze([fake_sweep.root, "--out", out, "--bootstrap-samples", "400"])
    table = pd.read_csv(out / "math" / "paired_average.csv")
    assert list(table["comparison"]) == ["forward_kl_T1 − SFT", "forward_kl_T2 − SFT"]
    tex = (out / "math" / "paired_average.tex").read_text(encoding="utf-8")
    assert "forward\\_kl\\_T1 $-$ SFT" in tex and tex.count("\\\\\n") == 3
    statistics = pd.read_csv(out / "statistics.csv")
    paired = statistics[statistics["hypothesis"] == "paired: KD vs SFT"]
    assert set(paired["unit"]) == {"items"} and paired["p_holm"].notna().all()
    per_task = pd.read_csv(out / "math" / "paired_tasks.csv")
    assert set(per_task["column"]) == {"gsm8k", "SVAMP"}


def test_runs_without_a_shared_task_get_a_refusal_not_silence(tmp_path, make_run) -> None:
    root = tmp_path / "runs"
    make_run(root, "teacher", model=TEACHER, role="teacher",
             predictions={"gsm8k": records([True] * 3), "SVAMP": records([True] * 3)})  # fmt: skip
    make_run(root, "sft", model=STUDENT, predictions={"SVAMP": records([True, False, True])})
    kd_run(make_run, root, "kd", {"gsm8k": records([True, True, False])})
    _, outcome = family_of(root)
    (row,) = outcome.paired.to_dict("records")
    assert (row["column"], row["n"], row["McNemar p"]) == ("Average", 0, None)
    (result,) = outcome.results
    assert not result.enough_data
    assert result.sentence.endswith("not enough data: no item was scored by both runs")
