"""One error hierarchy for every transport.

Each class declares the HTTP status and the gRPC code it maps to, so the REST and gRPC
adapters each need one handler and the data plane never thinks about transports::

    TurnoutError (500, INTERNAL)
    ├── InvalidInput            400  INVALID_ARGUMENT   bad tensors, JSON, parameters
    ├── Unauthenticated         401  UNAUTHENTICATED
    ├── PermissionDenied        403  PERMISSION_DENIED
    ├── ModelNotFound           404  NOT_FOUND          unknown model or version
    ├── Conflict                409  FAILED_PRECONDITION stale revision; version in use
    ├── PayloadTooLarge         413  RESOURCE_EXHAUSTED body over the configured limit
    ├── QueueFull               429  RESOURCE_EXHAUSTED batcher queue at max_queue_size
    ├── BackendError            500  INTERNAL           the replica failed to run the model
    ├── ModelNotReady           503  UNAVAILABLE        known but not loaded (yet)
    ├── ServerShuttingDown      503  UNAVAILABLE        draining
    └── DeadlineExceeded        504  DEADLINE_EXCEEDED  request timeout reached
"""

from __future__ import annotations

from typing import ClassVar

import grpc

__all__ = [
    "BackendError",
    "Conflict",
    "DeadlineExceeded",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueueFull",
    "ServerShuttingDown",
    "TurnoutError",
    "Unauthenticated",
]


class TurnoutError(Exception):
    """Base of every error a client may see; carries its HTTP status and gRPC code."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def http_headers(self) -> dict[str, str]:
        """Extra response headers this error asks for (e.g. Retry-After)."""
        return {}


class InvalidInput(TurnoutError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(TurnoutError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TurnoutError):
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ModelNotFound(TurnoutError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class Conflict(TurnoutError):
    http_status = 409
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class PayloadTooLarge(TurnoutError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFull(TurnoutError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class BackendError(TurnoutError):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL


class ModelNotReady(TurnoutError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class ServerShuttingDown(TurnoutError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TurnoutError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
