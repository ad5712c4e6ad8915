"""The demo pipeline end to end on a tiny model (the real one is too slow for the suite)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kdlab.sweep import demo as demo_module
from kdlab.sweep.demo import QUICK, Demo

TINY_PLAN = replace(
    QUICK,
    train_problems=40,
    test_problems=6,
    teacher_steps=2,
    student_steps=2,
    batch_size=2,
    student_layers=1,
    student_strategy="last",
    max_new_tokens=8,
    token_fidelity_records=4,
    cutoff_len=256,
)


@pytest.mark.slow
def test_demo_pipeline_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "demo"
    demo = Demo(out, TINY_PLAN, str(tiny_model_dir))
    text = demo.run()
    assert (out / "teacher" / "DONE").is_file()
    for method in TINY_PLAN.methods:
        assert (out / "students" / method / "DONE").is_file()
        assert (out / "students" / method / "eval" / "arithmetic" / "metrics.json").is_file()
    assert (out / "reference" / "untrained-student" / "eval" / "DONE").is_file()
    report = out / "report"
    assert (report / "report.html").is_file() and (report / "report.md").is_file()
    html = (report / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert "| teacher (LoRA) |" in text and "SFT" in text
    assert (out / "summary.md").read_text() == text
    # the data never overlaps: no test problem is a training problem
    train = {r["instruction"] for r in json.loads((out / "data" / "train.json").read_text())}
    test = [r["instruction"] for r in json.loads((out / "data" / "test.json").read_text())]
    assert not train.intersection(test)

    # started again, every stage is skipped (nothing is trained or evaluated twice)
    calls: list[str] = []
    monkeypatch.setattr("kdlab.training.finetune.run", lambda *a, **k: calls.append("finetune"))
    monkeypatch.setattr("kdlab.training.distill.run", lambda *a, **k: calls.append("distill"))
    monkeypatch.setattr("kdlab.evaluation.stage.run", lambda *a, **k: calls.append("eval"))
    monkeypatch.setattr(demo_module.Demo, "analyze", lambda self: None)
    Demo(out, TINY_PLAN, str(tiny_model_dir)).run()
    assert calls == []
