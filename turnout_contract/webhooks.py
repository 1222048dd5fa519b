"""The webhook sender both processes notify with: the sidecar's alerts, the gateway's
rollout decisions. JSON documents are POSTed from one background thread, so a slow or dead
receiver never delays the caller; a full outbox or a failed POST is counted, never retried.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from collections.abc import Sequence
from typing import Any

__all__ = ["WebhookSender"]

log = logging.getLogger(__name__)


class WebhookSender:
    """``post(document)`` queues one POST per URL; ``counts``: sent and failed."""

    def __init__(
        self, urls: Sequence[str], *, name: str = "turnout-webhooks", timeout_s: float = 5.0
    ) -> None:
        self.urls = list(urls)
        self.name = name
        self.timeout_s = timeout_s
        self.counts: dict[str, int] = {"sent": 0, "failed": 0}
        self._lock = threading.Lock()
        self._outbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=1024)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Send what is queued, then stop the thread (a later ``start`` begins again)."""
        if self._thread is not None:
            self._outbox.put(None)
            self._thread.join(10)
            self._thread = None

    def post(self, document: dict[str, Any], urls: Sequence[str] | None = None) -> None:
        body = json.dumps(document).encode()
        for url in self.urls if urls is None else urls:
            try:
                self._outbox.put_nowait((url, body))
            except queue.Full:
                self._count("failed")

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def _run(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            url, body = item
            request = urllib.request.Request(
                url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                outcome = "sent"
            except (OSError, ValueError) as exc:
                log.warning("webhook %s failed: %s", url, exc)
                outcome = "failed"
            self._count(outcome)
