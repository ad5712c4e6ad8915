"""An evaluated adapter is active (issue 21): ``kdlab eval run_dir=<run with adapter/>``
answers what the adapted model answers, not what its base model answers.

The reference is PEFT's own model with the adapter merged into the weights
(``merge_and_unload``), saved as a plain model and evaluated like any model: the adapter
run's predictions must equal its predictions and differ from the base model's. An adapter
loaded but silently disabled (or never attached) gives the base model's predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdlab.cli import invoke
from kdlab.config.run_identity import RunIdentity
from kdlab.utils.io import read_jsonl


@pytest.fixture
def adapter_run(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a finetune-style run dir with a LoRA adapter that moves the logits, the same
    adapter merged by PEFT into a standalone model directory)."""
    import yaml
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20.0)
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}})
    )
    identity = RunIdentity(stage="finetune", role="teacher", name="t", model=str(tiny_model_dir))
    (run_dir / "run.json").write_text(json.dumps(identity.to_dict()))
    merged_dir = tmp_path / "merged"
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter"
    )
    plain.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(merged_dir)
    return run_dir, merged_dir


def _predictions(out: Path) -> list[str]:
    return [r["output"] for r in read_jsonl(out / "hellaswag" / "predictions.jsonl")]


def test_an_evaluated_adapter_answers_as_the_adapted_model(
    tiny_model_dir: Path, hellaswag_dir: Path, adapter_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, merged_dir = adapter_run
    common = ("tasks=hellaswag", f"data_dir={hellaswag_dir}", "generation.max_new_tokens=8")
    assert invoke(["eval", f"run_dir={run_dir}", *common]) == 0
    assert invoke(["eval", f"model={merged_dir}", f"output_dir={tmp_path / 'm'}", *common]) == 0
    assert invoke(["eval", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'b'}", *common]) == 0
    adapted = _predictions(run_dir / "eval")
    assert adapted == _predictions(tmp_path / "m")
    assert adapted != _predictions(tmp_path / "b")
