"""The paper's directional claims, tested on runs kdlab made: ``kdlab study``'s table.

Each claim compares two kinds of run of the same student (``first`` − ``second``, in
accuracy points on the Average) and says which way the paper found the difference:

=============================  ====================================  ==========
claim                          first − second                        paper says
=============================  ====================================  ==========
KD ≥ SFT (forward KL)          forward_kl_T1 − SFT                   > 0
KD ≥ SFT (reverse KL)          reverse_kl_T1 − SFT                   > 0
reverse KL ≥ forward KL        reverse_kl_T1 − forward_kl_T1         > 0
T = 5 collapses                forward_kl_T5 − forward_kl_T1         < 0
σ = 5 collapses                forward_kl_T1_noise5 − forward_kl_T1  < 0
a task-unaware teacher hurts   forward_kl_T1_base_teacher − SFT      < 0
=============================  ====================================  ==========

plus "agreement (EM1) does not track the accuracy gain" (the paper's H4, per KD run).

Nothing here recomputes a comparison: the per-seed differences, intervals and McNemar
p-values are the analysis's own (:class:`~kdlab.analysis.outputs.AnalysisOutputs`, read
from ``paired_average.csv`` and ``runs.csv``). What this module adds is the question's
unit and its test, with the analysis's functions:

- with runs on several seeds, the unit is the seed: the per-seed differences (one paired
  comparison on the same items per seed) get a one-sided one-sample t-test in the claimed
  direction (:func:`~kdlab.analysis.statistics.one_sided_ttest`, n >= 3 seeds) and a
  two-sided t-interval of their mean (:func:`~kdlab.analysis.paired.t_interval`);
- with one seed, the unit is the item: that seed's McNemar exact test (two-sided) and
  paired bootstrap interval, as the analysis computed them;
- the directional tests of the study form one family: Holm-adjusted together
  (:func:`~kdlab.analysis.statistics.apply_holm`), raw p next to it;
- the agreement claim is a Spearman correlation (:func:`~kdlab.analysis.statistics.spearman`)
  of each main-grid KD run's gain over the SFT run of its seed with its EM1, over KD runs.
  It is *supported by a non-rejection*, so it stays out of the Holm family (correcting it
  would favour the claim) and its verdict says "consistent", never "proven".

Verdicts: ``supported`` (the test rejects, Holm-adjusted, in the claimed direction),
``contradicted`` (the interval lies wholly on the other side of 0, or a two-sided test
rejects the other way), ``not detectable at this budget`` (neither), or ``not tested`` with
the one-line reason (runs missing, too few seeds). Reported as measured, whatever it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kdlab.analysis.comparisons import PAIRED_TEST
from kdlab.analysis.numbers import count_text, format_p, format_percent_level, format_signed
from kdlab.analysis.outputs import AnalysisOutputs, PairedRow
from kdlab.analysis.paired import t_interval
from kdlab.analysis.paper_tables import SFT_METHOD
from kdlab.analysis.runs import Run
from kdlab.analysis.statistics import (
    NOT_ENOUGH_DATA,
    StatResult,
    apply_holm,
    one_sided_ttest,
    spearman,
)
from kdlab.config.methods import get_method
from kdlab.config.run_identity import RunIdentity

FORWARD_KL = get_method("forward_kl").name
REVERSE_KL = get_method("reverse_kl").name
#: The ablation settings of the paper's claims.
COLLAPSE_TEMPERATURE = 5.0
COLLAPSE_NOISE_STD = 5.0
#: The Holm family of the study's directional tests.
CLAIMS_FAMILY = "the study's directional claims"
SEEDS_UNIT = "seeds"
ITEMS_UNIT = "items"
KD_RUNS_UNIT = "KD runs"

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
NOT_DETECTABLE = "not detectable at this budget"
NOT_TESTED = "not tested"


def method_label(
    method: str,
    *,
    temperature: float = 1.0,
    noise_std: float = 0.0,
    base_teacher: bool = False,
    kd_weight: float = 1.0,
) -> str:
    """The Method label the analysis gives a KD run with these settings (its own rule,
    :attr:`kdlab.analysis.runs.Run.method_label`): ``forward_kl_T1_noise5``."""
    identity = RunIdentity(
        stage="distill", role="student", name="-", model="-", teacher="-", method=method,
        temperature=temperature, noise_std=noise_std, base_teacher=base_teacher,
        kd_weight=kd_weight,
    )  # fmt: skip
    return Run(run_dir=Path("."), identity=identity).method_label


@dataclass(frozen=True)
class RunKind:
    """A kind of student run: SFT (``method`` None) or KD with these settings."""

    method: str | None
    temperature: float = 1.0
    noise_std: float = 0.0
    base_teacher: bool = False

    @property
    def label(self) -> str:
        """Its Method label in the analysis (``SFT``, ``forward_kl_T5``)."""
        if self.method is None:
            return SFT_METHOD
        return method_label(
            self.method, temperature=self.temperature, noise_std=self.noise_std,
            base_teacher=self.base_teacher,
        )  # fmt: skip

    @property
    def is_ablation(self) -> bool:
        """Not a main-grid run (T = 1, no noise, the task-aware teacher)."""
        return self.temperature != 1.0 or self.noise_std > 0 or self.base_teacher


SFT_RUNS = RunKind(None)


@dataclass(frozen=True)
class Claim:
    """A directional claim: the paper found ``first`` − ``second`` on the side of ``direction``."""

    key: str
    title: str
    first_kind: RunKind
    second_kind: RunKind
    direction: int
    """+1: the paper says first > second; -1: first < second."""

    @property
    def first(self) -> str:
        """Method label of the first runs (``forward_kl_T5``)."""
        return self.first_kind.label

    @property
    def second(self) -> str:
        """Method label of the runs it is compared with (``SFT``, ``forward_kl_T1``)."""
        return self.second_kind.label

    @property
    def expected(self) -> str:
        return f"{self.first} {'>' if self.direction > 0 else '<'} {self.second}"

    @property
    def comparison(self) -> str:
        """``first − second`` (``forward_kl_T5 − forward_kl_T1``), as results name it."""
        return f"{self.first} − {self.second}"


def paper_claims() -> tuple[Claim, ...]:
    """The paper's directional claims (see the module table)."""
    forward = RunKind(FORWARD_KL)
    reverse = RunKind(REVERSE_KL)
    return (
        Claim("kd_vs_sft_forward_kl", "KD ≥ SFT (forward KL)", forward, SFT_RUNS, +1),
        Claim("kd_vs_sft_reverse_kl", "KD ≥ SFT (reverse KL)", reverse, SFT_RUNS, +1),
        Claim("reverse_vs_forward_kl", "reverse KL ≥ forward KL", reverse, forward, +1),
        Claim(
            "temperature_5",
            f"T = {COLLAPSE_TEMPERATURE:g} collapses",
            RunKind(FORWARD_KL, temperature=COLLAPSE_TEMPERATURE),
            forward,
            -1,
        ),
        Claim(
            "noise_5",
            f"σ = {COLLAPSE_NOISE_STD:g} collapses",
            RunKind(FORWARD_KL, noise_std=COLLAPSE_NOISE_STD),
            forward,
            -1,
        ),
        Claim(
            "base_teacher",
            "a task-unaware teacher hurts",
            RunKind(FORWARD_KL, base_teacher=True),
            SFT_RUNS,
            -1,
        ),
    )


def ablation_kinds(claims: Sequence[Claim]) -> list[RunKind]:
    """The KD run kinds the claims need beyond the main grid (T = 5, σ = 5, base teacher)."""
    kinds: list[RunKind] = []
    for claim in claims:
        for kind in (claim.first_kind, claim.second_kind):
            if kind.is_ablation and kind not in kinds:
                kinds.append(kind)
    return kinds


AGREEMENT_TITLE = "agreement (EM1) does not track the accuracy gain"


def compare_methods(claims: Sequence[Claim]) -> list[str]:
    """The Method labels the analysis must compare pairwise (``compare_methods``) so that
    every claim between two KD kinds finds its pairs (KD vs SFT is always compared)."""
    labels: list[str] = []
    for claim in claims:
        if SFT_RUNS in (claim.first_kind, claim.second_kind):
            continue
        for label in (claim.first, claim.second):
            if label not in labels:
                labels.append(label)
    return labels


@dataclass
class ClaimResult:
    """What the data says about one claim."""

    claim: str
    comparison: str
    expected: str
    test: StatResult | None
    """The claim's test (None when it could not be set up)."""
    difference: float | None = None
    """first − second in points: the mean over seeds, or the one seed's difference."""
    low: float | None = None
    high: float | None = None
    per_seed: list[PairedRow] = field(default_factory=list)
    direction: int = 1
    verdict: str = NOT_TESTED
    reason: str = ""


def _per_seed(outputs: AnalysisOutputs, claim: Claim) -> tuple[list[PairedRow], str]:
    """One paired row per seed, oriented first − second; and why there is none."""
    firsts = outputs.runs_labelled(claim.first)
    if firsts.empty:
        return [], f"no analysed run labelled {claim.first}"
    rows: list[PairedRow] = []
    for run_dir in firsts["run_dir"]:
        row = outputs.pair(run_dir, claim.second)
        if row is not None:
            rows.append(row)
    if not rows:
        return [], f"no {claim.second} run paired with {claim.first} (same student and seed)"
    rows.sort(key=lambda row: (row.seed is None, row.seed or 0))
    return rows, ""


def _seed_text(row: PairedRow) -> str:
    interval = ""
    if row.low is not None and row.high is not None:
        interval = f" [{format_signed(row.low)}, {format_signed(row.high)}]"
    difference = "–" if row.difference is None else format_signed(row.difference)
    p_value = "–" if row.p_value is None else format_p(row.p_value)
    return (
        f"seed {row.seed}: {difference}{interval}, McNemar p = {p_value} "
        f"(n = {count_text(row.n, ITEMS_UNIT)})"
    )


def _seeds_test(claim: Claim, rows: Sequence[PairedRow], alpha: float) -> ClaimResult:
    differences = [row.difference for row in rows if row.difference is not None]
    oriented = [claim.direction * value for value in differences]
    subject = f"{claim.title}: {claim.comparison}"
    tested = f"mean of {claim.direction:+d} × ({claim.comparison}) > 0 across seeds"
    test = one_sided_ttest(
        oriented, subject=subject, hypothesis=claim.key, group=claim.title,
        unit=SEEDS_UNIT, tested=tested, family=CLAIMS_FAMILY,
    )  # fmt: skip
    interval = t_interval(differences, alpha=alpha, unit=SEEDS_UNIT)
    return ClaimResult(
        claim=claim.title, comparison=claim.comparison, expected=claim.expected,
        test=test, difference=interval.estimate, low=interval.low, high=interval.high,
        per_seed=list(rows), direction=claim.direction,
    )  # fmt: skip


def _items_test(claim: Claim, row: PairedRow, alpha: float) -> ClaimResult:
    subject = f"{claim.title}: {claim.comparison} (seed {row.seed})"
    if row.p_value is None or row.difference is None:
        reason = row.note or "no item scored by both runs"
        test = StatResult(
            claim.key, f"{PAIRED_TEST} (two-sided)", "Average", claim.title, None, None, row.n,
            f"{subject}: {NOT_ENOUGH_DATA}: {reason}", unit=ITEMS_UNIT, reason=reason,
            family=CLAIMS_FAMILY,
        )  # fmt: skip
    else:
        interval = (
            f"{format_percent_level(alpha)} CI [{format_signed(row.low)}, "
            f"{format_signed(row.high)}]"
            if row.low is not None and row.high is not None
            else "no interval"
        )
        sentence = (
            f"{subject}: {format_signed(row.difference)} points, {interval}; McNemar exact p "
            f"= {format_p(row.p_value)} (two-sided; {row.first_only} vs {row.second_only} "
            f"discordant; n = {count_text(row.n, ITEMS_UNIT)})"
        )
        test = StatResult(
            claim.key, f"{PAIRED_TEST} (two-sided)", "Average", claim.title,
            float(min(row.first_only, row.second_only)), row.p_value, row.n, sentence,
            row.difference, unit=ITEMS_UNIT, ci_low=row.low, ci_high=row.high,
            family=CLAIMS_FAMILY,
        )  # fmt: skip
    return ClaimResult(
        claim=claim.title, comparison=claim.comparison, expected=claim.expected,
        test=test, difference=row.difference, low=row.low, high=row.high, per_seed=[row],
        direction=claim.direction,
    )  # fmt: skip


def _verdict(result: ClaimResult, alpha: float) -> tuple[str, str]:
    test = result.test
    if test is None:
        return NOT_TESTED, result.reason
    if not test.enough_data:
        return NOT_TESTED, test.reason or ""
    oriented = None if result.difference is None else result.direction * result.difference
    if test.significant(alpha) and oriented is not None and oriented > 0:
        return SUPPORTED, ""
    wrong_side = (
        result.low is not None
        and result.high is not None
        and (result.high < 0 if result.direction > 0 else result.low > 0)
    )
    two_sided = test.unit == ITEMS_UNIT
    if wrong_side or (two_sided and test.significant(alpha) and oriented is not None):
        return CONTRADICTED, ""
    return NOT_DETECTABLE, ""


def _agreement(outputs: AnalysisOutputs, claims: Sequence[Claim]) -> ClaimResult:
    """Spearman of each main KD run's gain over its SFT run with its EM1 (the paper's H4)."""
    main = [
        claim.first
        for claim in claims
        if claim.second_kind == SFT_RUNS and not claim.first_kind.is_ablation
    ]
    gains: list[float] = []
    agreements: list[float] = []
    for label in main:
        for _, run in outputs.runs_labelled(label).iterrows():
            row = outputs.pair(run["run_dir"], SFT_METHOD)
            em1 = run.get("EM1")
            if row is None or row.difference is None or em1 is None or pd.isna(em1):
                continue
            gains.append(row.difference)
            agreements.append(float(em1))
    subject = f"{AGREEMENT_TITLE}: gain over SFT vs EM1, per KD run ({', '.join(main)})"
    test = spearman(
        gains, agreements, subject=subject, hypothesis="agreement", group=AGREEMENT_TITLE,
        unit=KD_RUNS_UNIT,
    )  # fmt: skip
    return ClaimResult(
        claim=AGREEMENT_TITLE,
        comparison="Spearman(gain over SFT, EM1)",
        expected="no correlation",
        test=test,
        difference=test.statistic,
        reason="" if test.enough_data else test.reason or "",
    )


def _agreement_verdict(result: ClaimResult, alpha: float) -> tuple[str, str]:
    test = result.test
    if test is None or not test.enough_data:
        return NOT_TESTED, result.reason
    if test.p_value is not None and test.p_value < alpha:
        sign = "positively" if (test.statistic or 0) > 0 else "negatively"
        return CONTRADICTED, f"agreement tracks the gain ({sign})"
    return "consistent (no detectable correlation; a null result, not a proof)", ""


def evaluate_claims(
    outputs: AnalysisOutputs, claims: Sequence[Claim] | None = None
) -> list[ClaimResult]:
    """Every claim's test, interval, n and verdict, from the analysis's outputs."""
    claims = list(paper_claims() if claims is None else claims)
    alpha = outputs.alpha
    results: list[ClaimResult] = []
    for claim in claims:
        rows, reason = _per_seed(outputs, claim)
        if not rows:
            result = ClaimResult(
                claim=claim.title, comparison=claim.comparison,
                expected=claim.expected, test=None, direction=claim.direction, reason=reason,
            )  # fmt: skip
        elif len(rows) == 1:
            result = _items_test(claim, rows[0], alpha)
        else:
            result = _seeds_test(claim, rows, alpha)
        results.append(result)
    tests = [result.test for result in results if result.test is not None]
    adjusted = iter(apply_holm(tests))
    for result in results:
        if result.test is not None:
            result.test = next(adjusted)
        result.verdict, detail = _verdict(result, alpha)
        result.reason = detail or result.reason
    agreement = _agreement(outputs, claims)
    agreement.verdict, detail = _agreement_verdict(agreement, alpha)
    agreement.reason = detail or agreement.reason
    results.append(agreement)
    return results


# --------------------------------------------------------------------------- the table


def _interval_text(result: ClaimResult, alpha: float) -> str:
    if result.low is None or result.high is None:
        if result.test is not None and result.test.unit == KD_RUNS_UNIT:
            return "none (a rank correlation; kdlab gives no interval for it)"
        return "none"
    level = format_percent_level(alpha)
    kind = (
        "t-interval"
        if result.test is not None and result.test.unit == SEEDS_UNIT
        else ("paired bootstrap")
    )
    return f"{level} {kind} [{format_signed(result.low)}, {format_signed(result.high)}]"


def claims_table(results: Sequence[ClaimResult], alpha: float) -> pd.DataFrame:
    """One row per claim: estimate, interval, test, p, Holm p, n and unit, verdict."""
    rows = []
    for result in results:
        test = result.test
        estimate = result.difference
        rows.append(
            {
                "claim": result.claim,
                "comparison": result.comparison,
                "paper says": result.expected,
                "estimate": estimate,
                "estimate unit": "rho" if test is not None and test.unit == KD_RUNS_UNIT
                else "points",
                "interval": _interval_text(result, alpha),
                "test": "–" if test is None else test.test,
                "statistic": None if test is None else test.statistic,
                "p": None if test is None else test.p_value,
                "Holm p": None if test is None else test.p_holm,
                "m": None if test is None else test.family_size,
                "n": None if test is None else test.n,
                "unit": "–" if test is None else test.unit,
                "per seed": "; ".join(_seed_text(row) for row in result.per_seed),
                "verdict": result.verdict,
                "why": result.reason,
            }
        )  # fmt: skip
    return pd.DataFrame.from_records(rows)


def _estimate_text(result: ClaimResult) -> str:
    """``+3.0 points`` (a difference), ``rho = 0.31`` (the agreement claim), or ``–``."""
    if result.difference is None:
        return "–"
    if result.test is not None and result.test.unit == KD_RUNS_UNIT:
        return f"rho = {result.difference:.2f}"
    return f"{format_signed(result.difference)} points"


def claims_markdown(results: Sequence[ClaimResult], alpha: float, *, source: str) -> str:
    """The claims as a Markdown page: the table, then each claim's sentence."""
    from kdlab.analysis.report import markdown_table

    table = claims_table(results, alpha)
    shown = table.drop(columns=["per seed", "statistic", "estimate unit"])
    shown["estimate"] = [_estimate_text(result) for result in results]
    lines = [
        "# The paper's claims, tested at small scale",
        "",
        f"Every number is read from the analysis in `{source}` (its paired comparisons on "
        f"the same items, per seed); alpha = {alpha:g}. With several seeds a claim's unit is "
        "the seed (one-sided t-test in the claimed direction, t-interval of the mean "
        "difference); with one seed it is the item (McNemar exact, two-sided; paired "
        "bootstrap interval). Holm: over the directional claims together (m tests). "
        "Reported as measured.",
        "",
        markdown_table(shown).rstrip(),
        "",
    ]
    for result in results:
        lines.append(f"- **{result.claim}** ({result.verdict}"
                     + (f": {result.reason}" if result.reason else "") + ")")  # fmt: skip
        if result.test is not None:
            lines.append(f"  {result.test.sentence}")
        for row in result.per_seed:
            lines.append(f"  - {_seed_text(row)}")
    return "\n".join(lines) + "\n"


__all__ = [
    "AGREEMENT_TITLE",
    "CLAIMS_FAMILY",
    "CONTRADICTED",
    "NOT_DETECTABLE",
    "NOT_TESTED",
    "SFT_RUNS",
    "SUPPORTED",
    "Claim",
    "ClaimResult",
    "RunKind",
    "ablation_kinds",
    "claims_markdown",
    "claims_table",
    "compare_methods",
    "evaluate_claims",
    "method_label",
    "paper_claims",
]
