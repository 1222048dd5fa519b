"""One error hierarchy for every transport.

Each class names its :class:`turnout_contract.status.Status`, which gives both the HTTP
status and the gRPC code it maps to, so the REST and gRPC adapters each need one handler and
the data plane never thinks about transports::

    TurnoutError (500, INTERNAL)
    ├── InvalidInput            400  INVALID_ARGUMENT   bad tensors, JSON, parameters
    ├── Unauthenticated         401  UNAUTHENTICATED
    ├── PermissionDenied        403  PERMISSION_DENIED
    ├── ModelNotFound           404  NOT_FOUND          unknown model or version
    ├── Conflict                409  FAILED_PRECONDITION version in use
    │   └── RevisionConflict    409  FAILED_PRECONDITION stale revision (someone changed it first)
    ├── PayloadTooLarge         413  RESOURCE_EXHAUSTED body over the configured limit
    ├── QueueFull               429  RESOURCE_EXHAUSTED batcher queue at max_queue_size
    │   └── RateLimited         429  RESOURCE_EXHAUSTED a token's or model's rate_limit_rps
    ├── BackendError            500  INTERNAL           the replica failed to run the model
    ├── InjectedFault           500  INTERNAL           a fault injected by the traffic policy
    │   └── InjectedUnavailable 503  UNAVAILABLE        (the same, answered as unavailable)
    ├── ModelNotReady           503  UNAVAILABLE        known but not loaded (yet)
    ├── ServerShuttingDown      503  UNAVAILABLE        draining
    ├── PolicyStoreUnavailable  503  UNAVAILABLE        the Ray policy store cannot be reached
    ├── MonitorUnavailable      503  UNAVAILABLE        the sidecar cannot take feedback
    └── DeadlineExceeded        504  DEADLINE_EXCEEDED  request timeout reached

Anything else raised while serving is answered as 500/INTERNAL with an incident id only
(:func:`internal_error`); its text goes to the log under that id, never to the client.
"""

from __future__ import annotations

import logging
import secrets
from typing import ClassVar

import grpc

from turnout_contract import status as statuses
from turnout_contract.names import check_model_name
from turnout_contract.status import Status

__all__ = [
    "BackendError",
    "Conflict",
    "DeadlineExceeded",
    "InjectedFault",
    "InjectedUnavailable",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "MonitorUnavailable",
    "PayloadTooLarge",
    "PermissionDenied",
    "PolicyStoreUnavailable",
    "QueueFull",
    "RateLimited",
    "RevisionConflict",
    "ServerShuttingDown",
    "StateUnwritable",
    "TurnoutError",
    "Unauthenticated",
    "checked_model_name",
    "internal_error",
]


class TurnoutError(Exception):
    """Base of every error a client may see; carries its HTTP status and gRPC code."""

    status: ClassVar[Status] = statuses.INTERNAL
    http_status: ClassVar[int] = statuses.INTERNAL.http
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.http_status = cls.status.http
        cls.grpc_code = grpc.StatusCode[cls.status.grpc_name]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def http_headers(self) -> dict[str, str]:
        """Extra response headers this error asks for (e.g. Retry-After)."""
        return {}


class InvalidInput(TurnoutError):
    status = statuses.INVALID_ARGUMENT


class Unauthenticated(TurnoutError):
    status = statuses.UNAUTHENTICATED


class PermissionDenied(TurnoutError):
    status = statuses.PERMISSION_DENIED


class ModelNotFound(TurnoutError):
    status = statuses.NOT_FOUND


class Conflict(TurnoutError):
    status = statuses.CONFLICT


class RevisionConflict(Conflict):
    """The stored revision moved: someone else changed the policy first (a client's
    ``--if-revision``, or a commit's expected revision, no longer holds)."""


class PayloadTooLarge(TurnoutError):
    status = statuses.PAYLOAD_TOO_LARGE


class QueueFull(TurnoutError):
    status = statuses.TOO_MANY_REQUESTS

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class RateLimited(QueueFull):
    """A token's or a model's request rate is above its ``rate_limit_rps``."""


class BackendError(TurnoutError):
    status = statuses.INTERNAL


class InjectedFault(TurnoutError):
    """A request answered with an error on purpose (``turnout traffic fault``)."""

    status = statuses.INTERNAL


class InjectedUnavailable(InjectedFault):
    status = statuses.UNAVAILABLE


class ModelNotReady(TurnoutError):
    status = statuses.UNAVAILABLE


class ServerShuttingDown(TurnoutError):
    status = statuses.UNAVAILABLE


class PolicyStoreUnavailable(TurnoutError):
    """The policy store actor cannot be reached (Ray down, actor restarting)."""

    status = statuses.UNAVAILABLE


class StateUnwritable(TurnoutError):
    """The state dir refused a write (disk full, read-only): the change was not made."""

    status = statuses.INSUFFICIENT_STORAGE


class MonitorUnavailable(TurnoutError):
    """The monitor sidecar could not be reached (or failed) for feedback."""

    status = statuses.UNAVAILABLE


class DeadlineExceeded(TurnoutError):
    status = statuses.DEADLINE_EXCEEDED


def checked_model_name(name: str) -> str:
    """``name`` when it is a valid model name (``turnout_contract.names``); InvalidInput."""
    try:
        return check_model_name(name)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def internal_error(log: logging.Logger, what: str) -> str:
    """Log the exception being handled under a new incident id; the client's message.

    Call it from an ``except`` block: the traceback goes to the log, and the client learns
    only the id to quote (an exception's text can hold paths, addresses or model internals).
    """
    incident = secrets.token_hex(6)
    log.exception("internal error %s in %s", incident, what)
    return f"internal error (incident {incident}; the gateway's log has the details)"
