"""Write the analysis: CSV and LaTeX tables, figures, ``report.md`` and ``report.html``.

Each table is written as ``<section>/<name>.csv`` (full precision) and ``<name>.tex`` (a
booktabs ``tabular`` with the report's number formatting, :mod:`kdlab.analysis.numbers`);
each figure as ``<name>.png`` (200 dpi), ``.pdf`` and ``.svg``. A plot that is not drawn
(one point where it needs several) says why in the report. The HTML embeds its PNG plots
as base64 ``data:image/png`` URIs and its styles inline, so it is readable offline as a
single file. Every file goes through :mod:`kdlab.utils.io`'s atomic writes.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kdlab.analysis.numbers import format_p, format_value
from kdlab.analysis.paper_tables import AVERAGE
from kdlab.analysis.plots import FORMATS
from kdlab.analysis.statistics import STATISTICS_COLUMNS, StatResult, statistics_table
from kdlab.utils.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
STATISTICS_CSV = "statistics.csv"
#: Tables longer than this scroll inside a box in the HTML report.
LONG_TABLE_ROWS = 16


@dataclass
class ReportTable:
    """A table of the report, also written as ``<section>/<filename>``."""

    title: str
    frame: pd.DataFrame
    filename: str
    note: str = ""
    primary: bool = False
    """Shown before the plots (the others come after them)."""
    display_columns: list[str] | None = None
    """The columns shown in the report and the LaTeX file (the CSV keeps every column)."""

    @property
    def shown(self) -> pd.DataFrame:
        """The frame as the report shows it (``display_columns`` only)."""
        if self.display_columns is None:
            return self.frame
        return self.frame[[c for c in self.display_columns if c in self.frame.columns]]


@dataclass
class ReportPlot:
    """A figure of the report, written as ``<section>/<stem>.{png,pdf,svg}``.

    ``files`` maps each format to its bytes; ``None`` when the plot is not drawn, with the
    one-line ``reason``.
    """

    title: str
    files: dict[str, bytes] | None
    stem: str
    note: str = ""
    reason: str | None = None

    @property
    def png(self) -> bytes | None:
        """The PNG bytes (embedded in the HTML report)."""
        return None if self.files is None else self.files.get("png")

    def filename(self, fmt: str = "png") -> str:
        return f"{self.stem}.{fmt}"


@dataclass
class ReportSection:
    """One part of the report (a task family, or one set of paper tables)."""

    title: str
    slug: str
    statistics: list[StatResult] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    plots: list[ReportPlot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def headline(self, column: str = AVERAGE) -> list[StatResult]:
        """The statistics of one column (Average by default)."""
        return [result for result in self.statistics if result.column == column]

    def headline_groups(self, column: str = AVERAGE) -> list[tuple[str, list[StatResult]]]:
        """The statistics of one column by question: paired tests, seeds, the paper's tests."""
        groups: dict[str, list[StatResult]] = {}
        for result in self.headline(column):
            groups.setdefault(_question_title(result.hypothesis), []).append(result)
        return list(groups.items())


def _question_title(hypothesis: str) -> str:
    if hypothesis.startswith("paired: "):
        question = hypothesis[len("paired: ") :]
        return f"{question}, item by item (McNemar exact test, paired bootstrap interval)"
    if hypothesis.startswith("seeds: "):
        return f"{hypothesis[len('seeds: ') :]} across seeds (t-interval, t-test)"
    return "The paper's tests, across teacher-student-method rows"


#: Columns shown as p-values (their own format).
P_VALUE_COLUMNS = frozenset({"p_value", "p_holm", "McNemar p", "Holm p", "p"})
#: Columns of counts and seeds: shown as integers even when a missing value made them float.
INTEGER_COLUMNS = frozenset(
    {"n", "m", "family_size", "seed", "other seed", "only A right", "only B right", "tokens"}
)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def display_value(value: object, column: str = "") -> str:
    """One cell as the report shows it: numbers by magnitude, p-values, counts, text."""
    if _is_missing(value) or value is pd.NA:
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if column in P_VALUE_COLUMNS and math.isfinite(number):
            return format_p(number)
        if column in INTEGER_COLUMNS and math.isfinite(number) and number.is_integer():
            return str(int(number))
        return format_value(number)
    return str(value)


def _display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text (see :func:`display_value`)."""
    shown = frame.copy().astype(object)
    for column in shown.columns:
        shown[column] = [display_value(value, str(column)) for value in frame[column]]
    return shown


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers formatted by magnitude)."""
    if frame.empty:
        return "_(empty)_\n"
    shown = _display_frame(frame)
    header = "| " + " | ".join(str(column) for column in shown.columns) + " |"
    rule = "| " + " | ".join("---" for _ in shown.columns) + " |"
    lines = [header, rule]
    for _, row in shown.iterrows():
        cells = [str(value).replace("|", "\\|").replace("\n", " ") for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_table(frame: pd.DataFrame) -> str:
    """An HTML table (escaped, numbers formatted by magnitude)."""
    if frame.empty:
        return "<p><em>(empty)</em></p>"
    return _display_frame(frame).to_html(index=False, border=0, classes="data", escape=True)


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SYMBOLS = {
    "Δ": r"$\Delta$",
    "−": r"$-$",
    "–": "--",
    "←": r"$\leftarrow$",
    "→": r"$\rightarrow$",
    "≠": r"$\neq$",
    "±": r"$\pm$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "∞": r"$\infty$",
    "σ": r"$\sigma$",
    "‖": r"$\|$",
}


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX table cell (specials escaped, a few symbols in math mode)."""
    escaped = "".join(_LATEX_SPECIALS.get(character, character) for character in str(text))
    return "".join(_LATEX_SYMBOLS.get(character, character) for character in escaped)


def latex_table(frame: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``), numbers formatted as in the report."""
    if frame.empty:
        return "% (empty table)\n"
    shown = _display_frame(frame)
    align = "".join(
        "r" if pd.api.types.is_numeric_dtype(frame[column]) else "l" for column in frame.columns
    )
    lines = [
        "% kdlab analysis table; needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(latex_escape(str(column)) for column in shown.columns) + " \\\\",
        "\\midrule",
    ]
    for _, row in shown.iterrows():
        lines.append(" & ".join(latex_escape(str(value)) for value in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


#: the statistics table's columns shown in reports: all but significant, family and sentence
STATISTICS_DISPLAY_COLUMNS = [
    column for column in STATISTICS_COLUMNS if column not in ("significant", "family", "sentence")
]
STATISTICS_TEX = "statistics.tex"


def _table_stem(filename: str) -> str:
    return filename[: -len(".csv")] if filename.endswith(".csv") else filename


def _write_section_files(out_dir: Path, section: ReportSection, alpha: float) -> None:
    section_dir = out_dir / section.slug
    for table in section.tables:
        atomic_write_text(section_dir / table.filename, table.frame.to_csv(index=False))
        stem = _table_stem(table.filename)
        atomic_write_text(section_dir / f"{stem}.tex", latex_table(table.shown))
    if section.statistics:
        frame = statistics_table(section.statistics, alpha)
        atomic_write_text(section_dir / STATISTICS_CSV, frame.to_csv(index=False))
        atomic_write_text(
            section_dir / STATISTICS_TEX, latex_table(frame[STATISTICS_DISPLAY_COLUMNS])
        )
    for plot in section.plots:
        for fmt, data in (plot.files or {}).items():
            atomic_write_bytes(section_dir / plot.filename(fmt), data)


def _markdown_table_block(section: ReportSection, table: ReportTable) -> list[str]:
    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    stem = _table_stem(table.filename)
    files = f"CSV: `{section.slug}/{table.filename}`, LaTeX: `{section.slug}/{stem}.tex`"
    return [*lines, markdown_table(table.shown), files, ""]


def _markdown_plot_block(section: ReportSection, plot: ReportPlot) -> list[str]:
    lines = [f"### {plot.title}", ""]
    if plot.files is None:
        return [*lines, f"_(not drawn: {plot.reason or 'nothing to plot'})_", ""]
    if plot.note:
        lines += [plot.note, ""]
    others = ", ".join(f"`{section.slug}/{plot.filename(fmt)}`" for fmt in FORMATS[1:])
    return [*lines, f"![{plot.title}]({section.slug}/{plot.filename()})", "", f"Also {others}.", ""]


def render_markdown(
    title: str, sections: Sequence[ReportSection], inputs: Sequence[str], alpha: float
) -> str:
    """The Markdown report (plots linked as files next to it)."""
    lines = [f"# {title}", ""]
    lines.append(f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}.")
    lines.append("")
    if inputs:
        lines.append("Inputs:")
        lines.extend(f"- `{item}`" for item in inputs)
        lines.append("")
    for section in sections:
        lines += [f"## {section.title}", ""]
        lines.extend(f"> {note}\n" for note in section.notes)
        groups = section.headline_groups()
        if groups:
            lines += [f"### Statistics on {AVERAGE} (alpha = {alpha:g})", ""]
            for question, results in groups:
                lines += [f"**{question}**", ""]
                lines.extend(f"- {result.sentence}" for result in results)
                lines.append("")
            lines += [f"All columns: `{section.slug}/{STATISTICS_CSV}`.", ""]
        ordered = [table for table in section.tables if table.primary]
        for table in ordered:
            lines += _markdown_table_block(section, table)
        for plot in section.plots:
            lines += _markdown_plot_block(section, plot)
        for table in section.tables:
            if not table.primary:
                lines += _markdown_table_block(section, table)
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table.data { border-collapse: collapse; font-size: 13px; margin: .5em 0 1em 0; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 7px; text-align: right;
                             white-space: nowrap; }
table.data th { background: #f0f0f0; }
table.data td:nth-child(-n+3), table.data th:nth-child(-n+3) { text-align: left; }
.scroll { overflow-x: auto; }
.tall { max-height: 430px; overflow-y: auto; border-bottom: 1px solid #ccc; }
.tall table.data th { position: sticky; top: 0; }
.stats li { margin: .2em 0; }
.sig { color: #0a6b2c; font-weight: 600; }
.nsig { color: #666; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; }
img.plot { max-width: 100%; border: 1px solid #ddd; margin: .5em 0 1.5em 0; }
code { background: #f4f4f4; padding: 0 .25em; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table_block(table: ReportTable) -> str:
    """Heading, note and table; long tables scroll inside a box of limited height."""
    escape = html.escape
    parts = [f"<h3>{escape(table.title)}</h3>"]
    if table.note:
        parts.append(f"<p>{escape(table.note)}</p>")
    css = "scroll tall" if len(table.frame) > LONG_TABLE_ROWS else "scroll"
    parts.append(f'<div class="{css}">{html_table(table.shown)}</div>')
    return "\n".join(parts)


def render_html(
    title: str, sections: Sequence[ReportSection], inputs: Sequence[str], alpha: float
) -> str:
    """The self-contained HTML report (inline CSS, plots as data URIs)."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Generated {escape(datetime.datetime.now().isoformat(timespec='seconds'))}.</p>",
    ]
    if inputs:
        items = "".join(f"<li><code>{escape(item)}</code></li>" for item in inputs)
        parts.append(f"<p>Inputs:</p><ul>{items}</ul>")
    if len(sections) > 1:
        links = "".join(
            f'<li><a href="#{escape(section.slug)}">{escape(section.title)}</a></li>'
            for section in sections
        )
        parts.append(f"<ul>{links}</ul>")
    for section in sections:
        parts.append(f'<h2 id="{escape(section.slug)}">{escape(section.title)}</h2>')
        parts.extend(f'<p class="note">{escape(note)}</p>' for note in section.notes)
        groups = section.headline_groups()
        if groups:
            parts.append(f"<h3>Statistics on {AVERAGE} (alpha = {alpha:g})</h3>")
            for question, results in groups:
                items = []
                for result in results:
                    css = "sig" if result.significant(alpha) else "nsig"
                    items.append(f'<li class="{css}">{escape(result.sentence)}</li>')
                parts.append(f"<p><strong>{escape(question)}</strong></p>")
                parts.append(f'<ul class="stats">{"".join(items)}</ul>')
        primary = [table for table in section.tables if table.primary]
        secondary = [table for table in section.tables if not table.primary]
        parts.extend(_html_table_block(table) for table in primary)
        for plot in section.plots:
            parts.append(f"<h3>{escape(plot.title)}</h3>")
            if plot.png is None:
                reason = plot.reason or "nothing to plot"
                parts.append(f"<p><em>(not drawn: {escape(reason)})</em></p>")
                continue
            if plot.note:
                parts.append(f"<p>{escape(plot.note)}</p>")
            parts.append(
                f'<img class="plot" alt="{escape(plot.title)}" src="{_data_uri(plot.png)}">'
            )
        parts.extend(_html_table_block(table) for table in secondary)
        if section.statistics:
            frame = statistics_table(section.statistics, alpha)[STATISTICS_DISPLAY_COLUMNS]
            parts.append("<details><summary>All statistics (every column)</summary>")
            parts.append(f'<div class="scroll">{html_table(frame)}</div></details>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    out_dir: str | Path,
    sections: Sequence[ReportSection],
    *,
    title: str = "kdlab analysis",
    inputs: Sequence[str] = (),
    alpha: float = 0.05,
) -> dict[str, Path]:
    """Write every section's files, ``statistics.csv``, ``report.md`` and ``report.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for section in sections:
        _write_section_files(out, section, alpha)
    frames = []
    for section in sections:
        if section.statistics:
            frame = statistics_table(section.statistics, alpha)
            frame.insert(0, "section", section.slug)
            frames.append(frame)
    written: dict[str, Path] = {}
    if frames:
        combined = pd.concat(frames, ignore_index=True)
        written["statistics"] = atomic_write_text(
            out / STATISTICS_CSV, combined.to_csv(index=False)
        )
    written["markdown"] = atomic_write_text(
        out / REPORT_MD, render_markdown(title, sections, inputs, alpha)
    )
    written["html"] = atomic_write_text(
        out / REPORT_HTML, render_html(title, sections, inputs, alpha)
    )
    logger.info("report written to %s", written["html"])
    return written
