"""The two forms a model's side of a distillation loss takes besides plain logits.

* :class:`HiddenStates`: final hidden states plus the output projection (``lm_head``) that
  turns them into logits. The student always comes in this form on the chunked path; so
  does a live teacher. Logits are then built chunk by chunk, never for the whole batch.
* :class:`SparseTeacher`: what a teacher-output cache stores, the teacher's top-k
  log-probabilities, their token ids and the leftover tail mass (treated as in
  :mod:`kdlab.losses.sparse`).

Both are frozen and check their own consistency when built (shapes and dtypes that belong
together). What depends on the other arguments of a loss (the ``[batch, seq]`` of the
mask, the vocabulary width, the id range) is checked by the loss, which names the role
(``student.hidden``, ``teacher.topk_ids``).

``eq=False``: comparing two of them compares identities, never tensors elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdlab.losses._common import check_float_tensor, select_rows

__all__ = ["HiddenStates", "SparseTeacher"]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(frozen=True, eq=False)
class HiddenStates:
    """Final hidden states and the output projection that turns them into logits.

    ``logits = hidden @ weight.T + bias``, row ``v`` of ``weight`` producing logit ``v``.

    Attributes:
        hidden: ``[batch, seq, hidden]`` after the final norm, position ``t`` predicting
            token ``t + 1``; or the already-selected ``[N, hidden]`` rows of the counted
            positions (``N = loss_mask.sum()``, row-major order of ``x[loss_mask]``). Any
            float dtype.
        weight: ``[vocab, hidden]``, the same dtype as ``hidden``. Gets a gradient if it
            requires grad (full fine-tuning); frozen under LoRA.
        bias: optional ``[vocab]``, the same dtype.

    Raises:
        ValueError: naming the field, if the three do not fit together.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        check_float_tensor("hidden", self.hidden, ndim=(2, 3))
        check_float_tensor("weight", self.weight, ndim=2)
        if self.weight.shape[1] != self.hidden.shape[-1]:
            raise ValueError(
                f"weight must have shape [vocab, {self.hidden.shape[-1]}] to match hidden "
                f"{list(self.hidden.shape)}, got {list(self.weight.shape)}"
            )
        if self.weight.dtype != self.hidden.dtype:
            raise ValueError(
                f"weight dtype {self.weight.dtype} must equal hidden dtype {self.hidden.dtype}"
            )
        if self.bias is not None:
            check_float_tensor("bias", self.bias, ndim=1)
            if self.bias.shape[0] != self.weight.shape[0] or self.bias.dtype != self.weight.dtype:
                raise ValueError(
                    f"bias must be a [{self.weight.shape[0]}] tensor of dtype "
                    f"{self.weight.dtype}, got {list(self.bias.shape)} {self.bias.dtype}"
                )

    @property
    def vocab_size(self) -> int:
        """Logit width: the number of rows of ``weight``."""
        return self.weight.shape[0]

    def rows(self, name: str, loss_mask: Tensor) -> Tensor:
        """``[N, hidden]``: the hidden states of the counted positions (``name`` for errors)."""
        return select_rows(f"{name}.hidden", self.hidden, loss_mask, int(loss_mask.sum()), 1)


@dataclass(frozen=True, eq=False)
class SparseTeacher:
    """A top-k teacher: the cache's view of the teacher's next-token distribution.

    Attributes:
        topk_logprobs: ``[N, k]`` the teacher's ``k`` largest log-probabilities at
            temperature 1 for the counted positions (``N = loss_mask.sum()``, row-major
            order of ``x[loss_mask]``), or ``[batch, seq, k]`` for every position. Any
            float dtype.
        topk_ids: the same shape, integer token ids in ``[0, vocab)``, distinct within a
            row (not checked: a repeated id would count the same token twice).
        tail_mass: ``[N]`` (or ``[batch, seq]``), ``1 − Σ exp(topk_logprobs)``: the
            probability of the ``V − k`` other tokens. 0 or slightly below from rounding
            is allowed (floored, see :mod:`kdlab.losses.sparse`).

    With ``k = V`` (every token, ids any permutation of the vocabulary) the sparse loss
    equals the dense one; ``topk_logprobs`` may then even be logits (the buckets are
    renormalised) and ``tail_mass`` is unused.

    Raises:
        ValueError: naming the field, if the three do not fit together.
    """

    topk_logprobs: Tensor
    topk_ids: Tensor
    tail_mass: Tensor

    def __post_init__(self) -> None:
        check_float_tensor("topk_logprobs", self.topk_logprobs, ndim=(2, 3))
        if not isinstance(self.topk_ids, Tensor) or self.topk_ids.dtype not in _INTEGER_DTYPES:
            raise ValueError("topk_ids must be an integer tensor")
        if self.topk_ids.shape != self.topk_logprobs.shape:
            raise ValueError(
                f"topk_ids shape {list(self.topk_ids.shape)} must equal topk_logprobs shape "
                f"{list(self.topk_logprobs.shape)}"
            )
        check_float_tensor("tail_mass", self.tail_mass)
        if self.tail_mass.shape != self.topk_logprobs.shape[:-1]:
            raise ValueError(
                f"tail_mass shape {list(self.tail_mass.shape)} must equal topk_logprobs shape "
                f"without its last axis, {list(self.topk_logprobs.shape[:-1])}"
            )

    @property
    def num_topk(self) -> int:
        """``k``, the number of tokens stored per position."""
        return self.topk_logprobs.shape[-1]

    def rows(self, name: str, loss_mask: Tensor, vocab_size: int) -> SparseTeacher:
        """The ``[N, k]`` / ``[N]`` rows of the counted positions, checked against the loss.

        Args:
            name: the role, for error messages (``"teacher"``).
            loss_mask: ``[batch, seq]`` bool.
            vocab_size: the vocabulary the ids index (the student's, after trimming).

        Raises:
            ValueError: the rows do not match ``loss_mask``, ``k`` is not in
                ``[1, vocab_size]`` or an id lies outside ``[0, vocab_size)``.
        """
        num_rows = int(loss_mask.sum())
        topk_logprobs = select_rows(
            f"{name}.topk_logprobs", self.topk_logprobs, loss_mask, num_rows, 1
        )
        topk_ids = select_rows(f"{name}.topk_ids", self.topk_ids, loss_mask, num_rows, 1)
        tail_mass = select_rows(f"{name}.tail_mass", self.tail_mass, loss_mask, num_rows, 0)
        if not 1 <= self.num_topk <= vocab_size:
            raise ValueError(
                f"{name}.topk_logprobs must have 1 <= k <= vocab ({vocab_size}) columns, "
                f"got {self.num_topk}"
            )
        if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= vocab_size):
            raise ValueError(f"{name}.topk_ids must lie in [0, {vocab_size})")
        return SparseTeacher(topk_logprobs, topk_ids, tail_mass)
