"""The data plane's per-request metrics: in-flight requests come back down however a request
ends, cancelled ones included."""

from __future__ import annotations

import asyncio
from pathlib import Path

import model_zoo
import numpy as np

from gateway.backends.local import LocalBackend
from gateway.dataplane import DataPlane
from gateway.repository import Repository
from gateway.settings import ServerSettings
from gateway.types import InferInput, InferRequest


def request(model: str) -> InferRequest:
    row = np.ones((1, 4), np.float32)
    return InferRequest(
        model_name=model,
        inputs=[InferInput("a", "FP32", (1, 4), row), InferInput("b", "FP32", (1, 4), row)],
    )


async def test_in_flight_returns_to_zero_after_success_failure_and_cancellation(
    tmp_path: Path,
) -> None:
    # A lone request waits 10 s for company: long enough to be cancelled while queued.
    config = {"max_batch_size": 4, "max_queue_delay_us": 10_000_000}
    model_zoo.write_repository(tmp_path, {"lazy": (model_zoo.add_sub, config, [1])})
    plane = DataPlane(Repository(tmp_path, ServerSettings()), LocalBackend())
    await plane.start()
    try:
        waiting = asyncio.ensure_future(plane.infer(request("lazy")))
        await asyncio.sleep(0.05)
        assert plane.metrics.in_flight["lazy"] == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert plane.metrics.in_flight["lazy"] == 0
        bad = request("lazy")
        bad.inputs.pop()
        await asyncio.gather(plane.infer(bad), return_exceptions=True)
        assert plane.metrics.in_flight["lazy"] == 0
        assert plane.metrics.requests[("lazy", "1", "primary", "", 400)] == 1
    finally:
        await plane.stop()
