"""Plots of the analysis: matplotlib figures, rendered as PNG (200 dpi), PDF and SVG.

No pyplot and no global backend switch: each figure is a :class:`matplotlib.figure.Figure`
rendered on its own canvas, so the module works headless and leaves the caller's matplotlib
state alone. Every plot function returns a :class:`Plot`: a figure, or ``None`` with the
reason it is not drawn (a curve over temperature needs two temperatures, a size trend two
sizes; the report says so instead of drawing one point). Panels that are compared share
their y-axis.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from kdlab.analysis.paper_tables import AVERAGE, METHOD, STUDENT, TEACHER
from kdlab.analysis.runs import parse_size_billions
from kdlab.analysis.statistics import (
    KIND_KD,
    KIND_SFT,
    classify_method,
    method_temperature,
    normalize_teacher,
)

COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Resolution of the PNG files (the PDF and SVG are vector graphics).
DPI = 200
#: The formats every figure is written in, the first one embedded in the HTML report.
FORMATS = ("png", "pdf", "svg")
#: The paper's "SeqKD" in legends: footnoted in the plot's caption (statistics.SEQKD_CAVEAT).
SEQKD_LEGEND = "SeqKD*"


@dataclass
class Plot:
    """A figure, or the reason there is none."""

    figure: Figure | None
    reason: str | None = None

    @staticmethod
    def skipped(reason: str) -> Plot:
        return Plot(None, reason)


def render_figure(figure: Figure) -> dict[str, bytes]:
    """The figure in every format of :data:`FORMATS` (no timestamps: reruns give equal files)."""
    FigureCanvasAgg(figure)
    files: dict[str, bytes] = {}
    metadata = {
        "png": {"Software": None},
        "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
        "svg": {"Date": None, "Creator": None},
    }
    for fmt in FORMATS:
        buffer = io.BytesIO()
        extra = {"dpi": DPI} if fmt == "png" else {}
        if fmt == "svg":
            with matplotlib.rc_context({"svg.hashsalt": "kdlab"}):
                figure.savefig(buffer, format=fmt, bbox_inches="tight", metadata=metadata[fmt])
        else:
            figure.savefig(buffer, format=fmt, bbox_inches="tight", metadata=metadata[fmt], **extra)
        files[fmt] = buffer.getvalue()
    return files


def _palette(names: Sequence[str]) -> dict[str, str]:
    return {name: COLORS[index % len(COLORS)] for index, name in enumerate(names)}


def _legend_family(family: str) -> str:
    return SEQKD_LEGEND if family == "SeqKD" else family


def _size_order(students: Sequence[str]) -> list[str]:
    def key(name: str) -> tuple[float, str]:
        size = parse_size_billions(name)
        return (size if size is not None else math.inf, name)

    return sorted(dict.fromkeys(students), key=key)


@dataclass(frozen=True)
class _XAxis:
    """The x-axis of a plot over a quantity: it needs two or more distinct values."""

    column: str
    """The column of the frame holding the quantity."""
    what: str
    """The quantity's name (``temperature``)."""
    shown: str
    """How the one value is named when there is only one (``"T = {:g}"``)."""
    drawing: str
    """What the plot draws over it (``a curve over temperature``)."""
    table: str
    """The table that has the numbers when the plot is skipped."""

    def values(self, frame: pd.DataFrame, *, empty: str) -> list[float] | Plot:
        """The distinct values of ``frame[column]``, sorted; or the skipped plot (``empty``
        when ``frame`` has no rows)."""
        if frame.empty:
            return Plot.skipped(empty)
        values = sorted(set(frame[self.column]))
        if len(values) < 2:
            return Plot.skipped(
                f"one {self.what} only ({self.shown.format(values[0])}): {self.drawing} needs "
                f"two or more; the {self.table} table has the numbers"
            )
        return values


_TEMPERATURES = _XAxis(
    "_temperature", "temperature", "T = {:g}", "a curve over temperature", "accuracy"
)
_STUDENT_SIZES = _XAxis("student_size", "student size", "{:g}B", "a trend over size", "improvement")


def plot_accuracy_by_temperature(
    accuracy: pd.DataFrame, *, column: str = AVERAGE, title: str = ""
) -> Plot:
    """Accuracy of KD runs against temperature, one panel per student (shared y-axis).

    One line per (teacher, method); the student's SFT score is a dashed grey line. Methods
    without a temperature are drawn at T = 1. Not drawn with fewer than two temperatures.
    """
    if accuracy.empty or column not in accuracy.columns:
        return Plot.skipped("no accuracy to plot")
    table = accuracy.copy()
    classes = [classify_method(method) for method in table[METHOD]]
    table["_kind"] = [item.kind for item in classes]
    table["_family"] = [item.family for item in classes]
    table["_temperature"] = [method_temperature(method) or 1.0 for method in table[METHOD]]
    known_models = set(table[STUDENT])
    table[TEACHER] = [normalize_teacher(name, known_models) for name in table[TEACHER]]
    kd = table[(table["_kind"] == KIND_KD) & table[column].notna()]
    temperatures = _TEMPERATURES.values(kd, empty="no KD run to plot")
    if isinstance(temperatures, Plot):
        return temperatures
    sft = table[table["_kind"] == KIND_SFT].groupby(STUDENT)[column].mean()
    students = _size_order(list(kd[STUDENT]))
    families = list(dict.fromkeys(kd["_family"]))
    teachers = list(dict.fromkeys(kd[TEACHER]))
    colors = _palette(families)
    columns_count = min(3, len(students))
    rows_count = math.ceil(len(students) / columns_count)
    figure = Figure(figsize=(4.6 * columns_count, 3.6 * rows_count + 0.8))
    axes = figure.subplots(rows_count, columns_count, squeeze=False, sharey=True)
    handles: dict[str, object] = {}
    for index, student in enumerate(students):
        axis = axes[index // columns_count][index % columns_count]
        subset = kd[kd[STUDENT] == student]
        for (teacher, family), group in subset.groupby([TEACHER, "_family"], sort=False):
            points = group.groupby("_temperature")[column].max().sort_index()
            style = LINE_STYLES[teachers.index(teacher) % len(LINE_STYLES)]
            marker = MARKERS[teachers.index(teacher) % len(MARKERS)]
            label = f"{_legend_family(family)} ← {teacher}"
            (line,) = axis.plot(
                list(points.index),
                list(points.values),
                linestyle=style,
                marker=marker,
                color=colors[family],
                label=label,
            )
            handles.setdefault(label, line)
        if student in sft.index and math.isfinite(float(sft[student])):
            line = axis.axhline(float(sft[student]), color="#555555", linestyle="--", lw=1)
            handles.setdefault("SFT (same student)", line)
        axis.set_title(student, fontsize=10)
        axis.set_xticks(temperatures)
        axis.set_xticklabels([f"{value:g}" for value in temperatures])
        axis.set_xlim(temperatures[0] - 0.5, temperatures[-1] + 0.5)
        axis.set_xlabel("temperature")
        axis.tick_params(labelleft=True)
        if index % columns_count == 0:
            axis.set_ylabel(f"{column} accuracy (%)")
        axis.grid(alpha=0.3)
    for index in range(len(students), rows_count * columns_count):
        axes[index // columns_count][index % columns_count].set_visible(False)
    figure.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="lower center",
        ncol=min(4, len(handles)),
        fontsize=8,
        frameon=False,
    )
    figure.suptitle(title or f"{column} accuracy by method and temperature")
    figure.tight_layout(rect=(0, 0.08 + 0.02 * math.ceil(len(handles) / 4), 1, 0.97))
    return Plot(figure)


def plot_improvement_vs_size(
    improvements: pd.DataFrame, *, column: str = AVERAGE, title: str = ""
) -> Plot:
    """Improvement over SFT of the best KD run against the student's size (billions).

    Not drawn with fewer than two student sizes.
    """
    if improvements.empty:
        return Plot.skipped("no KD run paired with an SFT run")
    subset = improvements[
        (improvements["column"] == column)
        & improvements["student_size"].notna()
        & improvements["improvement"].notna()
    ]
    sizes_present = _STUDENT_SIZES.values(
        subset, empty="no student size known (record model_params, or name the size)"
    )
    if isinstance(sizes_present, Plot):
        return sizes_present
    families = list(dict.fromkeys(subset[METHOD]))
    colors = _palette(families)
    figure = Figure(figsize=(6.4, 4.4))
    axis = figure.subplots()
    offsets = {family: (index - (len(families) - 1) / 2) * 0.04 for index, family in
               enumerate(families)}  # fmt: skip
    for family in families:
        group = subset[subset[METHOD] == family]
        sizes = [size * (1 + offsets[family]) for size in group["student_size"]]
        axis.scatter(
            sizes, group["improvement"], color=colors[family], label=_legend_family(family), s=36
        )
    axis.axhline(0.0, color="#555555", linestyle="--", lw=1)
    if subset["student_size"].min() > 0:
        axis.set_xscale("log")
        axis.set_xticks(sizes_present)
        axis.set_xticklabels([f"{size:g}B" for size in sizes_present])
        axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xlabel("student size (billions of parameters)")
    axis.set_ylabel(f"improvement over SFT, {column} (points)")
    axis.set_title(title or f"KD improvement over SFT vs student size ({column})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return Plot(figure)


def plot_fidelity_vs_accuracy(
    points: pd.DataFrame,
    *,
    accuracy: str = "accuracy",
    agreement: str = "agreement",
    fidelity: str = "fidelity",
    title: str = "",
) -> Plot:
    """Agreement (EM1) and fidelity (BLEU) against accuracy, one point per run.

    ``points`` needs a ``label`` column (the group a point is coloured by) and the three
    value columns. The panels share their y-axis (accuracy); a panel needs two points.
    """
    panels = [
        (agreement, "teacher-student agreement EM1 (%)"),
        (fidelity, "rationale fidelity BLEU"),
    ]
    panels = [
        (name, label)
        for name, label in panels
        if name in points.columns and int(points[[name, accuracy]].notna().all(axis=1).sum()) >= 2
    ]
    if not panels:
        return Plot.skipped(
            "fewer than two runs with both accuracy and agreement or fidelity (a KD run needs "
            "its teacher's evaluation)"
        )
    labels = list(dict.fromkeys(points["label"]))
    colors = _palette(labels)
    figure = Figure(figsize=(5.2 * len(panels), 4.4))
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for position, (axis, (name, axis_label)) in enumerate(zip(axes, panels, strict=True)):
        for label in labels:
            group = points[(points["label"] == label)]
            group = group[group[[name, accuracy]].notna().all(axis=1)]
            if group.empty:
                continue
            marker = "s" if label == "SFT" else "o"
            axis.scatter(
                group[name],
                group[accuracy],
                color=colors[label],
                label=_legend_family(str(label)),
                s=36,
                marker=marker,
            )
        axis.set_xlabel(axis_label)
        if position == 0:
            axis.set_ylabel("Average accuracy (%)")
        axis.tick_params(labelleft=True)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title or "Agreement and fidelity vs accuracy (one point per run)")
    figure.tight_layout()
    return Plot(figure)


@dataclass(frozen=True)
class LossCurve:
    """One run's logged training values (``metrics.jsonl``) against the step."""

    label: str
    steps: tuple[float, ...]
    values: dict[str, tuple[float, ...]]
    """Per logged key (``ce``, ``kd``): one value per step (NaN where not logged)."""


LOSS_PANELS = (
    ("ce", "cross-entropy on the training responses (ce)"),
    ("kd", "distillation loss (kd)"),
)


def plot_training_loss(curves: Sequence[LossCurve], *, title: str = "") -> Plot:
    """Training curves, one line per run; one panel per logged loss (ce, kd).

    The panels hold different quantities, so they do not share a y-axis; within a panel
    every run is on the same axis. A line needs two logged steps.
    """
    panels = []
    for key, axis_label in LOSS_PANELS:
        drawable = [
            curve
            for curve in curves
            if sum(1 for value in curve.values.get(key, ()) if math.isfinite(value)) >= 2
        ]
        if drawable:
            panels.append((key, axis_label, drawable))
    if not panels:
        return Plot.skipped(
            "no run has metrics.jsonl with two or more logged training steps"
            if curves
            else "no run has a metrics.jsonl (evaluations only)"
        )
    labels = list(dict.fromkeys(curve.label for _, _, drawable in panels for curve in drawable))
    colors = _palette(labels)
    figure = Figure(figsize=(5.4 * len(panels), 4.2))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (key, axis_label, drawable) in zip(axes, panels, strict=True):
        for index, curve in enumerate(drawable):
            pairs = [
                (step, value)
                for step, value in zip(curve.steps, curve.values[key], strict=True)
                if math.isfinite(value)
            ]
            axis.plot(
                [step for step, _ in pairs],
                [value for _, value in pairs],
                color=colors[curve.label],
                linestyle=LINE_STYLES[index // len(COLORS) % len(LINE_STYLES)],
                label=curve.label,
                lw=1.3,
            )
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(axis_label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title or "Training curves (metrics.jsonl)")
    figure.tight_layout()
    return Plot(figure)
