"""Builders shared by the tests: tiny tokenizers and models saved with save_pretrained.

Importable from any test (``from kdlab_testing import save_tiny_model``): the root
conftest puts this folder on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "Tom has 12 apples. He buys 7 more apples. How many apples does Tom have now?",
    "Tom starts with 12 apples and gets 7 more, so 12 + 7 = 19. The answer is 19.",
    "the correct answer is answer1 answer2 answer3 answer4 answer5 option1 option2 "
    "solution1 solution2 ending1 ending2 ending3 ending4 true false",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 + - * / = . , ? ! $ %",
    "Mia read 24 pages on Monday and 15 pages on Tuesday. Sam had 45 marbles and gave 18 away.",
    "A B C D E ( ) Answer Choices: (A) (B) (C) (D) (E) The answer is (C).",
]


def _byte_level_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE trained on ``corpus``; ``special_tokens`` are pad, bos, eos (ids
    0, 1, 2, the ids the tiny models' configs expect)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    pad, bos, eos = special_tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad
    )


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (≈ 300 tokens) that can encode any text."""
    return _byte_level_bpe(_CORPUS, 320, ["<pad>", "<s>", "</s>"])


def build_tiny_model(vocab_size: int, *, layers: int = 2, hidden: int = 16, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(directory: Path, *, layers: int = 2, hidden: int = 16, seed: int = 0) -> Path:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), layers=layers, hidden=hidden, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


TRAIN_DATA = "generated:arithmetic?split=train&n=24&seed=0"


def finetune_overrides(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"data.train_files=['{TRAIN_DATA}']",
        "data.val_set_size=4",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.warmup_steps=1",
        "train.logging_steps=1",
        "train.eval_steps=2",
        "train.save_steps=2",
        f"train.output_dir={output_dir}",
        *extra,
    ]


def distill_overrides(
    student_dir: Path, teacher_dir: Path, output_dir: Path, method: str, *extra: str
) -> list[str]:
    """Overrides of a 2-step distillation on the tiny models; the teacher and the
    generation budget only where the method reads them (kdlab refuses the rest)."""
    from kdlab.config.methods import get_method

    spec = get_method(method)
    never_on_policy = any(item.startswith("distill.lambda_on_policy=0") for item in extra)
    samples = (spec.on_policy and not never_on_policy) or spec.teacher_responses
    return [
        f"student.name_or_path={student_dir}",
        *([f"teacher.model.name_or_path={teacher_dir}"] if spec.needs_teacher else []),
        f"data.train_files=['{TRAIN_DATA}']",
        "data.val_set_size=4",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.warmup_steps=1",
        "train.logging_steps=1",
        "train.eval_steps=2",
        "train.save_steps=2",
        *(["distill.generation.max_new_tokens=6"] if samples else []),
        f"distill.method={method}",
        f"train.output_dir={output_dir}",
        *extra,
    ]


def write_partly_truncated_data(path: Path, *, normal: int = 6, truncated: int = 6) -> Path:
    """A JSON training file: ``normal`` arithmetic records, then ``truncated`` records whose
    prompt alone is longer than the default ``cutoff_len`` (256): after tokenization they
    keep no response token, so a micro-batch made only of them counts nothing."""
    import json

    from kdlab.data.records import load_records

    records = load_records(f"generated:arithmetic?split=train&n={normal}&seed=0")
    filler = " ".join(f"Tom counts {n} apples and {n + 1} pears." for n in range(80))
    records += [
        {
            "instruction": f"{filler} Question {i}: how many?",
            "input": "",
            "output": "7.",
            "answer": "7",
        }
        for i in range(truncated)
    ]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


class ForwardCounter:
    """Counts the forward passes of every model loaded from ``model_dir``, at the source.

    Wraps ``LlamaModel.forward`` (the decoder stack every tiny test model runs, whether it
    is called through the causal LM, its ``get_decoder()``, ``generate`` or a PEFT wrapper)
    and counts the calls whose config was loaded from ``model_dir``: what a cache spares is
    proved by the teacher's own forward calls, not by the counters of the code under test.
    ``phase`` labels the calls (a test sets it, e.g. around ``TrainingLoop.run``).

    Use as ``counter = ForwardCounter(monkeypatch, teacher_dir)``.
    """

    def __init__(self, monkeypatch, model_dir: Path) -> None:
        from transformers.models.llama import modeling_llama

        self.model_dir = str(model_dir)
        self.phase = "other"
        self.calls: list[tuple[str, int]] = []  # (phase, rows)
        real_forward = modeling_llama.LlamaModel.forward
        counter = self

        def counting_forward(module, *args, **kwargs):
            if str(getattr(module.config, "_name_or_path", "")) == counter.model_dir:
                ids = kwargs.get("input_ids", args[0] if args else None)
                embeds = kwargs.get("inputs_embeds")
                rows = (ids if ids is not None else embeds).shape[0]
                counter.calls.append((counter.phase, int(rows)))
            return real_forward(module, *args, **kwargs)

        monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counting_forward)

    def count(self, phase: str | None = None) -> int:
        """Forward calls (in ``phase``, or in all)."""
        return sum(1 for name, _ in self.calls if phase is None or name == phase)

    def reset(self) -> None:
        self.calls.clear()


def tree_bytes(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` → its bytes (None for a folder): compare a tree
    before and after a refused command to prove the refusal changed nothing on disk."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): None if path.is_dir() else path.read_bytes()
        for path in sorted(directory.rglob("*"))
    }


# Cross-tokenizer pairs: a second byte-level BPE with other merges, size and special tokens.
_OTHER_CORPUS = [
    *_CORPUS,
    "The café serves crème brûlée. Unbelievable answers are unbelievably rare.",
    "Therefore the total is 19 apples; the answers are 12, 7 and 19.",
]


def build_other_tiny_tokenizer():
    """A second byte-level BPE tokenizer (≈ 360 tokens) that differs from
    :func:`build_tiny_tokenizer` in its merges, its size and its special tokens' strings
    (``<|pad|>``, ``<|begin|>``, ``<|endoftext|>`` at ids 0, 1, 2, the ids the tiny models'
    configs expect). Its corpus has accented words, so ``é`` is one token here and two
    byte tokens in the other tokenizer."""
    return _byte_level_bpe(_OTHER_CORPUS, 360, ["<|pad|>", "<|begin|>", "<|endoftext|>"])


def save_tiny_model_other_tokenizer(
    directory: Path, *, layers: int = 2, hidden: int = 16, seed: int = 0
) -> Path:
    """:func:`save_tiny_model` with :func:`build_other_tiny_tokenizer`: paired with a
    ``save_tiny_model`` directory it makes a teacher/student pair that shares no tokenizer."""
    tokenizer = build_other_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), layers=layers, hidden=hidden, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


#: A ChatML-like chat template for the tiny tokenizer: each turn is ``<s>ROLE\nTEXT</s>\n``;
#: the generation prompt opens an assistant turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_chat_tokenizer():
    """The tiny tokenizer with :data:`TINY_CHAT_TEMPLATE` (eos ``</s>`` ends each turn)."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def save_tiny_chat_model(directory: Path, *, layers: int = 2, hidden: int = 16) -> Path:
    """:func:`save_tiny_model` whose tokenizer has a chat template (an "instruct" model)."""
    tokenizer = build_tiny_chat_tokenizer()
    model = build_tiny_model(len(tokenizer), layers=layers, hidden=hidden)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
