"""Read back what ``kdlab analyze`` wrote: the one source of the demo's summary and the
study's claims.

The demo and the study never recompute a statistic: they read the analysis's own tables,
``<out>/<section>/runs.csv`` (one row per evaluated run: Method, Average, EM1, kind, seed,
run directory) and ``<out>/<section>/paired_average.csv`` (every paired comparison on the
Average: Δ, bootstrap interval, McNemar exact p, Holm p, n in items, the two run
directories), and the significance level from ``<out>/analysis.yaml``. So the numbers they
print are, digit for digit, the report's.

Trap: the CSVs hold full precision; sentences format them with the report's own rules
(:mod:`kdlab.analysis.numbers`), so a summary and ``report.md`` show the same strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdlab.analysis.comparisons import QUESTION_KD_SFT
from kdlab.analysis.numbers import count_text, format_p, format_percent_level, format_signed
from kdlab.analysis.paper_tables import AVERAGE, METHOD, SFT_METHOD, STUDENT
from kdlab.errors import RunDirError

#: Files of one report section (written by :mod:`kdlab.analysis.stage`).
RUNS_CSV = "runs.csv"
PAIRED_AVERAGE_CSV = "paired_average.csv"
#: The analysis's resolved config (its ``alpha``).
ANALYSIS_CONFIG = "analysis.yaml"


def _number(value: Any) -> float | None:
    """A CSV cell as a float; empty cells (NaN) are ``None``."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _integer(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _key(path: Any) -> str:
    """A run directory as the analysis records it (resolved), for joining tables."""
    return str(Path(str(path)).resolve())


@dataclass(frozen=True)
class PairedRow:
    """One paired comparison on the Average, ``first`` − ``second``, as the analysis wrote it.

    ``difference``, ``low`` and ``high`` are in accuracy points; ``n`` counts items.
    """

    question: str
    first_label: str
    second_label: str
    seed: int | None
    n: int
    difference: float | None
    low: float | None
    high: float | None
    first_only: int
    """Items only the first run gets right."""
    second_only: int
    p_value: float | None
    p_holm: float | None
    family_size: int | None
    note: str
    first_run: str
    second_run: str

    def reversed(self) -> PairedRow:
        """The same comparison as ``second`` − ``first`` (McNemar's p is symmetric)."""
        return PairedRow(
            question=self.question,
            first_label=self.second_label,
            second_label=self.first_label,
            seed=self.seed,
            n=self.n,
            difference=None if self.difference is None else -self.difference,
            low=None if self.high is None else -self.high,
            high=None if self.low is None else -self.low,
            first_only=self.second_only,
            second_only=self.first_only,
            p_value=self.p_value,
            p_holm=self.p_holm,
            family_size=self.family_size,
            note=self.note,
            first_run=self.second_run,
            second_run=self.first_run,
        )

    @property
    def tested_p(self) -> float | None:
        """The p-value a verdict reads: Holm-adjusted where the analysis adjusted it."""
        return self.p_holm if self.p_holm is not None else self.p_value

    def sentence(self, alpha: float) -> str:
        """``A − B (seed 6) = +3.0 points, 95 % CI [-2.0, +8.0], McNemar p = 0.350 …: verdict``."""
        head = f"{self.first_label} − {self.second_label}"
        if self.seed is not None:
            head += f" (seed {self.seed})"
        if self.difference is None or self.p_value is None:
            return f"{head}: not tested ({self.note or 'no item scored by both runs'})"
        text = f"{head} = {format_signed(self.difference)} points"
        if self.low is not None and self.high is not None:
            text += (
                f", {format_percent_level(alpha)} CI [{format_signed(self.low)}, "
                f"{format_signed(self.high)}]"
            )
        text += f", McNemar p = {format_p(self.p_value)}"
        if self.p_holm is not None and (self.family_size or 1) > 1:
            text += f" (Holm p = {format_p(self.p_holm)}, m = {self.family_size})"
        text += (
            f"; {self.first_only} vs {self.second_only} discordant, n = "
            f"{count_text(self.n, 'items')}: {self.verdict(alpha)}"
        )
        return text

    def verdict(self, alpha: float) -> str:
        """What the test says at ``alpha``, in words."""
        p_value = self.tested_p
        if p_value is None or self.difference is None:
            return "not tested"
        if p_value < alpha:
            direction = "ahead of" if self.difference > 0 else "behind"
            return f"{self.first_label} {direction} {self.second_label}, a detectable difference"
        return "no detectable difference at this budget"


@dataclass
class AnalysisOutputs:
    """One section of a written analysis: its runs, its paired comparisons, its alpha."""

    directory: Path
    section: Path
    alpha: float
    runs: pd.DataFrame
    paired: pd.DataFrame

    @classmethod
    def read(cls, directory: str | Path, section: str | None = None) -> AnalysisOutputs:
        """Read ``directory`` (an analysis ``out_dir``); ``section``: its sub-directory
        (a task family's slug), needed only when the analysis has several."""
        root = Path(directory)
        config_file = root / ANALYSIS_CONFIG
        if not config_file.is_file():
            raise RunDirError(f"{root} holds no analysis ({ANALYSIS_CONFIG} is missing)")
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        sections = sorted(path.parent for path in root.glob(f"*/{RUNS_CSV}"))
        if section is not None:
            sections = [path for path in sections if path.name == section]
        if len(sections) != 1:
            found = ", ".join(path.name for path in sections) or "none"
            raise RunDirError(f"{root}: expected one report section with {RUNS_CSV}, found {found}")
        (chosen,) = sections
        runs = pd.read_csv(chosen / RUNS_CSV)
        paired_file = chosen / PAIRED_AVERAGE_CSV
        paired = pd.read_csv(paired_file) if paired_file.is_file() else pd.DataFrame()
        return cls(root, chosen, float(config.get("alpha", 0.05)), runs, paired)

    # ----------------------------------------------------------------- runs

    def run_row(self, run_dir: str | Path) -> pd.Series | None:
        """The ``runs.csv`` row of a run directory (``None`` when it was not analysed)."""
        if self.runs.empty:
            return None
        matches = self.runs[self.runs["run_dir"].map(_key) == _key(run_dir)]
        return None if matches.empty else matches.iloc[0]

    def label_of(self, run_dir: str | Path) -> str:
        """The Method label the report gives a run (``Teacher``, ``SFT``, ``forward_kl_T1``)."""
        row = self.run_row(run_dir)
        return "?" if row is None else str(row[METHOD])

    def runs_labelled(self, label: str) -> pd.DataFrame:
        """The ``runs.csv`` rows whose Method is ``label``."""
        if self.runs.empty:
            return self.runs
        return self.runs[self.runs[METHOD].astype(str) == label]

    # ----------------------------------------------------------------- pairs

    def paired_rows(self) -> list[PairedRow]:
        """Every paired comparison on the Average, in the report's order."""
        if self.paired.empty:
            return []
        rows = []
        for _, row in self.paired[self.paired["column"] == AVERAGE].iterrows():
            question = str(row["question"])
            second = SFT_METHOD if question == QUESTION_KD_SFT else self.label_of(row["run B"])
            rows.append(
                PairedRow(
                    question=question,
                    first_label=self.label_of(row["run A"]),
                    second_label=second,
                    seed=_integer(row.get("seed")),
                    n=_integer(row["n"]) or 0,
                    difference=_number(row["Δ A−B (points)"]),
                    low=_number(row["CI low"]),
                    high=_number(row["CI high"]),
                    first_only=_integer(row["only A right"]) or 0,
                    second_only=_integer(row["only B right"]) or 0,
                    p_value=_number(row["McNemar p"]),
                    p_holm=_number(row["Holm p"]),
                    family_size=_integer(row["m"]),
                    note="" if pd.isna(row.get("note")) else str(row.get("note")),
                    first_run=_key(row["run A"]),
                    second_run=_key(row["run B"]),
                )
            )
        return rows

    def pair(self, first_run: str | Path, second_label: str) -> PairedRow | None:
        """The comparison of ``first_run`` with a run labelled ``second_label``, oriented as
        ``first_run`` − that run (the analysis pairs runs of the same student and seed)."""
        first = _key(first_run)
        for row in self.paired_rows():
            if row.first_run == first and row.second_label == second_label:
                return row
            if row.second_run == first and row.first_label == second_label:
                return row.reversed()
        return None

    # ----------------------------------------------------------------- summary

    def summary_lines(self, run_dirs: list[str | Path]) -> list[str]:
        """Markdown lines: the accuracy and EM1 of ``run_dirs`` (the teacher shown as the
        teacher), then one sentence per paired comparison (:meth:`PairedRow.sentence`)."""
        from kdlab.analysis.report import display_value

        lines = ["| run | accuracy (%) | EM1 with the teacher (%) |", "| --- | ---: | ---: |"]
        for run_dir in run_dirs:
            row = self.run_row(run_dir)
            if row is None:
                lines.append(f"| {Path(run_dir).name} | not analysed | – |")
                continue
            who = "the teacher" if row["kind"] == "teacher" else f"student {row[METHOD]}"
            label = f"{who} ({row[STUDENT]}, seed {display_value(row['seed'], 'seed')})"
            lines.append(
                f"| {label} | {display_value(row[AVERAGE])} | {display_value(row.get('EM1'))} |"
            )
        pairs = self.paired_rows()
        lines += ["", f"Paired on the same items (alpha = {self.alpha:g}):", ""]
        if not pairs:
            lines.append("- no paired comparison (no KD run with an SFT run of the same student)")
        lines += [f"- {row.sentence(self.alpha)}" for row in pairs]
        return lines


__all__ = [
    "ANALYSIS_CONFIG",
    "PAIRED_AVERAGE_CSV",
    "RUNS_CSV",
    "AnalysisOutputs",
    "PairedRow",
]
