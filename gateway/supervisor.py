"""The monitor sidecar as a supervised child of the gateway.

``turnout serve`` starts ``turnout monitor --listen unix://<state_dir>/monitor.sock`` next
to itself, restarts it with a growing backoff (up to ``max_backoff_s``) whenever it exits,
and terminates it on stop. The child's fate never touches the gateway: while it is down,
request records are dropped and counted, and requests are served as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time

__all__ = ["Supervisor", "monitor_command"]

log = logging.getLogger(__name__)


def monitor_command(address: str, metrics_port: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "turnout.cli", "monitor", "--listen", address]
    return command if metrics_port is None else [*command, "--metrics-port", str(metrics_port)]


class Supervisor:
    """Keep one child process running on the event loop's schedule; never raises."""

    def __init__(
        self,
        command: list[str],
        *,
        name: str = "monitor sidecar",
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        healthy_after_s: float = 30.0,
        poll_interval_s: float = 0.2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.env = env
        self.name = name
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.poll_interval_s = poll_interval_s
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        """Children started."""
        self.failed_starts = 0
        """Attempts whose command could not be started at all (missing, not executable)."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            started = time.monotonic()
            try:
                # Its stdout goes to our stderr: the gateway's stdout carries only its own lines.
                self.process = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=2, env=self.env
                )
                self.starts += 1
            except (OSError, ValueError) as exc:
                log.warning("cannot start the %s: %s", self.name, exc)
                self.failed_starts += 1
                code: int | None = None
            else:
                while (code := self.process.poll()) is None:
                    await asyncio.sleep(self.poll_interval_s)
            if time.monotonic() - started >= self.healthy_after_s:
                backoff = self.min_backoff_s
            log.warning(
                "the %s exited (code %s); restarting in %.1f s; requests are served meanwhile",
                self.name,
                code,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def stop_restarting(self) -> None:
        """Leave the child running but restart it no more (the gateway is draining: a Ctrl-C
        reaches the child too, and it should not come back)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop restarting, then terminate the child (SIGKILL after ``timeout_s``)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if process.poll() is None:
            log.warning("the %s did not exit on SIGTERM: killing it", self.name)
            process.kill()
            process.wait()
