"""`jsd` agrees with TRL's GKDTrainer.generalized_jsd_loss (no T² scaling, token mean)."""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

from kdlab.losses import KDLossSpec, distillation_loss

pytest.importorskip("trl")


def _trl_generalized_jsd_loss():
    """Locate the function: trl >= 0.20 moved GKD to trl.experimental.gkd."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for module_name in ("trl.experimental.gkd", "trl.trainer.gkd_trainer", "trl"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:
            continue
        trainer = getattr(module, "GKDTrainer", None)
        if trainer is not None:
            return trainer.generalized_jsd_loss
    pytest.fail("trl is installed but GKDTrainer.generalized_jsd_loss was not found")


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl(beta: float, temperature: float) -> None:
    generalized_jsd_loss = _trl_generalized_jsd_loss()
    generator = torch.Generator().manual_seed(int(beta * 10) + int(temperature))
    batch, seq, vocab = 3, 7, 41
    student_logits = 3 * torch.randn(batch, seq, vocab, generator=generator)
    teacher_logits = 3 * torch.randn(batch, seq, vocab, generator=generator)
    loss_mask = torch.rand(batch, seq, generator=generator) > 0.3
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[~loss_mask] = -100

    expected = generalized_jsd_loss(
        student_logits, teacher_logits, labels=labels, beta=beta, temperature=temperature
    )
    spec = KDLossSpec(
        "jsd", beta=beta, temperature=temperature, reduction="token", scale_by_t2=False
    )
    loss = distillation_loss(student_logits, teacher_logits, loss_mask, spec)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
