"""``kdlab analyze``: accuracy, agreement, fidelity, paired comparisons and statistics.

The stage's face (as every stage's): a typed config,
:class:`~kdlab.config.analysis.AnalyzeConfig`; :func:`run` ``(config, *, resume=False,
overwrite=False)`` returning an :class:`AnalyzeResult`; :func:`add_arguments` (one flag per
config field, :data:`kdlab.config.analysis.FLAGS`) and :func:`main`.

Two inputs:

- run or sweep directories (``kdlab analyze SWEEP_DIR --out DIR``): every evaluated run is
  read from its files (``docs/run-layout.md``), KD runs are linked to their teacher and SFT
  baseline, and the analysis is done per task family: the paper's tables and tests, and
  comparisons on the same items (every KD run against its SFT run, and the methods named in
  ``compare_methods``) and across seeds (:mod:`kdlab.analysis.comparisons`);
- tables in the paper's format (``kdlab analyze --results-table CSV [--llama-table CSV]
  [--agreement CSV] [--fidelity CSV] --out DIR``), so published results can be re-analysed.

Outputs in ``out_dir``: per section CSV and LaTeX tables and PNG/PDF/SVG figures,
``statistics.csv``, ``analysis.yaml`` (the resolved config), ``report.md`` and a
self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kdlab.analysis.comparisons import compare_family
from kdlab.analysis.numbers import format_percent_level
from kdlab.analysis.paper_tables import (
    AVERAGE,
    METHOD,
    STUDENT,
    TEACHER,
    combine_results_tables,
    load_pair_table,
    load_results_table,
)
from kdlab.analysis.plots import (
    SEQKD_LEGEND,
    Plot,
    plot_accuracy_by_temperature,
    plot_fidelity_vs_accuracy,
    plot_improvement_vs_size,
    plot_training_loss,
    render_figure,
)
from kdlab.analysis.report import (
    REPORT_HTML,
    REPORT_MD,
    STATISTICS_CSV,
    ReportPlot,
    ReportSection,
    ReportTable,
    write_report,
)
from kdlab.analysis.run_tables import FamilyTables, build_family_tables, loss_curves
from kdlab.analysis.runs import Run, RunCollection, collect_runs
from kdlab.analysis.statistics import (
    KIND_SFT,
    SEQKD_CAVEAT,
    StatResult,
    build_improvements,
    classify_method,
    improvement_wide,
    run_statistics,
)
from kdlab.config.analysis import AnalyzeConfig, add_flags, config_from_flags
from kdlab.config.core import to_dict
from kdlab.errors import ConfigError, ModelError, RunDirError
from kdlab.utils.io import atomic_write_yaml

logger = logging.getLogger(__name__)

#: The resolved config, written first: it marks the directory as a kdlab analysis.
CONFIG_FILE = "analysis.yaml"
#: Files of the report's own (no section folder may take their names).
_REPORT_NAMES = frozenset(
    name.lower()
    for name in (CONFIG_FILE, REPORT_MD, REPORT_HTML, STATISTICS_CSV, "SWEEP_INPUTS.json")
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``kdlab analyze``: one flag per :class:`AnalyzeConfig` field."""
    add_flags(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Delete out_dir first (needed when it holds files that are not a kdlab analysis).",
    )


def _slug(text: str, taken: set[str] | None = None) -> str:
    """A section's folder name under out_dir, from user text (``--label``, a run.json's
    ``task_family``): letters, digits and ``_ . -``, never ``.``/``..`` or another dot
    name, never a report file's name, and (with ``taken``) unique in the report."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_").lstrip("._") or "section"
    if slug.lower() in _REPORT_NAMES:
        slug = f"{slug}_section"
    if taken is not None:
        base, number = slug, 2
        while slug.lower() in taken:
            slug, number = f"{base}-{number}", number + 1
        taken.add(slug.lower())
    return slug


# --------------------------------------------------------------------------- shared pieces


def improvement_summary(improvements: pd.DataFrame) -> pd.DataFrame:
    """Wide improvement table: Average first, with the best Method, SFT score and size."""
    wide = improvement_wide(improvements)
    if wide.empty:
        return wide
    columns = [column for column in wide.columns if column not in (TEACHER, STUDENT, METHOD)]
    ordered = ([AVERAGE] if AVERAGE in columns else []) + [c for c in columns if c != AVERAGE]
    average = improvements[improvements["column"] == AVERAGE].set_index([TEACHER, STUDENT, METHOD])
    wide = wide.set_index([TEACHER, STUDENT, METHOD])
    extra = pd.DataFrame(index=wide.index)
    if not average.empty:
        extra["best run (Average)"] = average["best_method"].reindex(wide.index)
        extra["SFT Average"] = average["sft"].reindex(wide.index)
        extra["best KD Average"] = average["kd_best"].reindex(wide.index)
        extra["student size (B)"] = average["student_size"].reindex(wide.index)
    renamed = wide[ordered].rename(columns=lambda column: f"Δ {column}")
    return pd.concat([extra, renamed], axis=1).reset_index()


def _table_points(
    results: pd.DataFrame,
    improvements: pd.DataFrame,
    agreement: pd.DataFrame | None,
    fidelity: pd.DataFrame | None,
) -> pd.DataFrame:
    """Plot points from tables: each best KD configuration, and each pair's SFT student."""
    rows: list[dict[str, Any]] = []
    average = improvements[improvements["column"] == AVERAGE]
    for _, row in average.iterrows():
        rows.append(
            {
                "label": row[METHOD],
                "accuracy": row["kd_best"],
                "agreement": row["agreement"],
                "fidelity": row["fidelity"],
            }
        )
    sft_scores = results[results[METHOD] == "SFT"].groupby(STUDENT)[AVERAGE].mean()
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for name, table in (("agreement", agreement), ("fidelity", fidelity)):
        if table is None:
            continue
        for _, row in table[table[METHOD] == "SFT"].iterrows():
            key = (str(row[TEACHER]), str(row[STUDENT]))
            entry = pairs.setdefault(key, {"label": "SFT", "agreement": math.nan,
                                           "fidelity": math.nan})  # fmt: skip
            entry["accuracy"] = float(sft_scores.get(row[STUDENT], math.nan))
            entry[name] = row[AVERAGE]
    rows.extend(pairs.values())
    return pd.DataFrame.from_records(rows, columns=["label", "accuracy", "agreement", "fidelity"])


def _run_points(tables: FamilyTables) -> pd.DataFrame:
    """Plot points from runs: one per KD run, and each SFT student against each teacher."""
    rows: list[dict[str, Any]] = []
    per_run = tables.per_run
    if not per_run.empty:
        for _, row in per_run[per_run["kind"] == "kd"].iterrows():
            rows.append(
                {
                    "label": classify_method(row[METHOD]).family,
                    "accuracy": row[AVERAGE],
                    "agreement": row["EM1"],
                    "fidelity": row["BLEU"],
                }
            )
        sft_runs = per_run[per_run["kind"] == "sft"]
        sft_accuracy = sft_runs.groupby(STUDENT)[AVERAGE].mean()
        em1 = tables.pairs["EM1"]
        bleu = tables.pairs["BLEU"].set_index([TEACHER, STUDENT, METHOD])
        for _, row in em1[em1[METHOD] == "SFT"].iterrows():
            key = (row[TEACHER], row[STUDENT], "SFT")
            rows.append(
                {
                    "label": "SFT",
                    "accuracy": float(sft_accuracy.get(row[STUDENT], math.nan)),
                    "agreement": row[AVERAGE],
                    "fidelity": float(bleu.loc[key, AVERAGE]) if key in bleu.index else math.nan,
                }
            )
    return pd.DataFrame.from_records(rows, columns=["label", "accuracy", "agreement", "fidelity"])


def report_plot(title: str, plot: Plot, stem: str, note: str = "") -> ReportPlot:
    """A :class:`ReportPlot` from a plot outcome (rendered now, in every format)."""
    if plot.figure is None:
        return ReportPlot(title, None, stem, note, reason=plot.reason)
    return ReportPlot(title, render_figure(plot.figure), stem, note)


def _seqkd_note(*frames: pd.DataFrame) -> str:
    for frame in frames:
        for name in ("label", METHOD):
            if name in frame.columns and "SeqKD" in set(frame[name].astype(str)):
                return f" {SEQKD_LEGEND}: {SEQKD_CAVEAT}"
    return ""


def _plots(
    accuracy: pd.DataFrame, improvements: pd.DataFrame, points: pd.DataFrame, *, per_run: bool
) -> list[ReportPlot]:
    points_note = (
        "One point per KD run, and one per SFT student against each of its teachers."
        if per_run
        else "One point per (Teacher, Student, method) at its best Average, and one per SFT "
        "student against each teacher."
    )
    seqkd = _seqkd_note(improvements, points)
    return [
        report_plot(
            "Accuracy by method and temperature",
            plot_accuracy_by_temperature(accuracy),
            "accuracy_by_temperature",
            "Average accuracy of each KD configuration; dashed grey: the same student's SFT. "
            "Panels share their y-axis." + seqkd,
        ),
        report_plot(
            "Improvement over SFT vs student size",
            plot_improvement_vs_size(improvements),
            "improvement_vs_size",
            "Best KD run (over temperatures) minus the same student's SFT, Average column." + seqkd,
        ),
        report_plot(
            "Agreement and fidelity vs accuracy",
            plot_fidelity_vs_accuracy(
                points,
                title="Agreement and fidelity vs accuracy"
                + (" (one point per run)" if per_run else ""),
            ),
            "fidelity_vs_accuracy",
            points_note + " EM1 = % of items where the student's answer equals the teacher's; "
            "BLEU of the student's rationales against the teacher's. Panels share their "
            "y-axis." + seqkd,
        ),
    ]


# --------------------------------------------------------------------------- table mode


def table_sections(config: AnalyzeConfig) -> list[ReportSection]:
    """The section for ``results_table`` (plus the optional Llama/EM1/BLEU tables)."""
    assert config.results_table is not None
    main_table = load_results_table(config.results_table)
    extras = [load_results_table(path) for path in config.llama_tables]
    results = combine_results_tables(main_table, extras)
    agreement = load_pair_table(config.agreement) if config.agreement else None
    fidelity = load_pair_table(config.fidelity) if config.fidelity else None
    improvements = build_improvements(results, agreement=agreement, fidelity=fidelity)
    statistics = run_statistics(
        improvements,
        include_agreement=agreement is not None,
        include_fidelity=fidelity is not None,
    )
    label = config.label or Path(config.results_table).stem
    section = ReportSection(title=f"Tables: {label}", slug=_slug(label), statistics=statistics)
    if improvements.empty:
        section.notes.append(
            "No KD row could be paired with an SFT row of the same Student: no statistics."
        )
    section.tables.append(
        ReportTable("Accuracy (%)", results, "accuracy.csv", "The input results table(s).")
    )
    section.tables.append(
        ReportTable(
            "Improvement of the best KD run over SFT (points)",
            improvement_summary(improvements),
            "improvement.csv",
            "Per (Teacher, Student, method): the maximum over temperatures, per column "
            "independently, minus the same Student's SFT score.",
            primary=True,
        )
    )
    if agreement is not None:
        section.tables.append(ReportTable("Agreement EM1 (%)", agreement, "em1.csv"))
    if fidelity is not None:
        section.tables.append(ReportTable("Fidelity BLEU", fidelity, "bleu.csv"))
    if "SeqKD" in set(improvements[METHOD]):
        section.notes.append(SEQKD_CAVEAT)
    points = _table_points(results, improvements, agreement, fidelity)
    section.plots.extend(_plots(results, improvements, points, per_run=False))
    return [section]


# --------------------------------------------------------------------------- run mode


def _token_fidelity_pairs(collection: RunCollection, runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    pairs: dict[tuple[Path, Path], tuple[Run, Run]] = {}
    for run in runs:
        if not run.is_kd:
            continue
        links = collection.links_of(run)
        if links.teacher is None or run.base_teacher:
            continue
        pairs.setdefault((links.teacher.run_dir, run.run_dir), (links.teacher, run))
        if links.sft_baseline is not None:
            key = (links.teacher.run_dir, links.sft_baseline.run_dir)
            pairs.setdefault(key, (links.teacher, links.sft_baseline))
    return list(pairs.values())


def compute_token_fidelity(
    collection: RunCollection,
    runs: Sequence[Run],
    *,
    records_source: str,
    max_records: int,
    batch_size: int,
    cutoff_len: int,
) -> pd.DataFrame:
    """Token-level fidelity of every (teacher, KD student) and (teacher, SFT student) pair.

    Loads each run's model with :func:`kdlab.models.loading.load_run_model`, tokenizes the
    held-out records with the student's tokenizer and training template (``data.template``
    of its config.yaml; alpaca when it has none) and runs
    :func:`kdlab.analysis.token_fidelity.token_fidelity_over_batches`.
    """
    try:
        from kdlab.data.alignment import (
            CrossTokenizerCollator,
            build_vocabulary_map,
            tokenize_record_pairs,
        )
        from kdlab.data.records import TRAIN_FIELDS, load_records
        from kdlab.data.tokenize import (
            DEFAULT_TOKENIZE,
            Collator,
            TokenizeOptions,
            tokenize_records,
        )
        from kdlab.models.loading import load_run_model, read_run_template
        from kdlab.models.vocab import same_tokenizer
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ModelError(
            f"--token-fidelity needs kdlab.models and kdlab.data, which failed to import: {error}"
        ) from error
    from kdlab.analysis.token_fidelity import (
        aligned_token_fidelity_over_batches,
        token_fidelity_over_batches,
    )

    pairs = _token_fidelity_pairs(collection, runs)
    if not pairs:
        logger.warning("--token-fidelity: no (teacher, student) pair with a teacher run")
        return pd.DataFrame()
    records = load_records(records_source, required_fields=TRAIN_FIELDS)[:max_records]
    if not records:
        raise RunDirError(f"--token-fidelity-data {records_source} holds no records")
    rows: list[dict[str, Any]] = []
    loaded: dict[Path, tuple[Any, Any]] = {}

    def model_of(run: Run) -> tuple[Any, Any]:
        if run.run_dir not in loaded:
            logger.info("loading %s", run.describe())
            loaded[run.run_dir] = load_run_model(run.run_dir)
        return loaded[run.run_dir]

    def pad_id(tokenizer: Any) -> int:
        if tokenizer.pad_token_id is not None:
            return int(tokenizer.pad_token_id)
        return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0

    def batches_of(examples: list[dict[str, Any]], collate: Any) -> Any:
        return (
            collate(examples[start : start + batch_size])
            for start in range(0, len(examples), batch_size)
        )

    def options_of(student: Run) -> TokenizeOptions:
        # The student's prompts, as it was trained (data.template of its config.yaml).
        try:
            template = read_run_template(student.run_dir)
        except RunDirError as error:
            logger.warning("--token-fidelity: %s; alpaca prompts", error.one_line())
            template = None
        return TokenizeOptions(
            template=template or DEFAULT_TOKENIZE.template, cutoff_len=cutoff_len
        )

    for teacher, student in pairs:
        teacher_model, teacher_tokenizer = model_of(teacher)
        student_model, tokenizer = model_of(student)
        options = options_of(student)
        if same_tokenizer(teacher_tokenizer, tokenizer):
            positions = "response tokens"
            examples = tokenize_records(records, tokenizer, options)
            batches = batches_of(examples, Collator(pad_token_id=pad_id(tokenizer)))
            result = token_fidelity_over_batches(teacher_model, student_model, batches)
        else:
            # Another tokenizer: each model reads its own tokens, compared where aligned.
            positions = "aligned positions (cross-tokenizer)"
            vocabulary = build_vocabulary_map(tokenizer, teacher_tokenizer)
            examples = tokenize_record_pairs(
                records,
                tokenizer,
                teacher_tokenizer,
                vocabulary,
                options,
            )
            collate = CrossTokenizerCollator(pad_id(tokenizer), pad_id(teacher_tokenizer))
            result = aligned_token_fidelity_over_batches(
                teacher_model, student_model, batches_of(examples, collate), vocabulary.shared
            )
        rows.append(
            {
                TEACHER: teacher.student_label,
                STUDENT: student.student_label,
                METHOD: student.method_label,
                "KL(teacher||student) per token": result["kl"],
                "top-1 agreement (%)": 100.0 * result["top1_agreement"],
                "teacher top-1 accuracy (%)": 100.0 * result["teacher_top1_accuracy"],
                "student top-1 accuracy (%)": 100.0 * result["student_top1_accuracy"],
                "tokens": result["n_tokens"],
                "positions": positions,
                "template": options.template,
                "student_run": str(student.run_dir),
                "teacher_run": str(teacher.run_dir),
            }
        )
        # Students are compared once; free them (teachers are reused).
        if all(student.run_dir != other.run_dir for other, _ in pairs):
            loaded.pop(student.run_dir, None)
    return pd.DataFrame.from_records(rows)


PAIRED_DISPLAY = [
    "question",
    "comparison",
    TEACHER,
    STUDENT,
    "seed",
    "other seed",
    "n",
    "accuracy A (%)",
    "accuracy B (%)",
    "Δ A−B (points)",
    "CI low",
    "CI high",
    "only A right",
    "only B right",
    "McNemar p",
    "Holm p",
    "m",
    "note",
]


def _comparison_tables(
    config: AnalyzeConfig, paired: pd.DataFrame, seeds: pd.DataFrame, differences: pd.DataFrame
) -> list[ReportTable]:
    level = format_percent_level(config.alpha)
    tables: list[ReportTable] = []
    if not paired.empty:
        method = (
            f"Δ = A − B in points on the items both runs evaluated (matched by index); CI: "
            f"{level} paired bootstrap over items, stratified by task "
            f"({config.bootstrap_samples} replicates, seed {config.bootstrap_seed}); McNemar "
            "exact test on the discordant items; Holm p: adjusted within one question and "
            "column (m tests). n counts items."
        )
        average = paired[paired["column"] == AVERAGE]
        tables.append(
            ReportTable(
                "Paired comparisons on the same items (Average)",
                average,
                "paired_average.csv",
                "Every KD run against its SFT run (same student, same seed where one exists)"
                + (", and every pair of compare_methods" if config.compare_methods else "")
                + ". On the Average, Δ is the mean of the per-task differences and McNemar "
                "pools every task's items. " + method,
                primary=True,
                display_columns=PAIRED_DISPLAY,
            )
        )
        tables.append(
            ReportTable(
                "Paired comparisons on the same items, per task",
                paired[paired["column"] != AVERAGE],
                "paired_tasks.csv",
                method,
                display_columns=["column", *PAIRED_DISPLAY],
            )
        )
    if not seeds.empty:
        tables.append(
            ReportTable(
                "Across seeds: mean and interval",
                seeds,
                "seeds.csv",
                f"Runs that differ only by seed (same Teacher, Student, Method): mean ± {level} "
                "t-interval (n − 1 degrees of freedom); n counts seeds; the per-seed values "
                "are kept.",
                primary=True,
            )
        )
    if not differences.empty:
        tables.append(
            ReportTable(
                "Across seeds: KD − SFT of the same seed",
                differences,
                "seed_differences.csv",
                f"Per seed, the KD run's accuracy minus its SFT run's (the same seed); mean ± "
                f"{level} t-interval and a two-sided one-sample t-test of the mean difference; "
                "Holm within a column; n counts seeds.",
                primary=True,
            )
        )
    return tables


def run_sections(config: AnalyzeConfig) -> list[ReportSection]:
    """One section per task family of the evaluated runs."""
    collection = collect_runs(config.run_dirs, allow_missing_teacher=config.allow_missing_teacher)
    sections: list[ReportSection] = []
    slugs: set[str] = set()
    for family in collection.task_families():
        tables = build_family_tables(collection, family, rouge_max_items=config.rouge_max_items)
        em1 = tables.pairs["EM1"]
        bleu = tables.pairs["BLEU"]
        improvements = build_improvements(
            tables.accuracy,
            agreement=em1 if not em1.empty else None,
            fidelity=bleu if not bleu.empty else None,
            student_sizes=tables.student_sizes,
        )
        paper_statistics = run_statistics(
            improvements, include_agreement=not em1.empty, include_fidelity=not bleu.empty
        )
        comparisons = compare_family(
            collection,
            tables.runs,
            tables.tasks,
            tables.per_run,
            compare_methods=config.compare_methods,
            samples=config.bootstrap_samples,
            seed=config.bootstrap_seed,
            alpha=config.alpha,
        )
        section = ReportSection(
            title=f"Task family: {family}",
            slug=_slug(family, slugs),
            statistics=[*comparisons.results, *paper_statistics],
        )
        kinds = tables.per_run["kind"].value_counts().to_dict() if len(tables.per_run) else {}
        section.notes.append(
            f"{len(tables.runs)} evaluated runs ({kinds.get('teacher', 0)} teacher, "
            f"{kinds.get('kd', 0)} KD, {kinds.get(KIND_SFT, 0)} SFT, {kinds.get('base', 0)} "
            f"base) on {len(tables.tasks)} task(s): {', '.join(tables.tasks)}."
        )
        section.notes += comparisons.notes
        if improvements.empty:
            section.notes.append(
                "No KD run could be paired with an SFT run of the same student: no statistics."
            )
        section.tables += [
            ReportTable(
                "Accuracy (%)",
                tables.accuracy,
                "accuracy.csv",
                "Paper layout; runs differing only by seed are averaged (see the seeds table "
                "for their spread). Teacher: the teacher's own fine-tune.",
                primary=True,
            ),
            *_comparison_tables(
                config, comparisons.paired, comparisons.seeds, comparisons.seed_differences
            ),
            ReportTable(
                "Improvement of the best KD run over SFT (points)",
                improvement_summary(improvements),
                "improvement.csv",
                "Per (Teacher, Student, method): the maximum over temperatures, per column "
                "independently, minus the same student's SFT score. Ablations (noise, base "
                "teacher) are left out.",
            ),
            ReportTable(
                "Answer agreement with the teacher, EM1 (%)",
                em1,
                "em1.csv",
                "% of items where the student's extracted answer equals the teacher's "
                "(items matched by index; a missing answer never agrees).",
            ),
            ReportTable(
                "Answer agreement with the SFT student, EM2 (%)",
                tables.pairs["EM2"],
                "em2.csv",
                "% of items where the KD student's answer equals the same student's SFT run's.",
            ),
            ReportTable(
                "Reasoning fidelity: BLEU against the teacher's rationales",
                bleu,
                "bleu.csv",
                "Corpus BLEU (sacrebleu) of the student's outputs against the teacher's.",
            ),
            ReportTable(
                "Reasoning fidelity: ROUGE-L F1 against the teacher's rationales",
                tables.pairs["ROUGE-L"],
                "rouge_l.csv",
            ),
        ]
        if config.token_fidelity:
            assert config.token_fidelity_data is not None
            token_table = compute_token_fidelity(
                collection,
                tables.runs,
                records_source=config.token_fidelity_data,
                max_records=config.token_fidelity_records,
                batch_size=config.token_fidelity_batch_size,
                cutoff_len=config.token_fidelity_cutoff_len,
            )
            section.tables.append(
                ReportTable(
                    "Token-level fidelity (teacher forcing on held-out records)",
                    token_table,
                    "token_fidelity.csv",
                    "Mean KL(teacher || student) per response token (nats) and how often the "
                    "two models' most likely next token agree. Rows whose positions say "
                    "'aligned positions (cross-tokenizer)' pair a teacher with another "
                    "tokenizer: each model reads its own tokens, and KL (over the shared "
                    "tokens, renormalised) and agreement (top-1 tokens that map to each "
                    "other) are measured where the two tokenizations have read the same "
                    "text. The prompts are in each student's training template (template).",
                )
            )
        section.tables.append(
            ReportTable("Runs", tables.per_run, "runs.csv", "One row per evaluated run.")
        )
        section.plots.extend(
            _plots(tables.accuracy, improvements, _run_points(tables), per_run=True)
        )
        section.plots.append(
            report_plot(
                "Training curves",
                plot_training_loss(loss_curves(tables.runs)),
                "training_curves",
                "Each training run's logged loss terms against the optimizer step "
                "(metrics.jsonl; validation lines left out). ce and kd are different "
                "quantities: their panels do not share an axis.",
            )
        )
        sections.append(section)
    return sections


# --------------------------------------------------------------------------- entry point


@dataclass
class AnalyzeResult:
    """What :func:`run` wrote."""

    out_dir: Path
    report_html: Path
    report_markdown: Path
    sections: list[ReportSection] = field(default_factory=list)

    @property
    def statistics(self) -> list[StatResult]:
        """Every test and estimate of every section."""
        return [result for section in self.sections for result in section.statistics]

    def summary(self) -> dict[str, Any]:
        """A small JSON-able summary (what a sweep records)."""
        return {
            "report": str(self.report_html),
            "sections": [section.title for section in self.sections],
            "tests": len(self.statistics),
            "tests_run": sum(1 for result in self.statistics if result.enough_data),
        }


def _is_analysis_dir(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (CONFIG_FILE, REPORT_MD, REPORT_HTML))


def _prepare_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse to write into a directory holding something else; ``overwrite`` clears it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if overwrite:
        logger.info("overwrite: deleting %s", out)
        shutil.rmtree(out)
        return
    if not _is_analysis_dir(out):
        raise ConfigError(
            f"out_dir {out} holds files that are not a kdlab analysis; choose another "
            "directory, or pass --overwrite to delete it first"
        )


def run(config: AnalyzeConfig, *, resume: bool = False, overwrite: bool = False) -> AnalyzeResult:
    """Analyse, and write the report into ``config.out_dir``.

    Args:
        config: what to read and how to analyse it.
        resume: accepted for the stage contract: the analysis is recomputed from the run
            files every time (each file is written atomically), so resuming is a fresh run.
        overwrite: delete ``out_dir`` first. Without it, an earlier kdlab analysis there is
            replaced file by file, and a directory holding anything else is refused.
    """
    del resume  # nothing to resume: see the docstring
    config.check_inputs()
    assert config.out_dir is not None
    out = Path(config.out_dir)
    _prepare_out_dir(out, overwrite=overwrite)
    if config.results_table:
        sections = table_sections(config)
        inputs = [config.results_table, *config.llama_tables]
        inputs += [path for path in (config.agreement, config.fidelity) if path]
    else:
        sections = run_sections(config)
        inputs = list(config.run_dirs)
    atomic_write_yaml(out / CONFIG_FILE, to_dict(config))
    written = write_report(
        out, sections, title=config.title, inputs=[str(item) for item in inputs],
        alpha=config.alpha,
    )  # fmt: skip
    return AnalyzeResult(
        out_dir=out,
        report_html=written["html"],
        report_markdown=written["markdown"],
        sections=list(sections),
    )


def main(args: argparse.Namespace) -> int:
    """``kdlab analyze``: flags → :class:`AnalyzeConfig` → :func:`run`; prints the headline."""
    config = config_from_flags(args)
    result = run(config, overwrite=bool(getattr(args, "overwrite", False)))
    for section in result.sections:
        print(f"{section.title}: statistics on {AVERAGE}")
        for question, results in section.headline_groups():
            print(f"  {question}:")
            for item in results:
                print(f"    {item.sentence}")
    print(f"report: {result.report_html}")
    print(f"        {result.report_markdown}")
    return 0
