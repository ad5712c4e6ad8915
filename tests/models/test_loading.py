"""Model loading: local folders, errors, the smollm2-135m alias with its safetensors cache,
layer slicing, vocabulary checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.cli import main as cli_main
from kdlab.config.schema import ModelConfig
from kdlab.errors import ModelError
from kdlab.models import (
    check_vocab_compatibility,
    load_model_and_tokenizer,
    resolve_model_source,
    select_layer_indices,
    shared_vocab_size,
)
from kdlab.models.loading import _gguf_cache_dir, cache_root
from kdlab_testing import build_tiny_tokenizer


def test_local_directory_loads_in_eval_mode_float32(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert all(not p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None


def test_training_mode_keeps_gradients(tiny_model_dir: Path) -> None:
    model, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(tiny_model_dir)), for_training=True
    )
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("/nonexistent/model/dir", "no such file"),
        ("./relative/missing", "no such file"),
        ("justaname", "not a hub id"),
        ("missing.gguf", "GGUF file not found"),
    ],
)
def test_unresolvable_names_raise_model_error(name: str, needle: str) -> None:
    with pytest.raises(ModelError, match=needle):
        resolve_model_source(name)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model_source(str(tmp_path))


def test_hub_ids_are_recognised_without_loading() -> None:
    source = resolve_model_source("Qwen/Qwen2.5-0.5B")
    assert source.kind == "hub" and source.identity == "Qwen/Qwen2.5-0.5B"


def test_pickle_only_weights_are_refused_unless_allowed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    target = tmp_path / "pickle-model"
    target.mkdir()
    model.config.save_pretrained(target)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    build_tiny_tokenizer().save_pretrained(target)
    with pytest.raises(ModelError, match="pickle"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(target)))
    loaded, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(target), allow_pickle=True))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("last", [6, 7, 8, 9]),
        ("first", [0, 1, 2, 3]),
        ("even", [0, 3, 6, 9]),
        ("ends", [0, 1, 8, 9]),
    ],
)
def test_layer_selection(strategy: str, expected: list[int]) -> None:
    assert select_layer_indices(10, 4, strategy) == expected


def test_slice_larger_than_model_is_refused() -> None:
    with pytest.raises(ModelError, match="has 10 layers"):
        select_layer_indices(10, 11)


def test_sliced_student_trains_saves_reloads_and_generates(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    config = ModelConfig(name_or_path=str(tiny_teacher_dir), slice_layers=2, slice_strategy="even")
    model, tokenizer = load_model_and_tokenizer(config, for_training=True)
    layers = model.model.layers
    assert len(layers) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1]
    # one training step
    batch = tokenizer(["Tom has 3 apples. The answer is 3."], return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    # save, reload with plain from_pretrained, generate with the KV cache
    model.save_pretrained(tmp_path / "slice")
    tokenizer.save_pretrained(tmp_path / "slice")
    reloaded, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "slice")))
    assert reloaded.config.num_hidden_layers == 2
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name])
    out = reloaded.generate(**batch, max_new_tokens=5, do_sample=False)
    no_cache = reloaded.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)


def test_vocab_check(tiny_model_dir: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    check_vocab_compatibility(tokenizer, build_tiny_tokenizer())
    other = build_tiny_tokenizer()
    other.add_tokens(["<new>"])
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_vocab_compatibility(tokenizer, other)


def test_padded_logit_widths_use_the_shared_vocabulary(tmp_path: Path) -> None:
    from kdlab_testing import build_tiny_model

    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_model(len(tokenizer) + 64)  # padding rows, as Qwen2.5 7B/14B have
    student = build_tiny_model(len(tokenizer))
    assert shared_vocab_size(teacher, student, tokenizer) == len(tokenizer)
    too_small = build_tiny_model(len(tokenizer) - 10)
    with pytest.raises(ModelError, match="smaller"):
        shared_vocab_size(teacher, too_small, tokenizer)


def test_models_cli(tiny_model_dir: Path, capsys) -> None:
    assert cli_main(["models", "resolve", str(tiny_model_dir)]) == 0
    assert "kind: directory" in capsys.readouterr().out
    assert cli_main(["models", "info", str(tiny_model_dir), "--json"]) == 0
    assert '"layers": 2' in capsys.readouterr().out
    assert cli_main(["models", "resolve", "/no/such/model"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_alias_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded model: converted once to a safetensors cache, then loaded from it."""
    pytest.importorskip("gguf")
    try:
        source = resolve_model_source("smollm2-135m")
    except ModelError as error:
        pytest.skip(str(error))
    assert source.kind == "alias" and source.gguf_file.endswith(".gguf")
    cache = _gguf_cache_dir(source)
    assert cache.is_relative_to(cache_root())
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    assert (cache / "model.safetensors").is_file() and (cache / "kdlab-cache.json").is_file()
    assert model.config.num_hidden_layers == 30
    assert "quantization_config" not in (cache / "config.json").read_text()
    model.save_pretrained(tmp_path / "resaved")  # a full fine-tune must be able to save it

    import transformers

    calls = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    again, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    # read from the safetensors cache, not converted again (no timing: that is what proves it)
    assert calls == [None]
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    prompt = tokenizer("What is 2 + 3?", return_tensors="pt")
    output = again.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert isinstance(text, str) and output.shape[1] > prompt["input_ids"].shape[1]
