"""The evaluation's transformers backend: batching, stop strings, eval mode, seeds, pad token."""

from __future__ import annotations

import copy

import pytest
import torch

from kdlab.config.evaluation import EvalGenerationConfig
from kdlab.config.schema import ModelConfig
from kdlab.data.templates import build_prompt
from kdlab.errors import ConfigError
from kdlab.evaluation.generation import HFGenerator, choose_backend
from kdlab.models.generation import StopOnText, StopTexts

PROMPTS = [
    build_prompt("How many apples are left?"),
    build_prompt("He bought 3 more books and sold 2 of them. How many books does he have now?"),
    build_prompt("Is the sky green?\n\nAnswer format: true/false"),
    build_prompt("1 + 1 = ?", "Think step by step."),
]


def test_batched_greedy_equals_one_at_a_time(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    generator = HFGenerator(model, tokenizer, EvalGenerationConfig(max_new_tokens=6))
    lengths = generator.prompt_lengths(PROMPTS)
    assert len(set(lengths)) > 1  # the batch really needs padding
    batched = generator.generate(PROMPTS, batch_size=4)
    single = [generator.generate([prompt], batch_size=1)[0] for prompt in PROMPTS]
    assert batched == single
    assert all(g.generated_tokens == 6 and g.finish_reason == "length" for g in batched)


def test_pad_token_defaults_to_eos(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    assert bare.pad_token_id is None
    HFGenerator(model, bare, EvalGenerationConfig())
    assert bare.pad_token == bare.eos_token and bare.pad_token_id == bare.eos_token_id


def test_model_is_put_in_eval_mode(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    model.train()
    try:
        HFGenerator(model, tokenizer, EvalGenerationConfig(max_new_tokens=2))
        assert not model.training
        assert not any(module.training for module in model.modules())
    finally:
        model.eval()


def test_sampling_is_reproducible_for_a_seed(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    settings = EvalGenerationConfig(preset="paper", max_new_tokens=8)
    generator = HFGenerator(model, tokenizer, settings)
    seeds = [11, 12, 13, 14]
    first = generator.generate(PROMPTS, seeds=seeds, batch_size=4)
    assert generator.generate(PROMPTS, seeds=seeds, batch_size=4) == first
    # A prompt's sample depends on its own seed only: not on its batch or its neighbours.
    alone = [generator.generate([p], seeds=[s], batch_size=1)[0] for p, s in zip(PROMPTS, seeds)]
    assert alone == first
    reversed_order = generator.generate(PROMPTS[::-1], seeds=seeds[::-1], batch_size=2)
    assert reversed_order[::-1] == first
    others = [generator.generate(PROMPTS, seeds=[s + 100] * 4, batch_size=4) for s in range(3)]
    assert any(other != first for other in others)


def test_paper_sampling_has_no_top_k_cut(tiny_model_and_tokenizer) -> None:
    """top_k = 0 must reach generate as "off", not as transformers' default top-50."""
    model, tokenizer = tiny_model_and_tokenizer
    generator = HFGenerator(
        model, tokenizer, EvalGenerationConfig(preset="paper", max_new_tokens=1)
    )
    first_tokens: set[str] = set()
    for seed in range(4):
        seeds = [1000 * seed + row for row in range(64)]
        generations = generator.generate([PROMPTS[0]] * 64, seeds=seeds, batch_size=64)
        first_tokens.update(generation.raw_output for generation in generations)
    # The tiny random model is close to uniform over its 300 tokens: top-50 sampling could
    # never give more than 50 different first tokens.
    assert len(first_tokens) > 50


def test_generation_config_holds_exactly_our_settings(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    paper = HFGenerator(model, tokenizer, EvalGenerationConfig(preset="paper")).generation_config()
    assert paper.do_sample and paper.temperature == 1.0 and paper.top_p == 1.0
    assert paper.top_k == 0  # off
    assert paper.max_new_tokens == 256
    greedy = HFGenerator(model, tokenizer, EvalGenerationConfig()).generation_config()
    assert not greedy.do_sample and greedy.num_beams == 1
    assert greedy.pad_token_id == tokenizer.pad_token_id


def test_stop_criterion_is_per_row(tiny_model_and_tokenizer) -> None:
    _, tokenizer = tiny_model_and_tokenizer
    prompt = tokenizer("Prompt:", add_special_tokens=False)["input_ids"]
    rows = [
        prompt
        + tokenizer(" The answer is 4.\n\n### Instruction:", add_special_tokens=False)["input_ids"],
        prompt
        + tokenizer(" The answer is 4. And more text", add_special_tokens=False)["input_ids"],
    ]
    width = max(len(row) for row in rows)
    pad = tokenizer.eos_token_id
    batch = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    stop = StopTexts(tokenizer, ["### Instruction"])
    assert stop.matches([row[len(prompt) :] for row in rows]) == [True, False]
    criterion = StopOnText(stop, prompt_width=len(prompt))
    assert criterion(batch, None).tolist() == [True, False]
    # A prompt that itself contains the marker does not stop generation.
    criterion = StopOnText(stop, prompt_width=width)
    assert criterion(batch, None).tolist() == [False, False]


def test_backend_choice_without_vllm() -> None:
    settings = EvalGenerationConfig()
    assert choose_backend("auto", ModelConfig(), settings) == "hf"
    assert choose_backend("hf", ModelConfig(), settings) == "hf"
    with pytest.raises(ConfigError, match="vllm"):
        choose_backend("vllm", ModelConfig(), settings)
