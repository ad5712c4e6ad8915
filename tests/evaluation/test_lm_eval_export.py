"""``kdlab eval --export-lm-eval``: lm-evaluation-harness reproduces kdlab's accuracy."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.config.evaluation import load_eval_config
from kdlab.evaluation import evaluate, get_task, list_tasks
from kdlab.utils.io import read_jsonl

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_export_writes_the_fifteen_tasks(shared_eval_dir, tmp_path) -> None:
    out = tmp_path / "lm_eval_tasks"
    done = run(
        "-m", "kdlab", "eval", "--export-lm-eval", str(out), f"data_dir={shared_eval_dir}",
        "generation.max_new_tokens=32", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    yamls = sorted(path.name for path in out.glob("kdlab_*.yaml"))
    assert yamls == sorted(f"kdlab_{name}.yaml" for name in list_tasks())
    assert (out / "utils.py").is_file() and (out / "README.md").is_file()
    text = (out / "kdlab_ARC-Easy.yaml").read_text()
    assert "task: kdlab_ARC-Easy" in text and "process_results: !function utils." in text
    assert json.dumps(str((shared_eval_dir / "ARC-Easy" / "test.json").resolve())) in text
    assert "max_gen_toks: 32" in text and '- "### Instruction"' in text
    # The utils module's functions are kdlab's prompt and rules.
    namespace: dict = {}
    exec((out / "utils.py").read_text(), namespace)
    record = json.loads((shared_eval_dir / "AQuA" / "test.json").read_text())[0]
    assert namespace["doc_to_text"](record).endswith(record["instruction"] + "\n\n### Response:\n")
    scores = namespace["process_results_AQuA"](record, ["Answer: (A)"])
    assert scores == {"acc": 1.0, "acc_paper_rule": 1.0}
    assert namespace["process_results_AQuA"](record, ["Answer: (D)"]) == {
        "acc": 0.0,
        "acc_paper_rule": 1.0,  # the paper's first capital: the "A" of "Answer"
    }
    # A file the export did not write is never overwritten.
    (out / "utils.py").write_text("mine\n")
    again = run("-m", "kdlab", "eval", "--export-lm-eval", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert (out / "utils.py").read_text() == "mine\n"


@pytest.mark.slow
def test_lm_eval_gives_kdlabs_accuracy_on_the_same_items(
    tiny_model_dir, shared_eval_dir, tmp_path
) -> None:
    pytest.importorskip("lm_eval", reason="lm_eval (lm-evaluation-harness 0.4) is not installed")
    limit, tokens = 8, 12
    common = [f"model={tiny_model_dir}", "tasks=AQuA", "batch_size=1", f"limit={limit}"]
    common.append(f"generation.max_new_tokens={tokens}")
    # The tiny random model's answers, then gold letters that make half of its stated answers
    # right, so that the accuracy to reproduce is neither 0 nor 100.
    first = tmp_path / "first"
    evaluate(
        load_eval_config(None, [*common, f"data_dir={shared_eval_dir}", f"output_dir={first}"])
    )
    records = json.loads((shared_eval_dir / "AQuA" / "test.json").read_text())[:limit]
    answered = [r for r in read_jsonl(first / "AQuA" / "predictions.jsonl") if r["extracted"]]
    assert len(answered) >= 2, "the tiny model gave too few letters to make a parity check"
    for position, prediction in enumerate(answered):
        wrong = "E" if prediction["extracted"] != "E" else "A"
        records[prediction["index"]]["answer"] = prediction["extracted"] if position % 2 else wrong
    data = tmp_path / "data"
    (data / "AQuA").mkdir(parents=True)
    (data / "AQuA" / "test.json").write_text(json.dumps(records))

    kdlab_out, tasks_dir, harness_out = tmp_path / "kdlab", tmp_path / "tasks", tmp_path / "lm"
    done = run(
        "-m",
        "kdlab",
        "-q",
        "eval",
        *common,
        f"data_dir={data}",
        f"output_dir={kdlab_out}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    done = run(
        "-m",
        "kdlab",
        "eval",
        "--export-lm-eval",
        str(tasks_dir),
        *common,
        f"data_dir={data}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    done = run(
        "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
        "--include_path", str(tasks_dir), "--tasks", "kdlab_AQuA", "--limit", str(limit),
        "--device", "cpu", "--batch_size", "1", "--log_samples", "--output_path", str(harness_out),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = json.loads((kdlab_out / "AQuA" / "metrics.json").read_text())
    (results_file,) = glob.glob(str(harness_out / "**" / "results_*.json"), recursive=True)
    harness = json.loads(Path(results_file).read_text())["results"]["kdlab_AQuA"]
    assert 0 < metrics["accuracy"] < 100
    assert 100 * harness["acc,none"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert 100 * harness["acc_paper_rule,none"] == pytest.approx(
        metrics["accuracy_paper_rule"], abs=1e-6
    )
    # Not only the same number: the same text, item by item.
    (samples_file,) = glob.glob(
        str(harness_out / "**" / "samples_kdlab_AQuA_*.jsonl"), recursive=True
    )
    samples = {s["doc_id"]: s for s in map(json.loads, Path(samples_file).read_text().splitlines())}
    task = get_task("AQuA")
    for record in read_jsonl(kdlab_out / "AQuA" / "predictions.jsonl"):
        generated = samples[record["index"]]["filtered_resps"][0]
        assert task.extract(generated) == record["extracted"]
        assert generated.strip() == record["output"].strip()
