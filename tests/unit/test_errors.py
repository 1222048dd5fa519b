"""The error tree: every class's HTTP status and gRPC code, its extra headers, and that no
error a client can see lives outside the tree in gateway/errors.py."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import grpc
import pytest

import gateway
import gateway.errors as errors
from gateway.errors import QueueFull, TurnoutError, internal_error
from turnout_contract import status

TABLE: dict[type[TurnoutError], tuple[int, grpc.StatusCode]] = {
    errors.TurnoutError: (500, grpc.StatusCode.INTERNAL),
    errors.InvalidInput: (400, grpc.StatusCode.INVALID_ARGUMENT),
    errors.Unauthenticated: (401, grpc.StatusCode.UNAUTHENTICATED),
    errors.PermissionDenied: (403, grpc.StatusCode.PERMISSION_DENIED),
    errors.ModelNotFound: (404, grpc.StatusCode.NOT_FOUND),
    errors.Conflict: (409, grpc.StatusCode.FAILED_PRECONDITION),
    errors.RevisionConflict: (409, grpc.StatusCode.FAILED_PRECONDITION),
    errors.PayloadTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    errors.QueueFull: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    errors.RateLimited: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    errors.BackendError: (500, grpc.StatusCode.INTERNAL),
    errors.InjectedFault: (500, grpc.StatusCode.INTERNAL),
    errors.InjectedUnavailable: (503, grpc.StatusCode.UNAVAILABLE),
    errors.ModelNotReady: (503, grpc.StatusCode.UNAVAILABLE),
    errors.ServerShuttingDown: (503, grpc.StatusCode.UNAVAILABLE),
    errors.PolicyStoreUnavailable: (503, grpc.StatusCode.UNAVAILABLE),
    errors.MonitorUnavailable: (503, grpc.StatusCode.UNAVAILABLE),
    errors.StateUnwritable: (507, grpc.StatusCode.RESOURCE_EXHAUSTED),
    errors.DeadlineExceeded: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
}


def _subclasses(cls: type[TurnoutError]) -> set[type[TurnoutError]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


def test_every_subclass_anywhere_in_the_gateway_is_in_the_tree_module() -> None:
    # Import every module (Ray's optional ones too), then walk the live class tree: a
    # subclass defined outside gateway/errors.py, exported or not, fails here.
    for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
        importlib.import_module(module.name)
    tree = {c for c in _subclasses(TurnoutError) if not c.__module__.startswith("tests")}
    assert {c.__module__ for c in tree} == {"gateway.errors"}
    assert tree == set(TABLE)
    assert {getattr(errors, name) for name in errors.__all__ if name[0].isupper()} == set(TABLE)


@pytest.mark.parametrize(("cls", "codes"), TABLE.items(), ids=lambda v: getattr(v, "__name__", ""))
def test_status_and_code(cls: type[TurnoutError], codes: tuple[int, grpc.StatusCode]) -> None:
    error = cls("boom")
    assert (error.http_status, error.grpc_code) == codes
    assert error.message == "boom"
    assert str(error) == "boom"
    if not issubclass(cls, QueueFull):
        assert error.http_headers() == {}


def test_queue_full_retry_after() -> None:
    assert QueueFull("full").http_headers() == {"retry-after": "1"}
    error = QueueFull("full", retry_after_s=7)
    assert error.retry_after_s == 7
    assert error.http_headers() == {"retry-after": "7"}


def test_the_status_table_names_real_grpc_codes_and_maps_records_back() -> None:
    # The sidecar reads a record's gRPC code with grpc_code(): the same table as the tree.
    for entry in status.STATUSES:
        assert grpc.StatusCode[entry.grpc_name].value[0] == entry.grpc
        assert status.grpc_code(entry.http) == entry.grpc
    for cls in TABLE:
        assert status.grpc_code(cls.http_status) == cls.grpc_code.value[0], cls.__name__
    assert status.grpc_code(418) == grpc.StatusCode.UNKNOWN.value[0]


def test_an_internal_error_answers_an_incident_id_and_logs_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("tests.errors")
    try:
        raise RuntimeError("secret path /srv/models/x")
    except RuntimeError:
        message = internal_error(log, "POST /v2/models/x/infer")
    assert "secret" not in message
    incident = message.split("incident ")[1].split(";")[0]
    assert len(incident) == 12
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "secret path" in str(logged[0].exc_info[1])
