"""The training objectives compute the loss their settings name (issue 21).

Every KD value here is checked against :func:`kdlab.losses.distillation_loss` on the two
models' *full* logits, with a :class:`~kdlab.losses.KDLossSpec` built by the test from the
method's divergence (not taken from the objective): an objective that trained every method
with forward KL, or dropped the temperature, β, α, reduction or T² scaling, fails here.
The CE term is checked against ``F.cross_entropy`` on the full logits, and the helpers of
:mod:`kdlab.training.forward` against hand-written tensors.

These are the objective's own test files for ``make mutate`` (``objective`` group).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kdlab.config.schema import DistillSettings, ModelConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import IGNORE_INDEX, Collator, tokenize_records
from kdlab.errors import KdlabError
from kdlab.losses import DIVERGENCES, KDLossSpec, distillation_loss
from kdlab.models.loading import load_model_and_tokenizer
from kdlab.training.forward import (
    CPU_CHUNK_BYTES,
    chunked_cross_entropy,
    final_hidden_states,
    kd_loss_mask,
    next_token_targets,
    output_projection,
    resolve_chunk_size,
    response_mask,
    teacher_hidden_states,
)
from kdlab.training.loop import MICRO_KEY, STEP_KEY
from kdlab.training.objectives import (
    ON_POLICY_KEY,
    CrossEntropyObjective,
    DistillationObjective,
    connected_zero,
    counted_units,
)


class Models:
    """The tiny student (hidden 16) and teacher (hidden 32) of one tokenizer, and a batch."""

    def __init__(self, student_dir: Path, teacher_dir: Path) -> None:
        self.student, self.tokenizer = load_model_and_tokenizer(ModelConfig(str(student_dir)))
        self.teacher, _ = load_model_and_tokenizer(ModelConfig(str(teacher_dir)))
        # Random tiny models predict near-uniform distributions, between which every
        # divergence is ~0 and forward ≈ reverse KL: sharpen both, differently.
        with torch.no_grad():
            self.teacher.lm_head.weight.mul_(40.0)
            self.student.lm_head.weight.mul_(15.0)
        records = load_records("generated:arithmetic?split=train&n=6&seed=0")
        # uneven lengths: padding, and rows whose prompt share differs
        self.examples = tokenize_records(records, self.tokenizer)
        self.batch = Collator(self.tokenizer.pad_token_id)(self.examples[:4])

    def logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()

    def objective(self, settings: DistillSettings, **kwargs: Any) -> DistillationObjective:
        options: dict[str, Any] = {
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "vocab_size": None,
            "seed": 0,
            "cutoff_len": 256,
            "unwrap": lambda model: model,
        }
        options.update(kwargs)
        return DistillationObjective(settings=settings, **options)


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tiny_teacher_dir: Path) -> Models:
    return Models(tiny_model_dir, tiny_teacher_dir)


def gold_response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token t + 1 is a labelled (response) token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def kd_mean(objective: DistillationObjective, student: Any, batch: dict, training: bool) -> float:
    """The objective's KD term as a mean over its units (what the loop divides by)."""
    result = objective(student, batch, training)
    return float(result.sums["kd"]) / objective.counts(batch)["kd"]


#: every divergence with the settings it reads set away from their defaults
DIVERGENCE_SETTINGS = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.3},
    "skew_forward_kl": {"skew": 0.25},
    "skew_reverse_kl": {"skew": 0.25},
    "tvd": {},
    "symmetric_kl": {},
}


def test_every_registered_divergence_is_checked_here() -> None:
    assert set(DIVERGENCE_SETTINGS) == set(DIVERGENCES)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCE_SETTINGS))
@pytest.mark.parametrize(
    ("temperature", "reduction", "scale_by_t2"),
    [(1.0, "token", True), (2.0, "sequence", True), (2.0, "token", False)],
)
def test_kd_term_equals_the_dense_loss_of_the_method_divergence(
    models: Models, divergence: str, temperature: float, reduction: str, scale_by_t2: bool
) -> None:
    extra = DIVERGENCE_SETTINGS[divergence]
    settings = DistillSettings(
        method=divergence,
        temperature=temperature,
        reduction=reduction,
        scale_by_t2=scale_by_t2,
        **extra,
    )
    objective = models.objective(settings)
    batch = models.batch
    mask = gold_response_mask(batch["labels"])
    expected_spec = KDLossSpec(
        divergence=divergence,
        temperature=temperature,
        reduction=reduction,
        scale_by_t2=scale_by_t2,
        **extra,
    )
    expected = distillation_loss(
        models.logits(models.student, batch),
        models.logits(models.teacher, batch),
        mask,
        expected_spec,
    )
    actual = kd_mean(objective, models.student, batch, training=False)
    assert float(expected) > 0
    assert actual == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    units = int(mask.sum()) if reduction == "token" else int((mask.sum(1) > 0).sum())
    assert objective.counts(batch)["kd"] == units


def test_different_methods_give_different_kd_values(models: Models) -> None:
    values = {
        name: kd_mean(
            models.objective(DistillSettings(method=name, **extra)),
            models.student,
            models.batch,
            training=False,
        )
        for name, extra in DIVERGENCE_SETTINGS.items()
    }
    for (a, value_a), (b, value_b) in itertools.combinations(values.items(), 2):
        assert abs(value_a - value_b) > 1e-3 * max(value_a, value_b), (a, b, values)


def test_distill_divergence_overrides_the_method_default(models: Models) -> None:
    """``gkd`` defaults to JSD; ``distill.divergence`` replaces it (and ``none`` drops KD)."""
    batch = models.batch
    mask = gold_response_mask(batch["labels"])
    student, teacher = models.logits(models.student, batch), models.logits(models.teacher, batch)
    gkd = DistillSettings(method="gkd", lambda_on_policy=0.0)
    assert kd_mean(models.objective(gkd), models.student, batch, False) == pytest.approx(
        float(distillation_loss(student, teacher, mask, KDLossSpec(divergence="jsd"))), rel=1e-5
    )
    tvd = DistillSettings(method="gkd", lambda_on_policy=0.0, divergence="tvd")
    assert kd_mean(models.objective(tvd), models.student, batch, False) == pytest.approx(
        float(distillation_loss(student, teacher, mask, KDLossSpec(divergence="tvd"))), rel=1e-5
    )
    off = models.objective(DistillSettings(method="forward_kl", divergence="none"))
    assert off.weights == {"ce": 1.0} and off.loss_spec is None
    assert set(off(models.student, batch, False).sums) == {"ce"}


def test_loss_on_all_compares_every_attended_position(models: Models) -> None:
    batch = models.batch
    attended = batch["attention_mask"].bool()
    mask = torch.zeros_like(attended)
    mask[:, :-1] = attended[:, :-1] & attended[:, 1:]  # the last attended position predicts nothing
    assert int(mask.sum()) > int(gold_response_mask(batch["labels"]).sum())
    objective = models.objective(DistillSettings(method="reverse_kl", loss_on="all"))
    expected = distillation_loss(
        models.logits(models.student, batch),
        models.logits(models.teacher, batch),
        mask,
        KDLossSpec(divergence="reverse_kl"),
    )
    assert kd_mean(objective, models.student, batch, False) == pytest.approx(
        float(expected), rel=1e-5
    )
    assert objective.counts(batch)["kd"] == int(mask.sum())


def test_ce_term_is_the_summed_cross_entropy_of_the_gold_response(models: Models) -> None:
    batch = models.batch
    logits = models.logits(models.student, batch)
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    ce_count = int((targets != IGNORE_INDEX).sum())
    tokens = float(batch["attention_mask"].sum())
    sft = CrossEntropyObjective(chunk_size=3)
    assert sft.counts(batch) == {"ce": ce_count, "tokens": tokens}
    assert float(sft(models.student, batch, False).sums["ce"]) == pytest.approx(
        float(expected), rel=1e-5
    )
    settings = DistillSettings(method="forward_kl", kd_weight=0.25)
    distill = models.objective(settings)
    assert distill.weights == {"ce": 0.75, "kd": 0.25}
    result = distill(models.student, batch, True)
    assert float(result.sums["ce"]) == pytest.approx(float(expected), rel=1e-5)
    assert distill.counts(batch)["ce"] == ce_count and distill.counts(batch)["tokens"] == tokens


def test_kd_weight_one_skips_ce_in_training_but_validation_reports_both(models: Models) -> None:
    objective = models.objective(DistillSettings(method="forward_kl", kd_weight=1.0))
    assert objective.weights == {"ce": 0.0, "kd": 1.0}
    assert set(objective(models.student, models.batch, True).sums) == {"kd"}
    assert set(objective(models.student, models.batch, False).sums) == {"ce", "kd"}
    sft = models.objective(DistillSettings(method="sft"), teacher=None)
    assert sft.weights == {"ce": 1.0} and sft.loss_spec is None
    assert set(sft(models.student, models.batch, True).sums) == {"ce"}


def test_teacher_noise_is_a_training_perturbation_drawn_per_call(models: Models) -> None:
    batch = models.batch
    clean = models.objective(DistillSettings(method="forward_kl"))
    noisy = models.objective(DistillSettings(method="forward_kl", noise_std=3.0))
    clean_value = kd_mean(clean, models.student, batch, True)
    torch.manual_seed(5)
    first = kd_mean(noisy, models.student, batch, True)
    torch.manual_seed(5)
    again = kd_mean(noisy, models.student, batch, True)
    assert abs(first - clean_value) > 1e-2 * clean_value
    assert first == again  # the same seed reproduces the noise
    # validation compares with the clean teacher
    assert kd_mean(noisy, models.student, batch, False) == pytest.approx(
        kd_mean(clean, models.student, batch, False), rel=1e-6
    )


def test_noise_with_a_teacher_cache_is_refused(models: Models) -> None:
    with pytest.raises(KdlabError, match=r"noise_std > 0 cannot be combined"):
        models.objective(
            DistillSettings(method="forward_kl", noise_std=1.0), teacher_cache=object()
        )


def test_a_batch_that_counts_nothing_back_propagates_a_connected_zero(
    models: Models, tiny_model_dir: Path
) -> None:
    student, _ = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)), for_training=True)
    batch = dict(models.batch)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    objective = models.objective(DistillSettings(method="forward_kl", kd_weight=0.5))
    counts = objective.counts(batch)
    assert counts["ce"] == 0 and counts["kd"] == 0
    result = objective(student, batch, True)
    assert list(result.sums) == ["ce"]
    zero = result.sums["ce"]
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    zero.backward()
    assert any(p.grad is not None for p in student.parameters())
    # validation of such a batch reports nothing
    assert objective(student, batch, False).sums == {}


def test_connected_zero_depends_on_the_trained_weight() -> None:
    hidden = torch.randn(2, 3, requires_grad=True)
    weight = torch.randn(4, 3, requires_grad=True)
    zero = connected_zero(hidden, weight)
    assert zero.dtype == torch.float32 and float(zero.detach()) == 0.0
    zero.backward()
    assert hidden.grad is not None and weight.grad is not None
    frozen = torch.randn(4, 3)
    zero = connected_zero(torch.randn(2, 3, requires_grad=True), frozen)
    assert zero.requires_grad and frozen.grad is None


def test_counted_units() -> None:
    mask = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    assert counted_units(mask, "token") == 3.0
    assert counted_units(mask, "sequence") == 2.0


# ------------------------------------------------------------------ on-policy (GKD)


def _gkd(models: Models, lam: float, **kwargs: Any) -> DistillationObjective:
    settings = DistillSettings(method="gkd", lambda_on_policy=lam, **kwargs)
    settings.generation.max_new_tokens = 4
    return models.objective(settings)


def test_on_policy_draws_follow_lambda_and_are_a_function_of_step_and_micro(
    models: Models,
) -> None:
    def draws(objective: DistillationObjective) -> list[bool]:
        return [
            objective.draws_on_policy({STEP_KEY: torch.tensor(s), MICRO_KEY: torch.tensor(m)})
            for s in range(40)
            for m in range(2)
        ]

    half = draws(_gkd(models, 0.5))
    assert 25 <= sum(half) <= 55  # ~λ of 80 draws
    assert half == draws(_gkd(models, 0.5))  # reproducible
    assert not any(draws(_gkd(models, 0.0)))
    assert all(draws(_gkd(models, 1.0)))
    # a method that is not on-policy never samples, whatever the batch says
    forward = models.objective(DistillSettings(method="forward_kl"))
    assert not any(draws(forward))


def test_prepare_samples_only_in_training(models: Models) -> None:
    objective = _gkd(models, 1.0)
    batch = {**models.batch, STEP_KEY: torch.tensor(0), MICRO_KEY: torch.tensor(0)}
    assert objective.prepare(models.student, batch, False) is batch
    sampled = objective.prepare(models.student, batch, True)
    assert bool(sampled[ON_POLICY_KEY])
    assert not models.student.training  # the eval-mode model is left in eval mode
    # the prompts are kept; the labels are the sampled tokens, each after its prompt
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["prompt_lengths"][row])
        assert torch.equal(sampled["input_ids"][row, :length], batch["input_ids"][row, :length])
        labels = sampled["labels"][row]
        assert bool((labels[:length] == IGNORE_INDEX).all())
        answer = labels[labels != IGNORE_INDEX]
        assert 1 <= answer.numel() <= 4
        assert torch.equal(sampled["input_ids"][row, length : length + answer.numel()], answer)
        assert int(sampled["attention_mask"][row].sum()) == length + answer.numel()


def test_on_policy_kd_compares_the_sampled_responses(models: Models) -> None:
    objective = _gkd(models, 1.0)
    batch = {**models.batch, STEP_KEY: torch.tensor(0), MICRO_KEY: torch.tensor(0)}
    sampled = objective.prepare(models.student, batch, True)
    mask = gold_response_mask(sampled["labels"])
    expected = distillation_loss(
        models.logits(models.student, sampled),
        models.logits(models.teacher, sampled),
        mask,
        KDLossSpec(divergence="jsd"),
    )
    result = objective(models.student, sampled, True)
    assert set(result.sums) == {"kd"} and result.stats == {"on_policy_batches": 1.0}
    assert objective.counts(sampled)["kd"] == int(mask.sum())
    assert float(result.sums["kd"]) / int(mask.sum()) == pytest.approx(float(expected), rel=1e-5)
    off = _gkd(models, 0.0)
    assert off(models.student, models.batch, True).stats == {"off_policy_batches": 1.0}


def test_an_on_policy_batch_without_a_live_teacher_is_an_error(models: Models) -> None:
    settings = DistillSettings(method="gkd", lambda_on_policy=1.0)
    settings.generation.max_new_tokens = 4
    objective = models.objective(settings, teacher=None, teacher_cache=_NoCache())
    batch = {**models.batch, STEP_KEY: torch.tensor(0), MICRO_KEY: torch.tensor(0)}
    sampled = objective.prepare(models.student, batch, True)
    with pytest.raises(KdlabError, match="needs the live teacher"):
        objective(models.student, sampled, True)


class _NoCache:
    """A teacher cache that must not be read (on-policy batches cannot use one)."""

    def lookup(self, *_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an on-policy batch read the teacher cache")


def test_cached_batches_need_their_example_indices(models: Models) -> None:
    objective = models.objective(
        DistillSettings(method="forward_kl"), teacher=None, teacher_cache=_NoCache()
    )
    batch = {k: v for k, v in models.batch.items() if k != "index"}
    with pytest.raises(KdlabError, match=r"batch\['index'\]"):
        objective(models.student, batch, True)


# ------------------------------------------------------------------ forward.py


def test_next_token_targets_and_response_mask() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    expected = torch.tensor(
        [[IGNORE_INDEX, 7, 8, IGNORE_INDEX], [5, 6, IGNORE_INDEX, IGNORE_INDEX]]
    )
    assert torch.equal(next_token_targets(labels), expected)
    assert response_mask(labels).tolist() == [
        [False, True, True, False],
        [True, True, False, False],
    ]


def test_kd_loss_mask_response_and_all() -> None:
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    response = [[False, True, True, False], [True, True, False, False]]
    assert kd_loss_mask(attention, labels, "response").tolist() == response
    assert kd_loss_mask(attention, labels, "all").tolist() == [
        [True, True, True, False],
        [True, True, False, False],
    ]
    # on-policy batches compare the sampled response only, whatever loss_on says
    assert kd_loss_mask(attention, labels, "all", on_policy=True).tolist() == response


def test_final_hidden_states_project_to_the_model_logits(models: Models) -> None:
    batch = models.batch
    with torch.no_grad():
        hidden = final_hidden_states(models.student, batch["input_ids"], batch["attention_mask"])
        weight, bias = output_projection(models.student)
        assert bias is None and weight is models.student.lm_head.weight
        torch.testing.assert_close(
            F.linear(hidden, weight), models.logits(models.student, batch), rtol=1e-5, atol=1e-5
        )
        teacher = teacher_hidden_states(models.teacher, batch["input_ids"], batch["attention_mask"])
        teacher_weight, _ = output_projection(models.teacher)
        torch.testing.assert_close(
            F.linear(teacher, teacher_weight),
            models.logits(models.teacher, batch),
            rtol=1e-5,
            atol=1e-5,
        )


class _NoDecoder(torch.nn.Module):
    """A causal LM whose ``get_decoder`` is unusable: the teacher path falls back to the
    model's own forward."""

    def __init__(self, model: Any, error: type[Exception] | None) -> None:
        super().__init__()
        self.model = model
        self.error = error

    def get_decoder(self) -> Any:
        if self.error is not None:
            raise self.error("no decoder")
        return self

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)


@pytest.mark.parametrize("error", [NotImplementedError, AttributeError, None])
def test_teacher_hidden_states_fall_back_to_the_full_forward(
    models: Models, error: type[Exception] | None
) -> None:
    batch = models.batch
    with torch.no_grad():
        expected = teacher_hidden_states(
            models.teacher, batch["input_ids"], batch["attention_mask"]
        )
        wrapped = _NoDecoder(models.teacher, error)
        actual = teacher_hidden_states(wrapped, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_cross_entropy_equals_the_dense_sum(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=generator)
    weight = torch.randn(11, 4, generator=generator)
    bias = torch.randn(11, generator=generator)
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    logits = (hidden @ weight.T + bias).double()
    expected = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    total = chunked_cross_entropy(hidden, weight, bias, targets, mask, chunk_size)
    assert total.dtype == torch.float32
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    none = chunked_cross_entropy(hidden, weight, bias, targets, torch.zeros_like(mask), chunk_size)
    assert float(none) == 0.0


def test_resolve_chunk_size() -> None:
    cpu = torch.device("cpu")
    assert resolve_chunk_size(7, 49_152, cpu) == 7
    assert resolve_chunk_size(None, 49_152, cpu) == CPU_CHUNK_BYTES // (4 * 49_152) == 128
    assert resolve_chunk_size(None, 10**7, cpu) == 16  # at least 16 rows
