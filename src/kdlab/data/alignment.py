"""Cross-tokenizer alignment: which student and teacher positions predict the same text.

Two tokenizers split the same response text differently. Both are run on the text with
character offsets (``return_offsets_mapping``) and the token sequences are cut into
*aligned groups*: maximal runs of consecutive tokens, one run per side, that cover the same
character span. A group closes exactly where both tokenizations have a token boundary at the
same character (the boundaries *coincide*); this is how TRL's GOLD trainer and ULD's
successors align two tokenizations. The loss then compares one student and one teacher
distribution per group: those that predict the group's **first** token. At that position
both models have read exactly the same text (everything before the group), so their
next-token distributions answer the same question.

Boundaries that do not coincide
-------------------------------
Where one side has a token boundary and the other does not, the tokens on both sides are
merged into one group that runs to the next common boundary, and only the group's start is
compared; the predictions of the group's later tokens are *not* distilled (they condition on
different text: the student has read ``" un"``, the teacher ``" unbel"``). Example, the text
``" unbelievable"`` (13 characters)::

    student  " un" | "believ" | "able"      ends at 3, 9, 13
    teacher  " unbel" | "ievable"           ends at 6, 13

The only common boundary is 13, so the whole word is one group ``(student tokens 0..2,
teacher tokens 0..1)``, compared once: the student's distribution before ``" un"`` against
the teacher's before ``" unbel"``. Its first tokens differ, so the pair is *unmatched*
(``aligned_kl`` uses ULD alone there, see :mod:`kdlab.losses.cross_tokenizer`). A word split
the same way on both sides (``" the"`` in both) gives a 1:1 group whose tokens map to each
other: a *matched* pair.

Offsets and their traps
-----------------------
* The tokenizers' character offsets are turned into UTF-8 **byte** offsets
  (:func:`to_byte_offsets`) and groups are cut in bytes. A byte-level BPE can split one
  character into several tokens (``"é"`` → ``"Ã"``, ``"©"``); each of them reports the whole
  character's span, and their own bytes (from the byte-level alphabet) give each its byte
  span. So the same tokenizer on both sides aligns every token with itself, also inside a
  character, while ``"Ã" "©"`` against a single ``"é"`` token is one group. Where a run of
  such tokens cannot be split (their bytes do not add up to the character's), the run stays
  one unit: a boundary only counts where the next token ends *later*.
* Only token **ends** are used: a token covers the text from the previous token's end to its
  own. Byte-level tokenizers whose post-processor trims whitespace from offsets
  (``trim_offsets``) move starts, not ends, so the alignment does not depend on that setting.
* Ends must not decrease; offsets that do are refused (``ValueError``).
* The EOS appended to each response is aligned with the other side's EOS as a group of its
  own (both predict "the response ends here"); it is matched through the special-token roles
  of :func:`build_vocabulary_map`.
* Special tokens written *in* the text (``"a</s>b"`` splits out ``"</s>"``) have real spans
  and align like any token.

Vocabulary map
--------------
:func:`build_vocabulary_map` pairs the tokens of both vocabularies that stand for the same
text. Tokens are compared by the **bytes** they decode to, so the marker conventions do not
matter: byte-level BPE (``Ġ`` = space, ``Ċ`` = newline, GPT-2's byte alphabet) and
SentencePiece/Metaspace (``▁`` = space, ``<0x0A>`` byte-fallback tokens) normalise to the same
bytes. Added/special tokens pair only with added tokens of the same content, and the EOS,
BOS and UNK roles pair with each other first (``</s>`` ↔ ``<|endoftext|>``).
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from kdlab.data.tokenize import (
    DEFAULT_TOKENIZE,
    IGNORE_INDEX,
    Collator,
    TokenizedRecord,
    TokenizeOptions,
    tokenize_each,
    tokenize_record,
)
from kdlab.losses.cross_tokenizer import SharedVocabulary, TokenAlignment

__all__ = [
    "AlignedGroup",
    "CrossTokenizedRecord",
    "CrossTokenizerCollator",
    "ResponseAlignment",
    "VocabularyMap",
    "align_offsets",
    "align_response",
    "align_sampled_response",
    "batch_alignment",
    "build_vocabulary_map",
    "encode_with_offsets",
    "pair_sampled_record",
    "to_byte_offsets",
    "token_byte_keys",
    "tokenize_record_pair",
    "tokenize_record_pairs",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- offsets


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens added) and their character offsets.

    The ids are exactly those :func:`kdlab.data.tokenize.tokenize_record` produces for a
    response (the same call, plus ``return_offsets_mapping``). Needs a fast tokenizer.
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(index) for index in encoding["input_ids"]]
    offsets = [(int(start), int(end)) for start, end in encoding["offset_mapping"]]
    return ids, offsets


@dataclass(frozen=True)
class AlignedGroup:
    """Consecutive student and teacher tokens that cover the same text.

    Attributes:
        student: student token indices (within the aligned token sequence), never empty.
        teacher: teacher token indices, never empty.
        start, end: the span ``[start, end)`` the group covers, in the offsets' coordinates
            (bytes for :func:`align_response`): the end of the previous group, and the
            common boundary that closes this one.
    """

    student: range
    teacher: range
    start: int
    end: int


def _unit_ends(offsets: Sequence[tuple[int, int]], side: str) -> dict[int, int]:
    """Boundary offset → index of the last token before it, for one side.

    A boundary follows token ``i`` when the next token ends later (or ``i`` is last): tokens
    with equal ends (pieces of one character) never have a boundary between them.
    """
    ends = [end for _, end in offsets]
    for index, (start, end) in enumerate(offsets):
        if start < 0 or end < start:
            raise ValueError(f"{side} offset {index} is {(start, end)}: not a character span")
        if index and end < ends[index - 1]:
            raise ValueError(
                f"{side} offsets are not monotone: token {index} ends at {end}, before token "
                f"{index - 1} (ends at {ends[index - 1]})"
            )
    boundaries: dict[int, int] = {}
    for index, end in enumerate(ends):
        if index == len(ends) - 1 or ends[index + 1] > end:
            boundaries[end] = index
    return boundaries


def align_offsets(
    student_offsets: Sequence[tuple[int, int]], teacher_offsets: Sequence[tuple[int, int]]
) -> list[AlignedGroup]:
    """Cut two tokenizations of one text into aligned groups (module docstring).

    Args:
        student_offsets, teacher_offsets: ``(start, end)`` offsets of each token into the
            same text: characters as ``return_offsets_mapping`` gives them, or bytes from
            :func:`to_byte_offsets` (what :func:`align_response` uses).

    Returns:
        The groups in text order. Every token of both sides is in exactly one group, except
        for a trailing run on one side when the other side's tokens end earlier (offsets
        of texts that differ at the end); such a run is dropped.
    """
    student_units = _unit_ends(student_offsets, "student")
    teacher_units = _unit_ends(teacher_offsets, "teacher")
    common = sorted(set(student_units) & set(teacher_units))
    groups: list[AlignedGroup] = []
    student_next = teacher_next = 0
    previous = 0
    for boundary in common:
        student_last, teacher_last = student_units[boundary], teacher_units[boundary]
        groups.append(
            AlignedGroup(
                student=range(student_next, student_last + 1),
                teacher=range(teacher_next, teacher_last + 1),
                start=previous,
                end=boundary,
            )
        )
        student_next, teacher_next, previous = student_last + 1, teacher_last + 1, boundary
    if student_next < len(student_offsets) and teacher_next < len(teacher_offsets):
        # The two sides end at different characters: the rest still starts at a common
        # boundary, so it is one (last) group compared at its start.
        end = max(student_offsets[-1][1], teacher_offsets[-1][1])
        groups.append(
            AlignedGroup(
                student=range(student_next, len(student_offsets)),
                teacher=range(teacher_next, len(teacher_offsets)),
                start=previous,
                end=end,
            )
        )
    return groups


def to_byte_offsets(
    text: str, offsets: Sequence[tuple[int, int]], pieces: Sequence[bytes] | None = None
) -> list[tuple[int, int]]:
    """Character offsets into ``text`` → byte offsets into ``text.encode("utf-8")``.

    Args:
        text: the tokenized text.
        offsets: ``(start, end)`` character offsets of its tokens.
        pieces: each token's bytes (:func:`token_byte_keys`' bytes), used to split a run of
            tokens that share one end (pieces of one character): when their lengths add up
            to the run's bytes (from the previous token's end) they get consecutive byte
            spans; otherwise, or without ``pieces``, they keep the shared end.
    """
    char_to_byte = [0]
    for character in text:
        char_to_byte.append(char_to_byte[-1] + len(character.encode("utf-8")))
    for start, end in offsets:
        if not 0 <= start <= end <= len(text):
            raise ValueError(
                f"offset {(start, end)} is not a span of the {len(text)}-character text"
            )
    spans = [(char_to_byte[start], char_to_byte[end]) for start, end in offsets]
    if pieces is None:
        return spans
    if len(pieces) != len(spans):
        raise ValueError(f"{len(pieces)} pieces for {len(spans)} tokens")
    first = 0
    while first < len(spans):
        last = first
        while last + 1 < len(spans) and spans[last + 1][1] == spans[first][1]:
            last += 1
        if last > first:
            run_start = spans[first - 1][1] if first else 0
            lengths = [len(pieces[index]) for index in range(first, last + 1)]
            if sum(lengths) == spans[first][1] - run_start:
                cursor = run_start
                for index, length in zip(range(first, last + 1), lengths, strict=True):
                    spans[index] = (cursor, cursor + length)
                    cursor += length
        first = last + 1
    return spans


# --------------------------------------------------------------------------- vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte → the printable character standing for it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_BYTE_LEVEL_DECODER = {character: byte for byte, character in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_METASPACE = "\u2581"


def _tokenizer_kind(tokenizer: Any) -> str:
    """``"byte_level"``, ``"metaspace"`` or ``"plain"``: how token strings encode text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "plain"
    description = repr(backend.pre_tokenizer) + repr(backend.decoder)
    if "ByteLevel" in description:
        return "byte_level"
    if "Metaspace" in description or _METASPACE in description:
        return "metaspace"
    return "plain"


def _token_bytes(token: str, kind: str) -> bytes:
    """The text bytes a (non-added) token stands for."""
    if kind == "byte_level":
        if all(character in _BYTE_LEVEL_DECODER for character in token):
            return bytes(_BYTE_LEVEL_DECODER[character] for character in token)
        return token.encode("utf-8")
    if kind == "metaspace":
        fallback = _BYTE_FALLBACK.match(token)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return token.replace(_METASPACE, " ").encode("utf-8")
    return token.encode("utf-8")


def token_byte_keys(tokenizer: Any) -> dict[int, tuple[str, bytes]]:
    """Token id → normalised key: ``("text", bytes)`` for ordinary tokens (the bytes they
    decode to), ``("added", content)`` for added/special tokens. Ids ≥ ``len(tokenizer)``
    are not tokens and are left out."""
    kind = _tokenizer_kind(tokenizer)
    added = set(tokenizer.get_added_vocab())
    size = len(tokenizer)
    keys: dict[int, tuple[str, bytes]] = {}
    for token, index in tokenizer.get_vocab().items():
        if not 0 <= index < size:
            continue
        if token in added:
            keys[index] = ("added", token.encode("utf-8"))
        else:
            keys[index] = ("text", _token_bytes(token, kind))
    return keys


@dataclass(frozen=True)
class VocabularyMap:
    """Which teacher token is which student token.

    Attributes:
        teacher_to_student: teacher id → student id, one to one.
        student_size, teacher_size: ``len(tokenizer)`` of each side.
    """

    teacher_to_student: Mapping[int, int]
    student_size: int
    teacher_size: int

    @property
    def num_shared(self) -> int:
        return len(self.teacher_to_student)

    def student_id(self, teacher_id: int) -> int | None:
        """The student token for ``teacher_id``, or None if it has none."""
        return self.teacher_to_student.get(teacher_id)

    @cached_property
    def shared(self) -> SharedVocabulary:
        """The map as the loss's id tensors (CPU, ordered by teacher id; built once)."""
        pairs = sorted(self.teacher_to_student.items())
        return SharedVocabulary(
            student_ids=torch.tensor([s for _, s in pairs], dtype=torch.int64),
            teacher_ids=torch.tensor([t for t, _ in pairs], dtype=torch.int64),
            student_size=self.student_size,
            teacher_size=self.teacher_size,
        )


_SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "unk_token_id")


def build_vocabulary_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabularyMap:
    """Pair the tokens both vocabularies share (module docstring).

    Order: the EOS, BOS and UNK roles first (when both tokenizers define them), then every
    teacher token, by increasing id, whose :func:`token_byte_keys` key the student also has.
    Each id is used at most once: where one vocabulary holds several ids with the same key
    (rare: duplicate added tokens), the lowest unused one is paired and the others stay
    unmapped. The same tokenizer on both sides gives the identity map.
    """
    student_keys = token_byte_keys(student_tokenizer)
    teacher_keys = token_byte_keys(teacher_tokenizer)
    student_by_key: dict[tuple[str, bytes], list[int]] = {}
    for index in sorted(student_keys):
        student_by_key.setdefault(student_keys[index], []).append(index)

    mapping: dict[int, int] = {}
    used_students: set[int] = set()
    for role in _SPECIAL_ROLES:
        teacher_id = getattr(teacher_tokenizer, role, None)
        student_id = getattr(student_tokenizer, role, None)
        if (
            teacher_id is None
            or student_id is None
            or teacher_id in mapping
            or student_id in used_students
        ):
            continue
        mapping[int(teacher_id)] = int(student_id)
        used_students.add(int(student_id))
    for teacher_id in sorted(teacher_keys):
        if teacher_id in mapping:
            continue
        for student_id in student_by_key.get(teacher_keys[teacher_id], ()):
            if student_id not in used_students:
                mapping[teacher_id] = student_id
                used_students.add(student_id)
                break
    return VocabularyMap(
        teacher_to_student=mapping,
        student_size=len(student_tokenizer),
        teacher_size=len(teacher_tokenizer),
    )


def _token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """The bytes each of ``ids`` stands for (see :func:`token_byte_keys`)."""
    kind = _tokenizer_kind(tokenizer)
    added = tokenizer.get_added_vocab()
    return [
        token.encode("utf-8") if token in added else _token_bytes(token, kind)
        for token in tokenizer.convert_ids_to_tokens(list(ids))
    ]


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class ResponseAlignment:
    """One response tokenized by both tokenizers, and its aligned groups.

    Attributes:
        student_ids, teacher_ids: the response tokens (text, then EOS when added): exactly
            the response part of each side's :func:`~kdlab.data.tokenize.tokenize_record`.
        groups: the aligned groups over those tokens (the EOS pair is the last group).
        matched: per group, whether its first teacher token maps to its first student token.
    """

    student_ids: list[int]
    teacher_ids: list[int]
    groups: list[AlignedGroup]
    matched: list[bool]


def align_response(
    text: str,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    vocabulary: VocabularyMap,
    *,
    add_eos: bool = True,
) -> ResponseAlignment:
    """Tokenize ``text`` with both tokenizers and align the two token sequences.

    With ``add_eos`` (and both tokenizers having an EOS) each side's EOS is appended and
    forms the last group, after the text's groups. The groups' ``start``/``end`` are byte
    offsets into ``text.encode("utf-8")``.
    """
    student_ids, student_offsets = encode_with_offsets(student_tokenizer, text)
    teacher_ids, teacher_offsets = encode_with_offsets(teacher_tokenizer, text)
    groups = align_offsets(
        to_byte_offsets(text, student_offsets, _token_pieces(student_tokenizer, student_ids)),
        to_byte_offsets(text, teacher_offsets, _token_pieces(teacher_tokenizer, teacher_ids)),
    )
    return _with_eos(
        student_ids,
        teacher_ids,
        groups,
        vocabulary,
        student_eos=student_tokenizer.eos_token_id if add_eos else None,
        teacher_eos=teacher_tokenizer.eos_token_id if add_eos else None,
        end=len(text.encode("utf-8")),
    )


def _with_eos(
    student_ids: list[int],
    teacher_ids: list[int],
    groups: list[AlignedGroup],
    vocabulary: VocabularyMap,
    *,
    student_eos: int | None,
    teacher_eos: int | None,
    end: int,
) -> ResponseAlignment:
    """Append each side's EOS (when given) and, when both are, their group; flag the matched
    groups (first teacher token maps to first student token)."""
    if student_eos is not None:
        student_ids.append(int(student_eos))
    if teacher_eos is not None:
        teacher_ids.append(int(teacher_eos))
    if student_eos is not None and teacher_eos is not None:
        groups.append(
            AlignedGroup(
                student=range(len(student_ids) - 1, len(student_ids)),
                teacher=range(len(teacher_ids) - 1, len(teacher_ids)),
                start=end,
                end=end,
            )
        )
    matched = [
        vocabulary.student_id(teacher_ids[group.teacher.start]) == student_ids[group.student.start]
        for group in groups
    ]
    return ResponseAlignment(
        student_ids=student_ids, teacher_ids=teacher_ids, groups=groups, matched=matched
    )


def _decoded_spans(pieces: Sequence[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """Decode token bytes that are not valid UTF-8 (``errors="replace"``, as Python's and
    the tokenizers' decoders do) and give each token its span in *characters* of the text.

    A token that leaves an incomplete character pending ends after that character (the
    character, or the U+FFFD replacing it, is partly its own), so the pieces of one
    character share one end and are never split by the alignment.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    emitted = 0
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        output = decoder.decode(piece)
        parts.append(output)
        emitted += len(output)
        pending = bool(decoder.getstate()[0])
        end = emitted + (1 if pending else 0)
        spans.append((spans[-1][1] if spans else 0, end))
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts), spans


def align_sampled_response(
    sampled_ids: Sequence[int],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    vocabulary: VocabularyMap,
) -> ResponseAlignment:
    """Align a response the *student* sampled (on-policy GKD) with its re-tokenization.

    The student's ids are kept as sampled (they are what it is trained on); the text is the
    concatenation of their bytes (:func:`token_byte_keys`), tokenized for the teacher
    (:func:`encode_with_offsets`). The student's spans come from its tokens' own bytes, the
    teacher's from its offsets, and the two are cut into groups by :func:`align_offsets`.
    A final student EOS ends the text; the teacher then gets its own EOS, and the two form
    the last group.

    Trap: sampled tokens need not be valid UTF-8 (a byte-level model can sample half of a
    character, or a lone continuation byte). The text then holds U+FFFD where the bytes
    were invalid, and both sides are aligned in characters of that text instead of bytes
    (:func:`_decoded_spans`): a replaced byte run is one unit on the student's side and
    U+FFFD's tokens on the teacher's.
    """
    student_ids = [int(index) for index in sampled_ids]
    student_eos = student_tokenizer.eos_token_id
    ends_with_eos = bool(student_ids) and student_eos is not None and student_ids[-1] == student_eos
    body = student_ids[:-1] if ends_with_eos else student_ids
    pieces = _token_pieces(student_tokenizer, body)
    try:
        text = b"".join(pieces).decode("utf-8")
    except UnicodeDecodeError:
        text, student_spans = _decoded_spans(pieces)
        teacher_ids, teacher_spans = encode_with_offsets(teacher_tokenizer, text)
    else:
        student_spans = []
        for piece in pieces:
            start = student_spans[-1][1] if student_spans else 0
            student_spans.append((start, start + len(piece)))
        teacher_ids, teacher_offsets = encode_with_offsets(teacher_tokenizer, text)
        teacher_spans = to_byte_offsets(
            text, teacher_offsets, _token_pieces(teacher_tokenizer, teacher_ids)
        )
    groups = align_offsets(student_spans, teacher_spans)
    return _with_eos(
        body,
        teacher_ids,
        groups,
        vocabulary,
        student_eos=student_eos if ends_with_eos else None,
        teacher_eos=teacher_tokenizer.eos_token_id if ends_with_eos else None,
        end=student_spans[-1][1] if student_spans else 0,
    )


@dataclass
class CrossTokenizedRecord:
    """One training example for both tokenizers, with its aligned positions.

    Attributes:
        student, teacher: each side's :class:`~kdlab.data.tokenize.TokenizedRecord` (prompt
            built with that side's tokenizer, same response text).
        student_positions, teacher_positions: paired sequence positions (position t predicts
            token t + 1), one pair per aligned group whose first token survived truncation on
            both sides; increasing.
        matched: per pair, whether the two next tokens map to each other.
    """

    student: TokenizedRecord
    teacher: TokenizedRecord
    student_positions: list[int]
    teacher_positions: list[int]
    matched: list[bool]

    @property
    def truncated(self) -> bool:
        """Either side cut at ``cutoff_len``."""
        return self.student.truncated or self.teacher.truncated

    def as_dict(self) -> dict[str, Any]:
        """The collator's input: the student's usual keys plus ``teacher_*`` and ``align_*``."""
        example = self.student.as_dict()
        example.update(
            {
                "teacher_input_ids": self.teacher.input_ids,
                "teacher_labels": self.teacher.labels,
                "teacher_prompt_length": self.teacher.prompt_length,
                "align_student_positions": self.student_positions,
                "align_teacher_positions": self.teacher_positions,
                "align_matched": self.matched,
            }
        )
        return example


def tokenize_record_pair(
    record: dict[str, Any],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    vocabulary: VocabularyMap,
    options: TokenizeOptions = DEFAULT_TOKENIZE,
    *,
    response: str | None = None,
) -> CrossTokenizedRecord:
    """:func:`~kdlab.data.tokenize.tokenize_record` for both sides, plus the alignment.

    The student's record is exactly what ``tokenize_record`` gives for the student alone
    (its CE and everything else are unchanged). A group is kept when its first token is
    inside both truncated sequences and has a predicting position (a prompt of ≥ 1 token).
    """
    text = record.get("output", "") if response is None else response
    student, teacher = (
        tokenize_record(record, tokenizer, options, response=text)
        for tokenizer in (student_tokenizer, teacher_tokenizer)
    )
    alignment = align_response(
        text, student_tokenizer, teacher_tokenizer, vocabulary, add_eos=options.add_eos
    )
    _check_response(student, alignment.student_ids, "student")
    _check_response(teacher, alignment.teacher_ids, "teacher")
    return _paired_record(student, teacher, alignment)


def _paired_record(
    student: TokenizedRecord, teacher: TokenizedRecord, alignment: ResponseAlignment
) -> CrossTokenizedRecord:
    """The two records and the positions of the groups that survived truncation on both
    sides (the group's first token inside both sequences, after a prompt of >= 1 token)."""
    student_positions: list[int] = []
    teacher_positions: list[int] = []
    matched: list[bool] = []
    for group, is_matched in zip(alignment.groups, alignment.matched, strict=True):
        # The group's first token; its predicting position is one earlier. A prompt that
        # fills cutoff_len leaves prompt_length == len(input_ids): every group is dropped.
        student_token = student.prompt_length + group.student.start
        teacher_token = teacher.prompt_length + group.teacher.start
        if 0 < student_token < len(student.input_ids) and 0 < teacher_token < len(
            teacher.input_ids
        ):
            student_positions.append(student_token - 1)
            teacher_positions.append(teacher_token - 1)
            matched.append(is_matched)
    return CrossTokenizedRecord(
        student=student,
        teacher=teacher,
        student_positions=student_positions,
        teacher_positions=teacher_positions,
        matched=matched,
    )


def _prompt_and_response(prompt_ids: list[int], response_ids: list[int], cutoff_len: int):
    """A :class:`TokenizedRecord` of ``prompt + response`` (labels on the response), cut at
    ``cutoff_len`` like :func:`~kdlab.data.tokenize.tokenize_record`."""
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    return TokenizedRecord(
        input_ids=input_ids[:cutoff_len],
        labels=labels[:cutoff_len],
        prompt_length=min(len(prompt_ids), cutoff_len),
        truncated=len(input_ids) > cutoff_len,
    )


def pair_sampled_record(
    student_prompt_ids: Sequence[int],
    sampled_ids: Sequence[int],
    teacher_prompt_ids: Sequence[int],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    vocabulary: VocabularyMap,
    *,
    cutoff_len: int,
) -> CrossTokenizedRecord:
    """An on-policy example for both sides: the student's prompt and its own sampled
    response, and the teacher's prompt with that response re-tokenized
    (:func:`align_sampled_response`). The student side is kept whole (its sampling budget
    already fits ``cutoff_len``); the teacher side is cut at ``cutoff_len``."""
    alignment = align_sampled_response(
        sampled_ids, student_tokenizer, teacher_tokenizer, vocabulary
    )
    student_prompt = [int(index) for index in student_prompt_ids]
    student = _prompt_and_response(
        student_prompt, alignment.student_ids, len(student_prompt) + len(alignment.student_ids)
    )
    teacher = _prompt_and_response(
        [int(index) for index in teacher_prompt_ids], alignment.teacher_ids, cutoff_len
    )
    return _paired_record(student, teacher, alignment)


def tokenize_record_pairs(
    records: Sequence[dict[str, Any]],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    vocabulary: VocabularyMap,
    options: TokenizeOptions = DEFAULT_TOKENIZE,
    *,
    responses: Sequence[str] | None = None,
    complete: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """:func:`~kdlab.data.tokenize.tokenize_records` for a cross-tokenizer run: one
    :meth:`CrossTokenizedRecord.as_dict` example per record (with its ``index``), the
    same arguments after the vocabulary. Logs how many records were truncated on either
    side and how many keep no aligned position."""
    return tokenize_each(
        records,
        lambda record, record_options, response: tokenize_record_pair(
            record,
            student_tokenizer,
            teacher_tokenizer,
            vocabulary,
            record_options,
            response=response,
        ),
        options,
        responses=responses,
        complete=complete,
        lost=lambda pair: not pair.student_positions,
        lost_message="%d records keep no aligned response position after truncation: no KD "
        "term there",
        truncated_note=" (student or teacher tokens)",
    )


def _check_response(record: TokenizedRecord, response_ids: list[int], side: str) -> None:
    """Refuse a record whose (kept) response tokens are not the aligned ones."""
    kept = record.input_ids[record.prompt_length :]
    if kept != response_ids[: len(kept)]:
        raise ValueError(
            f"the {side}'s tokenized response differs from the aligned response tokens "
            "(a tokenizer that is not deterministic, or a changed tokenize_record)"
        )


@dataclass
class CrossTokenizerCollator:
    """Pads :meth:`CrossTokenizedRecord.as_dict` examples into a batch.

    Returns the student's usual :class:`~kdlab.data.tokenize.Collator` keys plus
    ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels`` (right-padded with
    the teacher's pad id / -100), and the alignment as ``[batch, seq]`` bool masks:
    ``align_student_mask``, ``align_teacher_mask`` (as many Trues per row, paired in order)
    and ``align_matched`` (subset of the student mask). :func:`batch_alignment` turns them
    into the loss's :class:`~kdlab.losses.cross_tokenizer.TokenAlignment`.
    """

    pad_token_id: int
    teacher_pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = Collator(self.pad_token_id)(examples)
        teacher_examples = [
            {
                "input_ids": example["teacher_input_ids"],
                "labels": example["teacher_labels"],
                "prompt_length": example["teacher_prompt_length"],
            }
            for example in examples
        ]
        teacher = Collator(self.teacher_pad_token_id)(teacher_examples)
        batch["teacher_input_ids"] = teacher["input_ids"]
        batch["teacher_attention_mask"] = teacher["attention_mask"]
        batch["teacher_labels"] = teacher["labels"]
        batch["teacher_prompt_lengths"] = teacher["prompt_lengths"]
        student_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        matched = torch.zeros_like(student_mask)
        teacher_mask = torch.zeros_like(teacher["input_ids"], dtype=torch.bool)
        for row, example in enumerate(examples):
            student_positions = torch.tensor(example["align_student_positions"], dtype=torch.long)
            teacher_positions = torch.tensor(example["align_teacher_positions"], dtype=torch.long)
            student_mask[row, student_positions] = True
            teacher_mask[row, teacher_positions] = True
            matched[row, student_positions] = torch.tensor(
                example["align_matched"], dtype=torch.bool
            )
        batch["align_student_mask"] = student_mask
        batch["align_teacher_mask"] = teacher_mask
        batch["align_matched"] = matched
        return batch


def batch_alignment(batch: Mapping[str, torch.Tensor]) -> TokenAlignment:
    """The loss's :class:`~kdlab.losses.cross_tokenizer.TokenAlignment` of a collated batch."""
    return TokenAlignment(
        student_mask=batch["align_student_mask"],
        teacher_mask=batch["align_teacher_mask"],
        matched=batch["align_matched"],
    )
