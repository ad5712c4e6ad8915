"""The method table: what each distillation method does, in one place.

Every distillation method kdlab offers has one :class:`MethodSpec` in :data:`METHODS`. Config
validation, the distill stage, the training objective, the teacher-output cache, the sweep
grid, the demo and the analysis ask the spec; nothing outside this module compares a method
name with a string. Adding a method (or a divergence, which is also an off-policy method of
the same name) is a line here plus its loss.

=================  ===========  ================  =========  ===================  ===========
method             teacher      KD divergence     on-policy  trains on            cache
=================  ===========  ================  =========  ===================  ===========
``sft``            no           none              no         gold responses       no
divergence names   yes          the method's own  no         gold responses       yes (*)
``uld``,           yes, any     the method's own  no         gold responses       no
``aligned_kl``     tokenizer    (two tokenizers)
``gkd``            yes          ``jsd``           λ share    student samples      off-policy
``seqkd``          yes          none              no         teacher responses    no
=================  ===========  ================  =========  ===================  ===========

(*) The teacher-output cache serves a run when :func:`teacher_cache_refusal` returns None.

Every divergence of the loss registry :data:`kdlab.losses.DIVERGENCES` is an off-policy
method of the same name, with the loss parameters it reads (:data:`DIVERGENCE_PARAMETERS`)
taken from the registry: adding a divergence there adds the method here. Likewise every
cross-tokenizer loss of :data:`kdlab.losses.CROSS_TOKENIZER_LOSSES` is a method of the same
name (:data:`CROSS_TOKENIZER_DIVERGENCES`): a teacher and a student with different
tokenizers, compared at aligned positions of the response (:mod:`kdlab.data.alignment`).
A run is cross-tokenizer when its divergence is one of them (:meth:`MethodSpec.cross_tokenizer`),
so ``gkd`` with ``distill.divergence: uld`` is on-policy GKD across tokenizers (the
student's samples are decoded and re-tokenized for the teacher).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kdlab.losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES
from kdlab.losses.divergences import DIVERGENCES

__all__ = [
    "CROSS_TOKENIZER_DIVERGENCES",
    "DIVERGENCE_PARAMETERS",
    "HIDDEN_CACHE",
    "METHODS",
    "PAPER_METHOD_NAMES",
    "SFT",
    "TEACHER_CACHE_KINDS",
    "TOPK_CACHE",
    "MethodSpec",
    "get_method",
    "method_choices",
    "teacher_cache_refusal",
    "unread_message",
    "unread_settings",
]

#: The divergences that compare two tokenizers (``distill.divergence`` values and methods of
#: the same name): the keys of :data:`kdlab.losses.CROSS_TOKENIZER_LOSSES`.
CROSS_TOKENIZER_DIVERGENCES: frozenset[str] = frozenset(CROSS_TOKENIZER_LOSSES)
#: Divergence name → the loss parameters it reads besides temperature, reduction and T²
#: scaling (``distill.<name>``); the valid ``distill.divergence`` values. Every divergence
#: is also a method of that name.
DIVERGENCE_PARAMETERS: Mapping[str, tuple[str, ...]] = {
    **{name: divergence.reads for name, divergence in DIVERGENCES.items()},
    **dict.fromkeys(CROSS_TOKENIZER_LOSSES, ()),
}
#: The paper scripts' ``kd_loss`` names of the divergences they had.
_PAPER_DIVERGENCE_NAMES = {"forward_kl": "kld", "reverse_kl": "reversekld"}

#: ``distill.*`` keys read by every run with a KD divergence.
_KD_KEYS = frozenset(
    {
        "divergence",
        "kd_weight",
        "temperature",
        "scale_by_t2",
        "reduction",
        "loss_on",
        "noise_std",
        "teacher_cache",
        "teacher_cache_kind",
    }
)
#: ``distill.*`` keys read by a run with a cross-tokenizer divergence: the loss reads the
#: temperature, the reduction and T² scaling only; the alignment covers the response, so
#: ``loss_on: all`` has no meaning; no noise, no cache (see :func:`teacher_cache_refusal`).
_CROSS_TOKENIZER_KD_KEYS = frozenset(
    {"divergence", "kd_weight", "temperature", "scale_by_t2", "reduction"}
)
#: ``distill.generation.*`` sampling keys, read only when the method samples.
_SAMPLING_KEYS = frozenset({"generation.temperature", "generation.top_k", "generation.top_p"})

#: ``distill.teacher_cache_kind`` values (:mod:`kdlab.training.teacher_cache`). ``hidden``
#: (the default) stores the teacher's final hidden states and its lm_head: the loss is the
#: live teacher's for every divergence and temperature (measured on smollm2-135m → its
#: 10-layer slice: < 0.01 % off, gradient cosine 1.0000 at T = 1, 2, 5), 2 · hidden_T bytes a
#: position. ``topk`` stores the top-k log-probabilities at T = 1 (6k + 4 bytes, k + 1
#: buckets): close only for forward KL at T = 1 (−1.8 to −2.2 % at k = 64), far off for
#: divergences that weight by the student (reverse KL −64 %, JSD −6 %), refused at T ≠ 1.
HIDDEN_CACHE, TOPK_CACHE = "hidden", "topk"
TEACHER_CACHE_KINDS = (HIDDEN_CACHE, TOPK_CACHE)


class DistillSettingsLike(Protocol):
    """The fields of :class:`kdlab.config.schema.DistillSettings` the table reads."""

    method: str
    divergence: str | None
    noise_std: float
    temperature: float
    teacher_cache_kind: str
    teacher_cache_topk: int
    lambda_on_policy: float
    seqkd_greedy: bool

    @property
    def generation(self) -> Any: ...


@dataclass(frozen=True)
class MethodSpec:
    """What one distillation method does.

    Attributes:
        name: the ``distill.method`` value.
        summary: one line for ``kdlab config`` and docs.
        needs_teacher: the method reads a teacher (everything but ``sft``).
        default_divergence: the token-level KD divergence used when ``distill.divergence``
            is unset; None = no KD term unless the config asks for one.
        on_policy: a share λ of the micro-batches is replaced by the student's own samples
            (GKD); those batches always need the live teacher.
        teacher_responses: the student trains on responses the teacher generated once
            (sequence-level KD) instead of the data's gold responses.
        cacheable: the teacher-output cache (top-k teacher log-probabilities of the data's
            responses) can stand in for the teacher's forward pass.
        paper_name: the paper scripts' ``kd_loss`` value, when the method is one of theirs.
        extra_keys: ``distill.*`` keys the method reads besides the KD keys.
        estimate_factor: default multiplier of a step's cost in sweep estimates.
    """

    name: str
    summary: str
    needs_teacher: bool
    default_divergence: str | None
    on_policy: bool = False
    teacher_responses: bool = False
    cacheable: bool = False
    paper_name: str | None = None
    extra_keys: frozenset[str] = frozenset()
    estimate_factor: float = 1.0

    def divergence(self, settings: DistillSettingsLike) -> str | None:
        """The KD divergence a run uses (None = no KD term): ``distill.divergence`` when set
        (``none`` switches it off), else the method's default; never one for ``sft``."""
        if not self.needs_teacher or settings.divergence == "none":
            return None
        return settings.divergence or self.default_divergence

    def cross_tokenizer(self, settings: DistillSettingsLike) -> bool:
        """Whether the run's KD divergence compares two tokenizers (:data:`CROSS_TOKENIZER_DIVERGENCES`):
        the teacher reads its own tokenization, and the vocabulary check is skipped."""
        return self.divergence(settings) in CROSS_TOKENIZER_DIVERGENCES

    def keys_read(self, settings: DistillSettingsLike) -> frozenset[str]:
        """Every ``distill.*`` key (dotted below ``distill.``) the run reads.

        A key outside this set has no effect on the run; the config loader refuses it when
        it is set to anything but its default.
        """
        keys = {"method", "chunk_size", *self.extra_keys}
        divergence = self.divergence(settings)
        if self.needs_teacher:
            keys.add("divergence")
        if divergence in CROSS_TOKENIZER_DIVERGENCES:
            keys |= _CROSS_TOKENIZER_KD_KEYS
        elif divergence is not None:
            keys |= _KD_KEYS
            keys.update(DIVERGENCE_PARAMETERS.get(divergence, ()))
            if settings.teacher_cache_kind == TOPK_CACHE:
                keys.add("teacher_cache_topk")
        if self.on_policy and settings.lambda_on_policy > 0:
            keys |= {"generation.max_new_tokens", "generation.do_sample"}
            if settings.generation.do_sample:
                keys |= _SAMPLING_KEYS
        if self.teacher_responses:
            keys |= {"generation.max_new_tokens"}
            if not settings.seqkd_greedy:
                keys |= _SAMPLING_KEYS
        return frozenset(keys)

    def uses_teacher_cache(self, settings: DistillSettingsLike, cache: str | None) -> bool:
        """Whether the KD term reads the teacher-output cache ``cache`` (a validated config)."""
        return (
            bool(cache)
            and self.cacheable
            and self.divergence(settings) is not None
            and not self.cross_tokenizer(settings)
        )

    def needs_live_teacher(self, settings: DistillSettingsLike, *, cached: bool) -> bool:
        """Whether training runs the teacher model: always without a cache; with one, only
        for on-policy batches (the student's samples are in no cache)."""
        if not self.needs_teacher:
            return False
        if self.teacher_responses and self.divergence(settings) is None:
            return False  # seqKD without a KD term: the teacher only writes the responses
        if not cached:
            return True
        return self.on_policy and settings.lambda_on_policy > 0


def _off_policy(name: str) -> MethodSpec:
    """The method of divergence ``name``: token-level KD on the data's gold responses."""
    doc = (DIVERGENCES[name].function.__doc__ or name).strip().splitlines()[0]
    return MethodSpec(
        name=name,
        summary=f"{doc} On the gold responses.",
        needs_teacher=True,
        default_divergence=name,
        cacheable=True,
        paper_name=_PAPER_DIVERGENCE_NAMES.get(name),
    )


def _cross_tokenizer_method(name: str) -> MethodSpec:
    """The method of cross-tokenizer loss ``name``: KD at aligned positions of the gold
    responses, for a teacher and a student with any two tokenizers."""
    return MethodSpec(
        name=name,
        summary=f"{CROSS_TOKENIZER_LOSSES[name].summary} Any two tokenizers; on the gold "
        "responses.",
        needs_teacher=True,
        default_divergence=name,
    )


SFT = "sft"

_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name=SFT,
        summary="Supervised fine-tuning on the gold responses; no teacher.",
        needs_teacher=False,
        default_divergence=None,
        paper_name="",
    ),
    *(_off_policy(name) for name in DIVERGENCES),
    *(_cross_tokenizer_method(name) for name in CROSS_TOKENIZER_LOSSES),
    MethodSpec(
        name="gkd",
        summary="On-policy GKD: a share λ of batches are the student's own samples (JSD).",
        needs_teacher=True,
        default_divergence="jsd",
        on_policy=True,
        cacheable=True,
        paper_name="gkd",
        extra_keys=frozenset({"lambda_on_policy"}),
        estimate_factor=3.0,
    ),
    MethodSpec(
        name="seqkd",
        summary="Sequence-level KD: the student trains on the teacher's own responses.",
        needs_teacher=True,
        default_divergence=None,
        teacher_responses=True,
        extra_keys=frozenset({"seqkd_greedy", "seqkd_batch_size", "seqkd_drop_truncated"}),
        estimate_factor=1.5,
    ),
)

#: method name → spec, in the table's order.
METHODS: Mapping[str, MethodSpec] = {spec.name: spec for spec in _SPECS}

#: The paper scripts' ``kd_loss`` names → kdlab methods.
PAPER_METHOD_NAMES: Mapping[str, str] = {
    spec.paper_name: spec.name for spec in _SPECS if spec.paper_name is not None
}


def method_choices() -> tuple[str, ...]:
    """Valid ``distill.method`` values: kdlab's names, then the paper's non-empty ones."""
    return (*METHODS, *(name for name in PAPER_METHOD_NAMES if name and name not in METHODS))


def get_method(name: str) -> MethodSpec:
    """The spec of ``name`` (a kdlab or paper method name); KeyError when unknown."""
    return METHODS[PAPER_METHOD_NAMES.get(name, name)]


def teacher_cache_refusal(
    settings: DistillSettingsLike, vocab_size: int | None = None, *, check_temperature: bool = True
) -> str | None:
    """Why ``distill.teacher_cache`` cannot serve ``settings``; None when it can.

    Sweeps turn the cache on by default exactly where this returns None (``vocab_size=None``
    assumes k < vocabulary, the usual case). ``check_temperature=False`` leaves out the one
    check that needs the vocabulary (the stage runs it once the teacher's width is known).

    - a method without a teacher, or one that trains on teacher responses (seqKD caches
      responses, not logits), has nothing for the cache to hold;
    - a cross-tokenizer divergence (``uld``, ``aligned_kl``) reads the teacher's whole
      distribution (ULD sorts all of it) at the teacher's own positions, not the top-k at
      the student's positions that the cache stores;
    - noise (``noise_std > 0``) is drawn on the teacher logits at every step; the cached
      path adds none;
    - temperature ≠ 1 with a ``topk`` cache and k < vocabulary: it holds the T = 1 top-k,
      and softened by T the teacher puts most of its mass outside it (66 % at T = 2, 98.5 %
      at T = 5 for smollm2-135m on math_cot_3k, k = 64), which k + 1 buckets cannot
      represent: the forward-KL loss came out 67-71 % (T = 2) and 98.5-98.8 % (T = 5) below
      the dense one, gradient cosine 0.90 / 0.46 (``benchmarks/teacher_cache_error.py``).
      The ``hidden`` cache (the default) is exact at every temperature: loss error < 0.01 %,
      gradient cosine 1.0000 at T = 1, 2, 5 on the same pair, for forward KL, reverse KL
      and JSD. So is a dense top-k cache (k ≥ vocabulary).

    Sweeps therefore cache the paper's T = 2 and T = 5 runs too.
    """
    spec = get_method(settings.method)
    if not spec.needs_teacher:
        return f"distill.method = {spec.name} has no teacher"
    if spec.cross_tokenizer(settings):
        return (
            f"divergence {spec.divergence(settings)} compares two tokenizers, and the cache "
            "holds the teacher's outputs at the student's token positions; cross-tokenizer "
            "runs use the live teacher"
        )
    if not spec.cacheable:
        return f"{spec.name} caches teacher responses, not logits"
    divergence = spec.divergence(settings)
    if divergence is None:
        return "distill.divergence = none: there is no KD term for the cache to serve"
    if settings.noise_std > 0:
        return (
            "distill.noise_std > 0 adds noise to the teacher logits at every step, which the "
            "cached path does not do; drop the cache for noise ablations"
        )
    if (
        check_temperature
        and settings.temperature != 1.0
        and settings.teacher_cache_kind == TOPK_CACHE
        and (vocab_size is None or settings.teacher_cache_topk < vocab_size)
    ):
        return (
            f"distill.temperature = {settings.temperature:g}: a top-k cache holds the "
            f"teacher's top-{settings.teacher_cache_topk} at T = 1, and at T ≠ 1 most of the "
            "softened mass lies outside it (measured: the KD loss 67 % low at T = 2, 98.5 % "
            "at T = 5 with k = 64); use distill.teacher_cache_kind = hidden (the default: exact "
            "at every temperature), or k >= the vocabulary"
        )
    return None


def _field_default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return item.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _settings_and_defaults(settings: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, default) of every field of a settings dataclass, nested expanded."""
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            yield from _settings_and_defaults(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", value, _field_default(item)


def unread_message(settings: DistillSettingsLike, key: str) -> str:
    """Why ``distill.<key>`` (a setting :func:`unread_settings` returned) is refused: one
    line, with the teacher cache's own reason (:func:`teacher_cache_refusal`) for its keys."""
    divergence = get_method(settings.method).divergence(settings)
    message = f"has no effect with distill.method = {settings.method}" + (
        f" (divergence {divergence})" if divergence else " (no KD divergence)"
    )
    refusal = teacher_cache_refusal(settings) if key.startswith("teacher_cache") else None
    if refusal:
        message += f": the teacher-output cache cannot serve it ({refusal})"
    return message + "; remove it (kdlab refuses settings a run would ignore)"


def unread_settings(settings: DistillSettingsLike) -> list[tuple[str, Any]]:
    """``(key, value)`` of every ``distill.*`` setting the run would ignore.

    A setting is ignored when the method (with its divergence, λ and sampling switches)
    does not read it (:meth:`MethodSpec.keys_read`) and its value differs from the default:
    a default is harmless, anything else is a setting that would silently do nothing.
    """
    read = get_method(settings.method).keys_read(settings)
    return [
        (key, value)
        for key, value, default in _settings_and_defaults(settings)
        if key not in read and value != default
    ]
