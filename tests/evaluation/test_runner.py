"""End-to-end evaluation with a tiny random model: outputs, resume, decontamination, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kdlab.cli import invoke, parse
from kdlab.config.evaluation import load_eval_config
from kdlab.config.run_identity import RunIdentity
from kdlab.errors import ConfigError, DataError, KdlabError
from kdlab.evaluation import TASK_GROUPS, evaluate
from kdlab.evaluation.generation import Generation, HFGenerator
from kdlab.evaluation.stage import import_paper_eval_args
from kdlab.utils.io import read_jsonl

PREDICTION_FIELDS = {
    "index",
    "instruction",
    "prompt",
    "raw_output",
    "output",
    "finish_reason",
    "generated_tokens",
    "extracted",
    "gold",
    "correct",
}
METRIC_FIELDS = {
    "task",
    "accuracy",
    "n",
    "correct",
    "extraction_failures",
    "excluded",
    "generation",
    "backend",
    "model",
    "adapter",
}


def run_cli(*argv: str) -> int:
    """``kdlab eval ARGV`` in this process; user errors are raised, not printed."""
    return invoke(["eval", *argv])


@pytest.fixture
def generate_calls(monkeypatch) -> list[list[str]]:
    """Every prompt list HFGenerator.generate is asked for (the real method still runs)."""
    calls: list[list[str]] = []
    original = HFGenerator.generate

    def recording(self, prompts, **kwargs):
        calls.append(list(prompts))
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(HFGenerator, "generate", recording)
    return calls


class StubGenerator:
    """Answers every prompt with the same text (for data-plumbing tests: no model)."""

    backend = "stub"
    tokenizer = None
    generated_tokens = 0

    def __init__(self, text: str = "The answer is 1.") -> None:
        self.text = text
        self.prompts: list[str] = []

    def prompt_lengths(self, prompts):
        return [len(prompt) for prompt in prompts]

    def generate(self, prompts, *, seeds, batch_size, on_result=None):
        self.prompts.extend(prompts)
        return [Generation(self.text, "eos", 5) for _ in prompts]


def test_every_shared_task_end_to_end(tiny_model_dir, shared_eval_dir, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    code = run_cli(
        f"model={tiny_model_dir}",
        "tasks=[all]",
        "skip_missing=true",
        f"data_dir={shared_eval_dir}",
        "limit=4",
        "batch_size=4",
        "generation.max_new_tokens=4",
        f"output_dir={out}",
    )
    assert code == 0
    tasks = [name for name in TASK_GROUPS["all"] if (shared_eval_dir / name).is_dir()]
    assert len(tasks) == 14
    for name in tasks:
        records = read_jsonl(out / name / "predictions.jsonl")
        assert [r["index"] for r in records] == [0, 1, 2, 3]
        assert all(set(r) == PREDICTION_FIELDS for r in records)
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert set(metrics) >= METRIC_FIELDS
        assert metrics["task"] == name and metrics["n"] == 4 and metrics["backend"] == "hf"
        assert metrics["accuracy"] == pytest.approx(100 * metrics["correct"] / 4)
        assert metrics["generation"]["max_new_tokens"] == 4
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][: len(tasks) + 3] == ["Model", *tasks, "Average", "Average_paper_rule"]
    assert len(rows) == 2
    assert (out / "summary.md").read_text().startswith("| Model | gsm8k |")
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "eval" and run["role"] == "base" and run["model_params"] > 0
    assert (out / "config.yaml").is_file() and (out / "DONE").is_file()
    assert "| Model |" in capsys.readouterr().out


def test_hellaswag_from_hand_written_records(
    tiny_model_dir, hellaswag_dir, hellaswag_records, tmp_path
) -> None:
    config = load_eval_config(
        None,
        [
            f"model={tiny_model_dir}",
            "tasks=[hellaswag, {name: hellaswag_copy, path: "
            + str(hellaswag_dir / "hellaswag" / "test.json")
            + ", type: commonsense}]",
            f"data_dir={hellaswag_dir}",
            "generation.max_new_tokens=3",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    report = evaluate(config)
    assert [r.task for r in report.results] == ["hellaswag", "hellaswag_copy"]
    for result in report.results:
        assert result.metrics["n"] == len(hellaswag_records)
        records = read_jsonl(tmp_path / "out" / result.task / "predictions.jsonl")
        assert [r["gold"] for r in records] == ["ending1", "ending2", "ending3"]


def _config(model_dir: Path, data_dir: Path, out: Path, *extra: str):
    return load_eval_config(
        None,
        [
            f"model={model_dir}",
            "tasks=[gsm8k, boolq]",
            f"data_dir={data_dir}",
            "limit=6",
            "batch_size=2",
            "generation.max_new_tokens=4",
            f"output_dir={out}",
            *extra,
        ],
    )


def test_resume_after_a_torn_write_generates_only_missing_items(
    tiny_model_dir, shared_eval_dir, tmp_path, generate_calls
) -> None:
    out = tmp_path / "eval"
    evaluate(_config(tiny_model_dir, shared_eval_dir, out))
    first = {r["index"]: r for r in read_jsonl(out / "gsm8k" / "predictions.jsonl")}
    assert sum(len(call) for call in generate_calls) == 12
    # Simulate a kill: two complete lines, then half a line; no metrics, no DONE.
    predictions = out / "gsm8k" / "predictions.jsonl"
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text(lines[3] + lines[0] + lines[4][: len(lines[4]) // 2])
    (out / "gsm8k" / "metrics.json").unlink()
    (out / "DONE").unlink()
    generate_calls.clear()

    with pytest.raises(KdlabError, match="--resume"):
        evaluate(_config(tiny_model_dir, shared_eval_dir, out))
    evaluate(_config(tiny_model_dir, shared_eval_dir, out), resume=True)

    regenerated = [prompt for call in generate_calls for prompt in call]
    assert len(regenerated) == 4 and len(set(regenerated)) == 4  # gsm8k 1, 2, 4, 5 only
    second = {r["index"]: r for r in read_jsonl(predictions)}
    assert sorted(second) == list(range(6))
    assert {i: r["output"] for i, r in second.items()} == {i: r["output"] for i, r in first.items()}
    assert json.loads((out / "gsm8k" / "metrics.json").read_text())["n"] == 6
    assert (out / "DONE").is_file()


def test_interrupted_run_resumes_without_generating_twice(
    tiny_model_dir, shared_eval_dir, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "eval"
    written: list[str] = []
    original = HFGenerator.generate

    def failing(self, prompts, *, on_result=None, **kwargs):
        def interrupting(position, generation):
            if len(written) == 4:
                raise KeyboardInterrupt
            written.append(prompts[position])
            on_result(position, generation)

        return original(self, prompts, on_result=interrupting, **kwargs)

    monkeypatch.setattr(HFGenerator, "generate", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(tiny_model_dir, shared_eval_dir, out))
    # Each item's line is written as soon as it is finished.
    assert len(read_jsonl(out / "gsm8k" / "predictions.jsonl")) == 4
    assert not (out / "DONE").exists()

    resumed: list[str] = []

    def recording(self, prompts, **kwargs):
        resumed.extend(prompts)
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(HFGenerator, "generate", recording)
    evaluate(_config(tiny_model_dir, shared_eval_dir, out), resume=True)
    assert len(resumed) == 8 and not set(resumed) & set(written)  # 2 gsm8k + 6 boolq
    assert len(set(written) | set(resumed)) == 12
    assert (out / "DONE").is_file()


def test_summary_of_several_models(tiny_model_dir, shared_eval_dir, tmp_path) -> None:
    from kdlab.evaluation.runner import collect_summary_rows, summary_tables

    for name in ("first", "second"):
        evaluate(
            _config(tiny_model_dir, shared_eval_dir, tmp_path / name, "limit=2", f"name={name}")
        )
    rows, columns = collect_summary_rows([tmp_path / "first", tmp_path / "second"])
    assert columns == ["gsm8k", "boolq"]
    assert [row["Model"] for row in rows] == ["first", "second"]
    csv_text, markdown = summary_tables(rows, columns)
    assert csv_text.splitlines()[0].startswith(
        "Model,gsm8k,boolq,Average,Average_paper_rule,gsm8k_ci95_lo,gsm8k_ci95_hi,gsm8k_stderr,"
    )
    wide, long = markdown.split("\n\n")[:2]
    assert wide.count("\n") == 3  # header, rule, two models
    assert long.count("\n") == 5  # header, rule, two models x two tasks


def test_resume_refuses_other_settings_and_overwrite_starts_again(
    tiny_model_dir, shared_eval_dir, tmp_path
) -> None:
    out = tmp_path / "eval"
    evaluate(_config(tiny_model_dir, shared_eval_dir, out, "limit=2"))
    with pytest.raises(KdlabError, match=r"generation\.\w+: .* \(changes the run\)"):
        evaluate(
            _config(tiny_model_dir, shared_eval_dir, out, "limit=2", "generation=paper"),
            resume=True,
        )
    evaluate(_config(tiny_model_dir, shared_eval_dir, out, "limit=2"), overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KdlabError, match="did not write"):
        evaluate(_config(tiny_model_dir, shared_eval_dir, out, "limit=2"), overwrite=True)


def test_decontamination_leaves_exactly_the_clean_items(
    shared_eval_dir, shared_train_dir, tmp_path
) -> None:
    from kdlab.data.decontamination import load_training_instructions, record_key
    from kdlab.data.records import load_records

    train_file = shared_train_dir / "math_cot_3k.json"
    if not train_file.is_file():
        pytest.skip(f"{train_file} not found")
    config = load_eval_config(
        None,
        [
            "model=unused",
            "tasks=[gsm8k, SVAMP, mawps]",
            f"data_dir={shared_eval_dir}",
            f"decontaminate_against={train_file}",
            f"output_dir={tmp_path / 'eval'}",
        ],
    )
    report = evaluate(config, generator=StubGenerator())
    train_keys = load_training_instructions([train_file])
    exact = {r["instruction"].strip() for r in load_records(train_file, required_fields=())}
    for result in report.results:
        records = load_records(shared_eval_dir / result.task / "test.json")
        clean = [i for i, r in enumerate(records) if record_key(r) not in train_keys]
        written = [
            r["index"] for r in read_jsonl(tmp_path / "eval" / result.task / "predictions.jsonl")
        ]
        assert written == clean
        assert not any(records[i]["instruction"].strip() in exact for i in written)
        assert result.metrics["excluded"] == len(records) - len(clean) > 0
        assert result.metrics["n"] == len(clean)
    excluded = {r.task: r.metrics["excluded"] for r in report.results}
    assert excluded["mawps"] >= 52  # 52 verbatim, more after normalisation

    refusing = load_eval_config(
        None,
        [
            "model=unused",
            "tasks=[mawps]",
            f"data_dir={shared_eval_dir}",
            f"decontaminate_against={train_file}",
            "on_overlap=error",
            f"output_dir={tmp_path / 'eval2'}",
        ],
    )
    with pytest.raises(DataError, match=r"\d+ of 238 test items occur"):
        evaluate(refusing, generator=StubGenerator())


def test_limit_applies_after_decontamination(shared_eval_dir, shared_train_dir, tmp_path) -> None:
    train_file = shared_train_dir / "math_cot_3k.json"
    if not train_file.is_file():
        pytest.skip(f"{train_file} not found")
    config = load_eval_config(
        None,
        [
            "model=unused",
            "tasks=[AddSub]",
            f"data_dir={shared_eval_dir}",
            f"decontaminate_against=[{train_file}]",
            "limit=5",
            f"output_dir={tmp_path / 'eval'}",
        ],
    )
    stub = StubGenerator()
    report = evaluate(config, generator=stub)
    assert report.results[0].metrics["n"] == 5 and len(stub.prompts) == 5


def test_run_dir_with_adapter(tiny_model_dir, hellaswag_dir, tmp_path) -> None:
    """A finetune-style run dir: model + LoRA adapter (dropout must be off in evaluation)."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.9,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )
    get_peft_model(base, lora).save_pretrained(run_dir / "adapter")
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}})
    )
    identity = RunIdentity(
        stage="finetune", role="teacher", name="tiny-teacher", model=str(tiny_model_dir)
    ).to_dict()
    (run_dir / "run.json").write_text(json.dumps(identity))
    outputs = []
    for attempt in range(2):
        code = run_cli(
            f"run_dir={run_dir}",
            "tasks=hellaswag",
            f"data_dir={hellaswag_dir}",
            "generation.max_new_tokens=6",
            *(["--overwrite"] if attempt else []),
        )
        assert code == 0
        records = read_jsonl(run_dir / "eval" / "hellaswag" / "predictions.jsonl")
        outputs.append([r["output"] for r in records])
    assert outputs[0] == outputs[1]  # greedy + dropout off: identical
    metrics = json.loads((run_dir / "eval" / "hellaswag" / "metrics.json").read_text())
    assert metrics["adapter"].endswith("adapter") and metrics["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "eval" / "run.json").read_text()) == identity
    assert "tiny-teacher" in (run_dir / "eval" / "summary.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["tasks=[gsm8kk]"], "did you mean 'gsm8k'"),
        (["tasks=[boolq]"], "boolq/test.json not found"),
        (["limit=0"], "'limit' = 0"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(
    tiny_model_dir, tmp_path, overrides, expected
) -> None:
    out = tmp_path / "eval"
    with pytest.raises(KdlabError) as error:
        run_cli(f"model={tiny_model_dir}", f"data_dir={tmp_path}", f"output_dir={out}", *overrides)
    assert expected in error.value.one_line()
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_record_without_answer_is_a_data_error(tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    records = [{"instruction": "What is 1 + 1?", "input": "", "output": "2"}]
    (data / "gsm8k" / "test.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"record 0: field 'answer' is missing"):
        run_cli(
            f"model={tiny_model_dir}",
            "tasks=gsm8k",
            f"data_dir={data}",
            f"output_dir={tmp_path / 'o'}",
        )


def test_paper_eval_args_import(tmp_path) -> None:
    args = tmp_path / "eval_args.json"
    args.write_text(
        json.dumps(
            {
                "base_model": "Qwen/Qwen2.5-0.5B",
                "lora_weights": "runs/t",
                "dataset": "boolq",
                "batch_size": 1,
                "model": "LLaMA-7B",
            }
        )
    )
    mapping = import_paper_eval_args(args)
    config = load_eval_config(None, ["limit=2"], base=mapping)
    assert config.model.name_or_path == "Qwen/Qwen2.5-0.5B" and config.adapter == "runs/t"
    assert config.tasks == ["boolq"] and config.batch_size == 1
    assert config.generation.do_sample and config.generation.top_k == 0
    with pytest.raises(ConfigError, match="not found"):
        import_paper_eval_args(tmp_path / "missing.json")


def test_config_shorthands_and_validation(tmp_path) -> None:
    config = load_eval_config(None, ["model=smollm2-135m", "generation=paper", "tasks=math"])
    assert config.generation.preset == "paper" and config.generation.temperature == 1.0
    assert config.generation.max_new_tokens == 256 and config.tasks == ["math"]
    greedy = load_eval_config(None, ["generation.max_new_tokens=32"])
    assert not greedy.generation.do_sample and greedy.generation.max_new_tokens == 32
    for overrides, message in [
        (["generation.top_k=-1"], "'generation.top_k' = -1"),
        (["generation=beam"], "not a preset"),
        (["batch_size=0"], "'batch_size' = 0"),
        (["tasks=[{type: numeric}]"], "'tasks[0].name'"),
        (["resume=true"], "did you mean '--resume'"),
        (["overwrite=true"], "did you mean '--overwrite'"),
        (["run_dir=x", "model=y"], "either model or run_dir"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_eval_config(None, overrides)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "model: smollm2-135m\ntasks: [gsm8k, {name: q, path: q.json, type: boolq}]\n"
    )
    loaded = load_eval_config(str(yaml_file), ["limit=3"])
    assert loaded.limit == 3 and loaded.tasks[1].type == "boolq"


def test_flags_may_sit_between_overrides(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("tasks: [gsm8k]\n")
    _, args = parse(["eval", str(config), "--resume", "limit=3", "--overwrite", "batch_size=2"])
    assert args.config_file == str(config) and args.overrides == ["limit=3", "batch_size=2"]
    assert args.resume and args.overwrite
    assert (args.config.tasks, args.config.limit, args.config.batch_size) == (["gsm8k"], 3, 2)


def test_resume_with_overwrite_is_refused_before_anything_loads(tmp_path) -> None:
    out = tmp_path / "eval"
    config = load_eval_config(None, [f"output_dir={out}", "model=/nonexistent/model"])
    with pytest.raises(KdlabError, match="choose one of --resume and --overwrite"):
        evaluate(config, resume=True, overwrite=True)
    assert not out.exists()
