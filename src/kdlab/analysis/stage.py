"""``kdlab analyze``: accuracy, agreement, fidelity and the paper's statistics, as a report.

Two inputs:

- run or sweep directories (``kdlab analyze SWEEP_DIR --out DIR``): every evaluated run is
  read from its files (``docs/run-layout.md``), KD runs are linked to their teacher and SFT
  baseline, and the analysis is done per task family;
- tables in the paper's format (``kdlab analyze --results-table CSV [--llama-table CSV]
  [--agreement CSV] [--fidelity CSV] --out DIR``), so published results can be re-analysed.

Outputs in ``--out``: CSV tables and PNG plots per section, ``statistics.csv``, ``report.md``
and a self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

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
    plot_accuracy_by_temperature,
    plot_fidelity_vs_accuracy,
    plot_improvement_vs_size,
)
from kdlab.analysis.report import ReportPlot, ReportSection, ReportTable, write_report
from kdlab.analysis.run_tables import FamilyTables, build_family_tables
from kdlab.analysis.runs import Run, RunCollection, collect_runs
from kdlab.analysis.statistics import (
    KIND_SFT,
    build_improvements,
    classify_method,
    improvement_wide,
    run_statistics,
)
from kdlab.errors import ConfigError, ModelError, RunDirError

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_FIDELITY_RECORDS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``kdlab analyze``."""
    parser.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_OR_SWEEP_DIR",
        help="Run or sweep directories (searched recursively for run.json).",
    )
    parser.add_argument("--out", required=True, help="Directory for tables, plots and reports.")
    tables = parser.add_argument_group("paper-format tables (instead of run directories)")
    tables.add_argument(
        "--results-table",
        metavar="CSV",
        help="Results table: Teacher, Student, Method, one column per task, Average.",
    )
    tables.add_argument(
        "--llama-table",
        metavar="CSV",
        action="append",
        default=[],
        help="Extra results table appended without its BaseModel rows (repeatable).",
    )
    tables.add_argument(
        "--agreement", metavar="CSV", help="EM1 pair table (Teacher, Student, Pair, Method...)."
    )
    tables.add_argument("--fidelity", metavar="CSV", help="BLEU pair table (same layout).")
    tables.add_argument("--label", help="Section name for the tables (default: the CSV's name).")
    runs = parser.add_argument_group("run directories")
    runs.add_argument(
        "--allow-missing-teacher",
        action="store_true",
        help="Warn (instead of failing) when a KD run's teacher run cannot be found.",
    )
    runs.add_argument(
        "--rouge-max-items",
        type=int,
        default=None,
        metavar="N",
        help="ROUGE-L on the first N items per task only (0 = skip ROUGE-L; default: all).",
    )
    runs.add_argument(
        "--token-fidelity",
        action="store_true",
        help="Also compute token-level KL(teacher||student) and top-1 agreement under "
        "teacher forcing (loads the models).",
    )
    runs.add_argument(
        "--token-fidelity-data",
        metavar="RECORDS",
        help="Held-out records (.json/.jsonl with instruction and output) for --token-fidelity.",
    )
    runs.add_argument(
        "--token-fidelity-records",
        type=int,
        default=DEFAULT_TOKEN_FIDELITY_RECORDS,
        metavar="N",
        help=f"Records used by --token-fidelity (default {DEFAULT_TOKEN_FIDELITY_RECORDS}).",
    )
    runs.add_argument(
        "--token-fidelity-batch-size", type=int, default=4, metavar="N", help="Default 4."
    )
    runs.add_argument(
        "--token-fidelity-cutoff-len", type=int, default=256, metavar="N", help="Default 256."
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="Significance level.")
    parser.add_argument("--title", default="kdlab analysis", help="Title of the report.")


def _check_args(args: argparse.Namespace) -> None:
    if args.results_table and args.run_dirs:
        raise ConfigError("give either run/sweep directories or --results-table, not both")
    if not args.results_table and not args.run_dirs:
        raise ConfigError("give run/sweep directories to analyse, or --results-table CSV")
    if not args.results_table:
        for flag, value in (
            ("--llama-table", args.llama_table),
            ("--agreement", args.agreement),
            ("--fidelity", args.fidelity),
        ):
            if value:
                raise ConfigError(f"{flag} only goes with --results-table")
    if args.results_table and args.token_fidelity:
        raise ConfigError("--token-fidelity needs run directories (it loads the models)")
    if args.token_fidelity and not args.token_fidelity_data:
        raise ConfigError("--token-fidelity needs --token-fidelity-data RECORDS")
    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.rouge_max_items is not None and args.rouge_max_items < 0:
        raise ConfigError("--rouge-max-items must be >= 0")
    for flag, value in (
        ("--token-fidelity-records", args.token_fidelity_records),
        ("--token-fidelity-batch-size", args.token_fidelity_batch_size),
        ("--token-fidelity-cutoff-len", args.token_fidelity_cutoff_len),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "section"


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


def _plots(
    accuracy: pd.DataFrame, improvements: pd.DataFrame, points: pd.DataFrame, *, per_run: bool
) -> list[ReportPlot]:
    points_note = (
        "One point per KD run, and one per SFT student against each of its teachers."
        if per_run
        else "One point per (Teacher, Student, method) at its best Average, and one per SFT "
        "student against each teacher."
    )
    return [
        ReportPlot(
            "Accuracy by method and temperature",
            plot_accuracy_by_temperature(accuracy),
            "accuracy_by_temperature.png",
            "Average accuracy of each KD configuration; dashed grey: the same student's SFT.",
        ),
        ReportPlot(
            "Improvement over SFT vs student size",
            plot_improvement_vs_size(improvements),
            "improvement_vs_size.png",
            "Best KD run (over temperatures) minus the same student's SFT, Average column.",
        ),
        ReportPlot(
            "Agreement and fidelity vs accuracy",
            plot_fidelity_vs_accuracy(
                points,
                title="Agreement and fidelity vs accuracy"
                + (" (one point per run)" if per_run else ""),
            ),
            "fidelity_vs_accuracy.png",
            points_note + " EM1 = % of items where the student's answer equals the teacher's; "
            "BLEU of the student's rationales against the teacher's.",
        ),
    ]


# --------------------------------------------------------------------------- table mode


def table_sections(args: argparse.Namespace) -> list[ReportSection]:
    """The section for ``--results-table`` (plus the optional Llama/EM1/BLEU tables)."""
    main_table = load_results_table(args.results_table)
    extras = [load_results_table(path) for path in args.llama_table]
    results = combine_results_tables(main_table, extras)
    agreement = load_pair_table(args.agreement) if args.agreement else None
    fidelity = load_pair_table(args.fidelity) if args.fidelity else None
    improvements = build_improvements(results, agreement=agreement, fidelity=fidelity)
    statistics = run_statistics(
        improvements,
        include_agreement=agreement is not None,
        include_fidelity=fidelity is not None,
    )
    label = args.label or Path(args.results_table).stem
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
    held-out records with the student's tokenizer (``kdlab.data.tokenize``) and runs
    :func:`kdlab.analysis.token_fidelity.token_fidelity_over_batches`.
    """
    try:
        from kdlab.data.records import TRAIN_FIELDS, load_records
        from kdlab.data.tokenize import Collator, tokenize_records
        from kdlab.models.loading import load_run_model
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ModelError(
            f"--token-fidelity needs kdlab.models and kdlab.data, which failed to import: {error}"
        ) from error
    from kdlab.analysis.token_fidelity import token_fidelity_over_batches

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

    for teacher, student in pairs:
        teacher_model, _ = model_of(teacher)
        student_model, tokenizer = model_of(student)
        examples = tokenize_records(records, tokenizer, cutoff_len=cutoff_len)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        collate = Collator(pad_token_id=int(pad_id))
        batches = (
            collate(examples[start : start + batch_size])
            for start in range(0, len(examples), batch_size)
        )
        result = token_fidelity_over_batches(teacher_model, student_model, batches)
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
                "student_run": str(student.run_dir),
                "teacher_run": str(teacher.run_dir),
            }
        )
        # Students are compared once; free them (teachers are reused).
        if all(student.run_dir != other.run_dir for other, _ in pairs):
            loaded.pop(student.run_dir, None)
    return pd.DataFrame.from_records(rows)


def run_sections(args: argparse.Namespace) -> list[ReportSection]:
    """One section per task family of the evaluated runs."""
    collection = collect_runs(args.run_dirs, allow_missing_teacher=args.allow_missing_teacher)
    sections: list[ReportSection] = []
    for family in collection.task_families():
        tables = build_family_tables(collection, family, rouge_max_items=args.rouge_max_items)
        em1 = tables.pairs["EM1"]
        bleu = tables.pairs["BLEU"]
        improvements = build_improvements(
            tables.accuracy,
            agreement=em1 if not em1.empty else None,
            fidelity=bleu if not bleu.empty else None,
            student_sizes=tables.student_sizes,
        )
        statistics = run_statistics(
            improvements, include_agreement=not em1.empty, include_fidelity=not bleu.empty
        )
        section = ReportSection(
            title=f"Task family: {family}", slug=_slug(family), statistics=statistics
        )
        kinds = tables.per_run["kind"].value_counts().to_dict() if len(tables.per_run) else {}
        section.notes.append(
            f"{len(tables.runs)} evaluated runs ({kinds.get('kd', 0)} KD, "
            f"{kinds.get(KIND_SFT, 0)} SFT, {kinds.get('base', 0)} base) on "
            f"{len(tables.tasks)} task(s): {', '.join(tables.tasks)}."
        )
        if improvements.empty:
            section.notes.append(
                "No KD run could be paired with an SFT run of the same student: no statistics."
            )
        section.tables += [
            ReportTable(
                "Accuracy (%)",
                tables.accuracy,
                "accuracy.csv",
                "Paper layout; runs differing only by seed are averaged.",
                primary=True,
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
        if args.token_fidelity:
            token_table = compute_token_fidelity(
                collection,
                tables.runs,
                records_source=args.token_fidelity_data,
                max_records=args.token_fidelity_records,
                batch_size=args.token_fidelity_batch_size,
                cutoff_len=args.token_fidelity_cutoff_len,
            )
            section.tables.append(
                ReportTable(
                    "Token-level fidelity (teacher forcing on held-out records)",
                    token_table,
                    "token_fidelity.csv",
                    "Mean KL(teacher || student) per response token (nats) and how often the "
                    "two models' most likely next token agree.",
                )
            )
        section.tables.append(
            ReportTable("Runs", tables.per_run, "runs.csv", "One row per evaluated run.")
        )
        section.plots.extend(
            _plots(tables.accuracy, improvements, _run_points(tables), per_run=True)
        )
        sections.append(section)
    return sections


# --------------------------------------------------------------------------- entry point


def main(args: argparse.Namespace) -> int:
    """Run ``kdlab analyze``; prints the Average statistics and where the report is."""
    _check_args(args)
    if args.results_table:
        sections = table_sections(args)
        inputs = [args.results_table, *args.llama_table]
        inputs += [path for path in (args.agreement, args.fidelity) if path]
    else:
        sections = run_sections(args)
        inputs = list(args.run_dirs)
    written = write_report(
        args.out, sections, title=args.title, inputs=[str(item) for item in inputs],
        alpha=args.alpha,
    )  # fmt: skip
    for section in sections:
        print(f"{section.title}: statistics on {AVERAGE}")
        for result in section.headline():
            print(f"  {result.sentence}")
    print(f"report: {written['html']}")
    print(f"        {written['markdown']}")
    return 0
