"""Training runs compute what their config says (issue 12, items 4, 5 and 7): seqKD caches
keyed by the teacher's weights and honest about truncation, sliced students saved as the
model they are, a clean teacher in validation, one mixing rule for GKD batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.cli import main as cli_main
from kdlab.config.core import load_config
from kdlab.config.paper_args import import_paper_train_args
from kdlab.config.schema import DistillConfig, DistillSettings, FinetuneConfig, ModelConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, tokenize_records
from kdlab.models.generation import GeneratedTokens
from kdlab.models.loading import load_model_and_tokenizer
from kdlab.models.peft_utils import apply_peft
from kdlab.training import distill as distill_module
from kdlab.training import objectives as objectives_module
from kdlab.training.distill import run_distill
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import list_checkpoints, load_trainable_state
from kdlab.training.objectives import ON_POLICY_KEY, DistillationObjective
from kdlab.training.seqkd import TeacherResponse
from kdlab_testing import distill_overrides, finetune_overrides


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("KDLAB_CACHE", str(directory))
    return directory


def _distill(student: Path, teacher: Path, out: Path, method: str, *extra: str) -> DistillConfig:
    return load_config(
        DistillConfig, None, distill_overrides(student, teacher, out, method, *extra)
    )


def _full_teacher(model_dir: Path, out: Path, *extra: str) -> Path:
    args = finetune_overrides(model_dir, out, "peft.method=full", "train.max_steps=2", *extra)
    run_finetune(load_config(FinetuneConfig, None, args), overwrite=True)
    return out


# ------------------------------------------------------------------ 12.4 seqKD


def test_seqkd_cache_is_rebuilt_for_a_teacher_retrained_in_place(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """A full fine-tune teacher has no adapter hash: today's main keyed its responses by
    path alone and reused 16 of 16 stale responses after the teacher was retrained."""
    teacher = _full_teacher(tiny_teacher_dir, tmp_path / "teacher")
    run = [f"teacher.run_dir={teacher}"]
    first = run_distill(_distill(tiny_model_dir, tiny_model_dir, tmp_path / "a", "seqkd", *run))
    _full_teacher(tiny_teacher_dir, teacher, "train.learning_rate=5e-2", "train.seed=9")
    second = run_distill(_distill(tiny_model_dir, tiny_model_dir, tmp_path / "b", "seqkd", *run))
    assert first["seqkd"]["cache"] != second["seqkd"]["cache"]
    assert second["seqkd"]["generated"] == first["seqkd"]["generated"] > 0
    assert second["seqkd"]["cached"] == 0
    meta = json.loads((Path(second["seqkd"]["cache"]) / "meta.json").read_text())
    assert meta["teacher_weights"] and meta["batch_size"] == 8


def test_truncated_teacher_responses_get_no_eos(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """A random tiny teacher never says EOS in 6 tokens: every response is cut by
    max_new_tokens. Today's main appended EOS to 40 of 40 such targets."""
    out = tmp_path / "run"
    summary = run_distill(_distill(tiny_model_dir, tiny_teacher_dir, out, "seqkd"))
    info = summary["seqkd"]
    assert info["truncated"] == info["generated"] == 24
    responses = [json.loads(line) for line in (Path(info["cache"]) / "responses.jsonl").open()]
    assert {r["finish_reason"] for r in responses} == {"length"}
    _, tokenizer = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)))
    records = load_records("generated:arithmetic?split=train&n=24&seed=0")
    texts = [r["response"] for r in sorted(responses, key=lambda r: r["index"])]
    cut = tokenize_records(records, tokenizer, responses=texts, complete=[False] * len(texts))
    whole = tokenize_records(records, tokenizer, responses=texts)
    eos = tokenizer.eos_token_id
    assert all(example["labels"][-1] != eos for example in cut)
    assert all(example["labels"][-1] == eos for example in whole)


def test_seqkd_drop_truncated_drops_only_the_cut_responses(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_responses(*, records, **_kwargs):
        answers = [
            TeacherResponse(f"The answer is {i}.", "eos" if i % 3 else "length")
            for i in range(len(records))
        ]
        return answers, {"truncated": sum(not a.complete for a in answers)}

    monkeypatch.setattr(distill_module, "teacher_responses", fake_responses)
    out = tmp_path / "run"
    config = _distill(
        tiny_model_dir, tiny_teacher_dir, out, "seqkd", "distill.seqkd_drop_truncated=true"
    )
    summary = run_distill(config)
    assert summary["seqkd"]["dropped_truncated"] == 8
    assert summary["train_records"] + summary["validation_records"] == 24 - 8


# ------------------------------------------------------------------ 12.5 sliced students


def test_a_sliced_lora_student_saves_the_model_it_is(
    tiny_teacher_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """Today's main wrote only adapter/, whose base is the *unsliced* model: PEFT and
    transformers loaded it onto the full model with only a warning."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sliced"
    slicing = ["student.slice_layers=2", "student.slice_strategy=last", "train.learning_rate=1e-2"]
    config = _distill(tiny_teacher_dir, tiny_teacher_dir, out, "forward_kl", *slicing)
    run_distill(config)
    assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
    plain = AutoModelForCausalLM.from_pretrained(out / "model")
    assert plain.config.num_hidden_layers == 2
    # kdlab's own rebuild: the sliced base + the LoRA weights of the final checkpoint
    rebuilt, tokenizer = load_model_and_tokenizer(config.student, for_training=True)
    rebuilt = apply_peft(rebuilt, config.peft)
    _step, checkpoint = list_checkpoints(out)[-1]
    load_trainable_state(rebuilt, load_file(checkpoint / "trainable.safetensors"))
    rebuilt.eval()
    ids = tokenizer("Tom has 3 apples and buys 4 more.", return_tensors="pt")
    with torch.no_grad():
        expected = rebuilt(**ids).logits
        actual = plain(**ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    base, _ = load_model_and_tokenizer(config.student)
    with torch.no_grad():
        assert (base(**ids).logits - actual).abs().max() > 1e-4  # the adapter is in it


# ------------------------------------------------------------------ 12.7 smaller items


def _metrics(out: Path) -> tuple[list[float], list[float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line["kd"] for line in lines if line.get("split") != "val"]
    val = [line["val_kd"] for line in lines if line.get("split") == "val"]
    return train, val


def test_teacher_noise_perturbs_training_but_validation_uses_the_clean_teacher(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    runs = {}
    for name, sigma in (("clean", "0.0"), ("noisy", "5.0"), ("noisy-again", "5.0")):
        out = tmp_path / name
        run_distill(
            _distill(
                tiny_model_dir,
                tiny_teacher_dir,
                out,
                "forward_kl",
                f"distill.noise_std={sigma}",
                "train.eval_steps=1",
            )
        )
        runs[name] = _metrics(out)
    clean_train, clean_val = runs["clean"]
    noisy_train, noisy_val = runs["noisy"]
    assert noisy_train[0] != pytest.approx(clean_train[0], rel=1e-3)  # noise reaches the loss
    assert runs["noisy-again"] == runs["noisy"]  # and is a function of the seed
    # step 1's validation ran before any update: the clean teacher, whatever the noise
    assert noisy_val[0] == pytest.approx(clean_val[0], rel=1e-6)


def test_on_policy_batches_follow_the_same_mixing_rule(
    tiny_model_dir: Path, tiny_teacher_dir: Path
) -> None:
    student, tokenizer = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)))
    teacher, _ = load_model_and_tokenizer(ModelConfig(str(tiny_teacher_dir)))
    settings = DistillSettings(method="gkd", lambda_on_policy=1.0, kd_weight=0.5)
    settings.generation.max_new_tokens = 4
    objective = DistillationObjective(
        settings=settings,
        teacher=teacher,
        tokenizer=tokenizer,
        vocab_size=None,
        seed=0,
        cutoff_len=256,
        unwrap=lambda model: model,
    )
    records = load_records("generated:arithmetic?split=train&n=2&seed=0")
    batch = Collator(tokenizer.pad_token_id)(tokenize_records(records, tokenizer))
    sampled = objective.prepare(student, batch, True)
    assert bool(sampled[ON_POLICY_KEY])
    assert objective.weights == {"ce": 0.5, "kd": 0.5}  # (1 − w)·CE + w·KD for every batch
    counts = objective.counts(sampled)
    assert counts["ce"] == 0 and counts["kd"] > 0  # a sampled response has no gold CE
    result = objective(student, sampled, True)
    assert set(result.sums) == {"kd"}


def test_student_samples_keep_sampled_pad_tokens(
    tiny_model_dir: Path, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sample without EOS ran to the budget: each of its tokens was sampled, the pad id
    included. Today's main dropped them."""
    student, tokenizer = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert pad != eos
    settings = DistillSettings(method="gkd", lambda_on_policy=1.0)
    objective = DistillationObjective(
        settings=settings,
        teacher=None,
        tokenizer=tokenizer,
        vocab_size=None,
        seed=0,
        cutoff_len=256,
        unwrap=lambda model: model,
    )
    records = load_records("generated:arithmetic?split=train&n=2&seed=0")
    batch = Collator(pad)(tokenize_records(records, tokenizer))
    calls = {}

    def fake_generate_tokens(model, prompts, **kwargs):
        calls.update(kwargs, prompts=prompts)
        return [GeneratedTokens([7, pad, 9], "length"), GeneratedTokens([5, eos], "eos")]

    monkeypatch.setattr(objectives_module, "generate_tokens", fake_generate_tokens)
    samples = objective.student_samples(student, batch)
    # each row: its own prompt, its own budget and seed (not the padded batch's width)
    lengths = batch["prompt_lengths"].tolist()
    assert [len(p) for p in calls["prompts"]] == lengths
    assert calls["max_new_tokens"] == [min(128, 256 - n) for n in lengths]
    assert len(set(calls["seeds"])) == 2
    responses = [[int(t) for t in row[row != -100]] for row in samples["labels"]]
    assert responses == [[7, pad, 9], [5, eos]]


def test_kdlab_config_distill_shows_the_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "distill"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "train.output_dir" in line]
    assert len(lines) == 1 and "'runs/distill'" in lines[0], lines


def test_paper_gkd_args_map_as_the_paper_ran_them(tmp_path: Path) -> None:
    """The paper's GKD ignored kd_temperature and had no T²; today's main applied both."""
    args = tmp_path / "train_args.json"
    args.write_text(json.dumps({"kd_loss": "gkd", "kd_temperature": 2.0}))
    mapped = import_paper_train_args(args, stage="distill")
    assert mapped["distill"] == {"method": "gkd", "scale_by_t2": False}
    config = load_config(DistillConfig, None, [], base=mapped)
    assert config.distill.temperature == 1.0 and not config.distill.scale_by_t2
    args.write_text(json.dumps({"kd_loss": "kld", "kd_temperature": 2.0}))
    assert import_paper_train_args(args, stage="distill")["distill"]["temperature"] == 2.0
