"""Model loading (hub ids, directories, GGUF files, aliases, a safetensors cache), layer
slicing, teacher/student vocabulary checks and PEFT wrapping."""

from kdlab.models.loading import (
    ALIASES,
    ModelSource,
    load_model_and_tokenizer,
    load_run_model,
    load_tokenizer,
    resolve_model_source,
    resolve_run_dir,
    select_device,
    select_dtype,
)
from kdlab.models.peft_utils import apply_peft, count_parameters
from kdlab.models.slicing import select_layer_indices, slice_decoder_layers
from kdlab.models.vocab import check_vocab_compatibility, shared_vocab_size

__all__ = [
    "ALIASES",
    "ModelSource",
    "apply_peft",
    "check_vocab_compatibility",
    "count_parameters",
    "load_model_and_tokenizer",
    "load_run_model",
    "load_tokenizer",
    "resolve_model_source",
    "resolve_run_dir",
    "select_device",
    "select_dtype",
    "select_layer_indices",
    "shared_vocab_size",
    "slice_decoder_layers",
]
