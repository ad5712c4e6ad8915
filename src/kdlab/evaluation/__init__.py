"""Evaluation: declarative benchmark tasks, answer extraction, batched generation, reports.

>>> from kdlab.evaluation import get_task
>>> task = get_task("gsm8k")
>>> task.extract("She has 3 + 4 = 7 apples. The answer is 7.")
'7'

``evaluate(config)`` runs a whole :class:`~kdlab.config.evaluation.EvalConfig` and writes
the run layout of ``docs/run-layout.md``; ``kdlab eval`` is its command line.
"""

from __future__ import annotations

from typing import Any

from kdlab.evaluation.tasks import (
    TASK_GROUPS,
    Task,
    custom_task,
    expand_task_names,
    get_task,
    list_tasks,
    register_task,
)

__all__ = [
    "TASK_GROUPS",
    "Task",
    "custom_task",
    "evaluate",
    "expand_task_names",
    "get_task",
    "list_tasks",
    "register_task",
]


def evaluate(config: Any, **kwargs: Any) -> Any:
    """Run an evaluation (see :func:`kdlab.evaluation.runner.evaluate`)."""
    from kdlab.evaluation.runner import evaluate as run

    return run(config, **kwargs)
