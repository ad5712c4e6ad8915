"""Run an evaluation: plan the items, generate in batches, score, write the run layout.

Output (``docs/run-layout.md``)::

    <out>/config.yaml                the resolved EvalConfig (written first)
    <out>/<task>/predictions.jsonl   index, instruction, prompt, raw_output, output,
                                     finish_reason, generated_tokens, extracted, gold, correct
                                     (appended as each item finishes; sorted at the end)
    <out>/<task>/metrics.json        accuracy (%), n, correct, extraction_failures, excluded, ...
    <out>/summary.csv, summary.md    one row per model: task columns + Average
    <out>/run.json                   the evaluated model's identity
    <out>/DONE                       written last

Items keep the index they have in their test file. ``decontaminate_against`` removes test
items whose question occurs in the training file(s) before ``limit`` takes the first N of
the rest (so ``limit`` is the number of items scored); ``excluded`` counts the removed ones.
An interrupted evaluation resumes: items already in ``predictions.jsonl`` are not generated
again (a torn last line, left by a kill, is repaired).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdlab import __version__
from kdlab.config.evaluation import CustomTaskConfig, EvalConfig, compact_dict
from kdlab.config.schema import ModelConfig
from kdlab.errors import DataError, KdlabError
from kdlab.evaluation.generation import Generation, Generator, choose_backend
from kdlab.evaluation.tasks import (
    Task,
    custom_task,
    default_data_source,
    expand_task_names,
    get_task,
)
from kdlab.models.generation import FINISH_REASONS, derive_seed
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    mark_done,
    read_jsonl,
)

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
#: Files of an evaluation directory besides the per-task folders.
RUN_FILES = ("config.yaml", "run.json", "summary.csv", "summary.md", "DONE")
#: Config keys that must match for ``resume`` to continue an earlier evaluation.
RESUME_KEYS = ("model", "adapter", "run_dir", "template", "generation", "decontaminate_against")


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
    run_info: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The model's identity as run.json records it (alias, hub id or path)."""
        if self.run_info.get("model"):
            return str(self.run_info["model"])
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
        from kdlab.models.loading import read_run_info, resolve_run_dir

        model_config, adapter = resolve_run_dir(config.run_dir)
        return ModelIdentity(model_config, adapter, config.run_dir, read_run_info(config.run_dir))
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
        return get_task(entry.name) if entry.path is None else custom_task(entry.name, entry.path)
    path = entry.path or default_data_source(entry.name, data_dir)
    golds: list[str] = []
    if entry.type.lower() == "commonsense" and not entry.choices:
        from kdlab.data.records import load_records

        if not path.startswith("hf:") and not Path(path).exists():
            raise DataError(f"task {entry.name}: data file {path} not found")
        golds = [record["answer"] for record in load_records(path)]
    return custom_task(entry.name, path, entry.type, choices=entry.choices, golds=golds)


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
    return Path("runs") / "eval" / name


def _owned(entry: Path) -> bool:
    if entry.name in RUN_FILES or entry.name.startswith("."):
        return True
    if entry.is_dir():
        return all(
            child.name in (PREDICTIONS_FILE, METRICS_FILE) or child.name.startswith(".")
            for child in entry.iterdir()
        )
    return False


def prepare_output_dir(out_dir: Path, config: EvalConfig) -> None:
    """Refuse to mix results: an existing non-empty directory needs resume or overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise KdlabError(f"output_dir {out_dir} exists and is not a directory")
    # Only config.yaml and empty task folders (a model that failed to load): nothing to lose.
    if not out_dir.exists() or all(
        e.name == "config.yaml" or (e.is_dir() and not any(e.iterdir())) for e in out_dir.iterdir()
    ):
        return
    if config.overwrite:
        foreign = [entry.name for entry in out_dir.iterdir() if not _owned(entry)]
        if foreign:
            raise KdlabError(
                f"output_dir {out_dir} holds files kdlab eval did not write ({foreign[0]}, ...): "
                "refusing to delete it; choose another output_dir"
            )
        logger.info("overwrite: deleting the earlier evaluation in %s", out_dir)
        shutil.rmtree(out_dir)
        return
    if not config.resume:
        raise KdlabError(
            f"output_dir {out_dir} already holds an evaluation: pass --resume to continue it "
            "or --overwrite to start again (or choose another output_dir)"
        )
    saved_file = out_dir / "config.yaml"
    if saved_file.is_file():
        import yaml

        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        current = compact_dict(config)
        for key in RESUME_KEYS:
            if saved.get(key) != current.get(key):
                raise KdlabError(
                    f"cannot resume {out_dir}: it was evaluated with a different '{key}' "
                    f"({saved.get(key)!r}, now {current.get(key)!r}); use --overwrite or "
                    "another output_dir"
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
        """The Model, task and Average cells of this evaluation."""
        row: dict[str, Any] = {"Model": self.label}
        for result in self.results:
            row[result.task] = result.accuracy
        row["Average"] = self.average
        return row


GeneratorFactory = Callable[[], Generator]


def _prompt(task: Task, item: dict[str, Any], tokenizer: Any) -> str:
    from kdlab.data.templates import build_prompt

    return build_prompt(
        item["instruction"], item.get("input", ""), template=task.template, tokenizer=tokenizer
    )


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
        "accuracy": round(100.0 * correct / n, 4) if n else None,
        "n": n,
        "correct": correct,
        "extraction_failures": failures,
        "excluded": plan.excluded,
        "total_items": plan.total,
        "limit": config.limit,
        "data": plan.source,
        "decontaminate_against": config.decontaminate_against,
        "template": plan.task.template,
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


# --------------------------------------------------------------------------- summaries


def _format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def summary_tables(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> tuple[str, str]:
    """(CSV text, Markdown text) of summary rows: Model, task columns, Average."""
    header = ["Model", *columns, "Average"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_format_cell(row.get(column)) for column in header])
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for row in rows:
        cells = [_format_cell(row.get(column)) or "-" for column in header]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
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
        row: dict[str, Any] = {"Model": identity.get("name") or directory.parent.name}
        accuracies: list[float] = []
        for metrics_file in sorted(directory.glob(f"*/{METRICS_FILE}")):
            metrics = json.loads(metrics_file.read_text())
            task = str(metrics.get("task") or metrics_file.parent.name)
            row[task] = metrics.get("accuracy")
            found.add(task)
            if isinstance(row[task], (int, float)):
                accuracies.append(float(row[task]))
        row["Average"] = sum(accuracies) / len(accuracies) if accuracies else None
        rows.append(row)
    registered = [name for name in list_tasks() if name in found]
    columns = registered + sorted(found - set(registered))
    return rows, columns


# --------------------------------------------------------------------------- entry point


def _model_label(config: EvalConfig, identity: ModelIdentity) -> str:
    if config.name:
        return config.name
    if identity.run_info.get("name"):
        return str(identity.run_info["name"])
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


def _run_json(
    identity: ModelIdentity, label: str, plans: Sequence[TaskPlan], model_params: int | None
) -> dict[str, Any]:
    if identity.run_info:
        return dict(identity.run_info)
    slice_layers = identity.model_config.slice_layers
    return {
        "stage": "eval",
        "role": "base",
        "name": label,
        "model": identity.model,
        "model_params": model_params,
        "student_layers": slice_layers,
        "adapter": identity.adapter,
        "teacher": None,
        "teacher_adapter": None,
        "teacher_run": None,
        "method": "base",
        "temperature": None,
        "noise_std": 0.0,
        "base_teacher": False,
        "kd_weight": None,
        "seed": None,
        "task_family": _task_family(plans),
    }


def evaluate(
    config: EvalConfig,
    *,
    generator: Generator | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> EvalReport:
    """Evaluate one model on the configured tasks; see the module docstring for outputs.

    ``generator`` (or an already loaded ``model`` + ``tokenizer``) replaces loading the model
    from the config: tests and benchmarks use it, and so can a caller holding the model.
    """
    identity = resolve_identity(config)
    tasks = resolve_tasks(config)
    plans = plan_tasks(config, tasks)
    out_dir = default_output_dir(config, identity)
    prepare_output_dir(out_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = replace(config, output_dir=str(out_dir), resume=False, overwrite=False)
    atomic_write_yaml(out_dir / "config.yaml", compact_dict(resolved))

    backend = (
        generator.backend
        if generator is not None
        else choose_backend(config.backend, identity.model_config, config.generation)
    )
    state: dict[str, Any] = {"generator": generator, "model_params": None}

    def get_generator() -> Generator:
        if state["generator"] is None:
            state["generator"] = _build_generator(
                backend, config, identity, model=model, tokenizer=tokenizer, state=state
            )
        return state["generator"]

    context = {
        "backend": backend,
        "model": identity.model,
        "model_name_or_path": identity.model_config.name_or_path,
        "adapter": identity.adapter,
        "run_dir": identity.run_dir,
    }
    label = _model_label(config, identity)
    logger.info(
        "evaluating %s on %d task(s) → %s (backend %s)", label, len(plans), out_dir, backend
    )
    results = [run_task(plan, config, out_dir, get_generator, context=context) for plan in plans]
    report = EvalReport(out_dir, label, results, backend)
    write_summary(out_dir, [report.summary_row()], [r.task for r in results])
    model_params = state["model_params"]
    if model_params is None and (out_dir / "run.json").is_file():
        import json

        model_params = json.loads((out_dir / "run.json").read_text()).get("model_params")
    atomic_write_json(out_dir / "run.json", _run_json(identity, label, plans, model_params))
    mark_done(
        out_dir,
        {
            "tasks": {r.task: r.accuracy for r in results},
            "average": report.average,
            "backend": backend,
        },
    )
    return report


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
