"""Model cards of saved runs, their evaluation results, ``kdlab export`` and the hub push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from kdlab_testing import distill_overrides, finetune_overrides

PROBE = ["Tom has 12 apples. He buys 7 more apples.", "Mia read 24 pages on Monday."]


def _kdlab(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "KDLAB_FAULT": "", **(env or {})},
    )


def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROBE, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.double()


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished LoRA fine-tune (lr high enough that the adapter changes the logits)."""
    root = tmp_path_factory.mktemp("card")
    out = root / "teacher"
    result = _kdlab(
        "finetune", *finetune_overrides(tiny_model_dir, out), "train.learning_rate=0.05", cwd=root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def sliced_run(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distilled student made of 2 of the teacher's 4 layers (saved merged as model/)."""
    root = tmp_path_factory.mktemp("sliced")
    out = root / "student"
    overrides = distill_overrides(
        tiny_teacher_dir,
        tiny_teacher_dir,
        out,
        "forward_kl",
        "student.slice_layers=2",
        "distill.temperature=2.0",
        "train.learning_rate=0.05",
    )
    result = _kdlab("distill", *overrides, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_adapter_card_says_what_the_run_is(adapter_run: Path) -> None:
    card = _card(adapter_run / "adapter" / "README.md")
    assert card.data.library_name == "peft"
    assert {"kdlab", "finetune", "teacher", "sft", "lora"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local directory is no hub id
    assert card.data.model_name == "teacher" and card.data.pipeline_tag == "text-generation"
    text = card.text
    assert "[More Information Needed]" not in str(card)  # PEFT's boilerplate is gone
    summary = json.loads((adapter_run / "train_summary.json").read_text())
    assert f"- Steps: {summary['steps']} ({summary['tokens']} tokens" in text
    assert "`generated:arithmetic?split=train&n=24&seed=0`" in text
    assert "| Method | sft |" in text and "kdlab 0.1.0" in text
    resolved = text.split("## Resolved config\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(resolved) == yaml.safe_load((adapter_run / "config.yaml").read_text())
    assert "Not evaluated yet" in text


def test_sliced_student_card_names_method_divergence_teacher(
    sliced_run: Path, tiny_teacher_dir: Path
) -> None:
    assert not (sliced_run / "adapter").exists()
    card = _card(sliced_run / "model" / "README.md")
    assert card.data.library_name == "transformers"
    assert {"distill", "student", "forward_kl", "knowledge-distillation"} <= set(card.data.tags)
    first = card.text.split("\n\n")[1]
    assert first == (
        f"A merged model from `{tiny_teacher_dir}`, sliced to 2 decoder layers: a student "
        f"distilled by forward_kl (temperature 2) from {tiny_teacher_dir}."
    )
    assert "| Temperature | 2.0 |" in card.text and "| Decoder layers kept | 2 |" in card.text


def _eval(run: Path, out: Path | None, task_file: Path, *extra: str) -> None:
    args = [
        "eval",
        f"run_dir={run}",
        f"tasks=[{{name: toy, path: {task_file}, type: numeric}}]",
        "generation.max_new_tokens=4",
        *([f"output_dir={out}"] if out else []),
        *extra,
    ]
    result = _kdlab(*args, cwd=run.parent)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_an_evaluation_adds_its_results_to_the_run_card(adapter_run: Path, tmp_path: Path) -> None:
    from kdlab.models.card import card_eval_results

    task_file = tmp_path / "toy.json"
    records = [{"instruction": q, "answer": str(n)} for n, q in enumerate(PROBE * 3)]
    task_file.write_text(json.dumps(records))
    card_file = adapter_run / "adapter" / "README.md"
    weights = (adapter_run / "adapter" / "adapter_model.safetensors").read_bytes()
    _eval(adapter_run, None, task_file)
    metrics = json.loads((adapter_run / "eval" / "toy" / "metrics.json").read_text())
    (result,) = card_eval_results(card_file)
    assert (result.dataset_name, result.metric_type) == ("toy", "accuracy")
    assert result.metric_value == pytest.approx(metrics["accuracy"])
    assert result.metric_args["n"] == 6 and result.metric_args["evaluation"] == "eval"
    assert "| toy | " in _card(card_file).text and "Not evaluated yet" not in _card(card_file).text
    # a second evaluation elsewhere adds its own; evaluating again into eval/ replaces eval/'s
    _eval(adapter_run, tmp_path / "limited", task_file, "limit=2")
    _eval(adapter_run, None, task_file, "--overwrite")
    results = card_eval_results(card_file)
    assert sorted(r.metric_args["evaluation"] for r in results) == sorted(
        ["eval", str((tmp_path / "limited").resolve())]
    )
    assert {r.metric_args["n"] for r in results} == {6, 2}
    assert (adapter_run / "adapter" / "adapter_model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_export_merge_loads_in_plain_transformers_with_kdlab_logits(
    adapter_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlab.models.loading import load_run_model

    out = tmp_path / "merged"
    result = _kdlab("export", str(adapter_run), "--out", str(out), "--merge", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    kdlab_model, _ = load_run_model(adapter_run)
    merged = _logits(plain, tokenizer)
    torch.testing.assert_close(merged, _logits(kdlab_model, tokenizer), atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (merged - _logits(base, tokenizer)).abs().max() > 1e-3  # the adapter is in it
    card = _card(out / "README.md")
    assert card.data.library_name == "transformers"
    assert "the adapter is merged into its base model" in card.text


@pytest.mark.slow
def test_export_of_an_adapter_and_of_a_sliced_model(
    adapter_run: Path, sliced_run: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlab.models.loading import load_run_model

    for run, expected in ((adapter_run, "adapter_config.json"), (sliced_run, "model.safetensors")):
        out = tmp_path / run.name
        result = _kdlab("export", str(run), "--out", str(out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (out / expected).is_file() and (out / "README.md").is_file()
        plain = AutoModelForCausalLM.from_pretrained(out).eval()  # peft integration for adapters
        tokenizer = AutoTokenizer.from_pretrained(out)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        kdlab_model, _ = load_run_model(run)
        torch.testing.assert_close(
            _logits(plain, tokenizer), _logits(kdlab_model, tokenizer), atol=1e-5, rtol=0
        )
    assert plain.config.num_hidden_layers == 2
    refused = _kdlab(
        "export", str(sliced_run), "--out", str(tmp_path / "x"), "--merge", cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "there is no adapter to merge; drop --merge" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_export_never_replaces_what_it_did_not_write(
    adapter_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdlab.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _kdlab("export", str(adapter_run), "--out", str(out), "--overwrite", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kdlab export: error: export out_dir {out} holds files kdlab export did not write "
        "(no kdlab-export.json): refusing to replace it; choose another folder"
    ]
    assert main(["export", str(adapter_run), "--out", str(out)]) == 2
    assert (out / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    assert main(["export", str(adapter_run), "--out", str(again)]) == 0
    assert main(["export", str(adapter_run), "--out", str(again)]) == 2
    assert "pass --overwrite to replace an earlier export" in capsys.readouterr().err
    (again / "README.md").write_text("stale")
    assert main(["export", str(adapter_run), "--out", str(again), "--overwrite"]) == 0
    assert (again / "README.md").read_text().startswith("---\n")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "run.json"):
        (unfinished / name).write_bytes((adapter_run / name).read_bytes())
    assert main(["export", str(unfinished), "--out", str(tmp_path / "u")]) == 2
    assert "neither adapter/ nor model/" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


#: Runs ``kdlab export`` with huggingface_hub's two network calls replaced: every call and
#: the commit's files (their bytes) are written to calls.json.
_PUSH_DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import huggingface_hub
    from huggingface_hub import HfApi, RepoUrl

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"call": "create_repo", "repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            assert isinstance(operation, huggingface_hub.CommitOperationAdd)
            files[operation.path_in_repo] = Path(operation.path_or_fileobj).read_text(
                encoding="latin-1"
            )
        calls.append({"call": "create_commit", "repo_id": repo_id, "files": files, **kwargs})
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="abc",
        )

    HfApi.create_repo = create_repo
    HfApi.create_commit = create_commit
    from kdlab.cli import main

    code = main(sys.argv[2:])
    Path(sys.argv[1]).write_text(json.dumps(calls))
    sys.exit(code)
    """
)


@pytest.mark.slow
def test_push_to_hub_commits_the_exported_folder(adapter_run: Path, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(_PUSH_DRIVER)
    out = tmp_path / "push"
    calls_file = tmp_path / "calls.json"
    args = ["export", str(adapter_run), "--out", str(out), "--merge"]
    result = subprocess.run(
        [
            sys.executable,
            str(driver),
            str(calls_file),
            *args,
            "--push-to-hub",
            "me/tiny",
            "--private",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "KDLAB_FAULT": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    create, commit = json.loads(calls_file.read_text())
    assert create == {
        "call": "create_repo",
        "repo_id": "me/tiny",
        "private": True,
        "repo_type": "model",
        "exist_ok": True,
    }
    assert commit["repo_id"] == "me/tiny" and commit["commit_message"] == "kdlab export of teacher"
    local = sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.name != "kdlab-export.json"
    )
    assert sorted(commit["files"]) == local
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(local)
    assert commit["files"]["README.md"] == (out / "README.md").read_text(encoding="latin-1")
    assert "library_name: transformers" in commit["files"]["README.md"]
    assert "pushed to https://huggingface.co/me/tiny" in result.stdout


def test_push_failure_is_one_line_and_keeps_the_export(adapter_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "offline"
    result = _kdlab(
        "export",
        str(adapter_run),
        "--out",
        str(out),
        "--push-to-hub",
        "me/tiny",
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kdlab export: error: push to hub me/tiny: OfflineModeIsEnabled")
    assert (out / "README.md").is_file() and (out / "adapter_model.safetensors").is_file()
    bad = _kdlab(
        "export", str(adapter_run), "--out", str(tmp_path / "b"), "--private", cwd=tmp_path
    )
    assert bad.returncode == 2 and "'private' = True: needs push_to_hub" in bad.stderr


def test_config_describes_export(capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.cli import main

    assert main(["config", "export"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert {"run_dir", "out_dir", "merge", "push_to_hub", "private"} <= {
        row.split()[0] for row in rows if row.strip()
    }


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_adapter_names_the_hub_model_and_kdlab_reloads_the_cache(tmp_path: Path) -> None:
    """Plain PEFT sees HuggingFaceTB/SmolLM2-135M-Instruct; kdlab loads the local GGUF cache."""
    pytest.importorskip("gguf")
    from peft import PeftConfig
    from safetensors.torch import load_file

    from kdlab.errors import ModelError
    from kdlab.models.loading import load_run_model, resolve_model_source

    try:
        resolve_model_source("smollm2-135m")
    except ModelError as error:
        pytest.skip(str(error))
    out = tmp_path / "smol"
    overrides = [
        "model.name_or_path=smollm2-135m",
        "data.train_files=['generated:arithmetic?split=train&n=6&seed=0']",
        "data.val_set_size=2",
        "data.cutoff_len=64",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.micro_batch_size=2",
        "train.warmup_steps=0",
        "train.save_steps=0",
        "train.eval_steps=0",
        f"train.output_dir={out}",
    ]
    result = _kdlab("finetune", *overrides, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert PeftConfig.from_pretrained(out / "adapter").base_model_name_or_path == hub_id
    card = _card(out / "adapter" / "README.md")
    assert card.data.base_model == hub_id and card.data.base_model_relation == "adapter"
    assert "Q4_1 GGUF SmolLM2-135M-Instruct.Q4_1.gguf" in card.text
    model, _ = load_run_model(out)  # offline: from the cache, not the hub
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved)
    for key, tensor in saved.items():
        loaded = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(state[loaded], tensor)
