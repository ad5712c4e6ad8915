"""The one prompt template, shared by training, generation and evaluation.

The paper's scripts indent their Alpaca prompt with runs of spaces and use a slightly
different string at evaluation than at training (``paper-spec.md``). kdlab builds every
prompt here, so a model is always evaluated on exactly the text it was trained on.
"""

from __future__ import annotations

from typing import Any

from kdlab.errors import ConfigError

INSTRUCTION_MARKER = "### Instruction:"
INPUT_MARKER = "### Input:"
RESPONSE_MARKER = "### Response:"
#: Text that ends a generated response: the model starting the next Alpaca block.
STOP_TEXTS: tuple[str, ...] = ("### Instruction",)

_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)

TEMPLATES = ("alpaca", "chat")


def build_prompt(
    instruction: str, input: str = "", *, template: str = "alpaca", tokenizer: Any = None
) -> str:
    """The prompt text for one record; the response follows it directly.

    ``alpaca``: the paper's Alpaca-style text (with an ``### Input:`` block when ``input`` is
    not empty), ending in ``"### Response:\\n"``. ``chat``: the user turn rendered with
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` for instruct models.
    """
    if template == "alpaca":
        if input and input.strip():
            return (
                f"{_PREAMBLE_WITH_INPUT}\n\n{INSTRUCTION_MARKER}\n{instruction}\n\n"
                f"{INPUT_MARKER}\n{input}\n\n{RESPONSE_MARKER}\n"
            )
        return f"{_PREAMBLE}\n\n{INSTRUCTION_MARKER}\n{instruction}\n\n{RESPONSE_MARKER}\n"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.template = 'chat' needs a tokenizer with a chat template; "
                "use template: alpaca for base models"
            )
        content = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ConfigError(f"unknown template {template!r}; choices: {', '.join(TEMPLATES)}")


def strip_continuation(text: str) -> str:
    """Cut a generated response where the model starts a new ``### Instruction`` block."""
    cuts = [position for position in (text.find(stop) for stop in STOP_TEXTS) if position != -1]
    return text[: min(cuts)].rstrip() if cuts else text
