"""The gRPC admin API (``turnout.admin.v1.TrafficService``) against a real gateway.

Each test gets a fresh gateway serving add_sub versions 1 and 2 (revision 0: version 2 takes
all traffic). Every change made over gRPC must show in the REST admin API and in where
inference requests go; every refused change must leave the policy and its revision alone.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from gateways import GatewayThread, local_settings, running
from model_zoo import add_sub, write_repository

from gateway.admin.grpc import SERVICE, message

ADMIN = "x" * 20
READER = "y" * 20
TOKENS = [
    {"name": "ops", "token": ADMIN, "role": "admin"},
    {"name": "reader", "token": READER, "role": "infer"},
]
CALL_TIMEOUT_S = 10.0

# RPC -> response message (the request is "<RPC>Request").
RESPONSES = {
    "GetPolicy": "PolicyStatus",
    "ListPolicies": "ListPoliciesResponse",
    "SetWeights": "PolicyStatus",
    "Switch": "PolicyStatus",
    "Promote": "PolicyStatus",
    "Rollback": "PolicyStatus",
    "SetShadow": "PolicyStatus",
    "ClearShadow": "PolicyStatus",
    "History": "HistoryResponse",
    "LoadModel": "PolicyStatus",
    "UnloadModel": "UnloadModelResponse",
}


@pytest.fixture(scope="module")
def add_sub_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("admin-models")
    return write_repository(root, {"add_sub": (add_sub, {"max_batch_size": 8}, [1, 2])})


@pytest.fixture
def gateway(add_sub_repository: Path) -> Iterator[GatewayThread]:
    with running(local_settings(add_sub_repository, admin_tokens=TOKENS)) as server:
        yield server


class Admin:
    """A blocking client of TrafficService over one channel."""

    def __init__(self, gateway: GatewayThread) -> None:
        self.gateway = gateway
        self.channel = grpc.insecure_channel(gateway.grpc_url)

    def __call__(self, rpc: str, token: str | None = ADMIN, **fields: Any) -> Any:
        call = self.channel.unary_unary(
            f"/{SERVICE}/{rpc}",
            request_serializer=message(f"{rpc}Request").SerializeToString,
            response_deserializer=message(RESPONSES[rpc]).FromString,
        )
        metadata = [("authorization", f"Bearer {token}")] if token is not None else None
        return call(message(f"{rpc}Request")(**fields), metadata=metadata, timeout=CALL_TIMEOUT_S)

    def refused(self, code: grpc.StatusCode, rpc: str, **fields: Any) -> str:
        """Call ``rpc``, expect ``code``, return the error's message."""
        with pytest.raises(grpc.RpcError) as info:
            self(rpc, **fields)
        error: Any = info.value
        assert error.code() == code, error.details()
        details: str = error.details()
        assert details
        return details

    def revision(self) -> int:
        revision: int = self("GetPolicy", model="add_sub").policy.revision
        return revision

    # -- the other side of the gateway: REST admin and inference --------------------------

    def _http(self, method: str, path: str, body: Any = None, token: str = ADMIN) -> Any:
        connection = http.client.HTTPConnection(self.gateway.http_url, timeout=CALL_TIMEOUT_S)
        try:
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            payload = orjson.dumps(body) if body is not None else None
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            document = orjson.loads(response.read())
            assert response.status == 200, document
            return document
        finally:
            connection.close()

    def rest_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self._http("GET", "/admin/v1/models/add_sub/traffic")
        return status

    def served_versions(self, requests: int = 12, version: str | None = None) -> list[str]:
        """The ``model_version`` of the answers to ``requests`` inferences."""
        row = [1.0, 2.0, 3.0, 4.0]
        body = {
            "inputs": [
                {"name": name, "shape": [1, 4], "datatype": "FP32", "data": row}
                for name in ("a", "b")
            ]
        }
        path = "/v2/models/add_sub/" + (f"versions/{version}/" if version else "") + "infer"
        answers = [self._http("POST", path, body) for _ in range(requests)]
        for answer in answers:
            assert answer["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
        return [answer["model_version"] for answer in answers]

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def admin(gateway: GatewayThread) -> Iterator[Admin]:
    client = Admin(gateway)
    yield client
    client.close()


# -- reading ------------------------------------------------------------------------------


def test_get_policy_before_any_change(admin: Admin) -> None:
    status = admin("GetPolicy", model="add_sub")
    policy = status.policy
    assert policy.model == "add_sub"
    assert policy.revision == 0
    assert policy.kind == "single"
    assert dict(policy.weights) == {2: 100}
    assert not policy.HasField("standby")
    assert not policy.HasField("shadow")
    assert policy.allow_explicit_version
    assert list(status.loaded_versions) == [1, 2]
    assert dict(status.shadow_stats) == {}


def test_list_policies(admin: Admin) -> None:
    admin("Promote", model="add_sub", version=1)
    models = admin("ListPolicies").models
    assert [status.policy.model for status in models] == ["add_sub"]
    assert dict(models[0].policy.weights) == {1: 100}
    assert models[0].policy.revision == 1


# -- changes, seen through REST and inference -----------------------------------------------


def test_promote_moves_unversioned_traffic(admin: Admin) -> None:
    assert set(admin.served_versions()) == {"2"}
    status = admin("Promote", model="add_sub", version=1)
    assert dict(status.policy.weights) == {1: 100}
    assert status.policy.revision == 1
    rest = admin.rest_status()
    assert rest["weights"] == {"1": 100}
    assert rest["revision"] == 1
    assert set(admin.served_versions()) == {"1"}
    # A request naming its version still gets it.
    assert set(admin.served_versions(3, version="2")) == {"2"}


def test_set_weights_canary(admin: Admin) -> None:
    status = admin("SetWeights", model="add_sub", weights={1: 50, 2: 50})
    assert status.policy.kind == "canary"
    assert dict(status.policy.weights) == {1: 50, 2: 50}
    rest = admin.rest_status()
    assert rest["kind"] == "canary"
    assert rest["weights"] == {"1": 50, "2": 50}
    # 60 draws at 50/50: both versions answer (all one side has probability 2**-59).
    assert set(admin.served_versions(60)) == {"1", "2"}


def test_set_weights_allow_explicit_version(admin: Admin) -> None:
    status = admin("SetWeights", model="add_sub", weights={2: 100}, allow_explicit_version=False)
    assert not status.policy.allow_explicit_version
    assert admin.rest_status()["allow_explicit_version"] is False
    # Absent: unchanged.
    status = admin("SetWeights", model="add_sub", weights={1: 100})
    assert not status.policy.allow_explicit_version
    assert status.policy.revision == 2


def test_blue_green_switch(admin: Admin) -> None:
    status = admin("SetWeights", model="add_sub", weights={2: 100}, standby=1)
    assert status.policy.kind == "blue-green"
    assert status.policy.standby == 1
    assert admin.rest_status()["standby"] == 1

    status = admin("Switch", model="add_sub")
    assert dict(status.policy.weights) == {1: 100}
    assert status.policy.standby == 2
    assert status.policy.revision == 2
    rest = admin.rest_status()
    assert (rest["weights"], rest["standby"]) == ({"1": 100}, 2)
    assert set(admin.served_versions()) == {"1"}

    # New weights without a standby end the pair.
    status = admin("SetWeights", model="add_sub", weights={1: 100})
    assert not status.policy.HasField("standby")
    assert status.policy.kind == "single"


def test_rollback_restores_the_previous_policy(admin: Admin) -> None:
    admin("Promote", model="add_sub", version=1)
    status = admin("Rollback", model="add_sub")
    assert dict(status.policy.weights) == {2: 100}
    assert status.policy.revision == 2
    assert admin.rest_status()["weights"] == {"2": 100}
    assert set(admin.served_versions()) == {"2"}


def test_shadow_set_and_clear(admin: Admin) -> None:
    status = admin("SetShadow", model="add_sub", version=1, percent=100.0)
    assert status.policy.shadow.version == 1
    assert status.policy.shadow.percent == 100.0
    assert admin.rest_status()["shadow"] == {"version": 1, "percent": 100.0}

    assert set(admin.served_versions(5)) == {"2"}
    deadline = time.monotonic() + 10
    while True:
        stats = admin("GetPolicy", model="add_sub").shadow_stats
        if 1 in stats and stats[1].requests >= 5 and stats[1].HasField("exact_match_rate"):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    # Versions 1 and 2 are the same model: every mirrored answer matches.
    assert stats[1].errors == 0
    assert stats[1].exact_match_rate == 1.0
    assert stats[1].mean_abs_diff == 0.0

    status = admin("ClearShadow", model="add_sub")
    assert not status.policy.HasField("shadow")
    assert admin.rest_status()["shadow"] is None

    # Percent absent: every request is mirrored.
    assert admin("SetShadow", model="add_sub", version=1).policy.shadow.percent == 100.0


def test_history(admin: Admin) -> None:
    before = time.time()
    admin("Promote", model="add_sub", version=1)
    admin("SetShadow", model="add_sub", version=2, percent=10.0)
    admin("ClearShadow", model="add_sub")
    history = admin("History", model="add_sub")
    assert history.model == "add_sub"
    entries = history.entries
    assert [e.operation for e in entries] == ["promote", "shadow", "clear_shadow"]
    assert [e.revision for e in entries] == [1, 2, 3]
    assert {e.actor for e in entries} == {"ops"}
    for entry in entries:
        assert before - 1 <= entry.time.ToNanoseconds() / 1e9 <= time.time() + 1
        assert entry.new_policy.revision == entry.revision
    # Before the first change: the default policy, revision 0 (the highest version).
    assert entries[0].old_policy.revision == 0
    assert dict(entries[0].old_policy.weights) == {2: 100}
    assert dict(entries[0].new_policy.weights) == {1: 100}
    assert entries[1].old_policy == entries[0].new_policy
    assert entries[1].new_policy.shadow.percent == 10.0
    assert not entries[2].new_policy.HasField("shadow")
    # The same entries as the REST API's.
    rest = admin._http("GET", "/admin/v1/models/add_sub/traffic/history")["history"]
    assert [(e["revision"], e["operation"]) for e in rest] == [
        (e.revision, e.operation) for e in entries
    ]


def test_unload_and_load(admin: Admin) -> None:
    answer = admin("UnloadModel", model="add_sub", version=1)
    assert (answer.model, answer.unloaded, list(answer.loaded_versions)) == ("add_sub", 1, [2])
    assert admin.rest_status()["loaded_versions"] == [2]

    status = admin("LoadModel", model="add_sub", version=1)
    assert list(status.loaded_versions) == [1, 2]
    assert admin.rest_status()["loaded_versions"] == [1, 2]
    assert set(admin.served_versions(3, version="1")) == {"1"}


def test_if_revision(admin: Admin) -> None:
    status = admin("Promote", model="add_sub", version=1, if_revision=0)
    assert status.policy.revision == 1
    message = admin.refused(
        grpc.StatusCode.FAILED_PRECONDITION, "Promote", model="add_sub", version=2, if_revision=0
    )
    assert "revision 1" in message
    for rpc, fields in [
        ("SetWeights", {"weights": {2: 100}}),
        ("Rollback", {}),
        ("SetShadow", {"version": 2}),
        ("ClearShadow", {}),
    ]:
        admin.refused(
            grpc.StatusCode.FAILED_PRECONDITION, rpc, model="add_sub", if_revision=7, **fields
        )
    assert admin.revision() == 1
    assert admin.rest_status()["weights"] == {"1": 100}


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rpc", "fields"),
    [
        ("GetPolicy", {"model": "add_sub"}),
        ("ListPolicies", {}),
        ("Promote", {"model": "add_sub", "version": 1}),
        ("UnloadModel", {"model": "add_sub", "version": 1}),
    ],
)
def test_auth(admin: Admin, rpc: str, fields: dict[str, Any]) -> None:
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in admin.refused(unauthenticated, rpc, token=None, **fields)
    assert "invalid bearer token" in admin.refused(unauthenticated, rpc, token="z" * 20, **fields)
    denied = admin.refused(grpc.StatusCode.PERMISSION_DENIED, rpc, token=READER, **fields)
    assert "'reader'" in denied
    assert admin.revision() == 0
    assert admin.rest_status()["loaded_versions"] == [1, 2]


@pytest.mark.parametrize(
    ("weights", "problem"),
    [
        ({1: 60, 2: 30}, "sum to 90"),
        ({1: 110, 2: -10}, "negative"),
        ({3: 100}, "not loaded"),
        ({0: 100}, "not a positive integer"),
        ({}, "at least one version"),
    ],
)
def test_bad_weights_change_nothing(admin: Admin, weights: dict[int, int], problem: str) -> None:
    admin("Promote", model="add_sub", version=1)
    message = admin.refused(
        grpc.StatusCode.INVALID_ARGUMENT, "SetWeights", model="add_sub", weights=weights
    )
    assert problem in message
    assert admin.revision() == 1
    rest = admin.rest_status()
    assert (rest["revision"], rest["weights"]) == (1, {"1": 100})
    assert len(admin("History", model="add_sub").entries) == 1


@pytest.mark.parametrize(
    ("rpc", "fields", "problem"),
    [
        ("Promote", {"version": 0}, "positive integer"),
        ("Promote", {"version": 5}, "not loaded"),
        ("Switch", {}, "no standby"),
        ("Rollback", {}, "no earlier revision"),
        ("SetShadow", {"version": 1, "percent": 0.0}, "percent"),
        ("SetShadow", {"version": 1, "percent": 150.0}, "percent"),
        ("SetShadow", {"version": 4}, "not loaded"),
        ("SetWeights", {"weights": {2: 100}, "standby": 2}, "also the active one"),
        ("SetWeights", {"weights": {1: 50, 2: 50}, "standby": 1}, "exactly one active"),
        ("LoadModel", {"version": 1}, None),  # already loaded: FAILED_PRECONDITION below
    ],
)
def test_bad_changes_change_nothing(
    admin: Admin, rpc: str, fields: dict[str, Any], problem: str | None
) -> None:
    if problem is None:
        admin.refused(grpc.StatusCode.FAILED_PRECONDITION, rpc, model="add_sub", **fields)
    else:
        message = admin.refused(grpc.StatusCode.INVALID_ARGUMENT, rpc, model="add_sub", **fields)
        assert problem in message
    assert admin.revision() == 0
    assert admin.rest_status()["weights"] == {"2": 100}
    assert admin.rest_status()["loaded_versions"] == [1, 2]


def test_model_is_required(admin: Admin) -> None:
    assert "'model'" in admin.refused(grpc.StatusCode.INVALID_ARGUMENT, "GetPolicy")
    admin.refused(grpc.StatusCode.INVALID_ARGUMENT, "Promote", version=1)


@pytest.mark.parametrize(
    ("rpc", "fields"),
    [
        ("GetPolicy", {}),
        ("History", {}),
        ("SetWeights", {"weights": {1: 100}}),
        ("Switch", {}),
        ("Promote", {"version": 1}),
        ("Rollback", {}),
        ("SetShadow", {"version": 1}),
        ("ClearShadow", {}),
        ("LoadModel", {"version": 1}),
        ("UnloadModel", {"version": 1}),
    ],
)
def test_unknown_model(admin: Admin, rpc: str, fields: dict[str, Any]) -> None:
    message = admin.refused(grpc.StatusCode.NOT_FOUND, rpc, model="nope", **fields)
    assert "nope" in message


def test_unknown_version_not_found(admin: Admin) -> None:
    admin.refused(grpc.StatusCode.NOT_FOUND, "LoadModel", model="add_sub", version=9)
    admin.refused(grpc.StatusCode.NOT_FOUND, "UnloadModel", model="add_sub", version=9)


def test_unload_version_with_traffic(admin: Admin) -> None:
    message = admin.refused(
        grpc.StatusCode.FAILED_PRECONDITION, "UnloadModel", model="add_sub", version=2
    )
    assert "has traffic" in message
    # The shadow and the standby count as traffic too.
    admin("SetShadow", model="add_sub", version=1, percent=5.0)
    admin.refused(grpc.StatusCode.FAILED_PRECONDITION, "UnloadModel", model="add_sub", version=1)
    admin("ClearShadow", model="add_sub")
    admin("SetWeights", model="add_sub", weights={2: 100}, standby=1)
    admin.refused(grpc.StatusCode.FAILED_PRECONDITION, "UnloadModel", model="add_sub", version=1)
    assert admin.rest_status()["loaded_versions"] == [1, 2]
    assert set(admin.served_versions(3)) == {"2"}
