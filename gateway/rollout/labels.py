"""Accuracy and rewards from feedback, read from the monitor sidecar's ``/status``.

Labels go to the sidecar (``POST /v2/models/{m}/feedback``), which matches them with the
predictions it sampled and counts labelled and correct predictions per version since it
started. :class:`SidecarAccuracy` polls those counts (off the event loop) for the models
under a rollout; a gate subtracts the counts at the start of its step. While the sidecar
cannot be reached the counts are None: the accuracy gate holds, never passes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import urllib.request
from typing import Any

from gateway.rollout.gates import Accuracy, InputDrift

__all__ = ["SidecarFeedback"]

log = logging.getLogger(__name__)


class SidecarFeedback:
    def __init__(self, url: str, *, max_age_s: float = 5.0, timeout_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self._counts: dict[tuple[str, int], Accuracy] = {}
        self._rewards: dict[tuple[str, int], tuple[int, float, float]] = {}
        self._features: dict[tuple[str, int], InputDrift] = {}
        self._read_at: dict[str, float] = {}
        self._reachable = True

    @property
    def reachable(self) -> bool:
        return self._reachable

    def counts(self, model: str, version: int) -> Accuracy | None:
        """The latest counts, or None when they are older than ``max_age_s``."""
        read_at = self._read_at.get(model)
        if read_at is None or time.monotonic() - read_at > self.max_age_s:
            return None
        return self._counts.get((model, version), Accuracy(0, 0))

    def reward(self, model: str, version: int) -> tuple[int, float, float] | None:
        """(n, mean, variance) of the rewards fed back, or None when stale."""
        read_at = self._read_at.get(model)
        if read_at is None or time.monotonic() - read_at > self.max_age_s:
            return None
        return self._rewards.get((model, version), (0, 0.0, 0.0))

    def input_drift(self, model: str, version: int) -> InputDrift | None:
        """The version's features against its reference profile; None without a profile.
        While the counts are stale (sidecar unreachable) a version seen with a profile
        reads as not evaluated, so its gate holds rather than passes."""
        seen = self._features.get((model, version))
        read_at = self._read_at.get(model)
        if seen is not None and (read_at is None or time.monotonic() - read_at > self.max_age_s):
            return InputDrift(evaluated=False, drifted={})
        return seen

    async def refresh(self, model: str) -> None:
        try:
            document = await asyncio.to_thread(self._fetch, model)
        except (OSError, ValueError) as exc:
            if self._reachable:
                log.warning("monitor sidecar at %s unreachable for accuracy: %s", self.url, exc)
            self._reachable = False
            return
        self._reachable = True
        for version, status in document.get("models", {}).get(model, {}).items():
            accuracy = status.get("accuracy") or {}
            self._counts[(model, int(version))] = Accuracy(
                int(accuracy.get("labelled", 0)), int(accuracy.get("correct", 0))
            )
            features = status.get("features") or {}
            if status.get("reference") is not None and features:
                self._features[(model, int(version))] = InputDrift(
                    evaluated=all(f.get("window") for f in features.values()),
                    drifted={
                        name: list(f["drifted"]) for name, f in features.items() if f.get("drifted")
                    },
                )
            reward = status.get("reward") or {}
            self._rewards[(model, int(version))] = (
                int(reward.get("n") or 0),
                float(reward.get("mean") or 0.0),
                float(reward.get("variance") or 0.0),
            )
        self._read_at[model] = time.monotonic()

    def _fetch(self, model: str) -> dict[str, Any]:
        url = f"{self.url}/status/{urllib.parse.quote(model, safe='')}"
        with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
            document: dict[str, Any] = json.loads(response.read())
        return document
