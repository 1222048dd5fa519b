"""What a transport knows about a request before decoding it: one value for the data plane.

The HTTP app and the gRPC servicer build a :class:`RequestContext` the moment they take a
request up (protocol, path, the model it names, headers or metadata, arrival time, and the
W3C trace context continued from them) and hand it to the data plane with a decoder; the
data plane authenticates, decodes, routes and counts, the same way for both.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from gateway.types import InferRequest
from turnout_contract.trace import TRACEPARENT_HEADER, TRACESTATE_HEADER, TraceContext

__all__ = ["Decode", "RequestContext", "decoded"]

Decode = Callable[[], Awaitable[InferRequest]]
"""Reads and decodes the request (an HTTP body, a proto message); raises TurnoutError."""


@dataclass(slots=True)
class RequestContext:
    protocol: str
    """``http`` or ``grpc``: labels metrics and spans."""
    model: str
    """The model the request names (URL path or message), before anything is decoded."""
    headers: Mapping[str, str]
    """HTTP headers or gRPC metadata, lower-case names."""
    trace: TraceContext
    """The caller's trace continued (or a new one); answered as ``traceparent``."""
    path: str = ""
    """The HTTP path ("" for gRPC)."""
    received: float = 0.0
    """``time.perf_counter()`` when the transport took the request up."""

    @classmethod
    def arrived(
        cls, protocol: str, model: str, headers: Mapping[str, str], path: str = ""
    ) -> RequestContext:
        """A request taken up now: its trace continues the headers' ``traceparent``."""
        received = time.perf_counter()
        trace = TraceContext.start(headers.get(TRACEPARENT_HEADER), headers.get(TRACESTATE_HEADER))
        return cls(protocol, model, headers, trace, path, received)


def decoded(request: InferRequest) -> Decode:
    """A decoder for a request that is already decoded (in-process callers, tests)."""

    async def decode() -> InferRequest:
        return request

    return decode
