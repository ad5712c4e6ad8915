"""Evaluation data in other schemas: custom-task column maps and TRL-format records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.cli import main as cli_main
from kdlab.config.evaluation import load_eval_config
from kdlab.errors import ConfigError, DataError
from kdlab.evaluation.prompts import render_record_prompt
from kdlab.evaluation.runner import resolve_tasks
from kdlab.evaluation.tasks import load_task_records
from kdlab.utils.io import read_jsonl
from kdlab_testing import build_tiny_chat_tokenizer, save_tiny_chat_model

ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "label": 7},
    {"question": "Mia has 2 pens and loses 1. How many?", "label": 1},
]


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_custom_task_columns_map_another_schema(tmp_path: Path) -> None:
    file = _write(tmp_path / "qa.json", ROWS)
    config = load_eval_config(
        None,
        [
            f"tasks=[{{name: qa, path: {file}, type: numeric, columns: {{instruction: question, answer: label}}}}]"
        ],
    )
    (task,) = resolve_tasks(config)
    records = task.load()
    assert [(r["instruction"], r["answer"]) for r in records] == [
        (ROWS[0]["question"], "7"),
        (ROWS[1]["question"], "1"),
    ]
    unmapped = load_eval_config(None, [f"tasks=[{{name: qa, path: {file}, type: numeric}}]"])
    with pytest.raises(DataError, match=r"record 0: field 'instruction' is missing"):
        resolve_tasks(unmapped)[0].load()


def test_a_registered_task_reads_a_file_through_columns(tmp_path: Path) -> None:
    file = _write(tmp_path / "gsm.json", ROWS)
    config = load_eval_config(
        None,
        [
            f"tasks=[{{name: gsm8k, path: {file}, columns: {{instruction: question, answer: label}}}}]"
        ],
    )
    (task,) = resolve_tasks(config)
    assert task.name == "gsm8k" and task.extract("so 3 + 4 = 7. The answer is 7.") == "7"
    assert task.load()[0]["answer"] == "7"


def test_absent_column_and_unknown_field_are_refused(tmp_path: Path) -> None:
    file = _write(tmp_path / "qa.json", [ROWS[0], {"question": "x"}])
    with pytest.raises(DataError) as error:
        load_task_records(
            str(file), name="qa", columns={"instruction": "question", "answer": "label"}
        )
    assert str(error.value) == (
        f"{file}: record 1: field 'label' is missing (tasks[qa].columns.answer names it)"
    )
    with pytest.raises(ConfigError, match=r"tasks\[0\].columns.question.*is not a record field"):
        load_eval_config(
            None, [f"tasks=[{{name: qa, path: {file}, type: numeric, columns: {{question: q}}}}]"]
        )


def test_trl_eval_records_are_prompted_as_in_training(tmp_path: Path) -> None:
    tokenizer = build_tiny_chat_tokenizer()
    messages = [{"role": "user", "content": ROWS[0]["question"]}]
    file = _write(
        tmp_path / "chat.json",
        [{"messages": messages, "answer": "7"}, {"prompt": "Q: 2 + 2 =", "answer": "4"}],
    )
    chat, standard = load_task_records(str(file), name="chat", template="chat")
    assert render_record_prompt("chat", chat, tokenizer) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert render_record_prompt("alpaca", standard, tokenizer) == "Q: 2 + 2 ="
    with pytest.raises(DataError) as error:
        load_task_records(str(file), name="chat", template="alpaca")
    assert str(error.value).startswith(f"{file}: record 0: field 'messages' is a conversation")
    assert str(error.value).endswith("the evaluation's template is 'alpaca': set template: chat")


def test_eval_cli_on_messages_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny_chat_model(tmp_path / "chat-model")
    messages = [[{"role": "user", "content": row["question"]}] for row in ROWS]
    file = _write(
        tmp_path / "chat.json",
        [{"messages": m, "answer": str(row["label"])} for m, row in zip(messages, ROWS)],
    )
    task = f"tasks=[{{name: chat, path: {file}, type: numeric}}]"
    out = tmp_path / "eval"
    refused = cli_main(
        ["eval", f"model={model}", task, f"output_dir={out}", "generation.max_new_tokens=3"]
    )
    assert refused == 2
    assert "set template: chat" in capsys.readouterr().err and not (out / "DONE").exists()
    code = cli_main(
        [
            "eval",
            f"model={model}",
            task,
            "template=chat",
            f"output_dir={out}",
            "generation.max_new_tokens=3",
        ]
    )
    assert code == 0
    predictions = read_jsonl(out / "chat" / "predictions.jsonl")
    assert [p["instruction"] for p in predictions] == [row["question"] for row in ROWS]
    assert [p["gold"] for p in predictions] == ["7", "1"]
