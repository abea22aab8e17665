"""hpcdask.taskstream: the scheduler's task stream survives a task that errs before it starts."""

from __future__ import annotations

import asyncio

from distributed import Scheduler
from distributed.diagnostics.task_stream import TaskStreamPlugin

from hpcdask.taskstream import TaskStream


def test_a_task_erring_without_start_times_is_left_out_not_a_traceback():
    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address=":0") as s:
            s.add_plugin(TaskStream(s))
            plugin = s._task_stream_plugin()  # what get_task_stream / performance_report use
            assert isinstance(plugin, TaskStream)
            done = {"action": "compute", "start": 1.0, "stop": 2.0}
            plugin.transition("a", "processing", "memory", startstops=[done], worker="w")
            plugin.transition("b", "processing", "erred", startstops=[], worker="w")
            plugin.transition("c", "processing", "erred", startstops=[done], worker="w")
            original = TaskStreamPlugin(s)
            try:
                original.transition("b", "processing", "erred", startstops=[], worker="w")
            except AssertionError:
                raised = True
            else:
                raised = False
            return [r["key"] for r in plugin.buffer], raised

    keys, original_raised = asyncio.run(main())
    assert keys == ["a", "c"]
    assert original_raised  # distributed's own plugin still asserts: this module is still needed
