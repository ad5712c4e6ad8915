"""Cross-tokenizer alignment: hand-made offset cases, then two real byte-level BPE tokenizers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kdlab.data.alignment import (
    AlignedGroup,
    CrossTokenizerCollator,
    align_offsets,
    align_response,
    align_sampled_response,
    batch_alignment,
    build_vocabulary_map,
    pair_sampled_record,
    to_byte_offsets,
    token_byte_keys,
    tokenize_record_pair,
    tokenize_record_pairs,
)
from kdlab.data.tokenize import TokenizeOptions, tokenize_record
from kdlab.losses import HiddenStates, chunked_distillation_loss
from kdlab.losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES, cross_tokenizer_loss
from kdlab.losses.spec import KDLossSpec
from kdlab.training.forward import response_mask
from kdlab_testing import save_tiny_model, save_tiny_model_other_tokenizer


def spans(ends: list[int]) -> list[tuple[int, int]]:
    """Offsets of tokens that tile the text and end at ``ends``."""
    return [(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def as_tuples(groups: list[AlignedGroup]) -> list[tuple[list[int], list[int], int, int]]:
    return [(list(g.student), list(g.teacher), g.start, g.end) for g in groups]


# ------------------------------------------------------------------ hand-made offsets


def test_identical_tokenizations_align_one_to_one() -> None:
    offsets = spans([3, 4, 9, 10])
    assert as_tuples(align_offsets(offsets, offsets)) == [
        ([0], [0], 0, 3),
        ([1], [1], 3, 4),
        ([2], [2], 4, 9),
        ([3], [3], 9, 10),
    ]


def test_a_word_split_differently_is_one_group() -> None:
    # " unbelievable": student " un" | "believ" | "able", teacher " unbel" | "ievable".
    student = spans([3, 9, 13])
    teacher = spans([6, 13])
    assert as_tuples(align_offsets(student, teacher)) == [([0, 1, 2], [0, 1], 0, 13)]


def test_multi_token_word_against_one_token() -> None:
    # " Tom has": student " Tom" | " has"; teacher " T" | "o" | "m" | " has".
    student = spans([4, 8])
    teacher = spans([2, 3, 4, 8])
    assert as_tuples(align_offsets(student, teacher)) == [
        ([0], [0, 1, 2], 0, 4),
        ([1], [3], 4, 8),
    ]


def test_boundaries_that_do_not_coincide_chain_until_a_common_one() -> None:
    # Student ends 2, 4, 6, 8; teacher 3, 6, 8: 2, 3 and 4 are not common, 6 and 8 are.
    student = spans([2, 4, 6, 8])
    teacher = spans([3, 6, 8])
    assert as_tuples(align_offsets(student, teacher)) == [
        ([0, 1, 2], [0, 1], 0, 6),
        ([3], [2], 6, 8),
    ]


def test_whitespace_trimmed_offsets_give_the_same_groups() -> None:
    # "a  b" as "a" | " " | " b" (student) and "a" | "  b" (teacher). A ByteLevel
    # post-processor with trim_offsets moves the starts past the spaces: (1,2)→(2,2),
    # (2,4)→(3,4), (1,4)→(3,4). Only ends matter, so the groups are the same.
    student = [(0, 1), (1, 2), (2, 4)]
    teacher = [(0, 1), (1, 4)]
    expected = [([0], [0], 0, 1), ([1, 2], [1], 1, 4)]
    assert as_tuples(align_offsets(student, teacher)) == expected
    assert as_tuples(align_offsets([(0, 1), (2, 2), (3, 4)], [(0, 1), (3, 4)])) == expected
    # Newlines: "\n\n" as one token vs two.
    assert as_tuples(align_offsets(spans([1, 2, 3]), spans([1, 3]))) == [
        ([0], [0], 0, 1),
        ([1, 2], [1], 1, 3),
    ]


def test_a_character_split_into_byte_tokens_is_never_cut() -> None:
    # "éa": the student's byte-level BPE writes "é" as two byte tokens, both reporting the
    # character's span (0, 1); the teacher has "é" as one token.
    student = [(0, 1), (0, 1), (1, 2)]
    teacher = [(0, 1), (1, 2)]
    assert as_tuples(align_offsets(student, teacher)) == [([0, 1], [0], 0, 1), ([2], [1], 1, 2)]
    # An emoji in 4 byte tokens against 2 two-byte tokens: one group, not two.
    assert as_tuples(align_offsets([(0, 1)] * 4, [(0, 1)] * 2)) == [([0, 1, 2, 3], [0, 1], 0, 1)]


def test_byte_offsets_split_a_character_into_its_byte_tokens() -> None:
    # "é" is 2 bytes: the byte tokens "Ã" "©" (both reporting the character span (0, 1))
    # get one byte each, so two tokenizations that split "é" the same way align 1:1.
    text = "éa"
    assert to_byte_offsets(text, [(0, 1), (1, 2)]) == [(0, 2), (2, 3)]
    split = to_byte_offsets(text, [(0, 1), (0, 1), (1, 2)], [b"\xc3", b"\xa9", b"a"])
    assert split == [(0, 1), (1, 2), (2, 3)]
    assert as_tuples(align_offsets(split, split)) == [
        ([0], [0], 0, 1),
        ([1], [1], 1, 2),
        ([2], [2], 2, 3),
    ]
    whole = to_byte_offsets(text, [(0, 1), (1, 2)], [b"\xc3\xa9", b"a"])
    assert as_tuples(align_offsets(split, whole)) == [([0, 1], [0], 0, 2), ([2], [1], 2, 3)]
    # " 😀" (1 + 4 bytes) as "Ġð" + three byte tokens, all ending with the emoji's character.
    emoji = to_byte_offsets(
        " 😀", [(0, 2), (1, 2), (1, 2), (1, 2)], [b" \xf0", b"\x9f", b"\x98", b"\x80"]
    )
    assert emoji == [(0, 2), (2, 3), (3, 4), (4, 5)]
    # Pieces that do not add up to the character: the run keeps its shared end (one unit).
    assert to_byte_offsets(text, [(0, 1), (0, 1)], [b"x", b"yz"]) == [(0, 2), (0, 2)]
    with pytest.raises(ValueError, match="span"):
        to_byte_offsets(text, [(0, 3)])


def test_different_text_ends() -> None:
    # The sides end at different characters: the rest is one last group from the last
    # common boundary; a side that has run out leaves the other's tail unaligned.
    assert as_tuples(align_offsets(spans([2, 5]), spans([2, 4, 7]))) == [
        ([0], [0], 0, 2),
        ([1], [1, 2], 2, 7),
    ]
    assert as_tuples(align_offsets(spans([2]), spans([2, 4]))) == [([0], [0], 0, 2)]
    assert align_offsets([], spans([1])) == []
    assert align_offsets([], []) == []


def test_offsets_that_go_backwards_are_refused() -> None:
    with pytest.raises(ValueError, match="monotone"):
        align_offsets([(0, 3), (1, 2)], spans([3]))
    with pytest.raises(ValueError, match="not a character span"):
        align_offsets(spans([3]), [(2, 1)])


# ------------------------------------------------------------------ real tokenizers


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A student with the tiny tokenizer and a teacher with the other tiny tokenizer."""
    student = save_tiny_model(tmp_path_factory.mktemp("xtok-student"))
    teacher = save_tiny_model_other_tokenizer(
        tmp_path_factory.mktemp("xtok-teacher"), layers=2, hidden=24, seed=1
    )
    return student, teacher


@pytest.fixture(scope="module")
def tokenizers(model_dirs: tuple[Path, Path]):
    from transformers import AutoTokenizer

    return tuple(AutoTokenizer.from_pretrained(directory) for directory in model_dirs)


TEXTS = [
    "Tom starts with 12 apples and gets 7 more, so 12 + 7 = 19. The answer is 19.",
    "Unbelievable!  The café's crème brûlée costs $19 😀\n\nTherefore the answer is (C).",
    "  leading spaces, trailing spaces  ",
    "literal special text: a</s>b<|endoftext|>c",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_groups_cover_the_same_text_on_both_sides(tokenizers, text: str) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    alignment = align_response(text, student_tokenizer, teacher_tokenizer, vocabulary)
    groups = alignment.groups
    # Every token of both sides in exactly one group, in order; the EOS pair last.
    assert [i for g in groups for i in g.student] == list(range(len(alignment.student_ids)))
    assert [i for g in groups for i in g.teacher] == list(range(len(alignment.teacher_ids)))
    assert alignment.student_ids[-1] == student_tokenizer.eos_token_id
    assert alignment.teacher_ids[-1] == teacher_tokenizer.eos_token_id
    assert (list(groups[-1].student), list(groups[-1].teacher)) == (
        [len(alignment.student_ids) - 1],
        [len(alignment.teacher_ids) - 1],
    )
    assert alignment.matched[-1]  # </s> ↔ <|endoftext|> through the EOS role
    text_bytes = text.encode("utf-8")
    student_bytes = token_byte_keys(student_tokenizer)
    teacher_bytes = token_byte_keys(teacher_tokenizer)
    for group, matched in zip(groups[:-1], alignment.matched[:-1], strict=True):
        piece = text_bytes[group.start : group.end]
        student_ids = [alignment.student_ids[i] for i in group.student]
        teacher_ids = [alignment.teacher_ids[i] for i in group.teacher]
        assert piece and group.end > group.start
        # Special tokens in the text ("</s>") stand for their content.
        assert b"".join(student_bytes[i][1] for i in student_ids) == piece
        assert b"".join(teacher_bytes[i][1] for i in teacher_ids) == piece
        assert matched == (vocabulary.student_id(teacher_ids[0]) == student_ids[0])
        if len(student_ids) == len(teacher_ids) == 1 and matched:
            assert student_tokenizer.convert_ids_to_tokens(student_ids) == (
                teacher_tokenizer.convert_ids_to_tokens(teacher_ids)
            )
    assert groups[-1].start == groups[-1].end == len(text_bytes)


def test_tokenizations_that_differ_give_unmatched_groups(tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    text = "The café. The answer is 19"
    alignment = align_response(text, student_tokenizer, teacher_tokenizer, vocabulary)
    by_text = {
        text.encode()[g.start : g.end].decode(): (len(g.student), len(g.teacher), m)
        for g, m in zip(alignment.groups, alignment.matched, strict=True)
    }
    # "é": two byte tokens for the student, one token for the teacher; " 19": "Ġ1"+"9" vs "Ġ19".
    assert by_text["é"] == (2, 1, False)
    assert by_text[" 19"] == (2, 1, False)
    assert by_text[" answer"] == (1, 1, True)
    # A literal "</s>" in the text is the student's special token and teacher text pieces.
    special = align_response("a</s>b", student_tokenizer, teacher_tokenizer, vocabulary)
    group = special.groups[1]
    assert "a</s>b"[group.start : group.end] == "</s>"
    assert [special.student_ids[i] for i in group.student] == [student_tokenizer.eos_token_id]
    assert len(group.teacher) > 1 and not special.matched[1]


def test_same_tokenizer_aligns_every_token_to_itself(tokenizers) -> None:
    tokenizer = tokenizers[0]
    vocabulary = build_vocabulary_map(tokenizer, tokenizer)
    assert vocabulary.shared.is_identity
    alignment = align_response(TEXTS[1], tokenizer, tokenizer, vocabulary)
    assert alignment.student_ids == alignment.teacher_ids
    # One group per token, also for the characters the BPE writes as several byte tokens.
    assert "Ã" in tokenizer.convert_ids_to_tokens(alignment.student_ids)
    assert [(list(g.student), list(g.teacher)) for g in alignment.groups] == [
        ([index], [index]) for index in range(len(alignment.student_ids))
    ]
    assert all(alignment.matched)


def test_vocabulary_map_pairs_tokens_by_their_bytes(tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    pairs = vocabulary.teacher_to_student
    assert len(set(pairs.values())) == len(pairs) == vocabulary.num_shared
    assert 250 < vocabulary.num_shared < len(student_tokenizer)
    for token in ("Ġanswer", "Ġ12", "Ċ", "!"):
        assert pairs[teacher_vocab[token]] == student_vocab[token]
    assert teacher_vocab["Ġ19"] not in pairs or "Ġ19" in student_vocab
    # Special tokens: by role (EOS, BOS), never by a text token of the same spelling.
    assert pairs[teacher_vocab["<|endoftext|>"]] == student_vocab["</s>"]
    assert pairs[teacher_vocab["<|begin|>"]] == student_vocab["<s>"]
    assert teacher_vocab["<|pad|>"] not in pairs
    shared = vocabulary.shared
    assert shared.student_size == len(student_tokenizer)
    assert shared.teacher_size == len(teacher_tokenizer)
    assert torch.equal(shared.teacher_ids, torch.tensor(sorted(pairs)))


def test_byte_level_and_metaspace_markers_normalise_to_the_same_bytes(tokenizers) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    corpus = ["The answer is 19. Tom has 12 apples.", "the café\n"] * 8
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_tokens(["<0x0A>"])  # a byte-fallback token, as SentencePiece models have
    metaspace = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    byte_level = tokenizers[0]
    keys = token_byte_keys(metaspace)
    vocab = metaspace.get_vocab()
    assert keys[vocab["▁answer"]] == ("text", b" answer")
    byte_keys = token_byte_keys(byte_level)
    assert byte_keys[byte_level.get_vocab()["Ġanswer"]] == ("text", b" answer")
    assert byte_keys[byte_level.get_vocab()["Ċ"]] == ("text", b"\n")
    vocabulary = build_vocabulary_map(byte_level, metaspace)
    assert vocabulary.student_id(vocab["▁answer"]) == byte_level.get_vocab()["Ġanswer"]
    assert vocabulary.student_id(vocab["</s>"]) == byte_level.eos_token_id
    # "<0x0A>" was added as a plain token here, so it is an added token: not paired with Ċ.
    assert vocabulary.student_id(vocab["<0x0A>"]) is None


def test_byte_fallback_tokens_decode_to_their_byte() -> None:
    from kdlab.data.alignment import _token_bytes

    assert _token_bytes("<0x0A>", "metaspace") == b"\n"
    assert _token_bytes("▁▁x", "metaspace") == b"  x"
    assert _token_bytes("Ã©", "byte_level") == "é".encode()
    assert _token_bytes("ĠĠ", "byte_level") == b"  "


# ------------------------------------------------------------------ records and batches


def record(index: int, output: str) -> dict:
    return {"instruction": f"Question {index}: add 12 and 7.", "input": "", "output": output}


def test_record_pair_positions_predict_each_groups_first_token(tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    example = record(0, TEXTS[1])
    pair = tokenize_record_pair(example, student_tokenizer, teacher_tokenizer, vocabulary)
    assert pair.student == tokenize_record(example, student_tokenizer)
    assert pair.teacher == tokenize_record(example, teacher_tokenizer)
    alignment = align_response(TEXTS[1], student_tokenizer, teacher_tokenizer, vocabulary)
    assert len(pair.student_positions) == len(alignment.groups)
    for position, teacher_position, group in zip(
        pair.student_positions, pair.teacher_positions, alignment.groups, strict=True
    ):
        assert pair.student.input_ids[position + 1] == alignment.student_ids[group.student.start]
        assert (
            pair.teacher.input_ids[teacher_position + 1]
            == alignment.teacher_ids[group.teacher.start]
        )
    assert pair.matched == alignment.matched
    assert pair.student_positions[0] == pair.student.prompt_length - 1


def test_truncation_keeps_groups_inside_both_sequences(tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    example = record(1, TEXTS[0])
    full = tokenize_record_pair(example, student_tokenizer, teacher_tokenizer, vocabulary)
    cutoff = full.student.prompt_length + 9
    cut = tokenize_record_pair(
        example,
        student_tokenizer,
        teacher_tokenizer,
        vocabulary,
        TokenizeOptions(cutoff_len=cutoff),
    )
    kept = len(cut.student_positions)
    assert 0 < kept < len(full.student_positions)
    assert cut.student_positions == full.student_positions[:kept]
    assert cut.teacher_positions == full.teacher_positions[:kept]
    assert max(cut.student_positions) + 1 < len(cut.student.input_ids)
    assert max(cut.teacher_positions) + 1 < len(cut.teacher.input_ids)
    # The next group's first token is outside one of the truncated sequences.
    assert full.student_positions[kept] + 1 >= cutoff or full.teacher_positions[kept] + 1 >= cutoff
    prompt_only = tokenize_record_pair(
        example, student_tokenizer, teacher_tokenizer, vocabulary, TokenizeOptions(cutoff_len=5)
    )
    assert prompt_only.student_positions == prompt_only.teacher_positions == []


def collate(student_tokenizer, teacher_tokenizer, outputs: list[str]) -> dict[str, torch.Tensor]:
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    examples = [
        tokenize_record_pair(
            record(index, output), student_tokenizer, teacher_tokenizer, vocabulary
        ).as_dict()
        for index, output in enumerate(outputs)
    ]
    collator = CrossTokenizerCollator(
        student_tokenizer.pad_token_id, teacher_tokenizer.pad_token_id
    )
    return collator(examples)


def test_collator_builds_paired_masks(tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = collate(student_tokenizer, teacher_tokenizer, TEXTS[:3])
    student_mask, teacher_mask = batch["align_student_mask"], batch["align_teacher_mask"]
    assert student_mask.shape == batch["input_ids"].shape
    assert teacher_mask.shape == batch["teacher_input_ids"].shape
    assert torch.equal(student_mask.sum(1), teacher_mask.sum(1))
    assert not bool((batch["align_matched"] & ~student_mask).any())
    assert 0 < int(batch["align_matched"].sum()) < int(student_mask.sum())
    # Aligned positions predict response tokens on both sides.
    assert not bool((student_mask & ~response_mask(batch["labels"])).any())
    assert not bool((teacher_mask & ~response_mask(batch["teacher_labels"])).any())
    padding = batch["teacher_attention_mask"] == 0
    assert bool((batch["teacher_input_ids"][padding] == teacher_tokenizer.pad_token_id).all())
    alignment = batch_alignment(batch)
    assert alignment.student_mask is student_mask


def final_states(model, input_ids, attention_mask) -> HiddenStates:
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    head = model.get_output_embeddings()
    return HiddenStates(output.hidden_states[-1], head.weight, getattr(head, "bias", None))


def test_losses_on_real_models_and_batches(model_dirs, tokenizers) -> None:
    from transformers import AutoModelForCausalLM

    student_model, teacher_model = (
        AutoModelForCausalLM.from_pretrained(directory) for directory in model_dirs
    )
    student_tokenizer, teacher_tokenizer = tokenizers
    spec = KDLossSpec(temperature=2.0)

    batch = collate(student_tokenizer, teacher_tokenizer, TEXTS[:3])
    student = final_states(student_model, batch["input_ids"], batch["attention_mask"])
    with torch.inference_mode():
        teacher = final_states(
            teacher_model, batch["teacher_input_ids"], batch["teacher_attention_mask"]
        )
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer).shared
    alignment = batch_alignment(batch)
    for method in CROSS_TOKENIZER_LOSSES:
        method_spec = dataclasses.replace(spec, divergence=method)
        loss = cross_tokenizer_loss(
            student, teacher, alignment, vocabulary, method_spec, chunk_size=16
        )
        (gradient,) = torch.autograd.grad(loss, student.hidden)
        assert loss.item() > 0 and torch.isfinite(gradient).all()
        assert gradient[~alignment.student_mask].abs().max() == 0
        assert gradient[alignment.student_mask].abs().amax(dim=-1).min() > 0

    # Same tokenizer on both sides: the alignment is the response mask and aligned_kl is
    # forward KL on it, exactly.
    same = collate(student_tokenizer, student_tokenizer, TEXTS[:3])
    assert torch.equal(same["align_student_mask"], response_mask(same["labels"]))
    assert torch.equal(same["align_teacher_mask"], same["align_student_mask"])
    assert torch.equal(same["align_matched"], same["align_student_mask"])
    teacher_model_same = AutoModelForCausalLM.from_pretrained(model_dirs[0])
    torch.manual_seed(0)
    for parameter in teacher_model_same.parameters():
        parameter.data += 0.3 * torch.randn_like(parameter)
    student = final_states(student_model, same["input_ids"], same["attention_mask"])
    with torch.no_grad():
        teacher = final_states(teacher_model_same, same["input_ids"], same["attention_mask"])
    vocabulary = build_vocabulary_map(student_tokenizer, student_tokenizer).shared
    aligned = cross_tokenizer_loss(
        student,
        teacher,
        batch_alignment(same),
        vocabulary,
        dataclasses.replace(spec, divergence="aligned_kl"),
        chunk_size=16,
    )
    forward = chunked_distillation_loss(
        student, teacher, response_mask(same["labels"]), spec, chunk_size=16
    )
    assert forward.item() > 0.01
    assert torch.equal(aligned, forward)


# ------------------------------------------------------------------ on-policy samples


@pytest.mark.parametrize("text", TEXTS[:4])
@pytest.mark.parametrize("eos", [True, False])
def test_a_valid_sample_aligns_like_its_text(tokenizers, text: str, eos: bool) -> None:
    """Sampled ids that spell valid UTF-8: the student keeps its ids, the teacher gets the
    same tokens and groups as the gold-text alignment of that text."""
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    gold = align_response(text, student_tokenizer, teacher_tokenizer, vocabulary, add_eos=eos)
    sampled = align_sampled_response(
        gold.student_ids, student_tokenizer, teacher_tokenizer, vocabulary
    )
    assert sampled.student_ids == gold.student_ids
    assert sampled.teacher_ids == gold.teacher_ids
    assert as_tuples(sampled.groups) == as_tuples(gold.groups)
    assert sampled.matched == gold.matched


def test_invalid_utf8_samples_align_in_characters(tokenizers) -> None:
    """A lone continuation byte and a truncated character: the teacher reads U+FFFD there,
    and each bad run is one group against U+FFFD's tokens; the rest aligns as text."""
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    keys = token_byte_keys(student_tokenizer)
    by_bytes = {value[1]: index for index, value in keys.items() if value[0] == "text"}
    good = student_tokenizer(" apples", add_special_tokens=False)["input_ids"]
    lone, lead = by_bytes[b"\xa9"], by_bytes[b"\xc3"]  # "©" alone; half of "é"
    ids = [*good, lone, *good, lead, student_tokenizer.eos_token_id]
    alignment = align_sampled_response(ids, student_tokenizer, teacher_tokenizer, vocabulary)
    assert alignment.student_ids == ids
    text = teacher_tokenizer.decode(alignment.teacher_ids, skip_special_tokens=True)
    assert text == " apples\ufffd apples\ufffd"
    assert alignment.teacher_ids[-1] == teacher_tokenizer.eos_token_id
    groups = [
        (
            [alignment.student_ids[i] for i in group.student],
            teacher_tokenizer.decode([alignment.teacher_ids[i] for i in group.teacher]),
        )
        for group in alignment.groups
    ]
    assert ([lone], "\ufffd") in groups and ([lead], "\ufffd") in groups
    assert groups[-1] == ([student_tokenizer.eos_token_id], teacher_tokenizer.eos_token)
    assert [i for g in alignment.groups for i in g.student] == list(range(len(ids)))
    assert [i for g in alignment.groups for i in g.teacher] == list(
        range(len(alignment.teacher_ids))
    )


def test_a_sampled_record_pairs_positions_after_each_sides_prompt(tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    text = "The café. The answer is 19"
    response = [
        *student_tokenizer(text, add_special_tokens=False)["input_ids"],
        student_tokenizer.eos_token_id,
    ]
    student_prompt, teacher_prompt = [1, 5, 6], [1, 7, 8, 9]
    pair = pair_sampled_record(
        student_prompt, response, teacher_prompt, student_tokenizer, teacher_tokenizer,
        vocabulary, cutoff_len=12,
    )  # fmt: skip
    assert pair.student.input_ids == student_prompt + response  # never cut
    assert pair.teacher.input_ids[:4] == teacher_prompt and len(pair.teacher.input_ids) == 12
    alignment = align_sampled_response(response, student_tokenizer, teacher_tokenizer, vocabulary)
    kept = [g for g in alignment.groups if 4 + g.teacher.start < 12]
    assert pair.student_positions == [3 + g.student.start - 1 for g in kept]
    assert pair.teacher_positions == [4 + g.teacher.start - 1 for g in kept]
    assert pair.matched == alignment.matched[: len(kept)]


def test_tokenize_record_pairs_indexes_every_record(tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = tokenizers
    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    records = [record(index, text) for index, text in enumerate(TEXTS[:3])]
    examples = tokenize_record_pairs(records, student_tokenizer, teacher_tokenizer, vocabulary)
    assert [example["index"] for example in examples] == [0, 1, 2]
    for example, item in zip(examples, records, strict=True):
        single = tokenize_record_pair(item, student_tokenizer, teacher_tokenizer, vocabulary)
        assert example == {**single.as_dict(), "index": example["index"]}
