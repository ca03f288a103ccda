"""Evaluation tasks: one module per benchmark family plus the offline synthetic suite.

Importing this package registers every task in :data:`TASKS`; use :func:`get_task` to look one
up by name. See :mod:`kvbound.eval.tasks.base` for the loader / scorer conventions.
"""

from kvbound.eval.tasks import (  # noqa: F401  (imported to register the tasks)
    aime24,
    gsm8k,
    longbench,
    longbench_v2,
    longmemeval,
    longproc,
    math500,
    ruler,
    scbench,
    synthetic,
)
from kvbound.eval.tasks.base import TASKS, TaskExample, TaskSpec, get_task

__all__ = ["TASKS", "TaskExample", "TaskSpec", "get_task"]
