"""The generation engine (kdlab.models.generation) against transformers' ``generate``.

The reference below is main's ``HFGenerator.generate`` before the engine existed, frozen:
left-padded ``model.generate`` with the KV cache and a per-row stop criterion on decoded text.
Greedy outputs of the engine must equal it on many prompts of different lengths, with every
finish reason (EOS, stop text, budget) occurring.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from kdlab.data.templates import build_prompt
from kdlab.data.tokenize import encode_prompt
from kdlab.models import generation as engine_module
from kdlab.models.generation import (
    GeneratedTokens,
    Sampling,
    StopTexts,
    derive_seed,
    engine_unsupported_reason,
    finish_row,
    generate_tokens,
)

_QUESTION = "Tom has 12 apples and buys 7 more . How many apples does he have now ?"
WORDS = _QUESTION.split()


def _prompts(count: int = 36) -> list[str]:
    prompts = []
    for index in range(count):
        words = (WORDS * 4)[index % 5 : index % 5 + 3 + (index * 7) % 29]
        instruction = " ".join(words)
        # Every fourth prompt has an input block: another preamble, a shorter shared prefix.
        extra = "Answer format: true/false" if index % 4 == 3 else ""
        prompts.append(build_prompt(instruction, extra))
    return prompts


class _FrozenStopOnText:
    """main's StopOnText (verbatim logic): stop a row once its decoded tail has a stop text."""

    def __init__(self, tokenizer, prompt_width, stop_texts, window=24):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.stop_texts, self.window = tuple(stop_texts), window
        self._done = None

    def __call__(self, input_ids, scores=None, **kwargs):
        if self._done is None or self._done.shape[0] != input_ids.shape[0]:
            self._done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0 or not self.stop_texts:
            return self._done.clone()
        tail = generated[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        for row, text in enumerate(texts):
            if not self._done[row] and any(stop in text for stop in self.stop_texts):
                self._done[row] = True
        return self._done.clone()


def reference_generate(model, tokenizer, prompts, *, max_new_tokens, eos_ids, stop_texts, batch):
    """main's HFGenerator.generate, ``batch`` prompts at a time: (texts, padded new tokens)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    texts, rows = [], []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=list(eos_ids),
        )
        criterion = _FrozenStopOnText(tokenizer, width, stop_texts)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([criterion]),
            )
        new_tokens = output[:, width:].tolist()
        rows.extend(new_tokens)
        texts.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return texts, rows


def _token_in_a_third(rows: list[list[int]], exclude: tuple[int, ...]) -> int:
    """The token found in closest to a third of ``rows``, each time after position 1."""
    found: Counter[int] = Counter(token for row in rows for token in set(row))
    early = {token for row in rows for token in row[:2]}
    candidates = [t for t in found if t not in early and t not in exclude]
    return min(candidates, key=lambda t: (abs(found[t] - len(rows) / 3), t))


@pytest.fixture(scope="module")
def scenario(tiny_model_and_tokenizer):
    """Prompts plus an EOS set and a stop text chosen so that all three finish reasons occur
    (the random tiny model never emits its real EOS by itself)."""
    model, tokenizer = tiny_model_and_tokenizer
    prompts = _prompts()
    budget = 14
    _, rows = reference_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=budget,
        eos_ids=[tokenizer.eos_token_id],
        stop_texts=(),
        batch=len(prompts),
    )
    # A token that about a third of the rows produce, never as their first two tokens,
    # becomes an extra EOS ...
    eos_token = _token_in_a_third(rows, exclude=())
    eos_ids = [eos_token, tokenizer.eos_token_id]
    # ... and the decoded text of another one, in a third of the other rows, a stop text.
    others = [row for row in rows if eos_token not in row]
    stop_token = _token_in_a_third(others, exclude=(eos_token,))
    stop_text = tokenizer.decode([stop_token])
    return prompts, budget, eos_ids, (stop_text,)


def _engine(model, tokenizer, prompts, budget, eos_ids, stop_texts, **kwargs):
    return generate_tokens(
        model,
        [encode_prompt(tokenizer, p) for p in prompts],
        max_new_tokens=budget,
        eos_token_ids=eos_ids,
        stop=StopTexts(tokenizer, stop_texts),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("batch_size", "share_prefix"), [(1, True), (3, True), (8, False), (8, True), (64, True)]
)
def test_greedy_equals_generate_on_many_prompts(
    tiny_model_and_tokenizer, scenario, batch_size, share_prefix
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    prompts, budget, eos_ids, stop_texts = scenario
    lengths = {len(encode_prompt(tokenizer, p)) for p in prompts}
    assert len(lengths) > 20  # many different prompt lengths
    texts, rows = reference_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=budget,
        eos_ids=eos_ids,
        stop_texts=stop_texts,
        batch=1,
    )
    results = _engine(
        model,
        tokenizer,
        prompts,
        budget,
        eos_ids,
        stop_texts,
        batch_size=batch_size,
        share_prefix=share_prefix,
    )
    assert [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results] == texts
    pad = tokenizer.pad_token_id
    for result, row in zip(results, rows, strict=True):
        # The same tokens; the reference has nothing but padding after the engine's end.
        assert row[: len(result.tokens)] == result.tokens
        assert all(token == pad for token in row[len(result.tokens) :])
    reasons = Counter(result.finish_reason for result in results)
    assert min(reasons[reason] for reason in ("eos", "stop", "length")) >= 3, reasons
    for result in results:
        decoded = tokenizer.decode(result.tokens, skip_special_tokens=True)
        if result.finish_reason == "eos":
            assert result.tokens[-1] in eos_ids
        elif result.finish_reason == "stop":
            before = tokenizer.decode(result.tokens[:-1], skip_special_tokens=True)
            assert any(s in decoded for s in stop_texts)
            assert not any(s in before for s in stop_texts)
        else:
            assert len(result.tokens) == budget


def test_greedy_equals_batched_generate(tiny_model_and_tokenizer, scenario) -> None:
    """Also against the reference's own batched mode (left padding across 12 rows)."""
    model, tokenizer = tiny_model_and_tokenizer
    prompts, budget, eos_ids, stop_texts = scenario
    texts, _ = reference_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=budget,
        eos_ids=eos_ids,
        stop_texts=stop_texts,
        batch=12,
    )
    results = _engine(model, tokenizer, prompts, budget, eos_ids, stop_texts, batch_size=5)
    assert [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results] == texts


def test_eager_attention_and_peft_model_equal_generate(tiny_model_dir, scenario) -> None:
    """The eager kernel takes an additive float mask; a PEFT wrapper must pass the cache on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts, budget, eos_ids, stop_texts = scenario
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    lora = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    lora.init_lora_weights = False  # a non-zero adapter: it must change the outputs
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, lora)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for model in (eager, peft_model, plain):
        model.eval()
    subset = prompts[:12]
    outputs = {}
    for name, model in (("eager", eager), ("peft", peft_model), ("plain", plain)):
        texts, _ = reference_generate(
            model,
            tokenizer,
            subset,
            max_new_tokens=budget,
            eos_ids=eos_ids,
            stop_texts=stop_texts,
            batch=1,
        )
        results = _engine(model, tokenizer, subset, budget, eos_ids, stop_texts, batch_size=4)
        outputs[name] = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
        assert outputs[name] == texts, name
    assert outputs["peft"] != outputs["plain"]


def test_rows_are_refilled_and_the_prefix_is_prefilled_once(
    tiny_model_and_tokenizer, scenario, monkeypatch
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    prompts, budget, eos_ids, stop_texts = scenario
    prompts = prompts[:10]
    widths: list[tuple[int, int]] = []
    admitted_beside: list[int] = []
    original_forward = engine_module._Engine._forward
    original_admit = engine_module._Engine._admit

    def forward(self, input_ids, position_ids, allowed):
        widths.append(tuple(input_ids.shape))
        return original_forward(self, input_ids, position_ids, allowed)

    def admit(self, queue):
        admitted_beside.append(len(self.request))
        return original_admit(self, queue)

    monkeypatch.setattr(engine_module._Engine, "_forward", forward)
    monkeypatch.setattr(engine_module._Engine, "_admit", admit)
    results = _engine(model, tokenizer, prompts, budget, eos_ids, stop_texts, batch_size=3)
    assert len(results) == 10
    # Never more rows than slots; new prompts join while other rows are still decoding.
    assert max(rows for rows, _ in widths) <= 3
    assert any(active > 0 for active in admitted_beside)
    # Prefills (more than one input column) hold only what follows the shared prefix.
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    shared = engine_module._shared_prefix(encoded)
    assert shared >= 20  # the Alpaca header
    prefill_widths = [width for _, width in widths if width > 1]
    assert max(prefill_widths) <= max(len(ids) for ids in encoded) - shared


def test_per_prompt_budgets_cut_the_same_tokens(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    prompts = [encode_prompt(tokenizer, p) for p in _prompts(6)]
    eos = [tokenizer.eos_token_id]
    long = generate_tokens(model, prompts, max_new_tokens=9, eos_token_ids=eos, batch_size=2)
    budgets = [1, 2, 3, 5, 8, 9]
    short = generate_tokens(model, prompts, max_new_tokens=budgets, eos_token_ids=eos)
    for whole, cut, budget in zip(long, short, budgets, strict=True):
        assert cut == GeneratedTokens(whole.tokens[:budget], "length")


def test_top_k_one_and_tiny_top_p_sample_the_greedy_token(tiny_model_and_tokenizer) -> None:
    """The filters take effect: with one candidate left, sampling is greedy decoding."""
    model, tokenizer = tiny_model_and_tokenizer
    prompts = [encode_prompt(tokenizer, p) for p in _prompts(5)]
    eos = [tokenizer.eos_token_id]
    greedy = generate_tokens(model, prompts, max_new_tokens=8, eos_token_ids=eos)
    seeds = list(range(5))
    for sampling in (
        Sampling(do_sample=True, top_k=1),
        Sampling(do_sample=True, top_p=1e-6),
        Sampling(do_sample=True, temperature=1e-4),
    ):
        sampled = generate_tokens(
            model, prompts, max_new_tokens=8, eos_token_ids=eos, sampling=sampling, seeds=seeds
        )
        assert sampled == greedy, sampling
    plain = generate_tokens(
        model,
        prompts,
        max_new_tokens=8,
        eos_token_ids=eos,
        sampling=Sampling(do_sample=True),
        seeds=seeds,
    )
    assert plain != greedy


def test_beam_search_goes_through_generate(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    assert engine_unsupported_reason(model, Sampling()) is None
    assert engine_unsupported_reason(model, Sampling(num_beams=2)) == "beam search"
    prompts = [encode_prompt(tokenizer, p) for p in _prompts(3)]
    results = generate_tokens(
        model,
        prompts,
        max_new_tokens=5,
        eos_token_ids=[tokenizer.eos_token_id],
        sampling=Sampling(num_beams=2),
        pad_token_id=tokenizer.pad_token_id,
    )
    assert [len(r.tokens) for r in results] == [5, 5, 5]
    assert {r.finish_reason for r in results} == {"length"}


def test_finish_row_drops_padding_after_the_end(tiny_model_and_tokenizer) -> None:
    _, tokenizer = tiny_model_and_tokenizer
    eos = tokenizer.eos_token_id
    stop = StopTexts(tokenizer, ["### Instruction"])
    marker = tokenizer("x\n### Instruction:", add_special_tokens=False)["input_ids"]
    assert finish_row([5, 6, eos, eos, eos], 10, [eos]) == GeneratedTokens([5, 6, eos], "eos")
    stopped = finish_row([7, *marker, eos, eos], 40, [eos], stop)
    assert stopped.finish_reason == "stop"
    assert "### Instruction" in tokenizer.decode(stopped.tokens)
    assert eos not in stopped.tokens
    assert finish_row([5, 6, 7, 8], 3, [eos]) == GeneratedTokens([5, 6, 7], "length")


def test_derived_seeds_are_stable_and_unrelated() -> None:
    assert derive_seed(6, 0) == derive_seed(6, 0)
    assert 0 <= derive_seed(6, 0) < 2**63
    seeds = {derive_seed(seed, index) for seed in range(20) for index in range(20)}
    assert len(seeds) == 400  # seed + index would collide (6, 1) with (7, 0)


def test_bad_input_is_refused(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    eos = [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="no tokens"):
        generate_tokens(model, [[]], max_new_tokens=3, eos_token_ids=eos)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(model, [[1, 2]], max_new_tokens=0, eos_token_ids=eos)
    training = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="eval mode"):
        generate_tokens(training, [[1, 2]], max_new_tokens=3, eos_token_ids=eos)
