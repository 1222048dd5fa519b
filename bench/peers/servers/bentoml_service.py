"""A BentoML service with adaptive batching, served by ``bentoml serve
bench.peers.servers.bentoml_service:MLP``; BentoML's own JSON: POST /infer ``{"x": rows}``
answers the output rows.

``bentoml serve`` takes no arguments for the service, so the runner passes them in
``BENCH_PEER_*`` environment variables. BentoML learns how long to wait for a batch; it has
no delay to set (``max_latency_ms`` is a deadline, past which it sheds requests).
"""

# No `from __future__ import annotations`: BentoML reads the API's annotations as types.
import os

import bentoml
import numpy as np

from bench.peers.servers._common import Model

MAX_BATCH_SIZE = int(os.environ.get("BENCH_PEER_MAX_BATCH_SIZE", "64"))
MAX_LATENCY_MS = 10_000


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class MLP:
    def __init__(self) -> None:
        self.model = Model(os.environ["BENCH_PEER_MODEL"], os.environ["BENCH_PEER_INPUT"])

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.model(x)
