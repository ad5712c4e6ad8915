"""The one prompt template, shared by training, generation and evaluation.

The paper's scripts indent their Alpaca prompt with runs of spaces and use a slightly
different string at evaluation than at training (``paper-spec.md``). kdlab builds every
prompt here, so a model is always evaluated on exactly the text it was trained on.

Records in TRL's formats (:mod:`kdlab.data.records`) bring their own prompt:
:func:`record_prompt` uses a standard ``prompt`` string verbatim and renders a
conversational one with the tokenizer's chat template; :func:`chat_completion` renders a
conversational completion as the text that follows that prompt in the whole conversation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdlab.errors import ConfigError, DataError

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


def _chat_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "conversational records (messages, or prompt/completion lists) need a tokenizer "
            "with a chat template; this model's tokenizer has none"
        )
    return tokenizer


def record_prompt(record: Mapping[str, Any], *, template: str, tokenizer: Any = None) -> str:
    """The prompt text of a normalised record; the response follows it directly.

    A standard ``prompt`` string is the whole prompt (no template, as TRL uses it); a
    conversational ``prompt`` (messages) is rendered with the chat template and its
    generation prompt, which needs ``template == "chat"``; other records are built by
    :func:`build_prompt` from ``instruction`` and ``input``.
    """
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if template != "chat":
            raise ConfigError(
                f"a conversational record needs template 'chat' (its prompt is rendered with "
                f"the chat template), not {template!r}"
            )
        return _chat_tokenizer(tokenizer).apply_chat_template(
            list(prompt), tokenize=False, add_generation_prompt=True
        )
    return build_prompt(
        record["instruction"], record.get("input", ""), template=template, tokenizer=tokenizer
    )


def chat_completion(record: Mapping[str, Any], tokenizer: Any) -> str | None:
    """The rendered text of a conversational completion, or None for other records.

    It is the whole conversation rendered with the chat template minus the rendered prompt
    (TRL's rule), so it ends as the template ends an assistant turn (e.g. ``<|im_end|>``):
    no EOS is appended after it.
    """
    completion = record.get("completion")
    prompt = record.get("prompt")
    if not isinstance(completion, list) or not isinstance(prompt, list):
        return None
    tokenizer = _chat_tokenizer(tokenizer)
    prompt_text = tokenizer.apply_chat_template(
        list(prompt), tokenize=False, add_generation_prompt=True
    )
    whole = tokenizer.apply_chat_template([*prompt, *completion], tokenize=False)
    if not whole.startswith(prompt_text):
        raise DataError(
            "the chat template renders a prompt differently inside the whole conversation "
            f"(prompt ends {prompt_text[-40:]!r}); kdlab cannot tell where the completion starts"
        )
    return whole[len(prompt_text) :]


def strip_continuation(text: str) -> str:
    """Cut a generated response where the model starts a new ``### Instruction`` block."""
    cuts = [position for position in (text.find(stop) for stop in STOP_TEXTS) if position != -1]
    return text[: min(cuts)].rstrip() if cuts else text
