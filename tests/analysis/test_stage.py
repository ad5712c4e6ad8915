"""``kdlab analyze`` end to end: report files, HTML contents, and user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
from PIL import Image

from kdlab.errors import ConfigError, DataError, KdlabError, RunDirError


def test_analyze_run_directories_writes_every_output(fake_sweep, analyze, tmp_path, capsys) -> None:
    out = tmp_path / "analysis"
    assert analyze([fake_sweep.root, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "KD improves over SFT on Average" in printed
    for name in ("report.md", "report.html", "statistics.csv"):
        assert (out / name).is_file()
    section = out / "math"
    for table in ("accuracy", "improvement", "em1", "em2", "bleu", "rouge_l", "runs",
                  "statistics", "paired_average", "paired_tasks"):  # fmt: skip
        assert (section / f"{table}.csv").is_file(), table
        assert (section / f"{table}.tex").read_text().count("\\begin{tabular}") == 1, table
    for plot in ("accuracy_by_temperature", "fidelity_vs_accuracy"):
        assert (section / f"{plot}.png").read_bytes().startswith(b"\x89PNG")
        assert (section / f"{plot}.pdf").read_bytes().startswith(b"%PDF")
        assert b"<svg" in (section / f"{plot}.svg").read_bytes()
        with Image.open(section / f"{plot}.png") as image:
            assert min(image.info["dpi"]) >= 199.9
    # One student size: the size plot is not drawn, and the report says why.
    assert not list(section.glob("improvement_vs_size.*"))
    assert "not drawn: one student size only (0.5B)" in (out / "report.md").read_text()
    accuracy = pd.read_csv(section / "accuracy.csv")
    assert list(accuracy.columns) == ["Teacher", "Student", "Method", "gsm8k", "SVAMP", "Average"]
    rows = accuracy.set_index("Method")
    assert rows.loc["forward_kl_T1", "Average"] == pytest.approx(87.5)
    assert rows.loc["forward_kl_T2", "gsm8k"] == pytest.approx(50.0)
    assert rows.loc["forward_kl_T1", "Teacher"] == "Qwen2.5-1.5B"
    sft = accuracy[accuracy["Method"] == "SFT"].set_index("Student")
    assert sft.loc["Qwen2.5-0.5B", "Average"] == pytest.approx(62.5)
    # The teacher's fine-tune is shown as the teacher, not as an SFT row.
    assert list(sft.index) == ["Qwen2.5-0.5B"]
    teacher = accuracy[accuracy["Method"] == "Teacher"].iloc[0]
    assert (teacher["Student"], teacher["Teacher"], teacher["Average"]) == (
        "Qwen2.5-1.5B",
        "-",
        62.5,
    )
    improvement = pd.read_csv(section / "improvement.csv").iloc[0]
    assert improvement["Method"] == "forward_kl"
    assert improvement["Δ Average"] == pytest.approx(25.0)
    assert improvement["Δ gsm8k"] == pytest.approx(50.0)
    assert improvement["Δ SVAMP"] == pytest.approx(0.0)
    assert improvement["best run (Average)"] == "forward_kl_T1"
    runs = pd.read_csv(section / "runs.csv")
    assert len(runs) == 4
    assert sorted(runs["kind"]) == ["kd", "kd", "sft", "teacher"]
    kd_t2 = runs[runs["Method"] == "forward_kl_T2"].iloc[0]
    assert kd_t2["EM1"] == pytest.approx(50.0) and kd_t2["EM2"] == pytest.approx(50.0)
    statistics = pd.read_csv(out / "statistics.csv")
    # One KD configuration: every run-level test is "not enough data", with its reason; the
    # item-level paired tests run.
    paper = statistics[~statistics["hypothesis"].str.startswith("paired")]
    assert set(paper["status"]) == {"not enough data"} and paper["reason"].notna().all()
    assert "a one-sample t-test needs n >= 3, got 1" in printed
    paired = statistics[statistics["hypothesis"] == "paired: KD vs SFT"]
    assert set(paired["status"]) == {"ok"} and len(paired) == 2 * 3


def test_report_html_is_self_contained(fake_sweep, analyze, tmp_path) -> None:
    out = tmp_path / "analysis"
    analyze([fake_sweep.root, "--out", out])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<table") >= 6 and 'class="dataframe data"' in page
    assert "<h3>Accuracy (%)</h3>" in page and "<th>SVAMP</th>" in page
    assert "<td>87.50</td>" in page  # the T=1 student's Average accuracy
    assert "forward_kl_T1" in page and "Qwen2.5-0.5B" in page
    assert page.count('src="data:image/png;base64,') == 2  # the size plot is not drawn
    assert "(not drawn: one student size only" in page
    assert "<h3>Paired comparisons on the same items (Average)</h3>" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| Teacher | Student | Method | gsm8k | SVAMP | Average |" in markdown
    assert "](math/accuracy_by_temperature.png)" in markdown


def test_analyze_paper_tables(paper_results: Path, analyze, tmp_path, capsys) -> None:
    out = tmp_path / "paper"
    code = analyze([
        "--results-table", paper_results / "math_results_main.csv",
        "--llama-table", paper_results / "llama_math_results.csv",
        "--agreement", paper_results / "EM1.csv",
        "--fidelity", paper_results / "BLEU.csv",
        "--out", out,
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "KD improves over SFT on Average: t = 8.47" in printed
    assert "vs reasoning fidelity (BLEU)" in printed
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3
    assert "SeqKD is the paper&#x27;s label for token-level forward KL" in page
    statistics = pd.read_csv(out / "math_results_main" / "statistics.csv")
    per_method = statistics[(statistics["hypothesis"] == "H1") & (statistics["group"] != "all")]
    assert per_method["p_holm"].notna().all() and set(per_method["family_size"]) == {3}
    assert {"H1", "H1-ANOVA", "H2", "H3", "H4", "H5"} <= set(statistics["hypothesis"])
    assert len(pd.read_csv(out / "math_results_main" / "improvement.csv")) == 33


def test_paper_tables_round_trip_through_kdlab_tables(fake_sweep, analyze, tmp_path) -> None:
    first = tmp_path / "first"
    analyze([fake_sweep.root, "--out", first])
    second = tmp_path / "second"
    analyze([
        "--results-table", first / "math" / "accuracy.csv", "--agreement", first / "math" / "em1.csv",
        "--fidelity", first / "math" / "bleu.csv", "--out", second, "--label", "again",
    ])  # fmt: skip
    before = pd.read_csv(first / "math" / "improvement.csv")
    after = pd.read_csv(second / "again" / "improvement.csv")
    assert after["Δ Average"].tolist() == pytest.approx(before["Δ Average"].tolist())


def test_user_errors(fake_sweep, analyze, tmp_path) -> None:
    out = ["--out", tmp_path / "out"]
    with pytest.raises(ConfigError, match="either"):
        analyze([fake_sweep.root, "--results-table", "x.csv", *out])
    with pytest.raises(ConfigError, match="give run/sweep directories"):
        analyze(out)
    with pytest.raises(ConfigError, match="only goes with --results-table"):
        analyze([fake_sweep.root, "--agreement", "em1.csv", *out])
    with pytest.raises(ConfigError, match="--token-fidelity-data"):
        analyze([fake_sweep.root, "--token-fidelity", *out])
    with pytest.raises(ConfigError, match="alpha"):
        analyze([fake_sweep.root, "--alpha", "2", *out])
    with pytest.raises(DataError, match="does not exist"):
        analyze(["--results-table", tmp_path / "missing.csv", *out])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match=r"no run\.json"):
        analyze([empty, *out])
    not_evaluated = tmp_path / "not_evaluated" / "run"
    not_evaluated.mkdir(parents=True)
    (not_evaluated / "run.json").write_text(
        json.dumps(
            {"stage": "finetune", "role": "student", "name": "run", "model": "m", "method": "sft"}
        )
    )
    with pytest.raises(KdlabError, match="no evaluation outputs"):
        analyze([not_evaluated.parent, *out])


def test_kd_run_without_its_teacher(fake_sweep, analyze, tmp_path) -> None:
    shutil.rmtree(fake_sweep.teacher)
    with pytest.raises(RunDirError, match="teacher"):
        analyze([fake_sweep.root, "--out", tmp_path / "out"])
    assert analyze([fake_sweep.root, "--out", tmp_path / "out", "--allow-missing-teacher"]) == 0
    em1 = pd.read_csv(tmp_path / "out" / "math" / "em1.csv")
    assert em1.empty


class CharTokenizer:
    """A stand-in tokenizer: one id per character (ids 3..63), EOS 2, pad 0."""

    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + ord(character) % 61 for character in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def get_vocab(self) -> dict[str, int]:
        """One vocabulary for every instance (the analysis checks teacher vs student)."""
        return {f"<{index}>": index for index in range(64)}


class ChatCharTokenizer(CharTokenizer):
    """:class:`CharTokenizer` with a chat template; counts the chat prompts it renders."""

    chat_template = "<user>{content}</user><assistant>"
    rendered: ClassVar[list[str]] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **_):
        assert not tokenize
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        ChatCharTokenizer.rendered.append(text)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_token_fidelity_prompts_are_the_students_training_template(
    fake_sweep, analyze, tmp_path, monkeypatch, caplog
) -> None:
    """A student distilled on chat prompts is compared with its teacher on chat prompts
    (``data.template`` of its config.yaml), the others on alpaca ones; the table says which."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import kdlab.models.loading as loading

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    (fake_sweep.kd_t1 / "config.yaml").write_text("data:\n  template: chat\n")
    (fake_sweep.kd_t2 / "config.yaml").write_text("data:\n  cutoff_len: 64\n")  # no template
    # fake_sweep.sft has no config.yaml: alpaca, with a warning

    def fake_load_run_model(run_dir):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), ChatCharTokenizer()

    monkeypatch.setattr(loading, "load_run_model", fake_load_run_model)
    ChatCharTokenizer.rendered = []
    records = tmp_path / "held_out.jsonl"
    records.write_text(
        "".join(
            json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                        "output": f"The answer is {2 * i + 1}.", "answer": str(2 * i + 1)})
            + "\n"
            for i in range(3)
        )
    )  # fmt: skip
    out = tmp_path / "out"
    code = analyze([
        fake_sweep.root, "--out", out, "--token-fidelity", "--token-fidelity-data", records,
        "--token-fidelity-records", "3",
    ])  # fmt: skip
    assert code == 0
    table = pd.read_csv(out / "math" / "token_fidelity.csv").set_index("Method")
    assert table.loc["forward_kl_T1", "template"] == "chat"
    assert set(table.drop(index="forward_kl_T1")["template"]) == {"alpaca"}
    warnings = [r.getMessage() for r in caplog.records if "--token-fidelity" in r.getMessage()]
    assert len(warnings) == 1 and str(fake_sweep.sft.name) in warnings[0]
    # the chat student's three records, each rendered as a chat prompt, and nothing else
    assert len(ChatCharTokenizer.rendered) == 3
    assert all("Add" in text for text in ChatCharTokenizer.rendered)


def test_token_fidelity_wiring(fake_sweep, analyze, tmp_path, monkeypatch) -> None:
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import kdlab.models.loading as loading

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    teacher = LlamaForCausalLM(config).eval()
    models = {
        fake_sweep.teacher.resolve(): teacher,
        fake_sweep.kd_t1.resolve(): copy.deepcopy(teacher),
    }
    loaded: list[Path] = []

    def fake_load_run_model(run_dir):
        loaded.append(Path(run_dir))
        model = models.get(Path(run_dir).resolve())
        if model is None:
            torch.manual_seed(len(loaded))
            model = LlamaForCausalLM(config).eval()
        return model, CharTokenizer()

    monkeypatch.setattr(loading, "load_run_model", fake_load_run_model)
    records = tmp_path / "held_out.jsonl"
    records.write_text(
        "".join(
            json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                        "output": f"{i} + {i + 1} = {2 * i + 1}. The answer is {2 * i + 1}.",
                        "answer": str(2 * i + 1)}) + "\n"
            for i in range(5)
        )
    )  # fmt: skip
    out = tmp_path / "out"
    code = analyze([
        fake_sweep.root, "--out", out, "--token-fidelity", "--token-fidelity-data", records,
        "--token-fidelity-records", "3", "--token-fidelity-batch-size", "2",
    ])  # fmt: skip
    assert code == 0
    table = pd.read_csv(out / "math" / "token_fidelity.csv").set_index("Method")
    assert set(table.index) == {"forward_kl_T1", "forward_kl_T2", "SFT"}
    assert table.loc["forward_kl_T1", "KL(teacher||student) per token"] == pytest.approx(
        0, abs=1e-5
    )
    assert table.loc["forward_kl_T1", "top-1 agreement (%)"] == pytest.approx(100.0)
    assert table.loc["forward_kl_T2", "KL(teacher||student) per token"] > 0
    assert (table["tokens"] > 0).all()
    assert len(loaded) == 4  # the teacher once, each student once
    assert "Token-level fidelity" in (out / "report.html").read_text(encoding="utf-8")
