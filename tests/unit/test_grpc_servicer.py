"""The gRPC adapter with a fake servicer context (the seam grpc.aio hands in): the six RPCs
convert and delegate, metadata names the version, the answer's trailers carry the
traceparent and revision, and one error mapping keeps each code and hides internals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import model_zoo
import pytest
from gateways import add_sub_request

from gateway.backends.local import LocalBackend
from gateway.dataplane import DataPlane
from gateway.errors import ModelNotFound
from gateway.grpc.messages import message
from gateway.grpc.servicer import InferenceServicer, guarded
from gateway.models import ModelTable
from gateway.repository import Repository
from gateway.settings import ServerSettings

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, **metadata: str | bytes) -> None:
        self.metadata = tuple(metadata.items())
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.metadata

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


@pytest.fixture
async def servicer(tmp_path: Path) -> AsyncIterator[InferenceServicer]:
    model_zoo.write_repository(tmp_path, {"add_sub": (model_zoo.add_sub, {}, [1, 2])})
    models = ModelTable(Repository(tmp_path, ServerSettings()), LocalBackend())
    await models.start()
    yield InferenceServicer(DataPlane(models))
    await models.stop()


async def test_health_and_metadata(servicer: InferenceServicer) -> None:
    context: Any = FakeContext()
    assert (await servicer.server_live(None, context)).live
    assert (await servicer.server_ready(None, context)).ready
    ready = await servicer.model_ready(message("ModelReadyRequest")(name="add_sub"), context)
    assert ready.ready
    meta = await servicer.server_metadata(None, context)
    assert meta.name == "turnout" and "statistics" in meta.extensions
    model = await servicer.model_metadata(message("ModelMetadataRequest")(name="add_sub"), context)
    assert list(model.versions) == ["1", "2"] and [t.name for t in model.inputs] == ["a", "b"]


async def test_infer_continues_the_trace_and_reads_the_version_from_metadata(
    servicer: InferenceServicer,
) -> None:
    context: Any = FakeContext(traceparent=PARENT, **{"x-turnout-version": "1", "x-bin": b"\0"})
    response = await servicer.model_infer(add_sub_request("add_sub", [1] * 4, [2] * 4), context)
    assert response.model_version == "1"
    trailers = dict(context.trailers)
    assert trailers["x-turnout-revision"] == "0"
    assert trailers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")


async def test_guarded_keeps_each_code_and_hides_unexpected_failures() -> None:
    async def missing(request: Any, context: Any) -> Any:
        raise ModelNotFound("model 'x' is not served")

    async def broken(request: Any, context: Any) -> Any:
        raise RuntimeError("secret internals")

    context: Any = FakeContext()
    with pytest.raises(Aborted):
        await guarded(missing)(None, context)
    assert (context.code, context.details) == (grpc.StatusCode.NOT_FOUND, "model 'x' is not served")
    with pytest.raises(Aborted):
        await guarded(broken)(None, context)
    assert context.code == grpc.StatusCode.INTERNAL
    assert "secret" not in context.details and "incident" in context.details
