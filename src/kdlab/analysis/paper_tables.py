"""Tables in the paper's format: reading, checking and combining them.

Two layouts (see ``shared/data/paper_results/``):

- a *results table*: ``Teacher, Student, Method, <task>..., Average`` with accuracies in %,
  one row per evaluated model (``-`` as Teacher for base models and SFT runs);
- a *pair table* (EM1, EM2, BLEU): ``Teacher, Student, Pair, Method, <task>...`` with one
  ``SFT`` row (the SFT student against the teacher) and one ``KD`` row per teacher-student
  pair; it has no Average column, so its Average is the mean over its task columns.

kdlab writes its own tables in the same layouts (with Methods such as ``forward_kl_T2``), so
``kdlab analyze --results-table`` re-analyses either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kdlab.errors import DataError

logger = logging.getLogger(__name__)

TEACHER = "Teacher"
STUDENT = "Student"
METHOD = "Method"
PAIR = "Pair"
AVERAGE = "Average"
ID_COLUMNS = (TEACHER, STUDENT, METHOD)
SFT_METHOD = "SFT"
#: kdlab's label for a teacher's own fine-tune (an SFT row of the teacher model).
TEACHER_METHOD = "Teacher"
BASE_METHOD = "BaseModel"


def _read_csv(path: str | Path, what: str) -> pd.DataFrame:
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataError(f"{what} {csv_path} does not exist")
    try:
        table = pd.read_csv(csv_path)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise DataError(f"cannot read {what} {csv_path}: {error}") from error
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in ID_COLUMNS if column not in table.columns]
    if missing:
        raise DataError(
            f"{what} {csv_path} lacks the column(s) {', '.join(missing)}; expected "
            f"{', '.join(ID_COLUMNS)}, one column per task (and Average); found "
            f"{', '.join(table.columns)}"
        )
    for column in ID_COLUMNS:
        table[column] = table[column].astype(str).str.strip()
    return table


def _to_numeric(table: pd.DataFrame, columns: Sequence[str], path: str | Path, what: str) -> None:
    for column in columns:
        converted = pd.to_numeric(table[column], errors="coerce")
        bad = converted.isna() & table[column].notna()
        if bad.any():
            raise DataError(
                f"{what} {path}: column {column!r} has non-numeric values, e.g. "
                f"{table.loc[bad, column].iloc[0]!r}"
            )
        table[column] = converted.astype(float)


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The task columns of a table, followed by ``Average`` when present."""
    tasks = [column for column in table.columns if column not in (*ID_COLUMNS, PAIR, AVERAGE)]
    tasks = [column for column in tasks if not str(column).startswith("_")]
    return [*tasks, AVERAGE] if AVERAGE in table.columns else tasks


def task_columns(table: pd.DataFrame) -> list[str]:
    """The task columns of a table (without Average)."""
    return [column for column in metric_columns(table) if column != AVERAGE]


def with_average(table: pd.DataFrame) -> pd.DataFrame:
    """A copy with an ``Average`` column (the mean over task columns) when it has none."""
    result = table.copy()
    if AVERAGE not in result.columns:
        tasks = task_columns(result)
        result[AVERAGE] = result[tasks].mean(axis=1) if tasks else float("nan")
    return result


def load_results_table(path: str | Path) -> pd.DataFrame:
    """A results table (Teacher, Student, Method, tasks..., Average) with numeric scores."""
    table = _read_csv(path, "results table")
    table = table.drop(columns=[PAIR], errors="ignore")
    columns = metric_columns(table)
    if not task_columns(table):
        raise DataError(f"results table {path} has no task columns")
    _to_numeric(table, columns, path, "results table")
    if AVERAGE not in table.columns:
        logger.warning("results table %s has no Average column: using the mean of tasks", path)
        table = with_average(table)
    return table.reset_index(drop=True)


def load_pair_table(path: str | Path) -> pd.DataFrame:
    """A pair table (EM1, EM2, BLEU...): Teacher, Student, [Pair,] Method, tasks...

    An ``Average`` column (the mean over the task columns) is added when absent.
    """
    table = _read_csv(path, "pair table")
    table = table.drop(columns=[PAIR], errors="ignore")
    if not task_columns(table):
        raise DataError(f"pair table {path} has no task columns")
    _to_numeric(table, metric_columns(table), path, "pair table")
    return with_average(table).reset_index(drop=True)


def combine_results_tables(
    main: pd.DataFrame, extra_tables: Sequence[pd.DataFrame] = ()
) -> pd.DataFrame:
    """``main`` followed by ``extra_tables`` without their BaseModel rows (paper step 1)."""
    parts = [main]
    for extra in extra_tables:
        parts.append(extra[extra[METHOD] != BASE_METHOD])
    combined = pd.concat(parts, ignore_index=True, sort=False)
    tasks = [column for column in combined.columns if column not in (*ID_COLUMNS, AVERAGE)]
    ordered = [*ID_COLUMNS, *tasks, *([AVERAGE] if AVERAGE in combined.columns else [])]
    return combined[ordered]


def find_column(table: pd.DataFrame, column: str) -> str | None:
    """The column of ``table`` named ``column`` (exactly, else ignoring case), or ``None``."""
    if column in table.columns:
        return column
    lowered = {str(candidate).lower(): candidate for candidate in table.columns}
    return lowered.get(column.lower())
