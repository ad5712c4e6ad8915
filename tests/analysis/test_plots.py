"""Figures and tables of the report: shared axes, refusals, formats, numbers by magnitude."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kdlab.analysis.plots import (
    plot_accuracy_by_temperature,
    plot_fidelity_vs_accuracy,
    plot_training_loss,
    render_figure,
)
from kdlab.analysis.report import html_table, latex_table, markdown_table
from kdlab.analysis.run_tables import loss_curves
from kdlab.analysis.runs import collect_runs


def accuracy_table(temperatures: list[float], students: list[str]) -> pd.DataFrame:
    rows = [{"Teacher": "-", "Student": s, "Method": "SFT", "Average": 40.0} for s in students]
    for index, student in enumerate(students):
        for temperature in temperatures:
            rows.append({"Teacher": "T-7B", "Student": student,
                         "Method": f"forward_kl_T{temperature:g}",
                         "Average": 20.0 + 30 * index + temperature})  # fmt: skip
    return pd.DataFrame.from_records(rows)


def test_accuracy_panels_share_their_y_axis() -> None:
    plot = plot_accuracy_by_temperature(accuracy_table([1, 2], ["S-0.5B", "S-1.5B"]))
    first, second = plot.figure.axes[:2]
    assert first.get_shared_y_axes().joined(first, second)
    assert first.get_ylim() == second.get_ylim()
    # The 1.5B panel's values (50-52) are inside the shared range of the 0.5B panel too.
    assert first.get_ylim()[1] >= 52


def test_plots_that_need_several_points_are_not_drawn_for_one() -> None:
    one_temperature = plot_accuracy_by_temperature(accuracy_table([1], ["S-0.5B", "S-1.5B"]))
    assert one_temperature.figure is None
    assert one_temperature.reason.startswith("one temperature only (T = 1)")
    one_point = pd.DataFrame({"label": ["forward_kl"], "accuracy": [50.0], "agreement": [60.0],
                              "fidelity": [20.0]})  # fmt: skip
    assert plot_fidelity_vs_accuracy(one_point).figure is None
    two = pd.concat([one_point, one_point.assign(label="SFT", accuracy=40.0)])
    plot = plot_fidelity_vs_accuracy(two)
    left, right = plot.figure.axes[:2]
    assert left.get_shared_y_axes().joined(left, right)


def write_metrics(run_dir: Path, lines: list[dict]) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_training_curves_from_metrics_jsonl(fake_sweep) -> None:
    write_metrics(fake_sweep.sft, [
        {"step": 1, "loss": 2.0, "ce": 2.0, "kd": None}, {"step": 2, "loss": 1.5, "ce": 1.5,
        "kd": None}, {"step": 2, "split": "val", "loss": 9.0, "ce": 9.0},
    ])  # fmt: skip
    write_metrics(fake_sweep.kd_t1, [
        {"step": 2, "loss": 0.8, "ce": None, "kd": 0.8}, {"step": 1, "loss": 1.0, "ce": None,
        "kd": 1.0}, {"step": 3, "loss": 0.7, "ce": None, "kd": 0.7},
    ])  # fmt: skip
    write_metrics(fake_sweep.kd_t2, [{"step": 1, "loss": 1.0, "kd": 1.0}])
    collection = collect_runs([fake_sweep.root])
    curves = {curve.label: curve for curve in loss_curves(collection.evaluated)}
    assert set(curves) == {"SFT (Qwen2.5-0.5B)", "forward_kl_T1 (Qwen2.5-0.5B)",
                           "forward_kl_T2 (Qwen2.5-0.5B)"}  # fmt: skip
    assert curves["forward_kl_T1 (Qwen2.5-0.5B)"].steps == (1.0, 2.0, 3.0)  # sorted by step
    assert curves["SFT (Qwen2.5-0.5B)"].values["ce"] == (2.0, 1.5)  # the val line left out
    plot = plot_training_loss(list(curves.values()))
    ce_axis, kd_axis = plot.figure.axes[:2]
    assert [line.get_label() for line in ce_axis.get_lines()] == ["SFT (Qwen2.5-0.5B)"]
    # The T=2 run logged one step: no line for it.
    assert [line.get_label() for line in kd_axis.get_lines()] == ["forward_kl_T1 (Qwen2.5-0.5B)"]
    assert list(kd_axis.get_lines()[0].get_ydata()) == [1.0, 0.8, 0.7]
    single = plot_training_loss([curves["forward_kl_T2 (Qwen2.5-0.5B)"]])
    assert single.figure is None and "two or more logged training steps" in single.reason


def test_training_curves_in_the_report(fake_sweep, analyze, tmp_path) -> None:
    for run_dir in (fake_sweep.sft, fake_sweep.kd_t1):
        write_metrics(run_dir, [{"step": s, "loss": 2.0 / s, "ce": 2.0 / s, "kd": 1.0 / s}
                                for s in (1, 2, 3)])  # fmt: skip
    out = tmp_path / "out"
    analyze([fake_sweep.root, "--out", out, "--bootstrap-samples", "200"])
    for fmt in ("png", "pdf", "svg"):
        assert (out / "math" / f"training_curves.{fmt}").stat().st_size > 0
    assert "![Training curves](math/training_curves.png)" in (out / "report.md").read_text()


def test_figures_render_in_three_formats_deterministically() -> None:
    figure = plot_accuracy_by_temperature(accuracy_table([1, 2], ["S-0.5B"])).figure
    files, again = render_figure(figure), render_figure(figure)
    assert set(files) == {"png", "pdf", "svg"} and files == again


def test_tables_format_numbers_by_magnitude() -> None:
    frame = pd.DataFrame({
        "Method": ["forward_kl_T1"], "KL(teacher||student) per token": [7.0e-06],
        "top-1 agreement (%)": [99.5], "McNemar p": [0.000012], "n": [8], "m": [float("nan")],
    })  # fmt: skip
    markdown = markdown_table(frame)
    assert "| forward_kl_T1 | 7.0e-06 | 99.50 | 1.2e-05 | 8 | – |" in markdown
    assert "<td>7.0e-06</td>" in html_table(frame)
    tex = latex_table(frame)
    assert "forward\\_kl\\_T1 & 7.0e-06 & 99.50 & 1.2e-05 & 8 & -- \\\\" in tex
    assert "top-1 agreement (\\%)" in tex and tex.startswith("% kdlab analysis table")
    assert "\\begin{tabular}{lrrrrr}" in tex


@pytest.mark.parametrize("text", ["a & b", "50%", "x_y", "#1", "{z}", "~", "^", "$5", "a\\b"])
def test_latex_cells_are_escaped(text: str) -> None:
    tex = latex_table(pd.DataFrame({"c": [text]}))
    body = tex.splitlines()[5]
    unescaped = [char for char in "&%_#{}$" if char in text]
    for char in unescaped:
        assert f"\\{char}" in body
