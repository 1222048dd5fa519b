"""The sidecar's supervisor: restarts a child that exits (with backoff), stops it, and never
fails when the command cannot start. Waits are on the supervisor's own counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.supervisor import Supervisor


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the supervisor never got there"
        await asyncio.sleep(0.01)


async def test_a_child_that_exits_is_restarted_with_backoff_and_stopped() -> None:
    quick = Supervisor(["/bin/sh", "-c", "exit 3"], min_backoff_s=0.05, poll_interval_s=0.01)
    quick.start()
    await until(lambda: quick.starts >= 3)  # restarted with backoff, the loop kept running
    await quick.stop()
    slow = Supervisor(["/bin/sleep", "30"], poll_interval_s=0.01)
    slow.start()
    await until(lambda: slow.process is not None)
    process = slow.process
    assert process is not None and process.poll() is None
    await slow.stop()
    assert process.poll() is not None  # terminated on stop


async def test_a_missing_command_never_fails_the_supervisor() -> None:
    supervisor = Supervisor(["/nonexistent/turnout-monitor"], min_backoff_s=0.05)
    supervisor.start()
    await until(lambda: supervisor.failed_starts >= 2)  # it kept trying
    await supervisor.stop()
    assert supervisor.starts == 0
