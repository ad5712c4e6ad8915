"""Model cards: the ``README.md`` of every saved ``adapter/`` and ``model/``, and of an export.

A card is the Hugging Face ``huggingface_hub.ModelCard`` format: YAML metadata
(``base_model``, ``base_model_relation``, ``library_name``, ``tags``, ``datasets``,
``pipeline_tag`` and, once the run is evaluated, ``model-index`` results) and a Markdown
body saying what the weights are: role, method, divergence, temperature, teacher, data,
steps, kdlab version, the resolved config and the evaluation results.

Everything on a card is read from the run directory (``docs/run-layout.md``): who the run
is from ``run.json`` (:class:`~kdlab.config.run_identity.RunIdentity`), its settings from
``config.yaml``, its training from ``train_summary.json`` (or the summary being saved), so
a card can be rebuilt at any time. Evaluation results are the exception: ``kdlab eval`` on
a run (:func:`update_run_card_evaluation`) adds its results to the card's ``model-index``
and rewrites the card; each result names the evaluation directory it came from
(``metric_args.evaluation``), so evaluating again into the same directory replaces that
evaluation's results and another directory adds its own.

Machine-local names never become hub metadata: ``base_model`` is set only for a public hub
id (an alias names the model its GGUF was quantised from, whose dequantisation the card
notes); ``datasets`` lists only hub datasets (``hf:owner/name``) and the body every source.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kdlab import __version__
from kdlab.config.run_identity import RunIdentity, read_run_identity
from kdlab.errors import RunDirError
from kdlab.utils.io import atomic_write_text, read_run_config

if TYPE_CHECKING:  # huggingface_hub loads lazily (kdlab --help imports none of it)
    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_FILE",
    "WEIGHT_KINDS",
    "card_eval_results",
    "eval_results_from_metrics",
    "render_run_card",
    "run_weights_dir",
    "update_run_card_evaluation",
    "write_run_card",
]

CARD_FILE = "README.md"
#: What a card describes: a PEFT adapter, a full (or sliced) model saved by training, or an
#: adapter merged into its base by ``kdlab export --merge``.
WEIGHT_KINDS = ("adapter", "model", "merged")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSIONED = ("torch", "transformers", "peft", "accelerate")


# --------------------------------------------------------------------------- run files


def run_weights_dir(run_dir: str | Path) -> Path | None:
    """``<run_dir>/adapter`` or ``<run_dir>/model`` (whichever training saved), or None."""
    directory = Path(run_dir)
    if (directory / "model" / "config.json").is_file():
        return directory / "model"
    if (directory / "adapter" / "adapter_config.json").is_file():
        return directory / "adapter"
    return None


def _read_config(run_dir: Path) -> dict[str, Any]:
    config = read_run_config(run_dir)
    if not isinstance(config, dict):
        raise RunDirError(f"{run_dir / 'config.yaml'}: expected a mapping")
    return config


def _read_summary(run_dir: Path) -> dict[str, Any]:
    file = run_dir / "train_summary.json"
    if not file.is_file():
        return {}
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirError(f"{file}: invalid JSON ({error})") from None
    return summary if isinstance(summary, dict) else {}


def _public_identity(identity: str | None) -> str | None:
    """A run.json model identity with an alias replaced by its hub id (``@slice`` kept)."""
    if not identity:
        return identity
    from kdlab.models.loading import ALIASES

    name, at, slice_part = identity.partition("@")
    alias = ALIASES.get(name.lower())
    return f"{alias.hub_id}{at}{slice_part}" if alias else identity


def _model_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    section = config.get("model") or config.get("student") or {}
    return section if isinstance(section, Mapping) else {}


def _hub_datasets(config: Mapping[str, Any]) -> list[str]:
    """The hub dataset ids among ``data.train_files`` (``hf:owner/name[:split]``)."""
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    result: list[str] = []
    for entry in (data or {}).get("train_files") or []:
        source = entry.get("path") if isinstance(entry, Mapping) else entry
        if not isinstance(source, str) or not source.startswith("hf:"):
            continue
        name = source[len("hf:") :].partition(":")[0].strip()
        if _HUB_ID.match(name) and not Path(name).expanduser().exists() and name not in result:
            result.append(name)
    return result


def _sources(config: Mapping[str, Any]) -> list[str]:
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    sources = []
    for entry in (data or {}).get("train_files") or []:
        if isinstance(entry, Mapping):
            extras = ", ".join(f"{k} {entry[k]}" for k in ("limit", "weight") if k in entry)
            sources.append(f"{entry.get('path')}" + (f" ({extras})" if extras else ""))
        else:
            sources.append(str(entry))
    return sources


# --------------------------------------------------------------------------- evaluation


def eval_results_from_metrics(
    task_metrics: Sequence[tuple[str, Mapping[str, Any]]], evaluation: str
) -> list[Any]:
    """``huggingface_hub.EvalResult`` entries for one evaluation's ``metrics.json`` files.

    ``evaluation`` names the evaluation directory (relative to the run when inside it);
    it is kept in ``metric_args`` with the item count, interval, scoring and template.
    """
    from huggingface_hub import EvalResult

    results = []
    for task, metrics in task_metrics:
        accuracy = metrics.get("accuracy")
        if accuracy is None:
            continue
        args: dict[str, Any] = {"evaluation": evaluation, "n": metrics.get("n")}
        for key in ("accuracy_ci95", "accuracy_paper_rule", "scoring", "template", "excluded"):
            if metrics.get(key) is not None:
                args[key] = metrics[key]
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=str(task),
                dataset_name=str(task),
                dataset_split="test",
                metric_type="accuracy",
                metric_name="accuracy (%)",
                metric_value=round(float(accuracy), 4),
                metric_args=args,
            )
        )
    return results


def card_eval_results(card_file: str | Path) -> list[Any]:
    """The ``model-index`` results of an existing card (empty when there is none)."""
    from huggingface_hub import ModelCard

    path = Path(card_file)
    if not path.is_file():
        return []
    try:
        card = ModelCard.load(path, ignore_metadata_errors=True)
    except Exception as error:  # a hand-edited card: start its results afresh
        logger.warning("%s: cannot read its metadata (%s); its results are rebuilt", path, error)
        return []
    return list(card.data.eval_results or [])


def _evaluation_of(result: Any) -> str | None:
    args = getattr(result, "metric_args", None) or {}
    return args.get("evaluation") if isinstance(args, Mapping) else None


def _eval_table(results: Sequence[Any]) -> list[str]:
    lines = [
        "| Task | Accuracy (%) | 95 % CI | n | Paper rule (%) | Scoring | Evaluation |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        args = result.metric_args or {}
        interval = args.get("accuracy_ci95")
        ci = f"{interval[0]:.2f}–{interval[1]:.2f}" if interval else "–"
        paper = args.get("accuracy_paper_rule")
        lines.append(
            f"| {result.dataset_name} | {result.metric_value:.2f} | {ci} | {args.get('n', '–')} "
            f"| {'–' if paper is None else f'{paper:.2f}'} | {args.get('scoring', 'generate')} "
            f"| `{args.get('evaluation', '')}` |"
        )
    return lines


# --------------------------------------------------------------------------- the card


def _versions() -> dict[str, str]:
    versions = {"kdlab": __version__}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _describe(identity: RunIdentity, kind: str, base: str, config: Mapping[str, Any]) -> str:
    """The card's first sentence: what these weights are."""
    peft = config.get("peft") if isinstance(config.get("peft"), Mapping) else {}
    method_name = (peft or {}).get("method", identity.peft or "lora")
    weights = {
        "adapter": f"A {method_name} adapter for {base}",
        "model": f"A {'fully fine-tuned' if method_name == 'full' else 'merged'} model from {base}",
        "merged": f"{base} with a {method_name} adapter merged into it",
    }[kind]
    if identity.student_layers:
        weights += f", sliced to {identity.student_layers} decoder layers"
    if identity.stage == "distill" and identity.teacher:
        teacher = _public_identity(identity.teacher)
        how = f"by {identity.method}"
        if identity.divergence:
            divergence = (
                "" if identity.divergence == identity.method else f"{identity.divergence}, "
            )
            how += f" ({divergence}temperature {identity.temperature:g})"
        adapter = " without its task adapter (base teacher)" if identity.base_teacher else ""
        return f"{weights}: a {identity.role} distilled {how} from {teacher}{adapter}."
    return f"{weights}: a {identity.role} trained by supervised fine-tuning ({identity.method})."


def render_run_card(
    run_dir: str | Path,
    *,
    kind: str,
    summary: Mapping[str, Any] | None = None,
    eval_results: Sequence[Any] = (),
    note: str | None = None,
) -> Any:
    """The :class:`huggingface_hub.ModelCard` of a run's weights (nothing written).

    Args:
        run_dir: the finetune/distill run directory (run.json and config.yaml are read).
        kind: one of :data:`WEIGHT_KINDS`.
        summary: the training summary (default: the run's ``train_summary.json``).
        eval_results: ``EvalResult`` entries (:func:`eval_results_from_metrics`).
        note: an extra paragraph (an export says where it came from).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from kdlab.config.core import from_mapping
    from kdlab.config.schema import ModelConfig
    from kdlab.models.loading import model_alias, public_model_id

    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind must be one of {WEIGHT_KINDS}, got {kind!r}")
    directory = Path(run_dir)
    identity = read_run_identity(directory)
    if identity is None:
        raise RunDirError(f"run directory '{directory}' has no run.json (not a kdlab run)")
    config = _read_config(directory)
    summary = dict(summary) if summary is not None else _read_summary(directory)
    model_config = from_mapping(
        ModelConfig, dict(_model_section(config)), source=str(directory / "config.yaml")
    )
    hub_id = public_model_id(model_config)
    alias = model_alias(model_config)
    base = hub_id or model_config.name_or_path

    tags = ["kdlab", identity.stage, identity.role, identity.method]
    if identity.stage == "distill":
        tags.append("knowledge-distillation")
    if identity.divergence and identity.divergence not in tags:
        tags.append(identity.divergence)
    if identity.peft and kind != "merged":
        tags.append(identity.peft)
    metadata = ModelCardData(
        base_model=hub_id,
        library_name="peft" if kind == "adapter" else "transformers",
        tags=list(dict.fromkeys(tags)),
        datasets=_hub_datasets(config) or None,
        pipeline_tag="text-generation",
        model_name=identity.name,
        eval_results=list(eval_results) or None,
        base_model_relation=("adapter" if kind == "adapter" else "finetune") if hub_id else None,
    )

    lines = [f"# {identity.name}", "", _describe(identity, kind, f"`{base}`", config), ""]
    if alias is not None:
        lines += [f"Base model: `{alias.hub_id}`. {alias.note}", ""]
    elif hub_id is None:
        tail = ": load the adapter onto your copy of it" if kind == "adapter" else ""
        lines += [
            f"Base model: the local model `{model_config.name_or_path}` (not a hub id{tail}).",
            "",
        ]
    if note:
        lines += [note, ""]

    rows: list[tuple[str, Any]] = [
        ("Role", identity.role),
        ("Stage", identity.stage),
        ("Method", identity.method),
        ("Divergence", identity.divergence),
        ("Temperature", identity.temperature),
        ("KD weight", identity.kd_weight),
        ("Teacher", _public_identity(identity.teacher)),
        ("Teacher adapter", identity.teacher_adapter),
        ("Base teacher (no task adapter)", identity.base_teacher or None),
        ("Model", _public_identity(identity.model)),
        ("Parameters", f"{identity.model_params:,}" if identity.model_params else None),
        ("Decoder layers kept", identity.student_layers),
        ("PEFT", identity.peft),
        ("Quantized base", json.dumps(identity.quantization) if identity.quantization else None),
        ("Seed", identity.seed),
        ("Task family", identity.task_family),
        ("Processes", identity.num_processes if identity.num_processes > 1 else None),
    ]
    lines += ["## What it is", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows if value not in (None, "")]
    lines.append("")

    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    data = data or {}
    lines += ["## Training", ""]
    lines += [f"- Data: {', '.join(f'`{s}`' for s in _sources(config)) or '–'}"]
    if data.get("columns"):
        lines += [f"- Columns: `{json.dumps(data['columns'])}`"]
    lines += [
        f"- Prompt template: `{data.get('template', 'alpaca')}`, cutoff "
        f"{data.get('cutoff_len', '–')} tokens, loss on "
        f"{'prompt and response' if data.get('train_on_inputs') else 'the response'}",
    ]
    if summary:
        lines += [
            f"- Records: {summary.get('train_records', '–')} for training, "
            f"{summary.get('validation_records', '–')} for validation",
            f"- Steps: {summary.get('steps', '–')} ({summary.get('tokens', '–')} tokens, "
            f"{summary.get('seconds', '–')} s); final weights from step "
            f"{summary.get('final_weights_from_step', '–')}",
        ]
        final = summary.get("final_validation") or {}
        if isinstance(final, Mapping) and final:
            shown = ", ".join(
                f"{key} {value:.4f}" for key, value in final.items() if isinstance(value, float)
            )
            if shown:
                lines.append(f"- Final validation: {shown}")
    lines.append("")

    lines += ["## Evaluation", ""]
    if eval_results:
        lines += _eval_table(eval_results)
    else:
        lines.append(f"Not evaluated yet (`kdlab eval run_dir={directory.name}` adds results).")
    lines.append("")

    lines += ["## How to load", "", "```python"]
    if kind == "adapter":
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_ADAPTER")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_ADAPTER")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_MODEL")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_MODEL")',
        ]
    lines += ["```", ""]
    template = data.get("template", "alpaca")
    lines += [
        f"Prompts are built as in training (template `{template}`, "
        "`kdlab.data.templates.build_prompt`); the response follows the prompt directly.",
        "",
    ]

    lines += ["## Resolved config", "", "```yaml"]
    lines += [yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    versions = ", ".join(f"{name} {version}" for name, version in _versions().items())
    lines += ["## Framework versions", "", versions, ""]
    content = f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def write_run_card(directory: str | Path, card: ModelCard | str) -> Path:
    """A rendered card (:func:`render_run_card`) as ``<directory>/README.md``, atomically."""
    return atomic_write_text(Path(directory) / CARD_FILE, str(card))


def update_run_card_evaluation(
    run_dir: str | Path,
    eval_dir: str | Path,
    task_metrics: Sequence[tuple[str, Mapping[str, Any]]],
) -> Path | None:
    """Add one evaluation's results to the card of a run's weights; return the card's path.

    Results of an earlier evaluation into the same ``eval_dir`` are replaced; those of
    other evaluations are kept. None (nothing written) when the run has no saved weights.
    """
    directory = Path(run_dir)
    weights = run_weights_dir(directory)
    if weights is None:
        return None
    eval_path = Path(eval_dir).resolve()
    try:
        label = str(eval_path.relative_to(directory.resolve()))
    except ValueError:
        label = str(eval_path)
    kept = [r for r in card_eval_results(weights / CARD_FILE) if _evaluation_of(r) != label]
    results = kept + eval_results_from_metrics(task_metrics, label)
    kind = "adapter" if weights.name == "adapter" else "model"
    return write_run_card(weights, render_run_card(directory, kind=kind, eval_results=results))
