"""Cross-tokenizer distillation (issue 16) on tiny models with two different byte-level BPE
tokenizers: the vocabulary check's message, padded widths, the objective (same-tokenizer
equality, on-policy re-tokenization) and the whole path from the CLI (train, save, reload,
evaluate, analyse)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.config.schema import DistillSettings, ModelConfig
from kdlab.data.alignment import CrossTokenizerCollator, build_vocabulary_map
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, tokenize_records
from kdlab.models.loading import load_model_and_tokenizer
from kdlab.training.objectives import CrossTokenizerObjective, DistillationObjective
from kdlab_testing import (
    REPO_ROOT,
    build_tiny_model,
    build_tiny_tokenizer,
    distill_overrides,
    finetune_overrides,
    save_tiny_model_other_tokenizer,
)


def kdlab(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", *argv],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="session")
def other_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 Llama with the *other* tiny tokenizer (360 tokens vs 320)."""
    return save_tiny_model_other_tokenizer(
        tmp_path_factory.mktemp("tiny-other-teacher"), layers=2, hidden=32, seed=1
    )


# --------------------------------------------------------------------------- the check


def test_same_vocabulary_method_across_tokenizers_exits_2_naming_both_sizes(
    tiny_model_dir: Path, other_teacher_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = kdlab(
        "distill", *distill_overrides(tiny_model_dir, other_teacher_dir, out, "forward_kl"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    message = lines[0]
    assert "teacher vocabulary 360 tokens, student 320" in message
    assert "distill.method = forward_kl" in message
    assert "uld" in message and "aligned_kl" in message
    assert not (out / "DONE").exists()


def test_padded_logit_widths_of_one_tokenizer_still_train(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Qwen2.5 7B/14B vs the small ones: one tokenizer, lm_heads of different heights (here
    320 tokens, 384 teacher rows). A same-vocabulary method runs as before, on the 320."""
    teacher_dir = tmp_path / "padded-teacher"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer) + 64, hidden=32, seed=2).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "run"
    done = kdlab(
        "distill", *distill_overrides(tiny_model_dir, teacher_dir, out, "forward_kl"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_validation"]["val_kd"] > 0
    assert "cross_tokenizer" not in summary


# --------------------------------------------------------------------------- configs


def test_the_example_config_loads_as_a_user_would_run_it(tmp_path: Path) -> None:
    done = kdlab(
        "distill", str(REPO_ROOT / "configs" / "examples" / "cross_tokenizer.yaml"),
        "--print-config", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["teacher"]["model"]["name_or_path"].startswith("meta-llama/")
    assert printed["student"]["name_or_path"].startswith("Qwen/")
    settings = DistillSettings(**{k: v for k, v in printed["distill"].items() if k != "generation"})
    assert settings.spec.cross_tokenizer(settings)


def test_the_cross_family_grid_plans_cross_tokenizer_runs_on_the_live_teacher() -> None:
    from kdlab.config.sweep import load_sweep_config
    from kdlab.sweep.grid import plan_sweep

    grid = REPO_ROOT / "configs" / "paper" / "cross_family_math.yaml"
    plan = plan_sweep(load_sweep_config(grid, ["out_dir=/nonexistent/paper"]))
    kd = [run for run in plan.training if run.kind == "kd"]
    assert len(kd) == 20
    pairs = {(run.params["teacher"], run.params["student"]) for run in kd}
    assert all(teacher.split("-")[0] != student.split("-")[0] for teacher, student in pairs)
    for run in kd:
        settings = run.config.distill
        assert settings.spec.cross_tokenizer(settings), run.name
        assert settings.teacher_cache is None, run.name  # refused: sweeps leave it off
    # The paper's same-family grid still turns the cache on where it serves the run.
    same = plan_sweep(
        load_sweep_config(REPO_ROOT / "configs" / "paper" / "qwen_math.yaml", ["out_dir=/x"])
    )
    assert any(run.config.distill.teacher_cache == "auto" for run in same.stage("distill"))


# --------------------------------------------------------------------------- the objective


def _batch(student_dir: Path, teacher_dir: Path, *, cross: bool):
    student, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(student_dir)))
    teacher, teacher_tokenizer = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(teacher_dir))
    )
    records = load_records("generated:arithmetic?split=train&n=4&seed=0")
    vocabulary = build_vocabulary_map(tokenizer, teacher_tokenizer)
    from kdlab.data.alignment import tokenize_record_pairs

    if cross:
        examples = tokenize_record_pairs(records, tokenizer, teacher_tokenizer, vocabulary)
        collate = CrossTokenizerCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
    else:
        examples = tokenize_records(records, tokenizer)
        collate = Collator(tokenizer.pad_token_id)
    batch = collate(examples)
    batch["_step"], batch["_micro"] = torch.tensor(0), torch.tensor(0)
    return student, tokenizer, teacher, teacher_tokenizer, vocabulary, batch


def test_aligned_kl_objective_equals_forward_kl_for_the_same_tokenizer(
    tiny_model_dir: Path, tiny_teacher_dir: Path
) -> None:
    """Through the whole objective (masks, counts, teacher on its own ids, CE): the same
    tokenizer on both sides makes aligned_kl the forward_kl run, sum for sum."""
    student, tokenizer, teacher, teacher_tokenizer, vocabulary, batch = _batch(
        tiny_model_dir, tiny_teacher_dir, cross=True
    )
    common = {"kd_weight": 0.5, "temperature": 2.0, "chunk_size": 8}
    cross = CrossTokenizerObjective(
        settings=DistillSettings(method="aligned_kl", **common),
        teacher=teacher,
        tokenizer=tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        vocabulary=vocabulary,
        seed=0,
        cutoff_len=256,
        unwrap=lambda model: model,
    )
    same = DistillationObjective(
        settings=DistillSettings(method="forward_kl", **common),
        teacher=teacher,
        tokenizer=tokenizer,
        vocab_size=None,
        seed=0,
        cutoff_len=256,
        unwrap=lambda model: model,
    )
    assert cross.counts(batch) == same.counts(batch)
    assert cross.weights == same.weights == {"ce": 0.5, "kd": 0.5}
    got, want = cross(student, batch, False).sums, same(student, batch, False).sums
    assert want["kd"].item() > 0.01
    assert torch.equal(got["kd"], want["kd"]) and torch.equal(got["ce"], want["ce"])


def test_on_policy_samples_are_retokenized_for_the_teacher(
    tiny_model_dir: Path, other_teacher_dir: Path
) -> None:
    """gkd + uld, λ = 1: the student's sampled ids are kept; the teacher reads their text in
    its own tokens after its own prompt; the pairs count in the KD term."""
    student, tokenizer, teacher, teacher_tokenizer, vocabulary, batch = _batch(
        tiny_model_dir, other_teacher_dir, cross=True
    )
    settings = DistillSettings(method="gkd", divergence="uld", lambda_on_policy=1.0)
    settings.generation.max_new_tokens = 8
    objective = CrossTokenizerObjective(
        settings=settings,
        teacher=teacher,
        tokenizer=tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        vocabulary=vocabulary,
        seed=0,
        cutoff_len=256,
        unwrap=lambda model: model,
    )
    prepared = objective.prepare(student, batch, True)
    assert bool(prepared["_on_policy"])
    rows = prepared["input_ids"].shape[0]
    compared = 0
    for row in range(rows):
        student_prompt = int(batch["prompt_lengths"][row])
        teacher_prompt = int(batch["teacher_prompt_lengths"][row])
        assert torch.equal(
            prepared["input_ids"][row, :student_prompt], batch["input_ids"][row, :student_prompt]
        )
        assert torch.equal(
            prepared["teacher_input_ids"][row, :teacher_prompt],
            batch["teacher_input_ids"][row, :teacher_prompt],
        )
        sampled = prepared["input_ids"][row, student_prompt:][
            prepared["attention_mask"][row, student_prompt:].bool()
        ].tolist()
        teacher_side = prepared["teacher_input_ids"][row, teacher_prompt:][
            prepared["teacher_attention_mask"][row, teacher_prompt:].bool()
        ].tolist()
        text = tokenizer.decode(sampled, skip_special_tokens=True)
        assert teacher_tokenizer.decode(teacher_side, skip_special_tokens=True) == text
        count = int(prepared["align_student_mask"][row].sum())
        assert count == int(prepared["align_teacher_mask"][row].sum()) > 0
        compared += count
    assert objective.counts(prepared)["kd"] == compared
    assert objective.counts(prepared)["ce"] == 0  # samples have no gold response
    result = objective(student, prepared, True)
    assert set(result.sums) == {"kd"} and result.sums["kd"].item() > 0
    assert result.stats == {"on_policy_batches": 1.0}


# --------------------------------------------------------------------------- acceptance


def _kd_values(run_dir: Path) -> tuple[list[float], list[float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line["kd"] for line in lines if line.get("split", "train") == "train" and "kd" in line]
    val = [line["val_kd"] for line in lines if line.get("split") == "val"]
    return train, val


@pytest.mark.slow
def test_both_methods_train_save_reload_evaluate_and_analyse_from_the_cli(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The acceptance path of issue 16: a teacher with another tokenizer learns generated
    arithmetic first; uld and aligned_kl students then train from the CLI (20 steps, the KD
    loss falls), are saved, reloaded, evaluated and analysed (token fidelity on aligned
    positions)."""
    teacher_base = save_tiny_model_other_tokenizer(
        tmp_path / "teacher-base", layers=2, hidden=32, seed=3
    )
    teacher_run = tmp_path / "teacher"
    done = kdlab(
        "finetune",
        *finetune_overrides(
            teacher_base, teacher_run, "train.max_steps=20", "train.learning_rate=1e-2",
            "peft.method=full",
        ),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    task = tmp_path / "tiny_math.json"
    task.write_text(
        json.dumps(
            [
                {
                    "instruction": f"Tom has {n} apples and buys {n} more. How many apples?",
                    "input": "",
                    "output": f"{n} + {n} = {2 * n}. The answer is {2 * n}.",
                    "answer": str(2 * n),
                }
                for n in range(1, 4)
            ]
        )
    )
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(
        yaml.safe_dump(
            {
                "tasks": [{"name": "tiny_math", "path": str(task), "type": "numeric"}],
                "batch_size": 3,
                "generation": {"max_new_tokens": 8},
            }
        )
    )
    students = {}
    for method in ("uld", "aligned_kl"):
        out = tmp_path / method
        overrides = distill_overrides(
            tiny_model_dir, teacher_base, out, method,
            f"teacher.run_dir={teacher_run}", "train.max_steps=20", "train.eval_steps=5",
            "train.save_steps=10", "train.learning_rate=1e-2", "peft.method=full",
        )  # fmt: skip
        overrides = [item for item in overrides if not item.startswith("teacher.model")]
        done = kdlab("distill", *overrides, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        train, val = _kd_values(out)
        assert len(train) == 20 and len(val) == 4, (train, val)
        assert val[-1] < 0.8 * val[0], (method, val)
        assert sum(train[-5:]) < 0.8 * sum(train[:5]), (method, train)
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["cross_tokenizer"] == {
            "student_tokens": 320, "teacher_tokens": 360,
            "shared_tokens": summary["cross_tokenizer"]["shared_tokens"],
        }  # fmt: skip
        identity = json.loads((out / "run.json").read_text())
        assert identity["method"] == method and identity["divergence"] == method
        assert identity["teacher_run"] == str(teacher_run.resolve())

        from kdlab.models.loading import load_run_model

        model, tokenizer = load_run_model(out)
        assert len(tokenizer) == 320  # the student's own tokenizer, saved with it
        ids = tokenizer("Tom has 3 apples.", return_tensors="pt")
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] > ids["input_ids"].shape[1]
        students[method] = out

    for run_dir in (teacher_run, *students.values()):
        done = kdlab("eval", str(eval_config), f"run_dir={run_dir}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        metrics = json.loads((run_dir / "eval" / "tiny_math" / "metrics.json").read_text())
        assert metrics["n"] == 3

    report = tmp_path / "analysis"
    records = tmp_path / "heldout.json"
    records.write_text(json.dumps(load_records("generated:arithmetic?split=test&n=6&seed=1")))
    done = kdlab(
        "analyze", str(teacher_run), *map(str, students.values()), "--out", str(report),
        "--token-fidelity", "--token-fidelity-data", str(records),
        "--bootstrap-samples", "200",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (report / "report.md").is_file()
    fidelity_files = list(report.rglob("token_fidelity.csv"))
    assert len(fidelity_files) == 1
    rows = list(csv.DictReader(fidelity_files[0].open()))
    by_run = {Path(row["student_run"]).name: row for row in rows}
    for method in students:
        row = by_run[method]
        assert row["positions"] == "aligned positions (cross-tokenizer)"
        assert int(row["tokens"]) > 0 and float(row["KL(teacher||student) per token"]) >= 0
    bleu_files = list(report.rglob("bleu.csv"))
    assert bleu_files and "aligned_kl" in bleu_files[0].read_text()
