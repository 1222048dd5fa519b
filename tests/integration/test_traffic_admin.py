"""The REST admin API against a real gateway, and what each change does to real inference.

Each test that changes traffic gets a fresh gateway serving the standard repository, where
add_sub has versions 1 and 2 (identical graphs) and, before any change, version 2 takes all
traffic at revision 0. Every answer is checked twice: the admin API's status, and where real
HTTP and gRPC inference requests go (the response's ``model_version`` and the revision in the
``x-turnout-revision`` header or trailing metadata). Refused changes run against one gateway
that nothing may ever change: after each, the revision is still 0 and the history empty.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import orjson
import pytest
from gateways import EVENTUALLY_S, GatewayThread, local_settings, running

from gateway.codecs import decode_raw
from gateway.grpc.messages import message
from gateway.routing.policy import TrafficPolicy, key_point, route

ADMIN_TOKEN = "o" * 24
INFER_TOKEN = "a" * 24
TOKENS = [
    {"name": "ops", "token": ADMIN_TOKEN, "role": "admin"},
    {"name": "app", "token": INFER_TOKEN, "role": "infer"},
]
MODEL = "add_sub"
TRAFFIC = f"models/{MODEL}/traffic"  # under /admin/v1
CALL_TIMEOUT_S = 10.0

A = [[1.0, 2.0, 3.0, 4.0]]
B = [[10.0, 20.0, 30.0, 40.0]]
SUM = [11.0, 22.0, 33.0, 44.0]
DIFF = [-9.0, -18.0, -27.0, -36.0]

_Request = message("ModelInferRequest")
_Response = message("ModelInferResponse")
_Parameter = message("InferParameter")


# -- clients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    def error(self) -> str:
        """The message of an error body, checking the body is exactly ``{"error": str}``."""
        assert self.headers.get("content-type") == "application/json", self.headers
        document = self.json()
        assert isinstance(document, dict) and list(document) == ["error"], document
        assert isinstance(document["error"], str) and document["error"], document
        return document["error"]


def http_call(
    server: GatewayThread,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    host, port = server.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token is not None else {}


class Admin:
    """The REST admin API as the ``ops`` token sees it; every call must succeed."""

    def __init__(self, server: GatewayThread, token: str = ADMIN_TOKEN) -> None:
        self.server = server
        self.token = token

    def call(self, method: str, path: str, body: Any = None, token: str | None = "") -> Reply:
        """``token``: '' sends this client's own, None sends no authorization header."""
        data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        headers = {
            "content-type": "application/json",
            **bearer(self.token if token == "" else token),
        }
        return http_call(self.server, method, f"/admin/v1/{path}", data, headers)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        reply = self.call(method, path, body)
        assert reply.status == 200, (reply.status, reply.body)
        return reply.json()

    def status(self, model: str = MODEL) -> dict[str, Any]:
        status: dict[str, Any] = self.ok("GET", f"models/{model}/traffic")
        return status

    def change(self, op: str, **fields: Any) -> dict[str, Any]:
        status: dict[str, Any] = self.ok("POST", f"models/{MODEL}/traffic", {"op": op, **fields})
        return status

    def history(self, model: str = MODEL) -> list[dict[str, Any]]:
        document = self.ok("GET", f"models/{model}/traffic/history")
        assert document["model"] == model
        history: list[dict[str, Any]] = document["history"]
        return history


class Served(NamedTuple):
    version: int
    revision: int


def infer_http(
    server: GatewayThread,
    version: str = "",
    headers: dict[str, str] | None = None,
    parameters: dict[str, Any] | None = None,
) -> Reply:
    tensors = [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": A},
        {"name": "b", "datatype": "FP32", "shape": [1, 4], "data": B},
    ]
    document: dict[str, Any] = {"inputs": tensors}
    if parameters is not None:
        document["parameters"] = parameters
    path = f"/v2/models/{MODEL}{f'/versions/{version}' if version else ''}/infer"
    return http_call(server, "POST", path, orjson.dumps(document), headers)


def served_http(reply: Reply) -> Served:
    """Where a good HTTP answer came from; its outputs must be right whichever version ran."""
    assert reply.status == 200, (reply.status, reply.body)
    document = reply.json()
    outputs = {o["name"]: o["data"] for o in document["outputs"]}
    assert outputs == {"sum": SUM, "diff": DIFF}, outputs
    return Served(int(document["model_version"]), int(reply.headers["x-turnout-revision"]))


def http_served(server: GatewayThread, **kwargs: Any) -> Served:
    return served_http(infer_http(server, **kwargs))


class GrpcInfer:
    """ModelInfer over a raw channel, so the trailing metadata can be read."""

    def __init__(self, server: GatewayThread) -> None:
        self.channel = grpc.insecure_channel(server.grpc_url)
        self.stub = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=_Request.SerializeToString,
            response_deserializer=_Response.FromString,
        )

    def request(self, version: str = "", routing_key: str | None = None) -> Any:
        request = _Request(model_name=MODEL, model_version=version)
        for name, data in (("a", A), ("b", B)):
            request.inputs.add(
                name=name, datatype="FP32", shape=[1, 4], contents={"fp32_contents": data[0]}
            )
        if routing_key is not None:
            request.parameters["routing_key"].CopyFrom(_Parameter(string_param=routing_key))
        return request

    def __call__(
        self,
        version: str = "",
        metadata: list[tuple[str, str]] | None = None,
        routing_key: str | None = None,
    ) -> Served:
        response, call = self.stub.with_call(
            self.request(version, routing_key), metadata=metadata, timeout=CALL_TIMEOUT_S
        )
        outputs = {
            o.name: decode_raw(o.name, o.datatype, tuple(o.shape), raw).tolist()
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        assert outputs == {"sum": [SUM], "diff": [DIFF]}, outputs
        trailing = dict(call.trailing_metadata())
        return Served(int(response.model_version), int(trailing["x-turnout-revision"]))

    def refused(self, version: str = "", metadata: list[tuple[str, str]] | None = None) -> Any:
        with pytest.raises(grpc.RpcError) as info:
            self.stub(self.request(version), metadata=metadata, timeout=CALL_TIMEOUT_S)
        return info.value

    def close(self) -> None:
        self.channel.close()


def eventually(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` until it returns something truthy (background work finishing)."""
    deadline = time.monotonic() + EVENTUALLY_S
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def gateway(repository: Path) -> Iterator[GatewayThread]:
    with running(local_settings(repository, admin_tokens=TOKENS)) as server:
        yield server


@pytest.fixture
def admin(gateway: GatewayThread) -> Admin:
    return Admin(gateway)


@pytest.fixture
def grpc_infer(gateway: GatewayThread) -> Iterator[GrpcInfer]:
    client = GrpcInfer(gateway)
    yield client
    client.close()


def assert_everywhere(
    server: GatewayThread, grpc_infer: GrpcInfer, expected: Served, times: int = 10
) -> None:
    """Every unkeyed request on both transports lands on ``expected``."""
    for _ in range(times):
        assert http_served(server) == expected
        assert grpc_infer() == expected


# -- each operation and its effect on inference ---------------------------------------------


def test_before_any_change_the_highest_version_serves_at_revision_0(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    assert admin.status() == {
        "model": MODEL,
        "revision": 0,
        "kind": "single",
        "weights": {"2": 100},
        "standby": None,
        "allow_explicit_version": True,
        "shadow": None,
        "faults": {},
        "rollout": None,
        "experiment": None,
        "loaded_versions": [1, 2],
        "shadow_stats": {},
    }
    assert admin.history() == []
    assert_everywhere(gateway, grpc_infer, Served(2, 0))


def test_set_splits_traffic_and_put_sets_weights(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    status = admin.change("set", weights={"1": 50, "2": 50})
    assert (status["revision"], status["kind"], status["weights"]) == (
        1,
        "canary",
        {"1": 50, "2": 50},
    )
    assert admin.status() == status
    http_seen = {http_served(gateway) for _ in range(100)}
    grpc_seen = {grpc_infer() for _ in range(100)}
    # 100 fair draws all landing on one version would have probability 2**-99.
    assert http_seen == grpc_seen == {Served(1, 1), Served(2, 1)}

    status = admin.ok("PUT", f"models/{MODEL}/traffic", {"weights": {"1": 100}})
    assert (status["revision"], status["kind"], status["weights"]) == (2, "single", {"1": 100})
    assert admin.status() == status
    assert_everywhere(gateway, grpc_infer, Served(1, 2))

    # A zero weight is allowed and leaves that version without traffic.
    status = admin.change("set", weights={"1": 0, "2": 100})
    assert (status["revision"], status["weights"]) == (3, {"2": 100})
    assert_everywhere(gateway, grpc_infer, Served(2, 3))


def test_blue_green_switch_swaps_active_and_standby(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    status = admin.change("set", weights={"2": 100}, standby=1)
    assert (status["revision"], status["kind"], status["weights"], status["standby"]) == (
        1,
        "blue-green",
        {"2": 100},
        1,
    )
    assert_everywhere(gateway, grpc_infer, Served(2, 1))

    status = admin.change("switch")
    assert (status["revision"], status["weights"], status["standby"]) == (2, {"1": 100}, 2)
    assert_everywhere(gateway, grpc_infer, Served(1, 2))

    status = admin.change("switch")
    assert (status["revision"], status["weights"], status["standby"]) == (3, {"2": 100}, 1)
    assert_everywhere(gateway, grpc_infer, Served(2, 3))

    # New weights without a standby end the blue-green pair.
    status = admin.change("set", weights={"1": 90, "2": 10})
    assert (status["revision"], status["kind"], status["standby"]) == (4, "canary", None)


def test_promote_sends_everything_to_one_version(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    admin.change("set", weights={"1": 90, "2": 10})
    status = admin.change("promote", version=2)
    assert (status["revision"], status["kind"], status["weights"]) == (2, "single", {"2": 100})
    assert_everywhere(gateway, grpc_infer, Served(2, 2))

    admin.change("set", weights={"2": 100}, standby=1)
    status = admin.change("promote", version="1")  # a numeric string is a version too
    assert (status["revision"], status["weights"], status["standby"]) == (4, {"1": 100}, None)
    assert_everywhere(gateway, grpc_infer, Served(1, 4))


def test_rollback_restores_the_previous_revisions_policy(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    admin.change("set", weights={"1": 100})
    assert_everywhere(gateway, grpc_infer, Served(1, 1))
    admin.change("set", weights={"1": 70, "2": 30}, allow_explicit_version=False)

    status = admin.change("rollback")
    assert (status["revision"], status["weights"], status["allow_explicit_version"]) == (
        3,
        {"1": 100},
        True,
    )
    assert_everywhere(gateway, grpc_infer, Served(1, 3))


def test_rollback_of_the_first_change_restores_the_default(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    admin.change("promote", version=1)
    status = admin.change("rollback")
    assert (status["revision"], status["weights"]) == (2, {"2": 100})
    assert_everywhere(gateway, grpc_infer, Served(2, 2))


def test_if_revision_applies_a_change_only_at_that_revision(admin: Admin) -> None:
    assert admin.change("promote", version=1, if_revision=0)["revision"] == 1
    reply = admin.call("POST", TRAFFIC, {"op": "promote", "version": 2, "if_revision": 0})
    assert reply.status == 409
    assert reply.error() == "model 'add_sub' is at revision 1, not 0"
    status = admin.status()
    assert (status["revision"], status["weights"]) == (1, {"1": 100})
    assert admin.change("promote", version=2, if_revision="1")["revision"] == 2


def test_shadow_mirrors_every_request_and_leaves_primary_answers_alone(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    status = admin.change("shadow", version=1, percent=100)
    assert (status["revision"], status["weights"], status["shadow"]) == (
        1,
        {"2": 100},
        {"version": 1, "percent": 100.0},
    )
    # Primary answers: version 2, the right outputs, the shadow's revision.
    assert_everywhere(gateway, grpc_infer, Served(2, 1), times=15)
    mirrored = 30

    def compared() -> dict[str, Any] | None:
        stats: dict[str, Any] | None = admin.status()["shadow_stats"].get("1")
        if stats and stats["requests"] == mirrored and stats["exact_match_rate"] == 1.0:
            return stats
        return None

    stats = eventually(compared, "every mirrored answer compared")
    assert stats["requests"] == mirrored
    assert stats["errors"] == 0
    assert 0.0 <= stats["exact_match_rate"] <= 1.0
    assert stats["mean_abs_diff"] >= 0.0
    # Versions 1 and 2 are the same graph: every answer agrees exactly.
    assert (stats["exact_match_rate"], stats["mean_abs_diff"]) == (1.0, 0.0)
    assert set(admin.status()["shadow_stats"]) == {"1"}

    # The mirrored copies really ran on version 1, which no client asked for.
    def version_1_count() -> bool:
        reply = http_call(gateway, "GET", f"/v2/models/{MODEL}/versions/1/stats")
        return bool(reply.json()["model_stats"][0]["inference_count"] == mirrored)

    eventually(version_1_count, "version 1 ran every mirrored request")

    status = admin.change("clear_shadow")
    assert (status["revision"], status["shadow"]) == (2, None)
    assert_everywhere(gateway, grpc_infer, Served(2, 2), times=5)
    assert admin.status()["shadow_stats"]["1"]["requests"] == mirrored


def test_shadow_percent_defaults_to_100(admin: Admin) -> None:
    assert admin.change("shadow", version=1)["shadow"] == {"version": 1, "percent": 100.0}


# -- explicit versions and sticky keys ------------------------------------------------------


def test_a_request_may_name_its_version_unless_the_policy_forbids_it(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    assert http_served(gateway, version="1") == Served(1, 0)
    assert http_served(gateway, headers={"x-turnout-version": "1"}) == Served(1, 0)
    assert grpc_infer(version="1") == Served(1, 0)
    assert grpc_infer(metadata=[("x-turnout-version", "1")]) == Served(1, 0)
    # The OIP version (path or field) wins over the header.
    assert http_served(gateway, version="2", headers={"x-turnout-version": "1"}) == Served(2, 0)
    assert grpc_infer(version="2", metadata=[("x-turnout-version", "1")]) == Served(2, 0)

    admin.change("set", weights={"2": 100}, allow_explicit_version=False)
    message = "model 'add_sub' does not allow requests to name a version (policy revision 1)"
    for reply in (
        infer_http(gateway, version="1"),
        infer_http(gateway, headers={"x-turnout-version": "1"}),
        infer_http(gateway, version="2"),
    ):
        assert reply.status == 403
        assert reply.error() == message
    for error in (
        grpc_infer.refused(version="1"),
        grpc_infer.refused(metadata=[("x-turnout-version", "1")]),
    ):
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == message
    assert_everywhere(gateway, grpc_infer, Served(2, 1), times=3)

    admin.change("set", weights={"2": 100}, allow_explicit_version=True)
    assert http_served(gateway, version="1") == Served(1, 2)


def test_a_routing_key_keeps_one_version_on_every_transport(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    admin.change("set", weights={"1": 50, "2": 50})
    policy = TrafficPolicy(model=MODEL, weights={1: 50, 2: 50})
    keys = [f"user-{i}" for i in range(40)]
    expected = {key: route(policy, key_point(MODEL, key)).version for key in keys}
    assert set(expected.values()) == {1, 2}
    for key, version in expected.items():
        want = Served(version, 1)
        for _ in range(3):
            assert http_served(gateway, headers={"x-turnout-routing-key": key}) == want, key
            assert grpc_infer(metadata=[("x-turnout-routing-key", key)]) == want, key
        assert http_served(gateway, parameters={"routing_key": key}) == want, key
        assert grpc_infer(routing_key=key) == want, key

    # The header (or metadata) wins over the parameter.
    one = next(k for k, v in expected.items() if v == 1)
    two = next(k for k, v in expected.items() if v == 2)
    headers = {"x-turnout-routing-key": one}
    assert http_served(gateway, headers=headers, parameters={"routing_key": two}).version == 1
    assert grpc_infer(metadata=[("x-turnout-routing-key", two)], routing_key=one).version == 2

    reply = infer_http(gateway, parameters={"routing_key": 5})
    assert reply.status == 400
    assert reply.error() == "parameters.routing_key must be a non-empty string"


# -- loading and unloading versions ---------------------------------------------------------


def test_unload_is_refused_while_a_version_has_traffic_and_load_brings_it_back(
    gateway: GatewayThread, admin: Admin, grpc_infer: GrpcInfer
) -> None:
    reply = admin.call("POST", f"models/{MODEL}/versions/2/unload")
    assert reply.status == 409
    assert reply.error() == (
        "model 'add_sub' version 2 has traffic under revision 0; move traffic away first "
        "(promote, set, clear_shadow)"
    )

    assert admin.ok("POST", f"models/{MODEL}/versions/1/unload") == {
        "model": MODEL,
        "unloaded": 1,
        "loaded_versions": [2],
    }
    assert admin.status()["loaded_versions"] == [2]
    reply = infer_http(gateway, version="1")
    assert reply.status == 404
    assert "has no version 1" in reply.error()
    reply = admin.call("POST", TRAFFIC, {"op": "set", "weights": {"1": 50, "2": 50}})
    assert reply.status == 400
    assert reply.error() == ("model 'add_sub' version(s) 1 not loaded (loaded: 2); load them first")
    reply = admin.call("POST", f"models/{MODEL}/versions/1/unload")
    assert reply.status == 404
    assert reply.error() == "model 'add_sub' version 1 is not loaded"

    # Loading pins the implicit "highest version" policy first (revision 1), so the newly
    # loaded version gets no traffic until a policy change gives it some.
    status = admin.ok("POST", f"models/{MODEL}/versions/1/load")
    assert (status["revision"], status["loaded_versions"]) == (1, [1, 2])
    assert status["weights"] == {"2": 100}
    assert http_served(gateway) == Served(2, 1)
    assert http_served(gateway, version="1") == Served(1, 1)
    assert grpc_infer(version="1") == Served(1, 1)
    reply = admin.call("POST", f"models/{MODEL}/versions/1/load")
    assert reply.status == 409
    assert reply.error() == "model 'add_sub' version 1 is already loaded"
    reply = admin.call("POST", f"models/{MODEL}/versions/9/load")
    assert reply.status == 404
    assert reply.error() == "model 'add_sub' version 9 is not in the repository"
    assert admin.status()["revision"] == 1
    [pin] = admin.history()
    assert (pin["operation"], pin["actor"]) == ("set", "turnout (pin before load)")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"op": "set", "weights": {"2": 100}, "standby": 1}, id="standby"),
        pytest.param({"op": "shadow", "version": 1, "percent": 5}, id="shadow"),
        pytest.param({"op": "set", "weights": {"1": 1, "2": 99}}, id="canary"),
    ],
)
def test_unload_is_refused_for_standby_shadow_and_canary_versions(
    admin: Admin, change: dict[str, Any]
) -> None:
    revision = admin.ok("POST", f"models/{MODEL}/traffic", change)["revision"]
    reply = admin.call("POST", f"models/{MODEL}/versions/1/unload")
    assert reply.status == 409
    assert f"version 1 has traffic under revision {revision}" in reply.error()
    assert admin.status()["loaded_versions"] == [1, 2]


def test_unload_drains_requests_in_flight(gateway: GatewayThread, admin: Admin) -> None:
    """Requests naming version 1 keep coming while it is unloaded: each is either answered
    by version 1 or refused with 404 once it is gone; none fails half-way."""
    replies: list[Reply] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            reply = infer_http(gateway, version="1")
            with lock:
                replies.append(reply)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: len(replies) >= 40, "requests to version 1 answered")
        assert admin.ok("POST", f"models/{MODEL}/versions/1/unload")["loaded_versions"] == [2]
        with lock:
            unloaded_at = len(replies)
        eventually(lambda: len(replies) >= unloaded_at + 40, "requests after the unload")
    finally:
        stop.set()
        for thread in threads:
            thread.join(CALL_TIMEOUT_S)
    results = [
        (200, served_http(r).version) if r.status == 200 else (r.status, None) for r in replies
    ]
    assert set(results) <= {(200, 1), (404, None)}, set(results)
    for reply in replies:
        if reply.status == 404:
            assert reply.error() == "model 'add_sub' has no version 1 (loaded: 2)"
    assert results[:40] == [(200, 1)] * 40
    assert results[-20:] == [(404, None)] * 20


# -- reading: history and the list of models ------------------------------------------------


def test_history_records_every_change_and_the_list_shows_every_model(
    gateway: GatewayThread, admin: Admin
) -> None:
    started = time.time()
    admin.change("set", weights={"1": 90, "2": 10})
    admin.change("set", weights={"2": 100}, standby=1)
    admin.change("switch")
    admin.change("shadow", version=2, percent=10)
    admin.change("clear_shadow")
    admin.change("promote", version=2)
    admin.change("rollback")
    history = admin.history()
    assert [(e["revision"], e["operation"], e["actor"]) for e in history] == [
        (1, "set", "ops"),
        (2, "set", "ops"),
        (3, "switch", "ops"),
        (4, "shadow", "ops"),
        (5, "clear_shadow", "ops"),
        (6, "promote", "ops"),
        (7, "rollback", "ops"),
    ]
    assert history[0]["old"]["revision"] == 0 and history[0]["old"]["weights"] == {"2": 100}
    for older, newer in itertools.pairwise(history):
        assert newer["old"] == older["new"]
        assert older["time"] <= newer["time"]
    assert started - 1 <= history[0]["time"] <= time.time() + 1
    status = admin.status()
    assert history[-1]["new"] == {k: status[k] for k in history[-1]["new"]}
    # Rollback restored revision 5's policy: blue-green with version 1 active.
    assert (status["weights"], status["standby"], status["shadow"]) == ({"1": 100}, 2, None)

    models = admin.ok("GET", "models")["models"]
    served = {m.spec.name for m in gateway.gateway.models.loaded()}
    assert [m["model"] for m in models] == sorted(served)
    by_name = {m["model"]: m for m in models}
    assert by_name[MODEL] == admin.status()
    assert by_name[MODEL]["revision"] == 7
    assert {m["revision"] for name, m in by_name.items() if name != MODEL} == {0}


# -- refused admin requests -----------------------------------------------------------------


@pytest.fixture(scope="module")
def untouched(repository: Path) -> Iterator[GatewayThread]:
    """A gateway no test may change: every request sent to it is refused."""
    with running(local_settings(repository, admin_tokens=TOKENS)) as server:
        yield server


@dataclass(frozen=True)
class Refusal:
    method: str
    path: str
    body: Any
    status: int
    words: tuple[str, ...]
    token: str | None = ADMIN_TOKEN


def refusal(
    case_id: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    *words: str,
    token: str | None = ADMIN_TOKEN,
) -> Any:
    return pytest.param(Refusal(method, path, body, status, words, token), id=case_id)


def post(case_id: str, body: Any, status: int, *words: str, token: str | None = ADMIN_TOKEN) -> Any:
    """A POST to add_sub's traffic (a change operation)."""
    return refusal(case_id, "POST", TRAFFIC, body, status, *words, token=token)


def put(case_id: str, weights: Any, status: int, *words: str, **fields: Any) -> Any:
    """A PUT of add_sub's weights (op "set")."""
    return refusal(case_id, "PUT", TRAFFIC, {"weights": weights, **fields}, status, *words)


REFUSALS = [
    # the request itself
    post("malformed-json", b'{"op": "set", "weights": ', 400, "malformed JSON in request body"),
    post("not-an-object", b"[1, 2]", 400, "request body must be a JSON object"),
    post("no-op", {"weights": {"2": 100}}, 400, "'op' is required", "set, switch"),
    post(
        "unknown-op",
        {"op": "explode"},
        400,
        "unknown operation 'explode'",
        "set, switch, promote, rollback, shadow, clear_shadow",
    ),
    refusal("put-malformed", "PUT", TRAFFIC, b"{weights", 400, "malformed JSON"),
    refusal("unknown-route", "GET", f"{TRAFFIC}/nope", None, 404, "no admin route"),
    refusal("unknown-method", "DELETE", TRAFFIC, None, 404, "no admin route for DELETE"),
    # weights
    post(
        "sum-90",
        {"op": "set", "weights": {"1": 60, "2": 30}},
        400,
        "weights must sum to 100, they sum to 90",
        "'add_sub'",
    ),
    put("sum-110-put", {"1": 60, "2": 50}, 400, "weights must sum to 100, they sum to 110"),
    post(
        "negative",
        {"op": "set", "weights": {"1": 110, "2": -10}},
        400,
        "weight of version 2 is negative (-10)",
    ),
    post("no-weights", {"op": "set"}, 400, "weights must be an object of version -> percent"),
    put("weights-list", [100], 400, "weights must be an object"),
    put("weight-not-int", {"2": 99.5, "1": 0.5}, 400, "weights[2] must be an integer, got 99.5"),
    put("version-not-int", {"two": 100}, 400, "weights version must be an integer, got 'two'"),
    put("version-0", {"0": 100}, 400, "version 0 is not a positive integer"),
    put("unknown-version", {"2": 50, "3": 50}, 400, "version(s) 3 not loaded", "loaded: 1, 2"),
    put(
        "explicit-not-bool",
        {"2": 100},
        400,
        "allow_explicit_version must be true or false",
        allow_explicit_version="no",
    ),
    # blue-green
    post(
        "switch-no-standby",
        {"op": "switch"},
        400,
        "model 'add_sub' has no standby version to switch to",
    ),
    put("standby-active", {"2": 100}, 400, "standby version 2 is also the active one", standby=2),
    put(
        "standby-two-active",
        {"1": 50, "2": 50},
        400,
        "blue-green needs exactly one active version",
        standby=1,
    ),
    put("standby-unknown", {"2": 100}, 400, "version(s) 5 not loaded", standby=5),
    put("standby-0", {"2": 100}, 400, "standby", "greater than or equal to 1", standby=0),
    # promote, rollback, shadow
    post("promote-no-version", {"op": "promote"}, 400, "version must be an integer, got None"),
    post("promote-unknown", {"op": "promote", "version": 7}, 400, "version(s) 7 not loaded"),
    post(
        "rollback-no-history",
        {"op": "rollback"},
        400,
        "model 'add_sub' has no earlier revision to roll back to",
    ),
    post("shadow-unknown", {"op": "shadow", "version": 4}, 400, "version(s) 4 not loaded"),
    post("shadow-0%", {"op": "shadow", "version": 1, "percent": 0}, 400, "shadow.percent"),
    post("shadow-200%", {"op": "shadow", "version": 1, "percent": 200}, 400, "shadow.percent"),
    post("shadow-no-version", {"op": "shadow"}, 400, "version must be an integer"),
    # revisions
    post(
        "if-revision-stale",
        {"op": "promote", "version": 1, "if_revision": 5},
        409,
        "model 'add_sub' is at revision 0, not 5",
    ),
    put("if-revision-put", {"1": 100}, 409, "at revision 0, not 3", if_revision=3),
    post(
        "if-revision-bad",
        {"op": "promote", "version": 1, "if_revision": "latest"},
        400,
        "if_revision must be an integer, got 'latest'",
    ),
    # models and versions
    refusal(
        "unknown-model-status",
        "GET",
        "models/nope/traffic",
        None,
        404,
        "model 'nope' is not served",
    ),
    refusal(
        "unknown-model-set",
        "POST",
        "models/nope/traffic",
        {"op": "promote", "version": 1},
        404,
        "model 'nope' is not served",
    ),
    refusal(
        "unknown-model-history",
        "GET",
        "models/nope/traffic/history",
        None,
        404,
        "model 'nope' is not served",
    ),
    refusal(
        "unknown-model-load",
        "POST",
        "models/nope/versions/1/load",
        None,
        404,
        "'nope'",
        "not in the repository",
    ),
    refusal(
        "unload-in-use",
        "POST",
        f"models/{MODEL}/versions/2/unload",
        None,
        409,
        "version 2 has traffic under revision 0",
    ),
    refusal(
        "unload-unknown",
        "POST",
        f"models/{MODEL}/versions/3/unload",
        None,
        404,
        "version 3 is not loaded",
    ),
    refusal(
        "load-loaded",
        "POST",
        f"models/{MODEL}/versions/2/load",
        None,
        409,
        "version 2 is already loaded",
    ),
    refusal(
        "load-bad-version",
        "POST",
        f"models/{MODEL}/versions/v2/load",
        None,
        404,
        "versions are integers >= 1",
    ),
    # tokens
    refusal("no-token", "GET", TRAFFIC, None, 401, "missing bearer token", token=None),
    post(
        "no-token-change", {"op": "promote", "version": 1}, 401, "missing bearer token", token=None
    ),
    post(
        "wrong-token", {"op": "promote", "version": 1}, 401, "invalid bearer token", token="x" * 24
    ),
    refusal("wrong-token-list", "GET", "models", None, 401, "invalid bearer token", token="o" * 23),
    post(
        "infer-token",
        {"op": "promote", "version": 1},
        403,
        "token 'app' has role 'infer', not 'admin'",
        token=INFER_TOKEN,
    ),
    refusal(
        "infer-token-unload",
        "POST",
        f"models/{MODEL}/versions/1/unload",
        None,
        403,
        "role 'infer'",
        token=INFER_TOKEN,
    ),
    refusal(
        "infer-token-read",
        "GET",
        f"{TRAFFIC}/history",
        None,
        403,
        "role 'infer'",
        token=INFER_TOKEN,
    ),
]


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_admin_requests(untouched: GatewayThread, case: Refusal) -> None:
    admin = Admin(untouched)
    before = admin.status()
    reply = admin.call(case.method, case.path, case.body, token=case.token)
    assert reply.status == case.status, reply.body
    message = reply.error()
    missing = [w for w in case.words if w not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    after = admin.status()
    assert after == before
    assert after["revision"] == 0
    assert after["loaded_versions"] == [1, 2]
    assert admin.history() == []


def test_bearer_scheme_is_required(untouched: GatewayThread) -> None:
    for authorization in (ADMIN_TOKEN, f"Basic {ADMIN_TOKEN}", "Bearer", "Bearer "):
        reply = http_call(
            untouched, "GET", f"/admin/v1/{TRAFFIC}", headers={"authorization": authorization}
        )
        assert reply.status == 401, authorization
        assert "bearer token" in reply.error()
    # The scheme is case-insensitive, as in RFC 7235.
    reply = http_call(
        untouched, "GET", f"/admin/v1/{TRAFFIC}", headers={"authorization": f"bearer {ADMIN_TOKEN}"}
    )
    assert reply.status == 200


# -- inference tokens -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(repository: Path) -> Iterator[GatewayThread]:
    server = GatewayThread(
        local_settings(repository, admin_tokens=TOKENS, require_infer_token=True)
    )
    yield server
    server.stop()


def test_require_infer_token_over_http(locked: GatewayThread) -> None:
    reply = infer_http(locked)
    assert reply.status == 401
    assert reply.error() == "missing bearer token (header 'authorization: Bearer <token>')"
    reply = infer_http(locked, headers=bearer("z" * 24))
    assert reply.status == 401
    assert reply.error() == "invalid bearer token"
    assert served_http(infer_http(locked, headers=bearer(INFER_TOKEN))) == Served(2, 0)
    assert served_http(infer_http(locked, headers=bearer(ADMIN_TOKEN))) == Served(2, 0)
    # The infer token still may not administer.
    reply = Admin(locked, INFER_TOKEN).call("POST", TRAFFIC, {"op": "promote", "version": 1})
    assert reply.status == 403


def test_require_infer_token_over_grpc(locked: GatewayThread) -> None:
    client = GrpcInfer(locked)
    try:
        error = client.refused()
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert client(metadata=[("authorization", f"Bearer {INFER_TOKEN}")]) == Served(2, 0)
    finally:
        client.close()
