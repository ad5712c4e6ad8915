"""Log-likelihood scoring of multiple-choice options (``scoring: loglikelihood``).

For each (context, continuation) pair the model's summed log-probability of the
continuation tokens given the context is computed; an item's prediction is the option with
the highest sum (``acc``) or the highest sum per character of the continuation
(``acc_norm``), the conventions of lm-evaluation-harness.

Tokenization follows lm-eval's ``_encode_pair``: whitespace at the end of the context moves
to the continuation, the whole text is encoded once (with the tokenizer's BOS when it adds
one, as kdlab's training and generation do: :func:`kdlab.data.tokenize.encode_prompt`) and
the continuation tokens are those past the encoded context. Pairs are scored in batches
(longest first, right padding, one forward pass per batch); padding never changes a score
because each row only reads its own positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdlab.errors import DataError


@dataclass(frozen=True)
class Request:
    """One option to score: ``context`` followed by ``continuation``."""

    context: str
    continuation: str


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them (see the module docstring)."""
    from kdlab.data.tokenize import encode_prompt

    stripped = context.rstrip()
    moved = context[len(stripped) :]
    context, continuation = stripped, moved + continuation
    whole = encode_prompt(tokenizer, context + continuation)
    context_ids = encode_prompt(tokenizer, context)
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise DataError(f"empty continuation after tokenization: {continuation!r}")
    prefix = whole[: len(context_ids)]
    if not prefix:  # nothing to condition on: lm-eval's prefix token (EOS, else BOS)
        token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else None
        token = token if token is not None else tokenizer.bos_token_id
        if token is None:
            raise DataError("an empty context needs an EOS or BOS token to condition on")
        prefix = [int(token)]
    return prefix, continuation_ids


class LoglikelihoodScorer:
    """Sums of continuation log-probabilities with a causal LM (eval mode, no grad)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad)

    def score(self, requests: Sequence[Request]) -> list[float]:
        """The summed log-probability of each request's continuation, in request order."""
        encoded = [encode_pair(self.tokenizer, r.context, r.continuation) for r in requests]
        order = sorted(
            range(len(encoded)), key=lambda i: (-(len(encoded[i][0]) + len(encoded[i][1])), i)
        )
        scores: list[float] = [0.0] * len(encoded)
        if getattr(self.model, "training", False):
            self.model.eval()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, value in zip(chunk, self._score_batch([encoded[i] for i in chunk])):
                scores[index] = value
        return scores

    def _score_batch(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        # Input = context + continuation without its last token; the logits at position t
        # predict token t + 1, so the continuation is read at positions len(context) - 1 ...
        rows = [(context + continuation)[:-1] for context, continuation in pairs]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
        results: list[float] = []
        for row, (context, continuation) in enumerate(pairs):
            start = len(context) - 1
            positions = logits[row, start : start + len(continuation)].float()
            log_probs = torch.log_softmax(positions, dim=-1)
            targets = torch.tensor(continuation, device=log_probs.device).unsqueeze(-1)
            results.append(float(log_probs.gather(-1, targets).sum()))
        return results


def predictions(loglikelihoods: Sequence[float], continuations: Sequence[str]) -> tuple[int, int]:
    """(argmax of the sums, argmax of the sums per continuation character); ties → first."""
    best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    normalised = [ll / max(1, len(text)) for ll, text in zip(loglikelihoods, continuations)]
    best_norm = max(range(len(normalised)), key=lambda i: (normalised[i], -i))
    return best, best_norm
