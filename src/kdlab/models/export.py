"""``kdlab export``: a run's model as a standalone folder, and optionally a hub repo.

``kdlab export RUN_DIR --out DIR`` writes what ``from_pretrained`` loads, with the run's
tokenizer and its model card (:mod:`kdlab.models.card`, evaluation results included):

- a run that saved ``model/`` (a full fine-tune, or a sliced student, saved merged): its
  files as they are;
- a run that saved ``adapter/``: the PEFT adapter (``base_model_name_or_path`` names the
  public base model: ``AutoModelForCausalLM.from_pretrained(DIR)`` fetches it), or with
  ``--merge`` the adapter merged into its base (``merge_and_unload``), a plain
  transformers model. A QLoRA adapter is merged into the unquantized base (a warning says
  that its logits then differ slightly from the quantized model it was trained on).

``--push-to-hub REPO_ID [--private]`` then uploads the folder with ``huggingface_hub``
(``HfApi.create_repo`` then one ``HfApi.create_commit`` with every file). The folder also
holds ``kdlab-export.json`` (where it came from; never uploaded), which lets ``--overwrite``
replace an earlier export and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab import __version__
from kdlab.config.export import ExportConfig
from kdlab.errors import ConfigError, KdlabError, RunDirError
from kdlab.utils.io import atomic_directory, atomic_write_json, is_done

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FILE", "ExportResult", "add_arguments", "main", "push_folder", "run"]

#: Provenance of an export folder (kept local: not uploaded).
EXPORT_FILE = "kdlab-export.json"


@dataclass
class ExportResult:
    """What :func:`run` wrote (and uploaded)."""

    out_dir: Path
    kind: str
    """``model`` (copied), ``adapter`` (copied) or ``merged``."""
    files: list[str] = field(default_factory=list)
    """Files of the folder, relative to it (sorted; :data:`EXPORT_FILE` excluded)."""
    repo_url: str | None = None
    commit_url: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``kdlab export RUN_DIR --out DIR [--merge] [--push-to-hub REPO_ID [--private]]``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A finished finetune/distill run.")
    parser.add_argument(
        "--out", dest="out_dir", required=True, metavar="DIR", help=_help("out_dir")
    )
    parser.add_argument("--merge", action="store_true", help=_help("merge"))
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help=_help("push_to_hub"))
    parser.add_argument("--private", action="store_true", help=_help("private"))
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an earlier export in --out."
    )


def _help(name: str) -> str:
    return next(f for f in dataclasses.fields(ExportConfig) if f.name == name).metadata["help"]


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    """The :class:`ExportConfig` the command line stands for (validated)."""
    from kdlab.config.core import from_mapping

    mapping = {
        "run_dir": args.run_dir,
        "out_dir": args.out_dir,
        "merge": args.merge,
        "push_to_hub": args.push_to_hub,
        "private": args.private,
    }
    return from_mapping(ExportConfig, mapping, source="command line")


def _check_out_dir(out_dir: Path, run_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise KdlabError(f"export out_dir {out_dir} exists and is not a directory")
    run = run_dir.resolve()
    out = out_dir.resolve()
    if out == run or out.is_relative_to(run / "adapter") or out.is_relative_to(run / "model"):
        raise KdlabError(f"export out_dir {out_dir} would replace the run's own files")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise KdlabError(
            f"export out_dir {out_dir} is not empty: pass --overwrite to replace an earlier "
            "export, or choose another folder"
        )
    if not (out_dir / EXPORT_FILE).is_file():
        raise KdlabError(
            f"export out_dir {out_dir} holds files kdlab export did not write (no {EXPORT_FILE}):"
            " refusing to replace it; choose another folder"
        )


def _copy_files(source: Path, target: Path) -> None:
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.name == "README.md":
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)


def _merge(model_config: Any, adapter: str, staging: Path) -> None:
    """Load the base + adapter on the CPU, merge, save the merged model and tokenizer."""
    import torch

    from kdlab.models.loading import load_model_and_tokenizer

    if model_config.quantization != "none":
        logger.warning(
            "the run's base model was loaded quantized (%s); the adapter is merged into the "
            "unquantized base, whose logits differ slightly from the quantized model it was "
            "trained on",
            model_config.quantization,
        )
        model_config = dataclasses.replace(
            model_config,
            quantization="none",
            quantization_4bit_type=None,
            quantization_4bit_compute_dtype=None,
            quantization_4bit_double=None,
        )
    model, tokenizer = load_model_and_tokenizer(
        model_config, adapter=adapter, device=torch.device("cpu")
    )
    merged = model.merge_and_unload()
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def _folder_files(directory: Path) -> list[str]:
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != EXPORT_FILE
    )


def run(config: ExportConfig, *, overwrite: bool = False) -> ExportResult:
    """Write the export folder (and push it when ``config.push_to_hub``); see the module doc."""
    from kdlab.models.card import (
        CARD_FILE,
        card_eval_results,
        render_run_card,
        run_weights_dir,
        write_run_card,
    )
    from kdlab.models.loading import resolve_run_dir

    run_dir = Path(config.run_dir)
    model_config, adapter = resolve_run_dir(run_dir)
    if not is_done(run_dir):
        raise RunDirError(f"run directory '{run_dir}' has no DONE: the run did not finish")
    weights = run_weights_dir(run_dir)
    assert weights is not None  # resolve_run_dir found adapter/ or model/
    if adapter is None and config.merge:
        raise ConfigError(
            f"export.merge: run '{run_dir}' saved a standalone model/ (a full fine-tune or a "
            "sliced student), there is no adapter to merge; drop --merge"
        )
    out_dir = Path(config.out_dir)
    _check_out_dir(out_dir, run_dir, overwrite=overwrite)
    kind = "merged" if config.merge else ("adapter" if adapter is not None else "model")
    note = f"Exported by `kdlab export` from the run `{run_dir.name}`"
    note += (
        ": the adapter is merged into its base model (a plain transformers model)."
        if kind == "merged"
        else "."
    )
    with atomic_directory(out_dir) as staging:
        if kind == "merged":
            assert adapter is not None
            _merge(model_config, adapter, staging)
        else:
            _copy_files(weights, staging)
        results = card_eval_results(weights / CARD_FILE)
        card = render_run_card(run_dir, kind=kind, eval_results=results, note=note)
        write_run_card(staging, card)
        atomic_write_json(
            staging / EXPORT_FILE,
            {
                "run_dir": str(run_dir.resolve()),
                "kind": kind,
                "kdlab_version": __version__,
            },
        )
    result = ExportResult(out_dir, kind, _folder_files(out_dir))
    logger.info("exported %s (%s) → %s: %s", run_dir, kind, out_dir, ", ".join(result.files))
    if config.push_to_hub:
        result.repo_url, result.commit_url = push_folder(
            out_dir,
            config.push_to_hub,
            private=config.private,
            commit_message=f"kdlab export of {run_dir.name}",
        )
    return result


def push_folder(
    folder: Path, repo_id: str, *, private: bool, commit_message: str
) -> tuple[str, str | None]:
    """Create (or reuse) the hub model repo and commit every file of ``folder`` at once.

    Returns (repo URL, commit URL). Every hub failure (offline, no token, refused) is one
    :class:`KdlabError` line; the local folder stays as written.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )

    failures: tuple[type[BaseException], ...] = (
        HfHubHTTPError,
        HFValidationError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        OSError,
        ValueError,
    )
    try:
        import httpx

        failures = (*failures, httpx.HTTPError)
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        pass
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in _folder_files(folder)
    ]
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        commit = api.create_commit(
            repo_id=getattr(repo, "repo_id", None) or repo_id,
            operations=operations,
            commit_message=commit_message,
            repo_type="model",
        )
    except failures as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise KdlabError(
            f"push to hub {repo_id}: {type(error).__name__}: {message} (the export in "
            f"{folder} is complete; upload it with `hf upload {repo_id} {folder}`)"
        ) from None
    logger.info("pushed %d files to %s", len(operations), repo)
    return str(repo), getattr(commit, "commit_url", None)


def main(args: argparse.Namespace) -> int:
    """``kdlab export``: flags → :class:`ExportConfig` → :func:`run`."""
    config = config_from_args(args)
    result = run(config, overwrite=args.overwrite)
    lines = [f"export ({result.kind}) → {result.out_dir}: {len(result.files)} files"]
    if result.repo_url:
        commit = f" ({result.commit_url})" if result.commit_url else ""
        lines.append(f"pushed to {result.repo_url}{commit}")
    print("\n".join(lines))  # noqa: T201
    return 0
