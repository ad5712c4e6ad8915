"""Reasoning fidelity: BLEU against sacrebleu directly, ROUGE-L against rouge-score."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from kdlab.analysis.fidelity import aligned_outputs, corpus_bleu, mean_rouge_l, reasoning_fidelity
from kdlab.analysis.run_tables import build_family_tables
from kdlab.analysis.runs import collect_runs

STUDENT = [
    {"index": 0, "output": "Tom has 12 apples and buys 7 more, so 12 + 7 = 19."},
    {"index": 1, "output": "She reads 24 pages then 15 pages, 39 in total."},
    {"index": 2, "output": "an item the teacher never answered"},
]
TEACHER = [
    {"index": 1, "output": "She read 24 pages and 15 pages: 24 + 15 = 39 pages."},
    {"index": 0, "output": "Tom starts with 12 apples and gets 7 more, so 12 + 7 = 19."},
]


def test_bleu_matches_sacrebleu_on_aligned_items() -> None:
    result = reasoning_fidelity(STUDENT, TEACHER)
    expected = sacrebleu.corpus_bleu(
        [STUDENT[0]["output"], STUDENT[1]["output"]],
        [[TEACHER[1]["output"], TEACHER[0]["output"]]],
    ).score
    assert result.n_items == 2
    assert result.bleu == pytest.approx(expected)


def test_rouge_l_is_the_mean_f1_of_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = 50.0 * (
        scorer.score(TEACHER[1]["output"], STUDENT[0]["output"])["rougeL"].fmeasure
        + scorer.score(TEACHER[0]["output"], STUDENT[1]["output"])["rougeL"].fmeasure
    )
    assert reasoning_fidelity(STUDENT, TEACHER).rouge_l == pytest.approx(expected)


def test_identical_texts_score_100() -> None:
    texts = ["the answer is 19 because 12 + 7 = 19", "so we get 39 pages in total today"]
    assert corpus_bleu(texts, texts) == pytest.approx(100.0)
    assert mean_rouge_l(texts, texts) == pytest.approx(100.0)


def test_empty_inputs_give_none_and_misaligned_raise() -> None:
    assert corpus_bleu([], []) is None
    assert mean_rouge_l([], []) is None
    with pytest.raises(ValueError, match="references"):
        corpus_bleu(["a"], [])


def test_bleu_of_fake_sweep_matches_sacrebleu(fake_sweep) -> None:
    collection = collect_runs([fake_sweep.root])
    tables = build_family_tables(collection, "math")
    bleu = tables.pairs["BLEU"].set_index("Method")
    by_dir = {run.run_dir: run for run in collection.runs}
    teacher = by_dir[fake_sweep.teacher.resolve()].tasks["gsm8k"].predictions()
    for method, run_dir in (
        ("forward_kl_T1", fake_sweep.kd_t1),
        ("forward_kl_T2", fake_sweep.kd_t2),
        ("SFT", fake_sweep.sft),
    ):
        student = by_dir[run_dir.resolve()].tasks["gsm8k"].predictions()
        hypotheses, references = aligned_outputs(student, teacher)
        expected = sacrebleu.corpus_bleu(hypotheses, [references]).score
        assert bleu.loc[method, "gsm8k"] == pytest.approx(expected)
    # The T=1 student copies more of the teacher's wording than the SFT student.
    assert bleu.loc["forward_kl_T1", "Average"] > bleu.loc["SFT", "Average"]
    rouge = tables.pairs["ROUGE-L"].set_index("Method")
    assert 0 < rouge.loc["forward_kl_T1", "Average"] <= 100
