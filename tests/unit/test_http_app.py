"""The HTTP adapter's routing, driven through ASGI directly (no server): every route, its
method, 404/405, the inference path with its headers, and a 500 that hides the cause."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import model_zoo
import orjson
import pytest

from gateway.backends.local import LocalBackend
from gateway.dataplane import DataPlane
from gateway.http.app import HttpApp
from gateway.models import ModelTable
from gateway.repository import Repository
from gateway.settings import ServerSettings

INFER = {
    "inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
    ]
}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[HttpApp]:
    model_zoo.write_repository(tmp_path, {"add_sub": (model_zoo.add_sub, {}, [1, 2])})
    models = ModelTable(Repository(tmp_path, ServerSettings()), LocalBackend())
    await models.start()
    yield HttpApp(DataPlane(models), max_request_bytes=1 << 20)
    await models.stop()


async def call(
    app: HttpApp, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str], Any]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, content = sent
    answer = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], answer, orjson.loads(content["body"])


@pytest.mark.parametrize(
    ("path", "status", "key"),
    [
        ("/v2", 200, "extensions"),
        ("/v2/health/live", 200, "live"),
        ("/v2/health/ready", 200, "ready"),
        ("/v2/models/stats", 200, "model_stats"),
        ("/v2/models/add_sub", 200, "versions"),
        ("/v2/models/add_sub/versions/1", 200, "versions"),
        ("/v2/models/add_sub/ready", 200, "ready"),
        ("/v2/models/add_sub/versions/2/stats", 200, "model_stats"),
        ("/v2/models/nope", 404, "error"),
        ("/v2/models/add_sub/versions/9", 404, "error"),
        ("/v2/models/add_sub/versions//infer", 404, "error"),
        ("/v2/elsewhere", 404, "error"),
        ("/v3", 404, "error"),
        ("/metrics", 404, "error"),  # no registry given: not served
    ],
)
async def test_get_routes(app: HttpApp, path: str, status: int, key: str) -> None:
    got, _, document = await call(app, "GET", path)
    assert (got, key in document) == (status, True), document


async def test_model_metadata_lists_every_version(app: HttpApp) -> None:
    _, _, document = await call(app, "GET", "/v2/models/add_sub")
    assert document["versions"] == ["1", "2"]
    assert [t["name"] for t in document["inputs"]] == ["a", "b"]


async def test_a_wrong_method_is_405_with_allow(app: HttpApp) -> None:
    status, headers, document = await call(app, "POST", "/v2/health/live")
    assert (status, headers["allow"]) == (405, "GET")
    assert "use GET" in document["error"]
    status, headers, _ = await call(app, "GET", "/v2/models/add_sub/infer")
    assert (status, headers["allow"]) == (405, "POST")


async def test_infer_answers_with_version_revision_and_traceparent(app: HttpApp) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    status, headers, document = await call(
        app, "POST", "/v2/models/add_sub/infer", orjson.dumps(INFER), traceparent=parent
    )
    assert status == 200, document
    assert document["model_version"] == "2"
    assert headers["x-turnout-revision"] == "0"
    assert headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert headers["traceparent"] != parent
    outputs = {o["name"]: o["data"] for o in document["outputs"]}
    assert outputs["sum"] == [2, 3, 4, 5]


async def test_the_version_header_and_path_version_pick_the_version(app: HttpApp) -> None:
    body = orjson.dumps(INFER)
    _, _, by_path = await call(app, "POST", "/v2/models/add_sub/versions/1/infer", body)
    _, _, by_header = await call(
        app, "POST", "/v2/models/add_sub/infer", body, x_turnout_version="1"
    )
    assert by_path["model_version"] == by_header["model_version"] == "1"


async def test_bad_bodies_are_400_and_carry_a_traceparent(app: HttpApp) -> None:
    status, headers, document = await call(app, "POST", "/v2/models/add_sub/infer", b"{")
    assert status == 400 and "traceparent" in headers
    assert "error" in document


async def test_an_unexpected_failure_is_500_with_an_incident_id_only(
    app: HttpApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr("gateway.metadata.server_metadata", broken)
    status, _, document = await call(app, "GET", "/v2")
    assert status == 500
    assert "secret" not in document["error"] and "incident" in document["error"]
