"""Analysis of evaluation outputs: accuracy, agreement, fidelity, statistics and reports.

Reads run directories' files (``docs/run-layout.md``) or tables in the paper's format, and
writes CSV and LaTeX tables, PNG/PDF/SVG figures, ``report.md`` and a self-contained
``report.html``. Comparisons of runs on the same items and across seeds are in
:mod:`kdlab.analysis.comparisons` (statistics in :mod:`kdlab.analysis.paired`). The command
line is ``kdlab analyze`` (:mod:`kdlab.analysis.stage`, config
:class:`kdlab.config.analysis.AnalyzeConfig`).
"""

from __future__ import annotations

from kdlab.analysis.agreement import AgreementResult, answer_agreement, answers_equal
from kdlab.analysis.fidelity import FidelityResult, corpus_bleu, mean_rouge_l, reasoning_fidelity
from kdlab.analysis.paired import (
    Interval,
    McNemarResult,
    PairedBootstrap,
    holm_adjust,
    mcnemar_exact,
    paired_bootstrap,
    t_interval,
)
from kdlab.analysis.runs import Run, RunCollection, collect_runs, parse_size_billions
from kdlab.analysis.statistics import (
    StatResult,
    build_improvements,
    classify_method,
    one_sided_ttest,
    one_way_anova,
    run_statistics,
    spearman,
)

__all__ = [
    "AgreementResult",
    "FidelityResult",
    "Interval",
    "McNemarResult",
    "PairedBootstrap",
    "Run",
    "RunCollection",
    "StatResult",
    "answer_agreement",
    "answers_equal",
    "build_improvements",
    "classify_method",
    "collect_runs",
    "corpus_bleu",
    "holm_adjust",
    "mcnemar_exact",
    "mean_rouge_l",
    "one_sided_ttest",
    "one_way_anova",
    "paired_bootstrap",
    "parse_size_billions",
    "reasoning_fidelity",
    "run_statistics",
    "spearman",
    "t_interval",
]
