"""Record batches as the gateway builds them, for the sidecar's tests."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from turnout_contract.records import RecordBatch


def record_batch(
    model: str,
    version: int,
    inputs: dict[str, np.ndarray[Any, Any]] | None = None,
    outputs: dict[str, np.ndarray[Any, Any]] | None = None,
    *,
    rows: int | None = None,
    arm: str = "stable",
    total_s: float | np.ndarray[Any, Any] = 0.01,
    status: int = 200,
    traced: bool = True,
) -> RecordBatch:
    """A batch whose every row is sampled (when tensors are given)."""
    inputs = inputs or {}
    outputs = outputs or {}
    tensors = [*inputs.values(), *outputs.values()]
    n = rows if rows is not None else (len(tensors[0]) if tensors else 1)
    total = np.broadcast_to(np.asarray(total_s, dtype=np.float64), (n,)).copy()
    columns = {
        "revision": np.ones(n, np.int64),
        "arm": [arm] * n,
        "status": np.full(n, status, np.int16),
        "start_ns": np.full(n, 1_700_000_000_000_000_000, np.int64),
        "queue_s": total * 0.1,
        "batch_s": total * 0.8,
        "total_s": total,
        "batch_size": np.full(n, 8, np.int32),
        "trace_id": [secrets.token_hex(16) if traced else "" for _ in range(n)],
        "span_id": [secrets.token_hex(8) for _ in range(n)],
        "request_id": [str(i) for i in range(n)],
    }
    sampled = np.arange(n, dtype=np.int64) if tensors else np.zeros(0, np.int64)
    return RecordBatch(model, version, columns, sampled, dict(inputs), dict(outputs))
