"""kdlab: knowledge distillation of LLMs, and what the student really learned."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

__all__ = ["__version__"]


class _KnownImportNoise(logging.Filter):
    """Drops the import-time notices of torchao (kdlab's CPU int8 backend), which say nothing
    a user can act on. transformers imports torchao from ``import peft`` whenever it is
    installed, so without this every stage (and every one-line error) would start with:
    "Failed to load .../torchao/_C_mxfp8...so" (CUDA-only extensions, on a CPU torch),
    "Detected no triton", and torch's "<enum ...> is an Enum subclass ... register_constant()
    ... deprecated" for two torchao enums. Only those messages are dropped."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


for _name, _fragments in (
    ("torchao", ("Failed to load", "Detected no triton")),
    ("torchao.kernel.intmm", ("Detected no triton",)),
    ("torch.utils._pytree", ("is an Enum subclass and is now natively supported",)),
):
    logging.getLogger(_name).addFilter(_KnownImportNoise(*_fragments))
