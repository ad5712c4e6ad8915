"""Answer generation for evaluation: the transformers backend and an optional vLLM backend.

A backend turns prompt texts into :class:`Generation` objects (raw text, finish reason, token
count), reporting each one as soon as it is finished (``on_result``), so the runner can
write its prediction line at once.

The transformers backend (:class:`HFGenerator`) tokenizes prompts exactly as training does
(:func:`kdlab.data.tokenize.encode_prompt`) and runs :func:`kdlab.models.generation.generate_tokens`,
the engine shared with on-policy GKD and seqKD: continuous batching of ``batch_size`` rows,
the template header's KV cache computed once, each row stopped at EOS or as soon as the
model starts a new ``### Instruction`` block (checked on decoded text). The model is put in
eval mode (adapter dropout off).

Seeds are per prompt: the runner passes ``derive_seed(settings.seed, item index)``, so a
sampled answer depends on its item and the seed only (not on batching or on a resume).

:class:`VLLMGenerator` is used when ``vllm`` is importable and CUDA is present (``backend:
auto``) or when asked for (``backend: vllm``); LoRA adapters go through ``LoRARequest``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from kdlab.config.evaluation import EvalGenerationConfig
from kdlab.config.schema import ModelConfig
from kdlab.data.templates import STOP_TEXTS
from kdlab.errors import ConfigError, ModelError
from kdlab.models.generation import (
    GeneratedTokens,
    Sampling,
    StopTexts,
    derive_seed,
    generate_tokens,
    hf_generation_config,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One generated answer, as the backend produced it."""

    raw_output: str
    """The generated text (prompt excluded, special tokens skipped), before any cut: it may
    end with the stop text that ended it."""
    finish_reason: str | None
    """``eos``, ``stop`` (a stop text) or ``length`` (``max_new_tokens`` reached)."""
    generated_tokens: int | None
    """Tokens the model generated for this prompt (no padding, nothing after its end)."""


OnResult = Callable[[int, Generation], None]


class Generator(Protocol):
    """Turns prompts into generated continuations (the prompt itself excluded)."""

    backend: str

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Token count of each prompt."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        batch_size: int,
        on_result: OnResult | None = None,
    ) -> list[Generation]:
        """One generation per prompt, in order; ``on_result(i, generation)`` as each ends.

        ``batch_size`` is the number of prompts decoded together; ``seeds[i]`` seeds the
        sampling of prompt i.
        """
        ...


# --------------------------------------------------------------------------- transformers


def _is_training(model: Any) -> bool:
    return bool(getattr(model, "training", False)) or any(
        module.training for module in model.modules()
    )


def sampling_of(settings: EvalGenerationConfig) -> Sampling:
    """The engine's decoding settings for an eval generation config: every field of
    :class:`~kdlab.models.generation.Sampling` is the setting of the same name."""
    return Sampling(**{field.name: getattr(settings, field.name) for field in fields(Sampling)})


class HFGenerator:
    """Generation with a transformers causal LM (optionally wrapped by PEFT)."""

    backend = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: EvalGenerationConfig,
        *,
        stop_texts: Sequence[str] = STOP_TEXTS,
        share_prefix: bool = True,
    ) -> None:
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ModelError("the tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        if _is_training(model):
            logger.info("putting the model in eval mode (dropout off) for generation")
            model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.stop_texts = tuple(stop_texts)
        self.share_prefix = share_prefix

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, exactly as training tokenizes prompts."""
        from kdlab.data.tokenize import encode_prompt

        return encode_prompt(self.tokenizer, prompt)

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Token count of each prompt."""
        return [len(self.encode(prompt)) for prompt in prompts]

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (config_eos, self.tokenizer.eos_token_id):
            for token_id in value if isinstance(value, (list, tuple)) else [value]:
                if token_id is not None and int(token_id) not in ids:
                    ids.append(int(token_id))
        return ids

    def generation_config(self) -> Any:
        """A fresh GenerationConfig holding exactly our settings (the ``generate`` fallback's)."""
        return hf_generation_config(
            sampling_of(self.settings),
            self.settings.max_new_tokens,
            self._eos_ids(),
            int(self.tokenizer.pad_token_id),
        )

    def _generation(self, result: GeneratedTokens) -> Generation:
        text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return Generation(text, result.finish_reason, len(result.tokens))

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        batch_size: int = 16,
        on_result: OnResult | None = None,
    ) -> list[Generation]:
        """Generations of ``prompts`` (see :class:`Generator`); ``seeds`` default to
        ``derive_seed(settings.seed, i)``."""
        if not prompts:
            return []
        if _is_training(self.model):
            self.model.eval()
        if seeds is None:
            seeds = [derive_seed(self.settings.seed, index) for index in range(len(prompts))]
        report = None
        if on_result is not None:
            callback = on_result

            def report(index: int, result: GeneratedTokens) -> None:
                callback(index, self._generation(result))

        results = generate_tokens(
            self.model,
            [self.encode(prompt) for prompt in prompts],
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_ids=self._eos_ids(),
            sampling=sampling_of(self.settings),
            stop=StopTexts(self.tokenizer, self.stop_texts),
            seeds=seeds,
            batch_size=batch_size,
            share_prefix=self.share_prefix,
            pad_token_id=int(self.tokenizer.pad_token_id),
            on_result=report,
        )
        return [self._generation(result) for result in results]


# --------------------------------------------------------------------------- vLLM


def vllm_available() -> bool:
    """Whether the vLLM backend can run here (``vllm`` importable and CUDA present)."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_backend(
    requested: str, model_config: ModelConfig, settings: EvalGenerationConfig
) -> str:
    """``auto`` → ``vllm`` when available and the model and settings allow it, else ``hf``."""
    reasons: list[str] = []
    if model_config.slice_layers:
        reasons.append("a layer-sliced model")
    if settings.num_beams > 1:
        reasons.append("beam search")
    if model_config.quantization != "none":
        reasons.append(f"model.quantization = {model_config.quantization} (kdlab loads it)")
    if requested == "hf":
        return "hf"
    if requested == "vllm":
        if not vllm_available():
            raise ConfigError("backend: vllm needs the vllm package and a CUDA device")
        if reasons:
            raise ConfigError(f"backend: vllm does not support {' and '.join(reasons)}")
        return "vllm"
    if vllm_available() and not reasons:
        return "vllm"
    return "hf"


class VLLMGenerator:
    """Generation with vLLM (CUDA only); a PEFT LoRA adapter is served with ``LoRARequest``."""

    backend = "vllm"

    def __init__(
        self,
        model_config: ModelConfig,
        settings: EvalGenerationConfig,
        *,
        adapter: str | None = None,
        stop_texts: Sequence[str] = STOP_TEXTS,
    ) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from kdlab.models.loading import materialise_gguf, resolve_model_source

        source = resolve_model_source(model_config.name_or_path, model_config.gguf_file)
        location = str(materialise_gguf(source)) if source.gguf_file else source.location
        dtype = "auto" if model_config.dtype == "auto" else model_config.dtype
        kwargs: dict[str, Any] = {
            "model": location,
            "dtype": dtype,
            "seed": settings.seed,
            "trust_remote_code": model_config.trust_remote_code,
        }
        if model_config.revision:
            kwargs["revision"] = model_config.revision
        self.lora_request = None
        if adapter:
            adapter_dir = Path(adapter)
            if (adapter_dir / "adapter").is_dir():
                adapter_dir = adapter_dir / "adapter"
            rank = json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 8)
            kwargs.update(enable_lora=True, max_lora_rank=_vllm_lora_rank(int(rank)))
            self.lora_request = LoRARequest("adapter", 1, str(adapter_dir.resolve()))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.settings = settings
        self.stop_texts = list(stop_texts)

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Token count of each prompt."""
        return [len(self.tokenizer(prompt)["input_ids"]) for prompt in prompts]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        batch_size: int = 16,
        on_result: OnResult | None = None,
    ) -> list[Generation]:
        """Generations of ``prompts`` (vLLM schedules its own batches: ``batch_size`` unused).

        The stop text is kept in ``raw_output`` (``include_stop_str_in_output``), as the
        transformers backend keeps it.
        """
        from vllm import SamplingParams

        settings = self.settings
        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature if settings.do_sample else 0.0,
                top_p=settings.top_p if settings.do_sample else 1.0,
                top_k=settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
                max_tokens=settings.max_new_tokens,
                stop=self.stop_texts,
                include_stop_str_in_output=True,
                seed=int(seed) % 2**31,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            list(prompts), params, lora_request=self.lora_request, use_tqdm=False
        )
        generations: list[Generation] = []
        for index, output in enumerate(outputs):
            completion = output.outputs[0]
            if completion.finish_reason == "length":
                reason = "length"
            elif isinstance(completion.stop_reason, str):
                reason = "stop"
            else:
                reason = "eos"
            generation = Generation(completion.text, reason, len(completion.token_ids))
            generations.append(generation)
            if on_result is not None:
                on_result(index, generation)
        return generations


def _vllm_lora_rank(rank: int) -> int:
    for supported in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= supported:
            return supported
    return rank
