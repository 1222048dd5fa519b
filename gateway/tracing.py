"""W3C trace context per request: continue the caller's trace or start one, answer with ours.

The gateway creates no spans. It draws the ids of its server span here, returns them to the
caller in a ``traceparent`` (response header / trailing metadata), and puts ids and
timestamps into the request record; the monitor sidecar builds and exports the spans
(``monitor/tracing/``), so tracing costs the serving path a few hundred nanoseconds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["TRACEPARENT_HEADER", "TRACESTATE_HEADER", "TraceContext", "parse_traceparent"]

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
_MAX_TRACESTATE = 512  # W3C: a vendor may drop a longer one whole
# version-traceid-parentid-flags; versions after 00 may append fields, which we ignore.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_random_bits = random.getrandbits


def parse_traceparent(header: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C ``traceparent``; None if absent or invalid."""
    if not header:
        return None
    match = _TRACEPARENT.fullmatch(header.strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)


@dataclass(slots=True)
class TraceContext:
    """The ids of one request's server span and where its trace came from."""

    trace_id: int
    """128 bits: the caller's trace, or a new one."""
    span_id: int
    """64 bits: the gateway's server span for this request."""
    parent_span_id: int = 0
    """The caller's span; 0 when the gateway started the trace."""
    flags: int = 0
    """The caller's trace flags (bit 0: the caller sampled it)."""
    state: str = ""
    """The caller's ``tracestate``, passed on unchanged."""

    @classmethod
    def start(cls, traceparent: str | None = None, tracestate: str | None = None) -> TraceContext:
        """Continue the trace of a valid ``traceparent``; otherwise start a new one."""
        parsed = parse_traceparent(traceparent)
        span_id = _random_bits(64) or 1
        if parsed is None:
            return cls(_random_bits(128) or 1, span_id)
        trace_id, parent, flags = parsed
        state = tracestate.strip() if tracestate else ""
        return cls(trace_id, span_id, parent, flags, state if len(state) <= _MAX_TRACESTATE else "")

    def traceparent(self) -> str:
        """The ``traceparent`` naming the gateway's span, returned to the caller."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags & 0xFF:02x}"

    def child(self) -> TraceContext:
        """A new span in the same trace whose parent is this one (shadow calls)."""
        return TraceContext(self.trace_id, _random_bits(64) or 1, self.span_id, self.flags)
