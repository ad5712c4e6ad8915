"""What kdlab eval reports is what the model did (issue 13): template, rules, intervals,
paper arguments, custom task paths."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.config.evaluation import load_eval_config
from kdlab.evaluation import evaluate
from kdlab.evaluation.extractors import EXTRACTOR_TYPES
from kdlab.evaluation.generation import Generation, HFGenerator
from kdlab.evaluation.stage import import_paper_eval_args
from kdlab.utils.intervals import wilson_interval
from kdlab.utils.io import read_jsonl

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BOOLQ = [
    {
        "instruction": "Please answer the following question with true or false, question: "
        f"is {number} an even number?\n\nAnswer format: true/false",
        "input": "",
        "output": "",
        "answer": "true" if number % 2 == 0 else "false",
    }
    for number in range(3)
]


def kdlab(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", *argv],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a chat template in its tokenizer (an "instruct" model)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def boolq_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    (directory / "boolq").mkdir(parents=True)
    (directory / "boolq" / "test.json").write_text(json.dumps(BOOLQ))
    return directory


@pytest.fixture
def generated_prompts(monkeypatch) -> list[str]:
    """Every prompt HFGenerator.generate receives (the real method still runs)."""
    prompts: list[str] = []
    original = HFGenerator.generate

    def recording(self, batch, **kwargs):
        prompts.extend(batch)
        return original(self, batch, **kwargs)

    monkeypatch.setattr(HFGenerator, "generate", recording)
    return prompts


def _chat_form(model_dir: Path, record: dict) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": record["instruction"]}],
        tokenize=False,
        add_generation_prompt=True,
    )


# --------------------------------------------------------------------------- 1. template


def test_configured_chat_template_is_what_the_model_sees(
    chat_model_dir, boolq_dir, tmp_path, generated_prompts
) -> None:
    out = tmp_path / "eval"
    config = load_eval_config(
        None,
        [
            f"model={chat_model_dir}",
            "template=chat",
            "tasks=boolq",
            f"data_dir={boolq_dir}",
            "generation.max_new_tokens=2",
            f"output_dir={out}",
        ],
    )
    evaluate(config)
    expected = [_chat_form(chat_model_dir, record) for record in BOOLQ]
    assert (
        expected[0].startswith("<|user|>\nPlease answer") and "### Instruction" not in expected[0]
    )
    assert sorted(generated_prompts) == sorted(expected)
    for record in read_jsonl(out / "boolq" / "predictions.jsonl"):
        if "prompt" in record:  # predictions carry the rendered prompt (issue 13, item 2)
            assert record["prompt"] == expected[record["index"]]
    metrics = json.loads((out / "boolq" / "metrics.json").read_text())
    assert metrics["template"] == "chat" and metrics["template_origin"] == "config"


def _run_dir(tmp_path: Path, model_dir: Path, template: str) -> Path:
    """A finished full-model run (model/ + config.yaml) trained with ``template``."""
    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir / "model")
    config = {"model": {"name_or_path": str(model_dir)}, "data": {"template": template}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    identity = {"stage": "finetune", "role": "student", "name": "chat-run", "model": str(model_dir)}
    (run_dir / "run.json").write_text(json.dumps(identity))
    return run_dir


def test_a_runs_template_is_used_when_none_is_configured(
    chat_model_dir, boolq_dir, tmp_path
) -> None:
    run_dir = _run_dir(tmp_path, chat_model_dir, "chat")
    common = [f"run_dir={run_dir}", "tasks=boolq", f"data_dir={boolq_dir}", "limit=1"]
    done = kdlab("eval", *common, "generation.max_new_tokens=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "eval" / "boolq" / "metrics.json").read_text())
    assert metrics["template"] == "chat" and metrics["template_origin"] == "run_dir"
    saved = yaml.safe_load((run_dir / "eval" / "config.yaml").read_text())
    assert saved["template"] == "chat"
    # An explicit template wins over the run's.
    other = tmp_path / "alpaca"
    config = load_eval_config(
        None, [*common, "template=alpaca", f"output_dir={other}", "generation.max_new_tokens=2"]
    )
    evaluate(config)
    metrics = json.loads((other / "boolq" / "metrics.json").read_text())
    assert metrics["template"] == "alpaca" and metrics["template_origin"] == "config"


def test_run_template_reaches_the_prompts(
    chat_model_dir, boolq_dir, tmp_path, generated_prompts
) -> None:
    run_dir = _run_dir(tmp_path, chat_model_dir, "chat")
    config = load_eval_config(
        None,
        [
            f"run_dir={run_dir}",
            "tasks=boolq",
            f"data_dir={boolq_dir}",
            "generation.max_new_tokens=1",
        ],
    )
    evaluate(config)
    assert sorted(generated_prompts) == sorted(_chat_form(chat_model_dir, r) for r in BOOLQ)


def test_raw_template_is_the_instruction_itself(
    tiny_model_dir, boolq_dir, tmp_path, generated_prompts
) -> None:
    config = load_eval_config(
        None,
        [
            f"model={tiny_model_dir}",
            "template=raw",
            "tasks=boolq",
            f"data_dir={boolq_dir}",
            "generation.max_new_tokens=1",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    evaluate(config)
    assert sorted(generated_prompts) == sorted(record["instruction"] for record in BOOLQ)


# --------------------------------------------------------------------------- 3 + 5. metrics


class FixedGenerator:
    """Answers every prompt with one realistic text (metrics plumbing; no model)."""

    backend = "stub"
    tokenizer = None
    generated_tokens = 0

    def __init__(self, text: str) -> None:
        self.text = text

    def prompt_lengths(self, prompts):
        return [len(prompt) for prompt in prompts]

    def generate(self, prompts, *, seeds, batch_size, on_result=None):
        return [Generation(self.text, "eos", 8) for _ in prompts]


def test_both_rules_and_their_intervals_reach_metrics_and_summaries(tmp_path) -> None:
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    golds = ["8", "8", "8", "3"]
    records = [
        {"instruction": f"Question {i}?", "input": "", "output": "", "answer": gold}
        for i, gold in enumerate(golds)
    ]
    (data / "gsm8k" / "test.json").write_text(json.dumps(records))
    out = tmp_path / "eval"
    config = load_eval_config(
        None, ["model=unused", "tasks=gsm8k", f"data_dir={data}", f"output_dir={out}", "name=m"]
    )
    # kdlab reads the stated 8; the paper's last-number rule reads the 3 of the continuation.
    text = "5 + 3 = 8. The answer is 8.\n\nQuestion: Tom has 5 apples and eats 2. He has 3."
    evaluate(config, generator=FixedGenerator(text))
    metrics = json.loads((out / "gsm8k" / "metrics.json").read_text())
    assert metrics["accuracy"] == 75.0 and metrics["accuracy_paper_rule"] == 25.0
    assert metrics["paper_rule"] == "paper_last_number"
    low, high = wilson_interval(3, 4)
    assert metrics["accuracy_ci95"] == [round(100 * low, 4), round(100 * high, 4)]
    assert metrics["accuracy_stderr"] == pytest.approx(25.0)
    low, high = wilson_interval(1, 4)
    assert metrics["accuracy_paper_rule_ci95"] == [round(100 * low, 4), round(100 * high, 4)]
    assert metrics["accuracy_paper_rule_stderr"] == pytest.approx(25.0)

    with open(out / "summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["gsm8k"] == "75.00" and row["gsm8k_paper_rule"] == "25.00"
    assert float(row["gsm8k_ci95_lo"]) == pytest.approx(100 * wilson_interval(3, 4)[0], abs=0.01)
    assert float(row["gsm8k_ci95_hi"]) == pytest.approx(100 * wilson_interval(3, 4)[1], abs=0.01)
    assert row["gsm8k_stderr"] == "25.00" and row["gsm8k_n"] == "4"
    assert row["Average"] == "75.00" and row["Average_paper_rule"] == "25.00"
    markdown = (out / "summary.md").read_text()
    assert "| m | 75.00 ± 25.00 | 75.00 |" in markdown
    assert "| m | gsm8k | 4 | 75.00 | [30.06, 95.44] | 25.00 | [4.56, 69.94] |" in markdown


# --------------------------------------------------------------------------- 8. paper args


def test_paper_eval_args_map_slicing_and_sampling(
    tiny_model_dir, tiny_model_and_tokenizer, boolq_dir, tmp_path, caplog
) -> None:
    args = tmp_path / "eval_args.json"
    paper = {
        "base_model": str(tiny_model_dir),
        "lora_weights": "base-model",
        "dataset": "boolq",
        "batch_size": 2,
        "max_new_tokens": 3,
        "student_slice_layers": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "do_sample": True,
        "num_beams": 1,
    }
    args.write_text(json.dumps(paper))
    with caplog.at_level(logging.INFO, logger="kdlab.evaluation.stage"):
        mapping = import_paper_eval_args(args)
    for key in ("student_slice_layers", "temperature", "top_p", "top_k", "do_sample", "num_beams"):
        assert any(f"paper arg {key} = " in message for message in caplog.messages), key
    assert not any("no meaning" in message for message in caplog.messages)
    config = load_eval_config(None, [], base=mapping)
    assert config.model.slice_layers == 1
    settings = config.generation
    assert (settings.temperature, settings.top_p, settings.top_k) == (0.7, 0.9, 20)
    assert settings.do_sample and settings.num_beams == 1

    out = tmp_path / "eval"
    done = kdlab(
        "eval",
        "--from-paper-args",
        str(args),
        f"data_dir={boolq_dir}",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    run = json.loads((out / "run.json").read_text())
    full_model, _ = tiny_model_and_tokenizer
    assert run["student_layers"] == 1
    # The slice, not the full model: one of the two decoder layers fewer.
    layer = sum(p.numel() for p in full_model.model.layers[0].parameters())
    assert run["model_params"] == sum(p.numel() for p in full_model.parameters()) - layer
    generation = json.loads((out / "boolq" / "metrics.json").read_text())["generation"]
    assert generation["temperature"] == 0.7 and generation["top_k"] == 20


# --------------------------------------------------------------------------- 9. custom tasks


def test_custom_task_paths_are_relative_to_the_config_file(tiny_model_dir, tmp_path) -> None:
    config_dir = tmp_path / "configs" / "quiz"
    config_dir.mkdir(parents=True)
    (config_dir / "quiz.json").write_text(json.dumps(BOOLQ))
    (config_dir / "eval.yaml").write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "tasks": [{"name": "quiz", "path": "quiz.json", "type": "boolq"}],
                "generation": {"max_new_tokens": 1},
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = kdlab("eval", str(config_dir / "eval.yaml"), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "quiz" / "metrics.json").read_text())
    assert Path(metrics["data"]).resolve() == (config_dir / "quiz.json").resolve()
    assert metrics["n"] == 3 and metrics["paper_rule"] == "paper_first_match"
    # On the command line a relative path is relative to the working directory.
    config = load_eval_config(None, ["tasks=[{name: q, path: q.json, type: numeric}]"])
    assert config.tasks[0].path == "q.json"


def test_config_help_documents_custom_tasks(tmp_path) -> None:
    done = kdlab("config", "eval", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (tasks_line,) = [line for line in done.stdout.splitlines() if line.startswith("tasks ")]
    assert "{name, path, type" in tasks_line and "relative to the config file" in tasks_line
    for kind in EXTRACTOR_TYPES:
        assert kind in tasks_line, kind
