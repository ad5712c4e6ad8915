"""Fixtures for the evaluation tests: a tiny random Llama + tokenizer saved to disk, data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_EVAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
SHARED_TRAIN_DIR = SHARED_EVAL_DIR.parent / "train"

#: Hand-written hellaswag records (the real file is too large to ship).
HELLASWAG_RECORDS = [
    {
        "instruction": "Please choose the correct ending to complete the given sentence: "
        "Baking a cake: A woman mixes flour and eggs in a bowl. she\n\n"
        "Ending1: pours the batter into a pan. Ending2: throws the bowl at the wall. "
        "Ending3: starts to swim. Ending4: paints the ceiling.\n\n"
        "Answer format: ending1/ending2/ending3/ending4",
        "input": "",
        "output": "the correct answer is ending1",
        "answer": "ending1",
    },
    {
        "instruction": "Please choose the correct ending to complete the given sentence: "
        "Tying shoes: A boy sits on the steps. he\n\n"
        "Ending1: flies away. Ending2: ties the laces of his shoes. Ending3: eats the shoe. "
        "Ending4: sings to the moon.\n\n"
        "Answer format: ending1/ending2/ending3/ending4",
        "input": "",
        "output": "the correct answer is ending2",
        "answer": "ending2",
    },
    {
        "instruction": "Please choose the correct ending to complete the given sentence: "
        "Washing a car: A man sprays water on a car. he\n\n"
        "Ending1: drives into a lake. Ending2: reads a book. Ending3: scrubs it with a sponge. "
        "Ending4: plants a tree on it.\n\n"
        "Answer format: ending1/ending2/ending3/ending4",
        "input": "",
        "output": "the correct answer is ending3",
        "answer": "ending3",
    },
]

_TOKENIZER_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction:\n### Response:\n### Input:\n",
    "The answer is 42. the correct answer is answer1 answer2 answer3 answer4 answer5",
    "true false solution1 solution2 option1 option2 ending1 ending2 ending3 ending4",
    "Please choose the correct answer to the question: Answer format: (A) (B) (C) (D) (E)",
    "0 1 2 3 4 5 6 7 8 9 10 100 1,000 $ % + - * / = .",
    "How many apples does she have left? He bought 3 more books and sold 2 of them.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (300 tokens) without a pad token (pad = eos at load)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def build_tiny_model(vocab_size: int, eos_token_id: int, bos_token_id: int):
    """A 2-layer Llama with hidden size 16 (random weights, fixed seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model + tokenizer directory, loadable with ``from_pretrained``."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_model_dir: Path):
    """The tiny model loaded once through kdlab's loader (eval mode, pad = eos)."""
    from kdlab.config.schema import ModelConfig
    from kdlab.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="session")
def shared_eval_dir() -> Path:
    """The shared LLM-Adapters test sets (tests skip when they are not there)."""
    if not SHARED_EVAL_DIR.is_dir():
        pytest.skip(f"{SHARED_EVAL_DIR} not found")
    return SHARED_EVAL_DIR


@pytest.fixture(scope="session")
def shared_train_dir() -> Path:
    """The shared training files (decontamination tests skip when they are not there)."""
    if not SHARED_TRAIN_DIR.is_dir():
        pytest.skip(f"{SHARED_TRAIN_DIR} not found")
    return SHARED_TRAIN_DIR


@pytest.fixture
def hellaswag_records() -> list[dict[str, str]]:
    """Hand-written hellaswag records (copies)."""
    return [dict(record) for record in HELLASWAG_RECORDS]


@pytest.fixture
def hellaswag_dir(tmp_path: Path) -> Path:
    """A data_dir holding only hellaswag/test.json with hand-written records."""
    directory = tmp_path / "data"
    (directory / "hellaswag").mkdir(parents=True)
    (directory / "hellaswag" / "test.json").write_text(json.dumps(HELLASWAG_RECORDS))
    return directory


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
