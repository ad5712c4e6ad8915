"""What predictions.jsonl and metrics.json record about each generation (issue 13, item 2):
the prompt seen, the raw and the cut output, the finish reason, the tokens generated, the
truncation counts, a generation time without model loading, and resume of older lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from kdlab.config.evaluation import load_eval_config
from kdlab.data.templates import build_prompt
from kdlab.data.tokenize import encode_prompt
from kdlab.evaluation import evaluate
from kdlab.evaluation import runner as runner_module
from kdlab.evaluation.generation import Generation, HFGenerator
from kdlab.models.generation import generate_tokens
from kdlab.utils.io import read_jsonl

_QUESTION = "Tom has 12 apples and buys 7 more . How many apples does he have now ?"
_WORDS = _QUESTION.split()
#: Questions of different lengths and words (the tiny model's answers differ between them).
ITEMS = [
    {
        "instruction": " ".join((_WORDS * 4)[i % 5 : i % 5 + 3 + (i * 7) % 29]),
        "input": "",
        "output": "",
        "answer": str(2 * i + 3),
    }
    for i in range(8)
]
OLD_FIELDS = ("index", "instruction", "gold", "output", "extracted", "correct")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    (directory / "gsm8k").mkdir(parents=True)
    (directory / "gsm8k" / "test.json").write_text(json.dumps(ITEMS), encoding="utf-8")
    return directory


def _config(data_dir: Path, out: Path, *extra: str, tokens: int = 6):
    return load_eval_config(
        None,
        [
            "tasks=[gsm8k]",
            f"data_dir={data_dir}",
            "batch_size=3",
            f"generation.max_new_tokens={tokens}",
            f"output_dir={out}",
            *extra,
        ],
    )


def test_lines_record_prompt_tokens_and_finish_reason(
    tiny_model_and_tokenizer, data_dir, tmp_path
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    prompts = [build_prompt(item["instruction"]) for item in ITEMS]
    # The random tiny model never emits its EOS: declare as EOS a token that about half of
    # the answers contain, so that both "eos" and "length" occur.
    rows = generate_tokens(
        model,
        [encode_prompt(tokenizer, prompt) for prompt in prompts],
        max_new_tokens=16,
        eos_token_ids=[tokenizer.eos_token_id],
    )
    found = Counter(token for row in rows for token in set(row.tokens))
    first = {row.tokens[0] for row in rows}
    frequent = min(
        (token for token in found if token not in first),
        key=lambda token: (abs(found[token] - len(rows) / 2), token),
    )
    original_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [frequent, tokenizer.eos_token_id]
    try:
        config = _config(data_dir, tmp_path / "eval", tokens=16)
        evaluate(config, generator=HFGenerator(model, tokenizer, config.generation))
    finally:
        model.generation_config.eos_token_id = original_eos
    lines = read_jsonl(tmp_path / "eval" / "gsm8k" / "predictions.jsonl")
    assert [line["index"] for line in lines] == list(range(8))
    for line, prompt in zip(lines, prompts, strict=True):
        assert line["prompt"] == prompt  # exactly the text the model was given
        tokens = line["generated_tokens"]
        if line["finish_reason"] == "length":
            assert tokens == 16
        else:
            assert line["finish_reason"] == "eos" and 1 <= tokens <= 16
        assert line["raw_output"] == line["output"]  # no stop text to cut here
    reasons = Counter(line["finish_reason"] for line in lines)
    assert reasons["eos"] > 0 and reasons["length"] > 0, reasons
    metrics = json.loads((tmp_path / "eval" / "gsm8k" / "metrics.json").read_text())
    assert metrics["truncated"] == reasons["length"]
    assert metrics["finish_reasons"] == {
        "eos": reasons["eos"],
        "stop": 0,
        "length": reasons["length"],
        "unknown": 0,
    }
    total = sum(line["generated_tokens"] for line in lines)
    assert total < 8 * 16  # rows that ended early count their own tokens, not padding
    assert metrics["generated_tokens"] == metrics["generated_tokens_this_session"] == total
    assert metrics["tokens_per_second"] > 0


class _ScriptedGenerator:
    """Returns the given generations in prompt order (for the record-keeping of stops)."""

    backend = "scripted"
    tokenizer = None

    def __init__(self, generations: list[Generation]) -> None:
        self.generations = generations

    def prompt_lengths(self, prompts):
        return [len(prompt) for prompt in prompts]

    def generate(self, prompts, *, seeds, batch_size, on_result=None):
        results = self.generations[: len(prompts)]
        for position, generation in enumerate(results):
            if on_result is not None:
                on_result(position, generation)
        return results


def test_a_stop_text_is_cut_from_output_but_kept_in_raw_output(data_dir, tmp_path) -> None:
    stopped = "Tom buys 3 more, so the answer is 3.\n\n### Instruction"
    generations = [
        Generation(stopped, "stop", 17),
        Generation("The answer is 5", "eos", 6),
        Generation("The answer is 7 and then more and more", "length", 6),
    ]
    config = _config(data_dir, tmp_path / "eval", "limit=3")
    evaluate(config, generator=_ScriptedGenerator(generations))
    lines = read_jsonl(tmp_path / "eval" / "gsm8k" / "predictions.jsonl")
    assert lines[0]["raw_output"] == stopped
    assert lines[0]["output"] == "Tom buys 3 more, so the answer is 3."
    assert lines[0]["extracted"] is not None and lines[0]["correct"]
    assert [line["finish_reason"] for line in lines] == ["stop", "eos", "length"]
    assert [line["generated_tokens"] for line in lines] == [17, 6, 6]
    metrics = json.loads((tmp_path / "eval" / "gsm8k" / "metrics.json").read_text())
    assert metrics["truncated"] == 1
    assert metrics["generated_tokens"] == 29


def test_generation_seconds_exclude_model_loading(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
) -> None:
    """Loading the model is made to take 1000 s on a shifted clock; generation does not."""
    offset = {"seconds": 0.0}
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset["seconds"])
    original_build = runner_module._build_generator

    def slow_build(*args, **kwargs):
        generator = original_build(*args, **kwargs)
        offset["seconds"] += 1000.0
        return generator

    monkeypatch.setattr(runner_module, "_build_generator", slow_build)
    config = _config(data_dir, tmp_path / "eval", f"model={tiny_model_dir}", "limit=3")
    evaluate(config)
    metrics = json.loads((tmp_path / "eval" / "gsm8k" / "metrics.json").read_text())
    assert 0 < metrics["generation_seconds"] < 1000


def _kdlab(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("KDLAB_FAULT", None)
    return subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_resume_keeps_lines_written_before_the_new_fields(
    tiny_model_dir, data_dir, tmp_path
) -> None:
    """Lines of an older kdlab (no prompt, raw_output, finish_reason, generated_tokens) are
    kept, not generated again; what they did not record stays null."""
    out = tmp_path / "eval"
    args = [
        "eval",
        f"model.name_or_path={tiny_model_dir}",
        "tasks=[gsm8k]",
        f"data_dir={data_dir}",
        "limit=5",
        "batch_size=2",
        "generation.max_new_tokens=6",
        f"output_dir={out}",
    ]
    first = _kdlab(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    predictions = out / "gsm8k" / "predictions.jsonl"
    complete = read_jsonl(predictions)
    # An older kdlab wrote items 0 and 1, then was killed.
    old_lines = [{key: line[key] for key in OLD_FIELDS} for line in complete[:2]]
    predictions.write_text("".join(json.dumps(line) + "\n" for line in old_lines))
    (out / "gsm8k" / "metrics.json").unlink()
    (out / "DONE").unlink()
    resumed = _kdlab(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = read_jsonl(predictions)
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]
    for line, before in zip(lines[:2], complete[:2], strict=True):
        assert line["output"] == before["output"]
        assert line["raw_output"] is None
        assert line["finish_reason"] is None and line["generated_tokens"] is None
        assert line["prompt"] == before["prompt"]  # rendered again: the same template
    assert lines[2:] == complete[2:]  # generated again, greedy: the same lines
    metrics = json.loads((out / "gsm8k" / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["generated_this_session"] == 3
    assert metrics["finish_reasons"]["unknown"] == 2
    assert metrics["generated_tokens"] == sum(line["generated_tokens"] for line in lines[2:])
