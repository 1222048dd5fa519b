"""Request records for the monitor sidecar: a bounded queue, columnar frames, Unix datagrams.

The data plane hands every request's :class:`turnout_contract.records.RequestRecord` to
:meth:`RecordEmitter.observe`, which appends it to a bounded deque and returns; a full queue
drops the record and counts it. A flush thread wakes every ``flush_interval_s``, groups what
was queued by (model, version), cuts each group into frames of at most ``max_frame_bytes``
(:mod:`.frames`) and sends each with one non-blocking ``sendto`` (:mod:`.datagram`). A
sidecar that is missing, refusing or behind costs one failed system call per frame: the
frame is dropped and counted, never retried, and requests are served exactly as without a
monitor. Input and output rows ride along, once per backend call, while the sampling budget
(:class:`gateway.limits.TokenBucket`) allows.
"""

from gateway.telemetry.emitter import RecordEmitter

__all__ = ["RecordEmitter"]
