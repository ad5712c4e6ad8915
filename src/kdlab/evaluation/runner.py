"""Run an evaluation: plan the items, generate in batches, score, write the run layout.

Output (``docs/run-layout.md``)::

    <out>/config.yaml                the resolved EvalConfig (written first)
    <out>/<task>/predictions.jsonl   index, instruction, prompt, raw_output, output,
                                     finish_reason, generated_tokens, extracted, gold, correct
                                     (appended as each item finishes; sorted at the end)
    <out>/<task>/metrics.json        accuracy (%) with its 95 % Wilson interval and standard
                                     error, accuracy_paper_rule (the paper scripts' rule) with
                                     its interval, n, correct, extraction_failures, excluded,
                                     truncated, template, scoring, ...
    <out>/summary.csv, summary.md    one row per model: task columns + Average (+ intervals)
    <out>/run.json                   the evaluated model's identity
    <out>/DONE                       written last
    <run_dir>/{adapter,model}/README.md   an evaluated run's model card gets these results

Items keep the index they have in their test file. ``decontaminate_against`` removes test
items whose question occurs in the training file(s) before ``limit`` takes the first N of
the rest (so ``limit`` is the number of items scored); ``excluded`` counts the removed ones.
An interrupted evaluation resumes: items already in ``predictions.jsonl`` are not generated
again (a torn last line, left by a kill, is repaired).

Prompts use one template per evaluation (:func:`kdlab.evaluation.prompts.resolve_template`:
the config's, else the run's training template, else the task's). ``scoring:
loglikelihood`` scores the options of multiple-choice tasks instead of generating
(:mod:`kdlab.evaluation.loglikelihood`); ``docs/evaluation.md`` describes both.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdlab import __version__
from kdlab.config.evaluation import CustomTaskConfig, EvalConfig, compact_dict
from kdlab.config.run_identity import RunIdentity, read_run_identity
from kdlab.config.schema import ModelConfig
from kdlab.errors import DataError, KdlabError
from kdlab.evaluation.generation import Generation, Generator, choose_backend
from kdlab.evaluation.prompts import resolve_template
from kdlab.evaluation.tasks import (
    Task,
    custom_task,
    default_data_source,
    expand_task_names,
    get_task,
    list_tasks,
)
from kdlab.models.generation import FINISH_REASONS, derive_seed
from kdlab.models.quantization import quantization_identity
from kdlab.training.rundir import (
    EVAL_FILES,
    EVAL_LAYOUT,
    EVAL_RESUME_SAFE,
    RunDirectory,
    content_entries,
    prepare_directory,
)
from kdlab.utils.faults import maybe_fault
from kdlab.utils.intervals import accuracy_fields
from kdlab.utils.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    mark_done,
    read_jsonl,
)

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
#: Files of an evaluation directory besides the per-task folders.
RUN_FILES = EVAL_FILES


# --------------------------------------------------------------------------- planning


@dataclass
class TaskPlan:
    """The items of one task to score, after decontamination and ``limit``."""

    task: Task
    source: str
    items: list[dict[str, Any]]
    """Records with their original ``index`` added."""
    total: int
    """Records in the data file."""
    excluded: int = 0
    """Records removed because their question occurs in the training data."""


@dataclass
class ModelIdentity:
    """What is evaluated: a model config plus an optional adapter (from a run or not)."""

    model_config: ModelConfig
    adapter: str | None
    run_dir: str | None
    run_identity: RunIdentity | None = None

    @property
    def model(self) -> str:
        """The model's identity as run.json records it (alias, hub id or path)."""
        if self.run_identity is not None:
            return self.run_identity.model
        try:
            from kdlab.models.loading import resolve_model_source

            source = resolve_model_source(
                self.model_config.name_or_path, self.model_config.gguf_file
            )
            return source.identity or self.model_config.name_or_path
        except KdlabError:
            return self.model_config.name_or_path


def resolve_identity(config: EvalConfig) -> ModelIdentity:
    """The model and adapter to evaluate (from ``run_dir`` when given)."""
    if config.run_dir is not None:
        from kdlab.models.loading import resolve_run_dir

        model_config, adapter = resolve_run_dir(config.run_dir)
        return ModelIdentity(
            model_config, adapter, config.run_dir, read_run_identity(config.run_dir)
        )
    return ModelIdentity(config.model, config.adapter, None)


def resolve_tasks(config: EvalConfig) -> list[Task]:
    """Tasks named by the config: names, groups and custom entries (golds read if needed)."""
    tasks: list[Task] = []
    seen: set[str] = set()
    for entry in config.tasks:
        if isinstance(entry, CustomTaskConfig):
            new = [_custom_task(entry, config.data_dir)]
        else:
            new = [get_task(name) for name in expand_task_names(entry)]
        for task in new:
            if task.name.lower() not in seen:
                seen.add(task.name.lower())
                tasks.append(task)
    return tasks


def _custom_task(entry: CustomTaskConfig, data_dir: str | None) -> Task:
    if entry.type is None:
        if entry.path is None and not entry.columns:
            return get_task(entry.name)
        path = entry.path or default_data_source(entry.name, data_dir)
        return custom_task(entry.name, path, columns=entry.columns)
    path = entry.path or default_data_source(entry.name, data_dir)
    golds: list[str] = []
    if entry.type.lower() == "commonsense" and not entry.choices:
        from kdlab.evaluation.tasks import load_task_records

        if not path.startswith("hf:") and not Path(path).exists():
            raise DataError(f"task {entry.name}: data file {path} not found")
        records = load_task_records(path, name=entry.name, columns=entry.columns)
        golds = [record["answer"] for record in records]
    return custom_task(
        entry.name, path, entry.type, choices=entry.choices, golds=golds, columns=entry.columns
    )


def plan_tasks(config: EvalConfig, tasks: Sequence[Task] | None = None) -> list[TaskPlan]:
    """Load every task's records, drop training overlap, apply ``limit`` (fails fast)."""
    from kdlab.data.decontamination import find_overlap, load_training_instructions

    tasks = list(tasks) if tasks is not None else resolve_tasks(config)
    training_keys: set[str] | None = None
    if config.decontaminate_against:
        training_keys = load_training_instructions(config.decontaminate_against)
        logger.info(
            "decontamination: %d training questions from %s",
            len(training_keys),
            ", ".join(config.decontaminate_against),
        )
    plans: list[TaskPlan] = []
    for task in tasks:
        source = task.data_source(config.data_dir)
        try:
            records = task.load(config.data_dir)
        except DataError:
            if config.skip_missing and not source.startswith("hf:") and not Path(source).exists():
                logger.warning("skipping task %s: data file %s not found", task.name, source)
                continue
            raise
        items = [{**record, "index": index} for index, record in enumerate(records)]
        excluded = 0
        if training_keys is not None:
            overlapping = set(find_overlap(training_keys, records))
            excluded = len(overlapping)
            if excluded and config.on_overlap == "error":
                raise DataError(
                    f"task {task.name}: {excluded} of {len(records)} test items occur in the "
                    f"training data ({', '.join(config.decontaminate_against or [])}); "
                    "set on_overlap: exclude to evaluate on the rest"
                )
            items = [item for item in items if item["index"] not in overlapping]
            if excluded:
                logger.info(
                    "task %s: excluded %d of %d items found in the training data",
                    task.name,
                    excluded,
                    len(records),
                )
        if config.limit is not None:
            items = items[: config.limit]
        plans.append(TaskPlan(task, source, items, len(records), excluded))
    if not plans:
        raise DataError("no task to evaluate: every task's data file is missing")
    return plans


# --------------------------------------------------------------------------- output dir


def short_model_name(model: str | None) -> str:
    """The last component of a hub id or path: ``"Qwen/Qwen2.5-0.5B"`` → ``"Qwen2.5-0.5B"``."""
    text = str(model or "").rstrip("/\\")
    return text.replace("\\", "/").rsplit("/", 1)[-1] or str(model or "-")


def default_output_dir(config: EvalConfig, identity: ModelIdentity) -> Path:
    """``<run_dir>/eval``, else ``runs/eval/<model name>``."""
    if config.output_dir:
        return Path(config.output_dir)
    if identity.run_dir:
        return Path(identity.run_dir) / "eval"
    name = short_model_name(identity.model)
    if identity.adapter:
        name += "+" + short_model_name(identity.adapter.rstrip("/").removesuffix("/adapter"))
    if name.strip(".") == "":  # a model path ending in ".." must not name runs/ itself
        name = "model"
    return Path("runs") / "eval" / name


def _nothing_to_lose(out_dir: Path) -> bool:
    """Only ``config.yaml`` and empty task folders (a model that failed to load)."""
    return all(
        entry.name == "config.yaml" or (entry.is_dir() and not any(entry.iterdir()))
        for entry in content_entries(out_dir)
    )


def prepare_output_dir(
    out_dir: Path, config: EvalConfig, *, resume: bool = False, overwrite: bool = False
) -> RunDirectory:
    """Lock ``out_dir`` and check the flags (:func:`kdlab.training.rundir.prepare_directory`).

    An existing evaluation needs ``--resume`` (the saved config must match, but for the keys
    of :data:`~kdlab.training.rundir.EVAL_RESUME_SAFE`) or ``--overwrite`` (which replaces
    only a kdlab evaluation, and only at :meth:`~kdlab.training.rundir.RunDirectory.start`).
    A folder holding only ``config.yaml`` (a model that failed to load) is not an evaluation.
    """
    return prepare_directory(
        out_dir,
        EVAL_LAYOUT,
        resume=resume,
        overwrite=overwrite,
        what="output_dir",
        config=compact_dict(config),
        resume_safe=EVAL_RESUME_SAFE,
        nothing_to_lose=_nothing_to_lose,
        resume_finished=True,  # e.g. a finished evaluation resumed with another task
    )


# --------------------------------------------------------------------------- running


@dataclass
class TaskResult:
    """The outcome of one task (what metrics.json holds)."""

    task: str
    metrics: dict[str, Any]
    generated: int
    """Items generated in this session (the rest came from an earlier, resumed session)."""

    @property
    def accuracy(self) -> float | None:
        """Accuracy in percent, ``None`` for a task without items."""
        return self.metrics.get("accuracy")


@dataclass
class EvalReport:
    """What :func:`evaluate` returns."""

    output_dir: Path
    label: str
    results: list[TaskResult]
    backend: str

    @property
    def average(self) -> float | None:
        """Mean accuracy over tasks that have items."""
        values = [r.accuracy for r in self.results if r.accuracy is not None]
        return sum(values) / len(values) if values else None

    def summary_row(self) -> dict[str, Any]:
        """The Model, task, Average and interval cells of this evaluation."""
        return summary_row(self.label, [(r.task, r.metrics) for r in self.results])


GeneratorFactory = Callable[[], Generator]


def _prompt(task: Task, item: dict[str, Any], tokenizer: Any) -> str:
    """The rendered prompt of one item (``task.template`` is the evaluation's template)."""
    from kdlab.evaluation.prompts import render_record_prompt

    return render_record_prompt(task.template, item, tokenizer)


def _load_done(path: Path, plan: TaskPlan) -> dict[int, dict[str, Any]]:
    """Records already written for this task (a torn last line is repaired)."""
    try:
        records = read_jsonl(path, repair=True)
    except (ValueError, OSError) as error:
        raise KdlabError(
            f"cannot resume: {path} is damaged ({error}); use --overwrite to start again"
        ) from None
    by_index = {item["index"]: item for item in plan.items}
    done: dict[int, dict[str, Any]] = {}
    dropped = 0
    for record in records:
        index = record.get("index")
        if index not in by_index:
            dropped += 1
            continue
        if record.get("instruction") != by_index[index]["instruction"]:
            raise KdlabError(
                f"cannot resume: {path} item {index} does not match {plan.source} (the data "
                "changed?); use --overwrite to start again"
            )
        done.setdefault(index, record)
    if dropped:
        logger.warning(
            "%s: %d earlier predictions are outside the current items (limit or data changed) "
            "and are dropped",
            path,
            dropped,
        )
    return done


def _record(
    task: Task, item: dict[str, Any], prompt: str | None, generation: Generation
) -> dict[str, Any]:
    """The predictions.jsonl line of one item: what the model saw and did, and its score."""
    from kdlab.evaluation.tasks import cut_continuation

    text = cut_continuation(generation.raw_output)
    extracted, correct = task.score(text, item["answer"])
    return {
        "index": item["index"],
        "instruction": item["instruction"],
        "prompt": prompt,
        "raw_output": generation.raw_output,
        "output": text,
        "finish_reason": generation.finish_reason,
        "generated_tokens": generation.generated_tokens,
        "extracted": extracted,
        "gold": item["answer"],
        "correct": correct,
    }


def _rescore(
    task: Task, item: dict[str, Any], record: dict[str, Any], prompt: str | None
) -> dict[str, Any]:
    """``record`` scored again with the current extractor.

    A line written before kdlab recorded raw outputs (no ``raw_output``) keeps its
    ``output`` (already cut); the fields it lacks stay null (``finish_reason``,
    ``generated_tokens``, ``raw_output``) and its ``prompt`` is the one rendered now, when
    this session rendered prompts (resume refuses another template).
    """
    raw = record.get("raw_output")
    if isinstance(raw, str):
        generation = Generation(raw, record.get("finish_reason"), record.get("generated_tokens"))
        return _record(task, item, record.get("prompt") or prompt, generation)
    rescored = _record(task, item, prompt, Generation(str(record.get("output") or ""), None, None))
    rescored["raw_output"] = None
    return rescored


def run_task(
    plan: TaskPlan,
    config: EvalConfig,
    out_dir: Path,
    get_generator: GeneratorFactory,
    *,
    context: dict[str, Any],
) -> TaskResult:
    """Generate the missing items of one task, then score it and write metrics.json."""
    task = plan.task
    task_dir = out_dir / task.name
    if task.name in RUN_FILES or task_dir.resolve().parent != out_dir.resolve():
        raise KdlabError(f"task name {task.name!r} cannot be a folder of {out_dir}")
    task_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = task_dir / PREDICTIONS_FILE
    done = _load_done(predictions_path, plan)
    pending = [item for item in plan.items if item["index"] not in done]
    prompts: dict[int, str] = {}
    elapsed = 0.0
    session_tokens = 0
    if pending:
        generator = get_generator()
        tokenizer = getattr(generator, "tokenizer", None)
        prompts = {item["index"]: _prompt(task, item, tokenizer) for item in plan.items}
        progress = _progress(len(pending), task.name)
        recorded: set[int] = set()

        def on_result(position: int, generation: Generation) -> None:
            # Written as soon as the item is finished: a kill loses only unfinished items.
            nonlocal session_tokens
            item = pending[position]
            record = _record(task, item, prompts[item["index"]], generation)
            append_jsonl(predictions_path, record)
            maybe_fault("eval_output")
            done[item["index"]] = record
            recorded.add(position)
            session_tokens += generation.generated_tokens or 0
            progress.update(1)

        # Timed from here: model loading (get_generator) is not generation time.
        started = time.perf_counter()
        try:
            # The generator batches and orders the items itself (continuous batching); each
            # item's sampling seed depends on its index only, so a resumed run samples the
            # same answers.
            generations = generator.generate(
                [prompts[item["index"]] for item in pending],
                seeds=[derive_seed(config.generation.seed, item["index"]) for item in pending],
                batch_size=config.batch_size,
                on_result=on_result,
            )
            for position, generation in enumerate(generations):
                if position not in recorded:
                    on_result(position, generation)
        finally:
            elapsed = time.perf_counter() - started
            progress.close()
    generated = len(pending)
    # Re-score every record with the current extractor and rewrite the file in index order.
    records = [
        _rescore(task, item, done[item["index"]], prompts.get(item["index"]))
        for item in sorted(plan.items, key=lambda item: item["index"])
    ]
    atomic_write_text(
        predictions_path,
        "".join(_json_line(record) for record in records),
    )
    metrics = _metrics(
        plan,
        records,
        config,
        context,
        generated=generated,
        elapsed=elapsed,
        session_tokens=session_tokens,
    )
    atomic_write_json(task_dir / METRICS_FILE, metrics)
    accuracy = metrics["accuracy"]
    logger.info(
        "%s: %s (%d/%d correct, %d without an answer%s)",
        task.name,
        "n/a" if accuracy is None else f"{accuracy:.2f}%",
        metrics["correct"],
        metrics["n"],
        metrics["extraction_failures"],
        f", {plan.excluded} excluded" if plan.excluded else "",
    )
    return TaskResult(task.name, metrics, generated)


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record, ensure_ascii=False) + "\n"


def _progress(total: int, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="item", leave=False, dynamic_ncols=True)


def _metrics(
    plan: TaskPlan,
    records: list[dict[str, Any]],
    config: EvalConfig,
    context: dict[str, Any],
    *,
    generated: int,
    elapsed: float,
    session_tokens: int = 0,
) -> dict[str, Any]:
    n = len(records)
    correct = sum(1 for record in records if record["correct"])
    failures = sum(1 for record in records if record["extracted"] is None)
    reasons = {reason: 0 for reason in (*FINISH_REASONS, "unknown")}
    for record in records:
        reason = record.get("finish_reason")
        reasons[reason if reason in FINISH_REASONS else "unknown"] += 1
    tokens = [record.get("generated_tokens") for record in records]
    return {
        "task": plan.task.name,
        "family": plan.task.family,
        "metric": plan.task.metric,
        **_accuracy_metrics(plan.task, records),
        "n": n,
        "correct": correct,
        "extraction_failures": failures,
        "excluded": plan.excluded,
        "total_items": plan.total,
        "limit": config.limit,
        "data": plan.source,
        "decontaminate_against": config.decontaminate_against,
        "template": plan.task.template,
        "scoring": "generate",
        "generation": config.generation.as_dict(),
        "batch_size": config.batch_size,
        "truncated": reasons["length"],
        "finish_reasons": reasons,
        "generated_tokens": sum(count for count in tokens if isinstance(count, int)),
        "generated_this_session": generated,
        "generated_tokens_this_session": session_tokens,
        "generation_seconds": round(elapsed, 3),
        "tokens_per_second": round(session_tokens / elapsed, 2) if elapsed > 0 else None,
        "kdlab_version": __version__,
        **context,
    }


def _accuracy_metrics(task: Task, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """accuracy (kdlab's rule) and accuracy_paper_rule, each with its interval and stderr.

    The paper's rule is applied to the same scored text as kdlab's (``output``), so the two
    differ only by the extraction rule (docs/evaluation.md).
    """
    n = len(records)
    fields = accuracy_fields(sum(1 for record in records if record["correct"]), n)
    if task.paper_extractor is None:  # a task without a paper rule (a registered extra)
        return {**fields, **accuracy_fields(0, 0, "accuracy_paper_rule"), "paper_rule": None}
    paper_correct = 0
    for record in records:
        scored = task.score_paper_rule(record.get("output") or "", record["gold"])
        paper_correct += bool(scored and scored[1])
    fields.update(accuracy_fields(paper_correct, n, "accuracy_paper_rule"))
    fields["paper_rule"] = task.paper_extractor.name
    return fields


# --------------------------------------------------------------------------- log-likelihood


def run_loglikelihood_task(
    plan: TaskPlan,
    config: EvalConfig,
    out_dir: Path,
    get_scorer: Callable[[], Any],
    *,
    context: dict[str, Any],
) -> TaskResult:
    """Score every option of the missing items of one task, then write metrics.json.

    predictions.jsonl holds per item: the options' ``keywords``, the ``continuations`` and
    their summed ``loglikelihoods``, the rendered ``prompt`` (``prompts`` when the context
    differs per option), ``extracted`` / ``correct`` (highest sum: acc) and
    ``extracted_norm`` / ``correct_norm`` (highest sum per character: acc_norm).
    """
    from kdlab.evaluation.loglikelihood import Request, predictions
    from kdlab.evaluation.prompts import continuation_delimiter, render_prompt

    task = plan.task
    if task.choices is None:
        raise KdlabError(f"task {task.name} has no options to score by log-likelihood")
    task_dir = out_dir / task.name
    if task.name in RUN_FILES or task_dir.resolve().parent != out_dir.resolve():
        raise KdlabError(f"task name {task.name!r} cannot be a folder of {out_dir}")
    task_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = task_dir / PREDICTIONS_FILE
    items = {
        item["index"]: task.choices.parse(item, where=f"{plan.source}: record {item['index']}")
        for item in plan.items
    }
    done = _load_done(predictions_path, plan)
    pending = [item for item in plan.items if item["index"] not in done]
    delimiter = continuation_delimiter(task.template)
    started = time.perf_counter()
    if pending:
        scorer = get_scorer()
        tokenizer = scorer.tokenizer
        progress = _progress(len(pending), task.name)
        try:
            # One scoring call per batch of items, so that a kill loses at most one batch.
            for start in range(0, len(pending), config.batch_size):
                batch = pending[start : start + config.batch_size]
                requests: list[Request] = []
                for item in batch:
                    choice = items[item["index"]]
                    for option_context, continuation in zip(
                        choice.contexts, choice.continuations, strict=True
                    ):
                        prompt = render_prompt(task.template, option_context, "", tokenizer)
                        requests.append(Request(prompt, delimiter + continuation))
                scores = scorer.score(requests)
                position = 0
                for item in batch:
                    choice = items[item["index"]]
                    count = len(choice.keywords)
                    lls = scores[position : position + count]
                    position += count
                    prompts = [r.context for r in requests[position - count : position]]
                    record = _loglikelihood_record(item, choice, lls, prompts)
                    append_jsonl(predictions_path, record)
                    maybe_fault("eval_output")
                    done[item["index"]] = record
                progress.update(len(batch))
        finally:
            progress.close()
    elapsed = time.perf_counter() - started
    records = []
    for item in sorted(plan.items, key=lambda item: item["index"]):
        record = done[item["index"]]
        best, best_norm = predictions(record["loglikelihoods"], record["continuations"])
        keywords = record["keywords"]
        gold = str(item["answer"]).strip().lower()
        record = {
            **record,
            "extracted": keywords[best],
            "correct": keywords[best] == gold,
            "extracted_norm": keywords[best_norm],
            "correct_norm": keywords[best_norm] == gold,
        }
        records.append(record)
    atomic_write_text(predictions_path, "".join(_json_line(record) for record in records))
    n = len(records)
    correct = sum(record["correct"] for record in records)
    correct_norm = sum(record["correct_norm"] for record in records)
    metrics = {
        "task": task.name,
        "family": task.family,
        "metric": "acc",
        **accuracy_fields(correct, n),
        **accuracy_fields(correct, n, "acc"),
        **accuracy_fields(correct_norm, n, "acc_norm"),
        **accuracy_fields(0, 0, "accuracy_paper_rule"),
        "paper_rule": None,
        "n": n,
        "correct": correct,
        "correct_norm": correct_norm,
        "extraction_failures": 0,
        "excluded": plan.excluded,
        "total_items": plan.total,
        "limit": config.limit,
        "data": plan.source,
        "decontaminate_against": config.decontaminate_against,
        "template": task.template,
        "scoring": "loglikelihood",
        "continuation_delimiter": delimiter,
        "batch_size": config.batch_size,
        "scored_this_session": len(pending),
        "scoring_seconds": round(elapsed, 3),
        "kdlab_version": __version__,
        **context,
    }
    atomic_write_json(task_dir / METRICS_FILE, metrics)
    logger.info(
        "%s: acc %s, acc_norm %s (%d items, log-likelihood)",
        task.name,
        "n/a" if metrics["acc"] is None else f"{metrics['acc']:.2f}%",
        "n/a" if metrics["acc_norm"] is None else f"{metrics['acc_norm']:.2f}%",
        n,
    )
    return TaskResult(task.name, metrics, len(pending))


def _loglikelihood_record(
    item: dict[str, Any], choice: Any, loglikelihoods: Sequence[float], prompts: Sequence[str]
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "index": item["index"],
        "instruction": item["instruction"],
        "gold": item["answer"],
        "keywords": list(choice.keywords),
        "continuations": list(choice.continuations),
        "loglikelihoods": [round(float(value), 6) for value in loglikelihoods],
    }
    if len(set(prompts)) == 1:
        record["prompt"] = prompts[0]
    else:
        record["prompts"] = list(prompts)
    return record


def _check_loglikelihood_tasks(tasks: Sequence[Task]) -> None:
    unsupported = [task.name for task in tasks if task.choices is None]
    if unsupported:
        supported = [name for name in list_tasks() if get_task(name).choices is not None]
        raise KdlabError(
            f"scoring: loglikelihood needs multiple-choice tasks; {', '.join(unsupported)} "
            f"have no options to score (tasks with options: {', '.join(supported)}); "
            "use scoring: generate for them"
        )


# --------------------------------------------------------------------------- summaries


#: Per-task summary.csv columns after the accuracy column ``<task>``: suffix → metrics key
#: (``[0]``/``[1]``: the interval's bounds).
SUMMARY_DETAILS: dict[str, tuple[str, int | None]] = {
    "_ci95_lo": ("accuracy_ci95", 0),
    "_ci95_hi": ("accuracy_ci95", 1),
    "_stderr": ("accuracy_stderr", None),
    "_paper_rule": ("accuracy_paper_rule", None),
    "_paper_rule_ci95_lo": ("accuracy_paper_rule_ci95", 0),
    "_paper_rule_ci95_hi": ("accuracy_paper_rule_ci95", 1),
    "_paper_rule_stderr": ("accuracy_paper_rule_stderr", None),
    "_n": ("n", None),
}


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else None


def summary_row(label: str, task_metrics: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One summary row: Model, ``<task>`` accuracies, Average, and every detail column."""
    row: dict[str, Any] = {"Model": label}
    for task, metrics in task_metrics:
        row[task] = metrics.get("accuracy")
        for suffix, (key, position) in SUMMARY_DETAILS.items():
            value = metrics.get(key)
            if position is not None:
                value = value[position] if isinstance(value, (list, tuple)) else None
            row[task + suffix] = value
    row["Average"] = _mean([metrics.get("accuracy") for _, metrics in task_metrics])
    row["Average_paper_rule"] = _mean(
        [metrics.get("accuracy_paper_rule") for _, metrics in task_metrics]
    )
    return row


def _format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _with_error(row: dict[str, Any], column: str) -> str:
    """``"12.50 ± 8.54"`` (accuracy ± standard error), or the accuracy alone."""
    value = _format_cell(row.get(column))
    stderr = _format_cell(row.get(column + "_stderr"))
    return f"{value} ± {stderr}" if value and stderr else value or "-"


def _interval(row: dict[str, Any], column: str) -> str:
    low, high = (
        _format_cell(row.get(column + "_ci95_lo")),
        _format_cell(row.get(column + "_ci95_hi")),
    )
    return f"[{low}, {high}]" if low and high else "-"


def summary_tables(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> tuple[str, str]:
    """(CSV text, Markdown text) of summary rows.

    CSV: Model, one accuracy column per task, Average, Average_paper_rule, then per task
    the :data:`SUMMARY_DETAILS` columns (``<task>_ci95_lo``, ..., ``<task>_n``). Markdown:
    the paper-style table of accuracies ``± standard error``, then one line per model and
    task with n, accuracy, its 95 % Wilson interval, the paper rule's accuracy and interval.
    """
    header = ["Model", *columns, "Average", "Average_paper_rule"]
    header += [column + suffix for column in columns for suffix in SUMMARY_DETAILS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_format_cell(row.get(column)) for column in header])

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    wide = ["Model", *columns, "Average"]
    lines = [line(wide), line(["---"] * len(wide))]
    for row in rows:
        cells = [str(row.get("Model") or "-")]
        cells += [_with_error(row, column) for column in columns]
        cells.append(_format_cell(row.get("Average")) or "-")
        lines.append(line(cells))
    long = ["Model", "Task", "n", "accuracy", "95 % CI", "paper rule", "95 % CI (paper rule)"]
    lines += ["", line(long), line(["---"] * len(long))]
    for row in rows:
        for column in columns:
            if row.get(column) is None and row.get(column + "_n") is None:
                continue
            lines.append(
                line(
                    [
                        str(row.get("Model") or "-"),
                        column,
                        _format_cell(row.get(column + "_n")) or "-",
                        _format_cell(row.get(column)) or "-",
                        _interval(row, column),
                        _format_cell(row.get(column + "_paper_rule")) or "-",
                        _interval(row, column + "_paper_rule"),
                    ]
                )
            )
    lines.append("")
    lines.append(
        "accuracy in %, ± its standard error; 95 % CI: Wilson score interval; paper rule: "
        "the paper scripts' answer extraction (docs/evaluation.md)."
    )
    return buffer.getvalue(), "\n".join(lines) + "\n"


def write_summary(out_dir: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Write ``summary.csv`` and ``summary.md``; return the Markdown table."""
    csv_text, markdown = summary_tables(rows, columns)
    atomic_write_text(out_dir / "summary.csv", csv_text)
    atomic_write_text(out_dir / "summary.md", markdown)
    return markdown


def collect_summary_rows(eval_dirs: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (Model, tasks, Average) and task columns of several evaluation directories.

    Each directory is an ``kdlab eval`` output (``<task>/metrics.json``, ``run.json``); its
    row is labelled with the run's name. Columns follow the registry's table order, then
    custom tasks by name. Used to put many models in one paper-style table.
    """
    import json

    from kdlab.evaluation.tasks import list_tasks

    rows: list[dict[str, Any]] = []
    found: set[str] = set()
    for raw in eval_dirs:
        directory = Path(raw)
        identity_file = directory / "run.json"
        identity = json.loads(identity_file.read_text()) if identity_file.is_file() else {}
        task_metrics: list[tuple[str, dict[str, Any]]] = []
        for metrics_file in sorted(directory.glob(f"*/{METRICS_FILE}")):
            metrics = json.loads(metrics_file.read_text())
            task = str(metrics.get("task") or metrics_file.parent.name)
            task_metrics.append((task, metrics))
            found.add(task)
        label = identity.get("name") or directory.parent.name
        rows.append(summary_row(str(label), task_metrics))
    registered = [name for name in list_tasks() if name in found]
    columns = registered + sorted(found - set(registered))
    return rows, columns


# --------------------------------------------------------------------------- entry point


def _model_label(config: EvalConfig, identity: ModelIdentity) -> str:
    if config.name:
        return config.name
    if identity.run_identity is not None:
        return identity.run_identity.name
    label = short_model_name(identity.model)
    if identity.adapter:
        label += " + " + short_model_name(identity.adapter.rstrip("/").removesuffix("/adapter"))
    return label


def _task_family(plans: Sequence[TaskPlan]) -> str:
    families = {plan.task.family for plan in plans}
    return families.pop() if len(families) == 1 else "custom"


def _count_parameters(model: Any) -> int:
    return sum(
        parameter.numel()
        for name, parameter in model.named_parameters()
        if "lora_" not in name and "modules_to_save" not in name
    )


def _run_identity(
    identity: ModelIdentity, label: str, plans: Sequence[TaskPlan], model_params: int | None
) -> RunIdentity:
    """The evaluated run's own identity, or a ``base`` identity for a model alone."""
    if identity.run_identity is not None:
        return identity.run_identity
    return RunIdentity(
        stage="eval",
        role="base",
        name=label,
        model=identity.model,
        model_params=model_params,
        student_layers=identity.model_config.slice_layers,
        adapter=identity.adapter,
        quantization=quantization_identity(identity.model_config),
        method="base",
        task_family=_task_family(plans),
    )


def evaluate(
    config: EvalConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    generator: Generator | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> EvalReport:
    """Evaluate one model on the configured tasks; see the module docstring for outputs.

    ``resume`` continues an interrupted evaluation in the output directory (items already
    in ``predictions.jsonl`` are kept; the config must match the saved one but for
    :data:`~kdlab.training.rundir.EVAL_RESUME_SAFE`); ``overwrite`` replaces an earlier
    kdlab evaluation once the model has loaded (a model or adapter that fails to load
    leaves it as it was). Without either, an output directory holding an evaluation is
    refused. The output directory is locked while the evaluation runs.

    ``generator`` (or an already loaded ``model`` + ``tokenizer``) replaces loading the model
    from the config: tests and benchmarks use it, and so can a caller holding the model.
    """
    if resume and overwrite:
        raise KdlabError("choose one of --resume and --overwrite")
    identity = resolve_identity(config)
    # One template for the whole evaluation, saved in config.yaml (and compared on resume).
    template, template_origin = resolve_template(config.template, identity.run_dir)
    config = replace(config, template=template)
    tasks = [replace(task, template=template or task.template) for task in resolve_tasks(config)]
    loglikelihood = config.scoring == "loglikelihood"
    if loglikelihood:
        _check_loglikelihood_tasks(tasks)
    plans = plan_tasks(config, tasks)
    out_dir = default_output_dir(config, identity)
    resolved = replace(config, output_dir=str(out_dir))
    run = prepare_output_dir(out_dir, resolved, resume=resume, overwrite=overwrite)
    if not run.replaces:
        run.start(compact_dict(resolved))  # config.yaml first (before the model loads)

    if generator is not None:
        backend = generator.backend
    elif loglikelihood:  # scoring needs the model's logits: transformers
        backend = "hf"
    else:
        backend = choose_backend(config.backend, identity.model_config, config.generation)
    state: dict[str, Any] = {"generator": generator, "model_params": None, "scorer": None}

    def get_generator() -> Generator:
        if state["generator"] is None:
            state["generator"] = _build_generator(
                backend, config, identity, model=model, tokenizer=tokenizer, state=state
            )
        return state["generator"]

    def get_scorer() -> Any:
        if state["scorer"] is None:
            from kdlab.evaluation.loglikelihood import LoglikelihoodScorer

            loaded = get_generator()
            if not hasattr(loaded, "model"):
                raise KdlabError(
                    f"scoring: loglikelihood needs a transformers model; the {backend} "
                    "generator has none"
                )
            state["scorer"] = LoglikelihoodScorer(
                loaded.model, loaded.tokenizer, batch_size=config.batch_size
            )
        return state["scorer"]

    context = {
        "backend": backend,
        "model": identity.model,
        "model_name_or_path": identity.model_config.name_or_path,
        "adapter": identity.adapter,
        "run_dir": identity.run_dir,
        "template_origin": template_origin,
    }
    label = _model_label(config, identity)
    logger.info(
        "evaluating %s on %d task(s) → %s (backend %s, template %s from %s, scoring %s)",
        label,
        len(plans),
        out_dir,
        backend,
        template or "the tasks' own",
        template_origin,
        config.scoring,
    )
    if run.replaces:  # --overwrite: the model loads before the earlier evaluation goes
        get_scorer() if loglikelihood else get_generator()
        run.start(compact_dict(resolved))
    if loglikelihood:
        results = [
            run_loglikelihood_task(plan, config, out_dir, get_scorer, context=context)
            for plan in plans
        ]
    else:
        results = [
            run_task(plan, config, out_dir, get_generator, context=context) for plan in plans
        ]
    report = EvalReport(out_dir, label, results, backend)
    write_summary(out_dir, [report.summary_row()], [r.task for r in results])
    model_params = state["model_params"]
    if model_params is None:  # a resumed evaluation that generated nothing new
        previous = read_run_identity(out_dir)
        model_params = previous.model_params if previous is not None else None
    _run_identity(identity, label, plans, model_params).write(out_dir)
    mark_done(
        out_dir,
        {
            "tasks": {r.task: r.accuracy for r in results},
            "average": report.average,
            "backend": backend,
        },
    )
    if identity.run_dir is not None:
        _update_run_card(identity.run_dir, out_dir, results)
    run.close()
    return report


def _update_run_card(run_dir: str, out_dir: Path, results: Sequence[TaskResult]) -> None:
    """Add this evaluation's results to the model card of the evaluated run's weights."""
    from kdlab.errors import RunDirError
    from kdlab.models.card import update_run_card_evaluation

    try:
        card = update_run_card_evaluation(run_dir, out_dir, [(r.task, r.metrics) for r in results])
    except RunDirError as error:
        logger.warning("model card of %s not updated: %s", run_dir, error)
        return
    if card is not None:
        logger.info("model card updated with these results: %s", card)


def _build_generator(
    backend: str,
    config: EvalConfig,
    identity: ModelIdentity,
    *,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
) -> Generator:
    from kdlab.evaluation.generation import HFGenerator, VLLMGenerator

    if backend == "vllm":
        return VLLMGenerator(identity.model_config, config.generation, adapter=identity.adapter)
    if model is None or tokenizer is None:
        from kdlab.models.loading import load_model_and_tokenizer

        logger.info(
            "loading %s%s", identity.model, f" + {identity.adapter}" if identity.adapter else ""
        )
        model, tokenizer = load_model_and_tokenizer(
            identity.model_config, adapter=identity.adapter, for_training=False
        )
    state["model_params"] = _count_parameters(model)
    return HFGenerator(model, tokenizer, config.generation)
