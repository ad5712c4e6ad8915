"""Batched answer generation: a transformers backend and an optional vLLM backend.

The transformers backend (:class:`HFGenerator`) left-pads a batch of prompts with an
attention mask, decodes with the KV cache, and stops each row at EOS or as soon as the model
starts a new ``### Instruction`` block (:class:`StopOnText`, checked per row on decoded
text). Prompts are tokenized exactly as in training (:func:`kdlab.data.tokenize.encode_prompt`).
The model must be in eval mode (adapter dropout off); the generator checks it.

Every batch is generated after ``torch.manual_seed(seed)``: the runner passes
``settings.seed + batch_index`` so that a sampled evaluation is reproducible.

:class:`VLLMGenerator` is used when ``vllm`` is importable and CUDA is present (``backend:
auto``) or when asked for (``backend: vllm``); LoRA adapters go through ``LoRARequest``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from kdlab.config.evaluation import EvalGenerationConfig
from kdlab.config.schema import ModelConfig
from kdlab.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

#: Text that ends a response: the model starting the next Alpaca block.
STOP_TEXTS: tuple[str, ...] = ("### Instruction",)


class Generator(Protocol):
    """Turns prompts into generated continuations (the prompt itself excluded)."""

    backend: str
    generated_tokens: int

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Token count of each prompt (used to sort items into batches)."""
        ...

    def generate(self, prompts: Sequence[str], *, seed: int) -> list[str]:
        """One continuation per prompt, in order."""
        ...


# --------------------------------------------------------------------------- transformers


class StopOnText:
    """A per-row stopping criterion: stop a row once its new text contains a stop string.

    Only the last ``window`` generated tokens of each row are decoded at every step, so the
    cost stays constant per step. Rows already finished stay finished.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_width: int,
        stop_texts: Sequence[str] = STOP_TEXTS,
        window: int = 24,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stop_texts = tuple(stop_texts)
        self.window = window
        self._done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self._done is None or self._done.shape[0] != input_ids.shape[0]:
            self._done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0 or not self.stop_texts:
            return self._done.to(input_ids.device).clone()
        tail = generated[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        for row, text in enumerate(texts):
            if not self._done[row] and any(stop in text for stop in self.stop_texts):
                self._done[row] = True
        return self._done.to(input_ids.device).clone()


def _is_training(model: Any) -> bool:
    return bool(getattr(model, "training", False)) or any(
        module.training for module in model.modules()
    )


class HFGenerator:
    """Batched generation with a transformers causal LM (optionally wrapped by PEFT)."""

    backend = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: EvalGenerationConfig,
        *,
        stop_texts: Sequence[str] = STOP_TEXTS,
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
        self.generated_tokens = 0
        self.device = next(model.parameters()).device

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
        """A fresh GenerationConfig holding exactly our settings (model defaults ignored)."""
        from transformers import GenerationConfig

        settings = self.settings
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "num_beams": settings.num_beams,
            "use_cache": True,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self._eos_ids() or None,
        }
        if settings.do_sample:
            # Explicit values: transformers fills fields left as None from the model's
            # generation_config and its global defaults (top_k = 50), which would turn the
            # paper's pure sampling (top_k = 0 = off) into top-50 sampling.
            kwargs.update(
                temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k
            )
        return GenerationConfig(**kwargs)

    def _batch_tensors(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self.encode(prompt) for prompt in prompts]
        width = max(len(ids) for ids in encoded)
        pad_id = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def generate(self, prompts: Sequence[str], *, seed: int) -> list[str]:
        """Continuations of ``prompts`` (special tokens removed), generated as one batch."""
        from transformers import StoppingCriteriaList

        if not prompts:
            return []
        if _is_training(self.model):
            self.model.eval()
        input_ids, attention_mask = self._batch_tensors(prompts)
        width = input_ids.shape[1]
        stopping = StoppingCriteriaList([StopOnText(self.tokenizer, width, self.stop_texts)])
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self.generation_config(),
                stopping_criteria=stopping,
            )
        new_tokens = output[:, width:].cpu()
        self.generated_tokens += _count_generated(new_tokens, self._eos_ids())
        return self.tokenizer.batch_decode(new_tokens.tolist(), skip_special_tokens=True)


def _count_generated(new_tokens: torch.Tensor, eos_ids: Sequence[int]) -> int:
    """Tokens generated before (and including) each row's first EOS."""
    if new_tokens.numel() == 0:
        return 0
    total = 0
    is_end = torch.zeros_like(new_tokens, dtype=torch.bool)
    for token_id in eos_ids:
        is_end |= new_tokens == token_id
    for row in range(new_tokens.shape[0]):
        ends = torch.nonzero(is_end[row]).flatten()
        total += int(ends[0]) + 1 if ends.numel() else new_tokens.shape[1]
    return total


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
        self.generated_tokens = 0

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Token count of each prompt."""
        return [len(self.tokenizer(prompt)["input_ids"]) for prompt in prompts]

    def generate(self, prompts: Sequence[str], *, seed: int) -> list[str]:
        """Continuations of ``prompts``."""
        from vllm import SamplingParams

        settings = self.settings
        params = SamplingParams(
            n=1,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
            top_k=settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
            max_tokens=settings.max_new_tokens,
            stop=self.stop_texts,
            seed=seed,
        )
        outputs = self.llm.generate(
            list(prompts), params, lora_request=self.lora_request, use_tqdm=False
        )
        texts: list[str] = []
        for output in outputs:
            completion = output.outputs[0]
            self.generated_tokens += len(completion.token_ids)
            texts.append(completion.text)
        return texts


def _vllm_lora_rank(rank: int) -> int:
    for supported in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= supported:
            return supported
    return rank
