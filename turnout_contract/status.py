"""Every status a request can end with, as an HTTP status and a gRPC code at once.

Request records carry the HTTP-style number; the gateway's error tree
(``gateway/errors.py``) names one of these per error class, and the sidecar reads the gRPC
code of a record's status from here when it builds a span. One table, so the two can never
disagree::

    name                 HTTP  gRPC
    OK                   200   OK (0)
    INVALID_ARGUMENT     400   INVALID_ARGUMENT (3)
    UNAUTHENTICATED      401   UNAUTHENTICATED (16)
    PERMISSION_DENIED    403   PERMISSION_DENIED (7)
    NOT_FOUND            404   NOT_FOUND (5)
    CONFLICT             409   FAILED_PRECONDITION (9)
    PAYLOAD_TOO_LARGE    413   RESOURCE_EXHAUSTED (8)
    TOO_MANY_REQUESTS    429   RESOURCE_EXHAUSTED (8)
    INTERNAL             500   INTERNAL (13)
    UNAVAILABLE          503   UNAVAILABLE (14)
    DEADLINE_EXCEEDED    504   DEADLINE_EXCEEDED (4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "CONFLICT",
    "DEADLINE_EXCEEDED",
    "GRPC_SERVER_ERRORS",
    "GRPC_UNKNOWN",
    "INSUFFICIENT_STORAGE",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "OK",
    "PAYLOAD_TOO_LARGE",
    "PERMISSION_DENIED",
    "STATUSES",
    "TOO_MANY_REQUESTS",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "Status",
    "grpc_code",
]


@dataclass(frozen=True, slots=True)
class Status:
    http: int
    """The HTTP status a REST client gets."""
    grpc: int
    """The gRPC status code a gRPC client gets (``grpc.StatusCode[grpc_name]``)."""
    grpc_name: str


OK: Final = Status(200, 0, "OK")
INVALID_ARGUMENT: Final = Status(400, 3, "INVALID_ARGUMENT")
UNAUTHENTICATED: Final = Status(401, 16, "UNAUTHENTICATED")
PERMISSION_DENIED: Final = Status(403, 7, "PERMISSION_DENIED")
NOT_FOUND: Final = Status(404, 5, "NOT_FOUND")
CONFLICT: Final = Status(409, 9, "FAILED_PRECONDITION")
PAYLOAD_TOO_LARGE: Final = Status(413, 8, "RESOURCE_EXHAUSTED")
TOO_MANY_REQUESTS: Final = Status(429, 8, "RESOURCE_EXHAUSTED")
INTERNAL: Final = Status(500, 13, "INTERNAL")
UNAVAILABLE: Final = Status(503, 14, "UNAVAILABLE")
DEADLINE_EXCEEDED: Final = Status(504, 4, "DEADLINE_EXCEEDED")
INSUFFICIENT_STORAGE: Final = Status(507, 8, "RESOURCE_EXHAUSTED")

STATUSES: Final = (
    OK,
    INVALID_ARGUMENT,
    UNAUTHENTICATED,
    PERMISSION_DENIED,
    NOT_FOUND,
    CONFLICT,
    PAYLOAD_TOO_LARGE,
    TOO_MANY_REQUESTS,
    INTERNAL,
    UNAVAILABLE,
    DEADLINE_EXCEEDED,
    INSUFFICIENT_STORAGE,
)
GRPC_UNKNOWN: Final = 2
"""The code of an HTTP status outside the table."""
GRPC_SERVER_ERRORS: Final = frozenset({2, 4, 12, 13, 14, 15})
"""gRPC codes a server span reports as errors (OpenTelemetry's RPC conventions)."""

_GRPC_BY_HTTP: Final = {s.http: s.grpc for s in STATUSES}


def grpc_code(http_status: int) -> int:
    """The gRPC code a record's HTTP-style status stands for (UNKNOWN outside the table)."""
    return _GRPC_BY_HTTP.get(http_status, GRPC_UNKNOWN)
