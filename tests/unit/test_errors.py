"""The error tree: every class's HTTP status and gRPC code, and its extra headers."""

from __future__ import annotations

import grpc
import pytest

import gateway.errors as errors
from gateway.errors import QueueFull, TurnoutError

TABLE: dict[type[TurnoutError], tuple[int, grpc.StatusCode]] = {
    errors.TurnoutError: (500, grpc.StatusCode.INTERNAL),
    errors.InvalidInput: (400, grpc.StatusCode.INVALID_ARGUMENT),
    errors.Unauthenticated: (401, grpc.StatusCode.UNAUTHENTICATED),
    errors.PermissionDenied: (403, grpc.StatusCode.PERMISSION_DENIED),
    errors.ModelNotFound: (404, grpc.StatusCode.NOT_FOUND),
    errors.Conflict: (409, grpc.StatusCode.FAILED_PRECONDITION),
    errors.PayloadTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    errors.QueueFull: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    errors.BackendError: (500, grpc.StatusCode.INTERNAL),
    errors.ModelNotReady: (503, grpc.StatusCode.UNAVAILABLE),
    errors.ServerShuttingDown: (503, grpc.StatusCode.UNAVAILABLE),
    errors.DeadlineExceeded: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
}


def test_table_covers_every_exported_error() -> None:
    exported = {getattr(errors, name) for name in errors.__all__}
    assert exported == set(TABLE)


@pytest.mark.parametrize(("cls", "codes"), TABLE.items(), ids=lambda v: getattr(v, "__name__", ""))
def test_status_and_code(cls: type[TurnoutError], codes: tuple[int, grpc.StatusCode]) -> None:
    error = cls("boom")
    assert issubclass(cls, TurnoutError)
    assert (error.http_status, error.grpc_code) == codes
    assert error.message == "boom"
    assert str(error) == "boom"
    if cls is not QueueFull:
        assert error.http_headers() == {}


def test_queue_full_retry_after() -> None:
    assert QueueFull("full").http_headers() == {"retry-after": "1"}
    error = QueueFull("full", retry_after_s=7)
    assert error.retry_after_s == 7
    assert error.http_headers() == {"retry-after": "7"}
