"""Write the analysis: CSV tables, PNG plots, ``report.md`` and a self-contained ``report.html``.

The HTML embeds its plots as base64 ``data:image/png`` URIs and its styles inline, so it is
readable offline as a single file. Every file goes through :mod:`kdlab.utils.io`'s atomic
writes.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kdlab.analysis.paper_tables import AVERAGE
from kdlab.analysis.statistics import StatResult, format_p, statistics_table
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


@dataclass
class ReportPlot:
    """A plot of the report, also written as ``<section>/<filename>``."""

    title: str
    png: bytes | None
    filename: str
    note: str = ""


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


def _format_value(value: object, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def _display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers rounded for reading (2 decimals; p-values in their own format)."""
    shown = frame.copy().astype(object)
    for column in shown.columns:
        if column == "p_value":
            shown[column] = [
                "–" if value is None or (isinstance(value, float) and math.isnan(value))
                else format_p(float(value))
                for value in frame[column]
            ]  # fmt: skip
        else:
            shown[column] = [_format_value(value) for value in frame[column]]
    return shown


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers with 2 decimals)."""
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
    """An HTML table (escaped, numbers with 2 decimals)."""
    if frame.empty:
        return "<p><em>(empty)</em></p>"
    return _display_frame(frame).to_html(index=False, border=0, classes="data", escape=True)


STATISTICS_DISPLAY_COLUMNS = [
    "hypothesis",
    "test",
    "column",
    "group",
    "statistic",
    "p_value",
    "n",
    "mean",
    "status",
    "sentence",
]


def _write_section_files(out_dir: Path, section: ReportSection, alpha: float) -> None:
    section_dir = out_dir / section.slug
    for table in section.tables:
        atomic_write_text(section_dir / table.filename, table.frame.to_csv(index=False))
    if section.statistics:
        frame = statistics_table(section.statistics, alpha)
        atomic_write_text(section_dir / STATISTICS_CSV, frame.to_csv(index=False))
    for plot in section.plots:
        if plot.png is not None:
            atomic_write_bytes(section_dir / plot.filename, plot.png)


def _markdown_table_block(section: ReportSection, table: ReportTable) -> list[str]:
    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    return [*lines, markdown_table(table.frame), f"CSV: `{section.slug}/{table.filename}`", ""]


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
        headline = section.headline()
        if headline:
            lines += [f"### Statistics on {AVERAGE} (alpha = {alpha:g})", ""]
            lines.extend(f"- {result.sentence}" for result in headline)
            lines += ["", f"All columns: `{section.slug}/{STATISTICS_CSV}`.", ""]
        ordered = [table for table in section.tables if table.primary]
        for table in ordered:
            lines += _markdown_table_block(section, table)
        for plot in section.plots:
            lines += [f"### {plot.title}", ""]
            if plot.png is None:
                lines += ["_(not enough data to plot)_", ""]
                continue
            if plot.note:
                lines += [plot.note, ""]
            lines += [f"![{plot.title}]({section.slug}/{plot.filename})", ""]
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
    parts.append(f'<div class="{css}">{html_table(table.frame)}</div>')
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
        headline = section.headline()
        if headline:
            parts.append(f"<h3>Statistics on {AVERAGE} (alpha = {alpha:g})</h3>")
            items = []
            for result in headline:
                css = "sig" if result.significant(alpha) else "nsig"
                items.append(f'<li class="{css}">{escape(result.sentence)}</li>')
            parts.append(f'<ul class="stats">{"".join(items)}</ul>')
        primary = [table for table in section.tables if table.primary]
        secondary = [table for table in section.tables if not table.primary]
        parts.extend(_html_table_block(table) for table in primary)
        for plot in section.plots:
            parts.append(f"<h3>{escape(plot.title)}</h3>")
            if plot.png is None:
                parts.append("<p><em>(not enough data to plot)</em></p>")
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
