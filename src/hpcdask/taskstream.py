"""The scheduler's task stream (what ``performance_report`` and ``get_task_stream`` read), minus
one assertion.

distributed's ``TaskStreamPlugin`` asserts that a task leaving ``processing`` for ``erred`` has
start/stop times. A task that errs before it starts has none: at a Slurm time limit every worker
closes at once, and a task handed to a closing worker fails before it runs. The assertion then
fails inside the scheduler, which logs it with a traceback (seen once in 13 runs of the
time-limit test). Such a task has nothing to draw: it is left out of the stream.

hpcdask's scheduler registers this under distributed's own name (``task-stream``), so
``Scheduler.get_task_stream`` and the dashboard use it instead of creating the original.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.task_stream import TaskStreamPlugin


class TaskStream(TaskStreamPlugin):
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing" and finish in ("memory", "erred") and \
                not kwargs.get("startstops"):
            return
        super().transition(key, start, finish, *args, **kwargs)
