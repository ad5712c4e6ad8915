"""Batched generation for evaluation, on-policy GKD and seqKD: token ids in, token ids out.

One engine serves every caller::

    from kdlab.models.generation import Sampling, StopTexts, generate_tokens

    results = generate_tokens(
        model,                       # a causal LM (PEFT-wrapped or not), in eval mode
        prompts,                     # list of token-id lists (prompt i, BOS included if any)
        max_new_tokens=256,          # an int, or one budget per prompt
        eos_token_ids=[2],
        sampling=Sampling(),         # greedy; Sampling(do_sample=True, temperature=..., ...)
        stop=StopTexts(tokenizer, ["### Instruction"]),   # or None
        seeds=[...],                 # one per prompt (sampling only)
        batch_size=16,               # rows decoded together
    )
    results[i].tokens         # the ids generated for prompt i: no prompt, no padding; they end
                              # with the EOS token ("eos"), the token that completed a stop
                              # text ("stop"), or after the budget ("length")
    results[i].finish_reason  # "eos", "stop" or "length"

``on_result(i, result)`` is called as soon as prompt i is finished (the evaluation runner
writes its prediction line there), in completion order; the returned list is in prompt order.

How it runs (continuous batching on a slot KV cache):

- **Slots.** Up to ``batch_size`` rows are decoded together. Each row owns one slot of a
  preallocated ``[slots, kv_heads, capacity, head_dim]`` key and value buffer per layer
  (:class:`SlotCache`); a row's tokens sit in its slot's first columns, each decoding step
  writes every row's new key/value at that row's own next column, and attention reads the
  first ``width`` columns (the longest row) with a per-row mask, so nothing is concatenated
  or shifted per step (transformers' ``DynamicCache`` copies the whole cache every step).
- **Continuous batching.** Prompts are taken longest first. A row that finishes (EOS, stop
  text, budget) is retired at once (the last row moves into its slot) and a waiting prompt
  is prefilled into the free slot, so one long answer no longer holds a whole batch.
- **Shared prefix.** The token prefix that every prompt of the call shares (the Alpaca
  template's header) is run once; its keys/values are copied into each new row's slot and
  only the rest of the prompt is prefilled. A row is laid out as ``[prefix][gap][suffix]``:
  new rows prefilled together (rows of similar length: at most :data:`PREFILL_PADDING`
  positions per real token) right-align their suffixes (the gap is masked), so the last
  prompt token of each row is in the same column and one logits position suffices.
- **Positions** are per row (``position_ids`` count the row's real tokens, as
  ``generate``'s left padding does), so the gap and the slot layout change nothing.
- **Decoding**: greedy is ``argmax`` of the float32 logits (ties: lowest id, as
  ``generate``); sampling applies temperature, top-k (0 = off) and top-p (1 = off) in
  ``generate``'s order and draws from a per-row ``torch.Generator`` seeded by ``seeds[i]``,
  so a sample depends on its prompt and seed only, not on which rows share its batch or on
  a resumed run. The model's own ``generation_config`` is ignored (a hub model's
  ``repetition_penalty`` or ``top_k`` would otherwise change kdlab's decoding unasked).

Greedy outputs equal ``model.generate``'s (left-padded, KV cache, the same stop rule) up to
floating-point summation order: a different batch or prefix split can move a logit by an
ulp, as ``generate`` itself does between batch sizes (tests/evaluation/test_generation.py
compares the two on many prompts).

Fallback: beam search, sliding-window or non-attention layers, and attention kernels other
than ``sdpa``/``eager`` go through ``model.generate`` in length-sorted batches of
``batch_size``, with the same stop rule and the same result type (sampling there is seeded
once per batch with ``torch.manual_seed`` of its first prompt's seed).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

logger = logging.getLogger(__name__)

#: Why a row stopped: its EOS token, a stop text in its decoded tail, or its token budget.
FINISH_REASONS = ("eos", "stop", "length")

#: A prefill of several new rows holds at most this many positions per real prompt token
#: (the rest is padding up to its longest suffix); longer rows are prefilled apart.
PREFILL_PADDING = 1.25

ResultCallback = Callable[[int, "GeneratedTokens"], None]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy by default.

    ``top_k = 0`` and ``top_p = 1`` mean off; ``temperature``, ``top_k`` and ``top_p`` are
    read only when ``do_sample``. ``num_beams > 1`` is beam search (the fallback path).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.num_beams < 1:
            raise ValueError("top_k must be >= 0 and num_beams >= 1")


@dataclass(frozen=True)
class GeneratedTokens:
    """What one prompt produced."""

    tokens: list[int]
    """Generated ids (prompt excluded, no padding), ending with the EOS token (``eos``) or the
    token that completed a stop text (``stop``), or ``budget`` ids long (``length``)."""
    finish_reason: str
    """One of :data:`FINISH_REASONS`."""


class StopTexts:
    """A row stops once the decoded text of its last ``window`` generated tokens contains one
    of ``texts`` (special tokens skipped). Only generated tokens are decoded, so a prompt that
    itself contains a stop text does not stop anything."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], window: int = 24) -> None:
        self.tokenizer = tokenizer
        self.texts = tuple(text for text in texts if text)
        self.window = window

    def __bool__(self) -> bool:
        return bool(self.texts)

    def matches(self, generated: Sequence[Sequence[int]]) -> list[bool]:
        """For each row's generated ids: does its decoded tail contain a stop text?"""
        if not self.texts or not generated:
            return [False] * len(generated)
        tails = [list(tokens[-self.window :]) for tokens in generated]
        decoded = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return [any(text in tail for text in self.texts) for tail in decoded]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. a run seed and an item index), well mixed.

    ``seed + index`` would give item 1 of seed 7 the stream of item 2 of seed 6; hashing
    keeps the streams of different seeds unrelated.
    """
    digest = hashlib.sha256(",".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def finish_row(
    tokens: Sequence[int],
    budget: int,
    eos_token_ids: Sequence[int],
    stop: StopTexts | None = None,
) -> GeneratedTokens:
    """The result of a row from a longer token stream (e.g. ``generate``'s padded output).

    Walks the stream with the engine's rule: a row ends at its first EOS, at the token that
    completes a stop text, or after ``budget`` tokens; what follows (padding) is dropped.
    """
    eos = set(int(token) for token in eos_token_ids)
    kept: list[int] = []
    for token in tokens:
        kept.append(int(token))
        if int(token) in eos:
            return GeneratedTokens(kept, "eos")
        if stop and stop.matches([kept])[0]:
            return GeneratedTokens(kept, "stop")
        if len(kept) >= budget:
            return GeneratedTokens(kept, "length")
    return GeneratedTokens(kept, "length")


# --------------------------------------------------------------------------- the slot cache


class _Plan:
    """What the next forward writes into the slot cache and reads back (shared by all layers).

    Rows ``start:stop`` are read. Prefill (``columns is None``): the prefix keys/values (if
    any) go to columns ``[0, P)`` and the new ones to ``first_column:``. Decode: row
    ``rows[i]`` writes its single new key/value at column ``columns[i]``. Attention gets
    columns ``[0, width)``.
    """

    def __init__(self) -> None:
        self.start = 0
        self.stop = 0
        self.rows: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None
        self.first_column = 0
        self.width = 0
        self.capacity = 0
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class _SlotLayer(DynamicLayer):
    """One layer's ``[slots, kv_heads, capacity, head_dim]`` key and value buffers.

    Allocated at the first update (shapes and dtype come from the model); grown, keeping
    their contents, when the plan asks for more columns.
    """

    def __init__(self, index: int, plan: _Plan, slots: int) -> None:
        super().__init__()
        self.index = index
        self.plan = plan
        self.slots = slots
        self.capacity = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = self.plan.capacity
        keys = key_states.new_zeros(
            (self.slots, key_states.shape[1], capacity, key_states.shape[3])
        )
        values = value_states.new_zeros(
            (self.slots, value_states.shape[1], capacity, value_states.shape[3])
        )
        if self.key_buffer is not None and self.value_buffer is not None:
            keys[:, :, : self.capacity] = self.key_buffer
            values[:, :, : self.capacity] = self.value_buffer
        self.key_buffer, self.value_buffer, self.capacity = keys, values, capacity
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        if self.key_buffer is None or self.capacity < plan.capacity:
            self._allocate(key_states, value_states)
        keys, values = self.key_buffer, self.value_buffer
        assert keys is not None and values is not None
        rows = slice(plan.start, plan.stop)
        if plan.columns is None:
            if plan.prefix is not None:
                prefix_keys, prefix_values = plan.prefix[self.index]
                width = prefix_keys.shape[2]
                keys[rows, :, :width] = prefix_keys
                values[rows, :, :width] = prefix_values
            end = plan.first_column + key_states.shape[2]
            keys[rows, :, plan.first_column : end] = key_states
            values[rows, :, plan.first_column : end] = value_states
        else:
            keys[plan.rows, :, plan.columns] = key_states[:, :, 0]
            values[plan.rows, :, plan.columns] = value_states[:, :, 0]
        self.keys = keys[rows, :, : plan.width]
        self.values = values[rows, :, : plan.width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.plan.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan.width, 0

    def move_row(self, source: int, target: int, width: int) -> None:
        """Copy slot ``source``'s first ``width`` columns into slot ``target``."""
        if self.key_buffer is not None and self.value_buffer is not None:
            self.key_buffer[target, :, :width] = self.key_buffer[source, :, :width]
            self.value_buffer[target, :, :width] = self.value_buffer[source, :, :width]


class SlotCache(Cache):
    """A transformers ``Cache`` of per-row slots (see the module docstring); the engine sets
    its :class:`_Plan` before every forward. Not usable with ``generate``."""

    def __init__(self, num_layers: int, slots: int) -> None:
        self.plan = _Plan()
        super().__init__(
            layers=[_SlotLayer(index, self.plan, slots) for index in range(num_layers)]
        )

    def move_row(self, source: int, target: int, width: int) -> None:
        for layer in self.layers:
            layer.move_row(source, target, width)


# --------------------------------------------------------------------------- support checks


def _config(model: Any) -> Any:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def _num_layers(model: Any) -> int | None:
    value = getattr(_config(model), "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


def _cache_keyword(model: Any) -> str:
    """The forward keyword that takes the KV cache (``cache`` since transformers 5.2x)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def engine_unsupported_reason(model: Any, sampling: Sampling) -> str | None:
    """Why the slot engine cannot run this model/setting (then ``generate`` is used), or None."""
    if sampling.num_beams > 1:
        return "beam search"
    config = _config(model)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r}"
    if _num_layers(model) is None:
        return "unknown layer count"
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, _ = get_layer_types_and_kwargs(config)
    except Exception:  # configs without the layer-type helpers
        layer_types = [getattr(config, "sliding_window", None) and "sliding_attention"]
    if any(layer_type not in (None, "full_attention") for layer_type in layer_types):
        return "layers other than full attention"
    return None


# --------------------------------------------------------------------------- the engine


def _check_prompts(prompts: Sequence[Sequence[int]], budgets: Sequence[int]) -> None:
    for index, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} has no tokens")
        if budget < 1:
            raise ValueError(f"prompt {index}: max_new_tokens must be >= 1, got {budget}")


def _shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token."""
    if len(prompts) < 2:
        return 0
    first = prompts[0]
    length = min(len(prompt) for prompt in prompts) - 1
    for prompt in prompts[1:]:
        common = 0
        while common < length and prompt[common] == first[common]:
            common += 1
        length = common
        if length == 0:
            break
    return max(length, 0)


class _Engine:
    """The continuous-batching loop over a :class:`SlotCache` (one call of generate_tokens)."""

    def __init__(
        self,
        model: Any,
        prompts: Sequence[Sequence[int]],
        budgets: Sequence[int],
        *,
        sampling: Sampling,
        eos_token_ids: Sequence[int],
        stop: StopTexts | None,
        seeds: Sequence[int] | None,
        slots: int,
        share_prefix: bool,
        on_result: ResultCallback | None,
    ) -> None:
        self.model = model
        self.prompts = [list(map(int, prompt)) for prompt in prompts]
        self.budgets = list(budgets)
        self.sampling = sampling
        self.eos = set(int(token) for token in eos_token_ids)
        self.stop = stop if stop else None
        self.seeds = seeds
        self.slots = max(1, min(slots, len(prompts)))
        self.on_result = on_result
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.cache_keyword = _cache_keyword(model)
        num_layers = _num_layers(model)
        assert num_layers is not None
        self.cache = SlotCache(num_layers, self.slots)
        self.plan = self.cache.plan
        self.prefix_length = _shared_prefix(self.prompts) if share_prefix else 0
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.valid = torch.zeros((self.slots, 0), dtype=torch.bool, device=self.device)
        # Per-slot state of the active rows (slots 0 .. n-1).
        self.request: list[int] = []
        self.next_column: list[int] = []
        self.next_position: list[int] = []
        self.generated: list[list[int]] = []
        self.generators: list[torch.Generator | None] = []
        self.results: list[GeneratedTokens | None] = [None] * len(self.prompts)

    # ---------------------------------------------------------------- forward helpers

    def _forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[rows, vocab]`` (float32) at the last input position of each row."""
        if self.eager:
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        else:
            mask = allowed
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_keyword: self.cache},
        )
        if not self.cache.layers[0].is_initialized:
            raise RuntimeError("the model did not use the slot cache (unsupported forward)")
        return output.logits[:, -1, :].float()

    def _compute_prefix(self) -> None:
        length = self.prefix_length
        if length == 0:
            return
        ids = torch.tensor([self.prompts[0][:length]], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_keyword: cache})
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]
        if len(self.prefix) != len(self.cache.layers):
            raise RuntimeError("the prefix cache does not have one entry per layer")

    def _ensure_capacity(self, columns: int) -> None:
        if columns <= self.plan.capacity:
            return
        capacity = max(columns, int(self.plan.capacity * 1.5))
        grown = torch.zeros((self.slots, capacity), dtype=torch.bool, device=self.device)
        grown[:, : self.valid.shape[1]] = self.valid
        self.valid = grown
        self.plan.capacity = capacity  # the layers grow at their next update

    # ---------------------------------------------------------------- choosing tokens

    def _choose(
        self, logits: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> list[int]:
        sampling = self.sampling
        if not sampling.do_sample:
            return logits.argmax(dim=-1).tolist()
        scores = logits
        if sampling.temperature != 1.0:
            scores = scores / sampling.temperature
        if sampling.top_k > 0:
            k = min(sampling.top_k, scores.shape[-1])
            threshold = torch.topk(scores, k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < threshold, -float("inf"))
        if sampling.top_p < 1.0:
            sorted_scores, sorted_ids = torch.sort(scores, descending=False, dim=-1)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cumulative <= (1 - sampling.top_p)
            remove_sorted[..., -1:] = False
            remove = remove_sorted.scatter(-1, sorted_ids, remove_sorted)
            scores = scores.masked_fill(remove, -float("inf"))
        probs = scores.softmax(dim=-1).cpu()
        return [
            int(torch.multinomial(probs[row], 1, generator=generator))
            for row, generator in enumerate(generators)
        ]

    # ---------------------------------------------------------------- admission and retiring

    def _admit(self, queue: list[int]) -> None:
        """Prefill waiting prompts (the queue's head) into the free slots."""
        take = min(self.slots - len(self.request), len(queue))
        newcomers = queue[:take]
        del queue[:take]
        for group in self._prefill_groups(newcomers):
            self._prefill(group)

    def _prefill_groups(self, newcomers: list[int]) -> list[list[int]]:
        """Newcomers (longest first) cut into prefills whose padding stays within
        :data:`PREFILL_PADDING` of their real suffix tokens (a prefill is compute-bound:
        padded positions cost as much as real ones, an extra forward little)."""
        prefix = self.prefix_length
        groups: list[list[int]] = []
        real = 0
        for index in newcomers:
            length = len(self.prompts[index]) - prefix
            if groups:
                group = groups[-1]
                width = len(self.prompts[group[0]]) - prefix
                if width * (len(group) + 1) <= PREFILL_PADDING * (real + length):
                    group.append(index)
                    real += length
                    continue
            groups.append([index])
            real = length
        return groups

    def _prefill(self, newcomers: list[int]) -> None:
        """One forward that prefills ``newcomers`` into the next free slots."""
        start = len(self.request)
        prefix = self.prefix_length
        suffixes = [self.prompts[index][prefix:] for index in newcomers]
        width = max(len(suffix) for suffix in suffixes)
        end_column = prefix + width
        self._ensure_capacity(end_column + max(self.budgets[index] for index in newcomers))
        count = len(newcomers)
        input_ids = torch.zeros((count, width), dtype=torch.long)
        position_ids = torch.full((count, width), prefix, dtype=torch.long)
        valid_rows = torch.zeros((count, end_column), dtype=torch.bool)
        valid_rows[:, :prefix] = True
        for row, suffix in enumerate(suffixes):
            gap = width - len(suffix)
            input_ids[row, gap:] = torch.tensor(suffix, dtype=torch.long)
            position_ids[row, gap:] = torch.arange(prefix, prefix + len(suffix))
            valid_rows[row, prefix + gap :] = True
        columns = torch.arange(end_column)
        query_columns = torch.arange(prefix, end_column)
        causal = columns[None, :] <= query_columns[:, None]
        diagonal = columns[None, :] == query_columns[:, None]
        # A gap query sees only itself (and the prefix): never a fully masked row.
        allowed = (causal[None] & valid_rows[:, None, :]) | diagonal[None]
        plan = self.plan
        plan.start, plan.stop = start, start + count
        plan.rows = plan.columns = None
        plan.first_column = prefix
        plan.width = end_column
        plan.prefix = self.prefix
        logits = self._forward(
            input_ids.to(self.device),
            position_ids.to(self.device),
            allowed[:, None].to(self.device),
        )
        plan.prefix = None
        self.valid[start : start + count] = False
        self.valid[start : start + count, :end_column] = valid_rows.to(self.device)
        generators: list[torch.Generator | None] = []
        for index in newcomers:
            generator = None
            if self.sampling.do_sample:
                seed = self.seeds[index] if self.seeds is not None else derive_seed(0, index)
                generator = torch.Generator().manual_seed(int(seed))
            generators.append(generator)
        tokens = self._choose(logits, generators)
        for index, token, generator in zip(newcomers, tokens, generators, strict=True):
            self.request.append(index)
            self.next_column.append(end_column)
            self.next_position.append(len(self.prompts[index]))
            self.generated.append([token])
            self.generators.append(generator)
        self._retire(range(start, start + count))

    def _row_states(self) -> tuple[list[Any], ...]:
        """The per-row lists indexed by slot row (``valid`` is a tensor, moved apart)."""
        return (
            self.request,
            self.next_column,
            self.next_position,
            self.generated,
            self.generators,
        )

    def _retire(self, rows: Sequence[int] | range) -> None:
        """Finish the rows among ``rows`` whose last token ends them; compact the slots."""
        candidates = [row for row in rows if self.generated[row][-1] not in self.eos]
        stopped: set[int] = set()
        if self.stop is not None and candidates:
            hits = self.stop.matches([self.generated[row] for row in candidates])
            stopped = {row for row, hit in zip(candidates, hits, strict=True) if hit}
        finished: list[tuple[int, str]] = []
        for row in rows:
            tokens = self.generated[row]
            if tokens[-1] in self.eos:
                finished.append((row, "eos"))
            elif row in stopped:
                finished.append((row, "stop"))
            elif len(tokens) >= self.budgets[self.request[row]]:
                finished.append((row, "length"))
        for row, reason in sorted(finished, reverse=True):
            index = self.request[row]
            result = GeneratedTokens(self.generated[row], reason)
            self.results[index] = result
            last = len(self.request) - 1
            if row != last:
                width = self.next_column[last]
                self.cache.move_row(last, row, width)
                self.valid[row] = self.valid[last]
                for state in self._row_states():
                    state[row] = state[last]
            for state in self._row_states():
                state.pop()
            if self.on_result is not None:
                self.on_result(index, result)

    def _decode(self) -> None:
        """One token for every active row."""
        count = len(self.request)
        columns = torch.tensor(self.next_column, dtype=torch.long, device=self.device)
        rows = torch.arange(count, device=self.device)
        self.valid[rows, columns] = True
        width = max(self.next_column) + 1
        plan = self.plan
        plan.start, plan.stop = 0, count
        plan.rows, plan.columns = rows, columns
        plan.width = width
        input_ids = torch.tensor([[tokens[-1]] for tokens in self.generated], device=self.device)
        position_ids = torch.tensor([[p] for p in self.next_position], device=self.device)
        allowed = self.valid[:count, None, None, :width]
        logits = self._forward(input_ids, position_ids, allowed)
        tokens = self._choose(logits, self.generators)
        for row, token in enumerate(tokens):
            self.generated[row].append(token)
            self.next_column[row] += 1
            self.next_position[row] += 1
        self._retire(range(count))

    def run(self) -> list[GeneratedTokens]:
        queue = sorted(range(len(self.prompts)), key=lambda i: (-len(self.prompts[i]), i))
        self._compute_prefix()
        while queue or self.request:
            if queue and len(self.request) < self.slots:
                self._admit(queue)
            else:
                self._decode()
        results = [result for result in self.results if result is not None]
        assert len(results) == len(self.prompts)
        return results


# --------------------------------------------------------------------------- fallback


class StopOnText:
    """A transformers stopping criterion for ``generate`` (the fallback path): per row, the
    :class:`StopTexts` rule on the tokens after ``prompt_width``. Finished rows stay finished."""

    def __init__(self, stop: StopTexts, prompt_width: int) -> None:
        self.stop = stop
        self.prompt_width = prompt_width
        self._done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self._done is None or self._done.shape[0] != input_ids.shape[0]:
            self._done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] > 0 and self.stop:
            hits = self.stop.matches(generated.tolist())
            self._done |= torch.tensor(hits, dtype=torch.bool)
        return self._done.to(input_ids.device).clone()


def hf_generation_config(
    sampling: Sampling, max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int
) -> Any:
    """A GenerationConfig holding exactly ``sampling`` (used by the ``generate`` fallback).

    Explicit values: transformers fills fields left as None from the model's
    generation_config and its global defaults (top_k = 50), which would turn the paper's pure
    sampling (top_k = 0 = off) into top-50 sampling.
    """
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sampling.do_sample,
        "num_beams": sampling.num_beams,
        "use_cache": True,
        "pad_token_id": pad_token_id,
        "eos_token_id": list(eos_token_ids) or None,
    }
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    return GenerationConfig(**kwargs)


def generate_with_transformers(
    model: Any,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    sampling: Sampling,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    stop: StopTexts | None,
    seeds: Sequence[int] | None,
    batch_size: int,
    on_result: ResultCallback | None = None,
) -> list[GeneratedTokens]:
    """The ``generate`` path (the engine's fallback, and what kdlab did before the engine).

    Prompts are sorted longest first and cut into batches of ``batch_size``; each batch is
    left-padded and decoded by ``model.generate`` with the KV cache and :class:`StopOnText`
    until every row has ended; :func:`finish_row` then drops each row's padding. Call it
    under ``torch.inference_mode``. ``benchmarks/eval_throughput.py`` uses it as baseline.
    """
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results: list[GeneratedTokens | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            length = len(prompts[index])
            input_ids[row, width - length :] = torch.tensor(list(prompts[index]), dtype=torch.long)
            attention_mask[row, width - length :] = 1
        criteria = StoppingCriteriaList([StopOnText(stop, width)] if stop else [])
        config = hf_generation_config(
            sampling, max(budgets[i] for i in chunk), eos_token_ids, pad_token_id
        )
        torch.manual_seed(int(seeds[chunk[0]]) if seeds is not None else 0)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=criteria,
        )
        new_tokens = output[:, width:].cpu().tolist()
        for row, index in enumerate(chunk):
            result = finish_row(new_tokens[row], budgets[index], eos_token_ids, stop)
            results[index] = result
            if on_result is not None:
                on_result(index, result)
    return [result for result in results if result is not None]


# --------------------------------------------------------------------------- entry point


def generate_tokens(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    eos_token_ids: Sequence[int],
    sampling: Sampling | None = None,
    stop: StopTexts | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int = 16,
    share_prefix: bool = True,
    pad_token_id: int | None = None,
    on_result: ResultCallback | None = None,
) -> list[GeneratedTokens]:
    """Generate a continuation of every prompt; see the module docstring.

    ``prompts``: token-id sequences (no padding). ``max_new_tokens``: one budget for all or
    one per prompt (e.g. ``cutoff_len - len(prompt)`` for training). ``seeds``: one per prompt,
    read when sampling (default ``derive_seed(0, i)``). ``batch_size``: rows decoded together
    (the KV buffers hold ``batch_size × (longest prompt + budget)`` positions per layer).
    ``pad_token_id``: only the ``generate`` fallback pads (default: the first EOS id).
    The model must be in eval mode (dropout would make greedy decoding random); runs under
    ``torch.inference_mode``.
    """
    sampling = sampling or Sampling()
    if not prompts:
        return []
    budgets = (
        [int(max_new_tokens)] * len(prompts)
        if isinstance(max_new_tokens, int)
        else [int(budget) for budget in max_new_tokens]
    )
    _check_prompts(prompts, budgets)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if getattr(model, "training", False):
        raise ValueError("generate_tokens needs the model in eval mode (model.eval())")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reason = engine_unsupported_reason(model, sampling)
    with torch.inference_mode():
        if reason is None:
            engine = _Engine(
                model,
                prompts,
                budgets,
                sampling=sampling,
                eos_token_ids=eos_token_ids,
                stop=stop,
                seeds=seeds,
                slots=batch_size,
                share_prefix=share_prefix,
                on_result=on_result,
            )
            return engine.run()
        logger.info("generation through model.generate (%s)", reason)
        pad = pad_token_id if pad_token_id is not None else next(iter(eos_token_ids), 0)
        return generate_with_transformers(
            model,
            prompts,
            budgets,
            sampling=sampling,
            eos_token_ids=eos_token_ids,
            pad_token_id=int(pad),
            stop=stop,
            seeds=seeds,
            batch_size=batch_size,
            on_result=on_result,
        )
