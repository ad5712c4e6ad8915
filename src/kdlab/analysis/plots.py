"""Plots of the analysis, rendered to PNG bytes with matplotlib's Agg canvas.

No pyplot and no global backend switch: each figure is a :class:`matplotlib.figure.Figure`
drawn on its own Agg canvas, so the module works headless and leaves the caller's matplotlib
state alone. Every function returns PNG bytes, or ``None`` when there is nothing to plot.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

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
DPI = 100


def figure_to_png(figure: Figure) -> bytes:
    """Render ``figure`` to PNG bytes."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _palette(names: Sequence[str]) -> dict[str, str]:
    return {name: COLORS[index % len(COLORS)] for index, name in enumerate(names)}


def _size_order(students: Sequence[str]) -> list[str]:
    def key(name: str) -> tuple[float, str]:
        size = parse_size_billions(name)
        return (size if size is not None else math.inf, name)

    return sorted(dict.fromkeys(students), key=key)


def plot_accuracy_by_temperature(
    accuracy: pd.DataFrame, *, column: str = AVERAGE, title: str = ""
) -> bytes | None:
    """Accuracy of KD runs against temperature, one panel per student.

    One line per (teacher, method); the student's SFT score is a dashed grey line. Methods
    without a temperature are drawn at T = 1.
    """
    if accuracy.empty or column not in accuracy.columns:
        return None
    table = accuracy.copy()
    classes = [classify_method(method) for method in table[METHOD]]
    table["_kind"] = [item.kind for item in classes]
    table["_family"] = [item.family for item in classes]
    table["_temperature"] = [method_temperature(method) or 1.0 for method in table[METHOD]]
    known_models = set(table[STUDENT])
    table[TEACHER] = [normalize_teacher(name, known_models) for name in table[TEACHER]]
    kd = table[(table["_kind"] == KIND_KD) & table[column].notna()]
    if kd.empty:
        return None
    temperatures = sorted(set(kd["_temperature"]))
    sft = table[table["_kind"] == KIND_SFT].groupby(STUDENT)[column].mean()
    students = _size_order(list(kd[STUDENT]))
    families = list(dict.fromkeys(kd["_family"]))
    teachers = list(dict.fromkeys(kd[TEACHER]))
    colors = _palette(families)
    columns_count = min(3, len(students))
    rows_count = math.ceil(len(students) / columns_count)
    figure = Figure(figsize=(4.6 * columns_count, 3.6 * rows_count + 0.8))
    axes = figure.subplots(rows_count, columns_count, squeeze=False)
    handles: dict[str, object] = {}
    for index, student in enumerate(students):
        axis = axes[index // columns_count][index % columns_count]
        subset = kd[kd[STUDENT] == student]
        for (teacher, family), group in subset.groupby([TEACHER, "_family"], sort=False):
            points = group.groupby("_temperature")[column].max().sort_index()
            style = LINE_STYLES[teachers.index(teacher) % len(LINE_STYLES)]
            marker = MARKERS[teachers.index(teacher) % len(MARKERS)]
            (line,) = axis.plot(
                list(points.index),
                list(points.values),
                linestyle=style,
                marker=marker,
                color=colors[family],
                label=f"{family} ← {teacher}",
            )
            handles.setdefault(f"{family} ← {teacher}", line)
        if student in sft.index and math.isfinite(float(sft[student])):
            line = axis.axhline(float(sft[student]), color="#555555", linestyle="--", lw=1)
            handles.setdefault("SFT (same student)", line)
        axis.set_title(student, fontsize=10)
        axis.set_xticks(temperatures)
        axis.set_xticklabels([f"{value:g}" for value in temperatures])
        axis.set_xlim(temperatures[0] - 0.5, temperatures[-1] + 0.5)
        axis.set_xlabel("temperature")
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
    return figure_to_png(figure)


def plot_improvement_vs_size(
    improvements: pd.DataFrame, *, column: str = AVERAGE, title: str = ""
) -> bytes | None:
    """Improvement over SFT of the best KD run against the student's size (billions)."""
    if improvements.empty:
        return None
    subset = improvements[
        (improvements["column"] == column)
        & improvements["student_size"].notna()
        & improvements["improvement"].notna()
    ]
    if subset.empty:
        return None
    families = list(dict.fromkeys(subset[METHOD]))
    colors = _palette(families)
    figure = Figure(figsize=(6.4, 4.4))
    axis = figure.subplots()
    offsets = {family: (index - (len(families) - 1) / 2) * 0.04 for index, family in
               enumerate(families)}  # fmt: skip
    for family in families:
        group = subset[subset[METHOD] == family]
        sizes = [size * (1 + offsets[family]) for size in group["student_size"]]
        axis.scatter(sizes, group["improvement"], color=colors[family], label=family, s=36)
    axis.axhline(0.0, color="#555555", linestyle="--", lw=1)
    if subset["student_size"].min() > 0:
        axis.set_xscale("log")
        sizes_present = sorted(set(subset["student_size"]))
        axis.set_xticks(sizes_present)
        axis.set_xticklabels([f"{size:g}B" for size in sizes_present])
        axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xlabel("student size (billions of parameters)")
    axis.set_ylabel(f"improvement over SFT, {column} (points)")
    axis.set_title(title or f"KD improvement over SFT vs student size ({column})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure_to_png(figure)


def plot_fidelity_vs_accuracy(
    points: pd.DataFrame,
    *,
    accuracy: str = "accuracy",
    agreement: str = "agreement",
    fidelity: str = "fidelity",
    title: str = "",
) -> bytes | None:
    """Agreement (EM1) and fidelity (BLEU) against accuracy, one point per run.

    ``points`` needs a ``label`` column (the group a point is coloured by) and the three
    value columns.
    """
    panels = [
        (agreement, "teacher-student agreement EM1 (%)"),
        (fidelity, "rationale fidelity BLEU"),
    ]
    panels = [
        (name, label)
        for name, label in panels
        if name in points.columns and points[[name, accuracy]].notna().all(axis=1).any()
    ]
    if not panels:
        return None
    labels = list(dict.fromkeys(points["label"]))
    colors = _palette(labels)
    figure = Figure(figsize=(5.2 * len(panels), 4.4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (name, axis_label) in zip(axes, panels, strict=True):
        for label in labels:
            group = points[(points["label"] == label)]
            group = group[group[[name, accuracy]].notna().all(axis=1)]
            if group.empty:
                continue
            marker = "s" if label == "SFT" else "o"
            axis.scatter(
                group[name], group[accuracy], color=colors[label], label=label, s=36, marker=marker
            )
        axis.set_xlabel(axis_label)
        axis.set_ylabel("Average accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title or "Agreement and fidelity vs accuracy (one point per run)")
    figure.tight_layout()
    return figure_to_png(figure)
