"""Cutting one (model, version)'s queued records into runs whose frame fits a datagram.

Sizes are estimated before encoding, from the bytes per row of the first sampled request's
batch (a model's rows are alike); the emitter splits a run whose frame came out larger
anyway, and sends each run of alike tensor shapes on its own when shapes differ (variable
dimensions cannot be joined into one column).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import numpy as np

from turnout_contract.records import BatchTensors, RequestRecord, Tensors

__all__ = ["FRAME_KEYS_BYTES", "MAX_FRAME_BYTES", "chunks", "runs_of_alike_shapes"]

MAX_FRAME_BYTES: Final = 192 * 1024  # the default Unix datagram limit is ~208 KiB (wmem_default)
FRAME_KEYS_BYTES: Final = 4096  # room for a frame's own keys and counters
_ROW_OVERHEAD_BYTES: Final = 256  # numeric columns + ids + msgpack framing, per record


def chunks(records: list[RequestRecord], max_frame_bytes: int) -> Iterator[list[RequestRecord]]:
    """Runs of ``records`` whose frame should stay under ``max_frame_bytes``."""
    budget = max_frame_bytes - FRAME_KEYS_BYTES
    row_bytes = 0
    for record in records:
        tensors = _sampled(record)
        if tensors is not None:
            tensor_bytes = _tensor_bytes(tensors.inputs) + _tensor_bytes(tensors.outputs)
            row_bytes = tensor_bytes // max(tensors.rows, 1)
            break
    chunk: list[RequestRecord] = []
    size = 0
    for record in records:
        cost = _ROW_OVERHEAD_BYTES + len(record.path) + len(record.error) + len(record.request_id)
        if record.sampled:
            cost += row_bytes * record.rows
        if chunk and size + cost > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(record)
        size += cost
    if chunk:
        yield chunk


def runs_of_alike_shapes(records: list[RequestRecord]) -> list[list[RequestRecord]]:
    """Consecutive runs whose sampled tensors share names, dtypes and inner shapes."""
    runs: list[list[RequestRecord]] = [[]]
    signature: tuple[Any, ...] | None = None
    for record in records:
        tensors = _sampled(record)
        if tensors is not None:
            record_signature = _signature(tensors.inputs, tensors.outputs)
            if signature is not None and record_signature != signature and runs[-1]:
                runs.append([])
            signature = record_signature
        runs[-1].append(record)
    return runs


def _sampled(record: RequestRecord) -> BatchTensors | None:
    """The batch tensors whose rows ride along with ``record`` (None: it is not sampled)."""
    return record.batch_tensors() if record.sampled else None


def _tensor_bytes(tensors: Tensors) -> int:
    total = 0
    for value in tensors.values():
        if value.dtype == np.object_:
            total += sum(len(v) if isinstance(v, bytes | str) else 16 for v in value.flat)
            total += 4 * value.size
        else:
            total += value.nbytes
    return total


def _signature(inputs: Tensors, outputs: Tensors) -> tuple[Any, ...]:
    return (
        tuple((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()),
        tuple((k, v.dtype.str, v.shape[1:]) for k, v in outputs.items()),
    )
