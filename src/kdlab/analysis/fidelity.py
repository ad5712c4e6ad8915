"""Reasoning fidelity: how close a student's rationales are to its teacher's.

Corpus BLEU (sacrebleu, default 13a tokenization) with the student's ``output`` texts as
hypotheses and the teacher's as references, on the items both answered (matched by
``index``); ROUGE-L F1 (rouge-score, averaged over items) as a second view. Both in 0-100.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdlab.analysis.agreement import index_predictions


@dataclass(frozen=True)
class FidelityResult:
    """BLEU and ROUGE-L of one model's rationales against another's."""

    bleu: float | None
    rouge_l: float | None
    n_items: int


def _text(record: Mapping[str, Any]) -> str:
    value = record.get("output")
    return "" if value is None else str(value)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Corpus BLEU (0-100) of ``hypotheses`` against one reference each; ``None`` if empty."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references for BLEU")
    if not hypotheses:
        return None
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 (0-100) over aligned pairs; ``None`` if empty."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references for ROUGE-L"
        )
    if not hypotheses:
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        total += scorer.score(reference, hypothesis)["rougeL"].fmeasure
    return 100.0 * total / len(hypotheses)


def aligned_outputs(
    predictions: Iterable[Mapping[str, Any]], reference: Iterable[Mapping[str, Any]]
) -> tuple[list[str], list[str]]:
    """The ``output`` texts of the items both prediction sets hold, in the same order."""
    first = index_predictions(predictions)
    second = index_predictions(reference)
    shared = [key for key in first if key in second]
    return [_text(first[key]) for key in shared], [_text(second[key]) for key in shared]


def reasoning_fidelity(
    predictions: Iterable[Mapping[str, Any]],
    reference: Iterable[Mapping[str, Any]],
    *,
    rouge: bool = True,
) -> FidelityResult:
    """BLEU (and ROUGE-L) of ``predictions``' rationales against ``reference``'s."""
    hypotheses, references = aligned_outputs(predictions, reference)
    return FidelityResult(
        bleu=corpus_bleu(hypotheses, references),
        rouge_l=mean_rouge_l(hypotheses, references) if rouge else None,
        n_items=len(hypotheses),
    )
