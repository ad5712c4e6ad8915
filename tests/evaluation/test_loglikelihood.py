"""``scoring: loglikelihood``: option continuations scored with the model (lm-eval style)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.config.evaluation import load_eval_config
from kdlab.errors import DataError, KdlabError
from kdlab.evaluation import evaluate, get_task
from kdlab.evaluation.loglikelihood import LoglikelihoodScorer, Request, encode_pair, predictions
from kdlab.evaluation.multiple_choice import MultipleChoice
from kdlab.utils.io import read_jsonl


def _piqa(goal: str, first: str, second: str, answer: str) -> dict[str, str]:
    return {
        "instruction": f"Please choose the correct solution to the question: {goal}\n\n"
        f"Solution1: {first}\n\nSolution2: {second}\n\nAnswer format: solution1/solution2",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


# The correct solution is "true true", the wrong one "false false"; gold alternates.
PLANTED = [
    _piqa("How do I keep bread fresh?", "true true", "false false", "solution1"),
    _piqa("How do I open a jar?", "false false", "true true", "solution2"),
    _piqa("How do I dry wet shoes?", "false false", "true true", "solution2"),
    _piqa("How do I cool soup fast?", "true true", "false false", "solution1"),
]


def _requests(records: list[dict], task: str = "piqa") -> list[Request]:
    requests = []
    for record in records:
        item = get_task(task).choices.parse(record)
        for context, continuation in zip(item.contexts, item.continuations, strict=True):
            requests.append(Request(context, " " + continuation))
    return requests


def _reference(model, tokenizer, request: Request) -> float:
    """Unbatched, unpadded forward; log-softmax in float64."""
    context_ids, continuation_ids = encode_pair(tokenizer, request.context, request.continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    start = len(context_ids) - 1
    return float(sum(log_probs[start + i, token] for i, token in enumerate(continuation_ids)))


def test_batched_scores_equal_an_unbatched_float64_reference(
    tiny_model_and_tokenizer, shared_eval_dir
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    records = json.loads((shared_eval_dir / "piqa" / "test.json").read_text())[:3]
    records += json.loads((shared_eval_dir / "winogrande" / "test.json").read_text())[:2]
    requests = _requests(records[:3]) + _requests(records[3:], "winogrande")
    scores = LoglikelihoodScorer(model, tokenizer, batch_size=3).score(requests)
    assert len({len(encode_pair(tokenizer, r.context, r.continuation)[0]) for r in requests}) > 1
    for request, score in zip(requests, scores, strict=True):
        assert score == pytest.approx(_reference(model, tokenizer, request), abs=1e-4)
    assert LoglikelihoodScorer(model, tokenizer, batch_size=1).score(requests) == pytest.approx(
        scores, abs=1e-4
    )


def test_scores_equal_lm_evaluation_harness(tiny_model_dir, tiny_model_and_tokenizer) -> None:
    """The same (context, continuation) pairs through lm-eval's HFLM.loglikelihood."""
    pytest.importorskip("lm_eval", reason="lm_eval (lm-evaluation-harness) is not installed")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model_and_tokenizer
    requests = [*_requests(PLANTED[:2]), Request("Question: Is the sky blue?\nAnswer:", " yes")]
    harness = HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2)
    instances = [
        Instance("loglikelihood", {}, (r.context, r.continuation), index)
        for index, r in enumerate(requests)
    ]
    expected = [ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True)]
    ours = LoglikelihoodScorer(model, tokenizer, batch_size=2).score(requests)
    assert ours == pytest.approx(expected, abs=1e-4)


def _planted_model(model_dir: Path, tokenizer, favoured_text: str):
    """The tiny Llama with an output layer that prefers the tokens of ``favoured_text``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    favoured = tokenizer(favoured_text, add_special_tokens=False)["input_ids"]
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[favoured] = 10.0
    model.lm_head = head
    return model.eval(), set(favoured)


@pytest.mark.parametrize(("planted", "expected"), [("true true", 100.0), ("false false", 0.0)])
def test_a_planted_option_is_ranked_first(tiny_model_dir, tmp_path, planted, expected) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, favoured = _planted_model(tiny_model_dir, tokenizer, " " + planted)
    other = "false false" if planted == "true true" else "true true"
    assert favoured.isdisjoint(tokenizer(" " + other, add_special_tokens=False)["input_ids"])
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "test.json").write_text(json.dumps(PLANTED))
    out = tmp_path / "eval"
    config = load_eval_config(
        None,
        [
            "model=unused",
            "tasks=piqa",
            "scoring=loglikelihood",
            "template=raw",
            f"data_dir={data}",
            "batch_size=3",
            f"output_dir={out}",
        ],
    )
    report = evaluate(config, model=model, tokenizer=tokenizer)
    metrics = report.results[0].metrics
    assert metrics["acc"] == metrics["accuracy"] == expected
    assert metrics["acc_norm"] == expected  # both options have the same length
    records = read_jsonl(out / "piqa" / "predictions.jsonl")
    for record in records:
        chosen = record["continuations"][record["keywords"].index(record["extracted"])]
        assert chosen == planted
        lls = record["loglikelihoods"]
        assert max(lls) - min(lls) > 15  # 2 tokens x 10 nats
        assert record["prompt"].startswith("Question: How do I")


def test_acc_norm_divides_by_the_continuation_length() -> None:
    lls, continuations = [-10.0, -12.0, -30.0], ["ab", "abcdefgh", "abcdefghijklmnopqrstuvwxyz"]
    lengths = np.array([len(text) for text in continuations], dtype=float)
    assert (
        predictions(lls, continuations)
        == (
            int(np.argmax(lls)),
            int(np.argmax(np.array(lls) / lengths)),
        )
        == (0, 2)
    )
    assert predictions([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties: the first option


def test_every_option_layout_parses(hellaswag_records) -> None:
    item = get_task("hellaswag").choices.parse(hellaswag_records[1])
    assert item.contexts[0] == "Tying shoes: A boy sits on the steps. he"
    assert item.continuations[1] == "ties the laces of his shoes." and item.gold == 1
    boolq = get_task("boolq").choices.parse(
        {
            "instruction": "Please answer the following question with true or false, "
            "question: is the sky blue?\n\nAnswer format: true/false",
            "answer": "false",
        }
    )
    assert boolq.contexts == ("Question: is the sky blue?\nAnswer:",) * 2
    assert boolq.continuations == ("yes", "no") and boolq.gold == 1
    with pytest.raises(DataError, match="cannot find the options Answer1"):
        MultipleChoice().parse({"instruction": "What is 2 + 2?", "answer": "answer1"})
    with pytest.raises(DataError, match="not one of the options"):
        get_task("piqa").choices.parse({**PLANTED[0], "answer": "solution3"})


@pytest.mark.slow
def test_cli_writes_acc_and_acc_norm_with_intervals(
    tiny_model_dir, shared_eval_dir, hellaswag_dir, tmp_path
) -> None:
    out = tmp_path / "eval"
    hellaswag = hellaswag_dir / "hellaswag" / "test.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "kdlab", "-q", "eval", f"model={tiny_model_dir}",
            f"tasks=[boolq, winogrande, ARC-Challenge, {{name: hellaswag, path: {hellaswag}}}]",
            "scoring=loglikelihood", f"data_dir={shared_eval_dir}", "limit=3", f"output_dir={out}",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for task in ("boolq", "winogrande", "ARC-Challenge", "hellaswag"):
        metrics = json.loads((out / task / "metrics.json").read_text())
        assert metrics["scoring"] == "loglikelihood" and metrics["n"] == 3
        for name in ("acc", "acc_norm"):
            assert 0 <= metrics[name] <= 100
            low, high = metrics[f"{name}_ci95"]
            assert low <= metrics[name] <= high and metrics[f"{name}_stderr"] is not None
        assert metrics["accuracy"] == metrics["acc"]
        records = read_jsonl(out / task / "predictions.jsonl")
        assert [r["index"] for r in records] == [0, 1, 2]
        assert all(len(r["loglikelihoods"]) == len(r["keywords"]) >= 2 for r in records)
    with open(out / "summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    boolq = json.loads((out / "boolq" / "metrics.json").read_text())
    assert float(row["boolq"]) == pytest.approx(boolq["acc"], abs=0.01)
    assert float(row["boolq_ci95_hi"]) == pytest.approx(boolq["acc_ci95"][1], abs=0.01)

    refused = subprocess.run(
        [
            sys.executable, "-m", "kdlab", "eval", f"model={tiny_model_dir}",
            "tasks=[gsm8k, boolq]", "scoring=loglikelihood", f"data_dir={shared_eval_dir}",
            f"output_dir={tmp_path / 'refused'}",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "gsm8k have no options to score" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()


def test_an_interrupted_scoring_resumes_without_scoring_twice(
    tiny_model_and_tokenizer, shared_eval_dir, tmp_path, monkeypatch
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    scored: list[int] = []
    original = LoglikelihoodScorer.score

    def failing(self, requests):
        if scored:
            raise KeyboardInterrupt
        scored.append(len(requests))
        return original(self, requests)

    out = tmp_path / "eval"
    overrides = [
        "model=unused", "tasks=boolq", "scoring=loglikelihood", f"data_dir={shared_eval_dir}",
        "limit=4", "batch_size=2", f"output_dir={out}",
    ]  # fmt: skip
    monkeypatch.setattr(LoglikelihoodScorer, "score", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate(load_eval_config(None, overrides), model=model, tokenizer=tokenizer)
    assert len(read_jsonl(out / "boolq" / "predictions.jsonl")) == 2
    with pytest.raises(KdlabError, match="--resume"):
        evaluate(load_eval_config(None, overrides), model=model, tokenizer=tokenizer)

    def recording(self, requests):
        scored.append(len(requests))
        return original(self, requests)

    monkeypatch.setattr(LoglikelihoodScorer, "score", recording)
    evaluate(load_eval_config(None, overrides), model=model, tokenizer=tokenizer, resume=True)
    assert scored == [4, 4]  # 2 items x 2 options, then the other 2 items only
    records = read_jsonl(out / "boolq" / "predictions.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2, 3]
