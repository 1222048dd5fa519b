"""The data plane: one record per request to every observer, refusals before routing
included; in-flight requests come back down however a request ends, cancelled ones too;
the inference token is checked in the data plane for both transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import model_zoo
import numpy as np
import pytest

from gateway.auth import Token, TokenAuth
from gateway.backends.local import LocalBackend
from gateway.context import RequestContext, decoded
from gateway.dataplane import UNKNOWN_MODEL, DataPlane
from gateway.errors import InvalidInput, ModelNotFound, QueueFull, Unauthenticated
from gateway.metrics import RequestMetrics
from gateway.models import ModelTable
from gateway.repository import Repository
from gateway.settings import ServerSettings
from gateway.types import InferInput, InferRequest
from turnout_contract.records import SERVER, RequestRecord

LAZY = {"max_batch_size": 4, "max_queue_delay_us": 10_000_000}
TOKEN = "infer-token-0123456789"


def request(model: str) -> InferRequest:
    row = np.ones((1, 4), np.float32)
    return InferRequest(
        model_name=model,
        inputs=[InferInput("a", "FP32", (1, 4), row), InferInput("b", "FP32", (1, 4), row)],
    )


def context(model: str, **headers: str) -> RequestContext:
    return RequestContext.arrived("http", model, headers, f"/v2/models/{model}/infer")


@pytest.fixture
async def table(tmp_path: Path) -> AsyncIterator[ModelTable]:
    model_zoo.write_repository(
        tmp_path,
        {"add_sub": (model_zoo.add_sub, {}, [1]), "lazy": (model_zoo.add_sub, LAZY, [1])},
    )
    models = ModelTable(Repository(tmp_path, ServerSettings()), LocalBackend())
    await models.start()
    yield models
    await models.stop()


async def test_every_request_ends_as_one_record_for_every_observer(table: ModelTable) -> None:
    seen: list[RequestRecord] = []
    also: list[RequestRecord] = []
    plane = DataPlane(table, observers=[seen.append, also.append])
    response = await plane.infer(context("add_sub"), decoded(request("add_sub")))
    assert response.model_version == "1"
    bad = request("add_sub")
    bad.inputs.pop()
    with pytest.raises(InvalidInput):
        await plane.infer(context("add_sub"), decoded(bad))
    with pytest.raises(ModelNotFound):
        await plane.infer(context("nope"), decoded(request("nope")))
    assert seen == also and len(seen) == 3
    ok, invalid, unknown = seen
    assert (ok.model, ok.version, ok.arm, ok.status, ok.kind) == (
        "add_sub",
        1,
        "primary",
        200,
        SERVER,
    )
    assert ok.rows == 1 and ok.outputs() is not None
    # Its tensors are its batch's (it was alone in it): the stacked inputs, the outputs.
    tensors = ok.batch_tensors()
    assert tensors is not None and tensors.rows == 1 and set(tensors.inputs) == {"a", "b"}
    assert ok.timing is not None and ok.timing.row == 0
    assert ok.timing is not None and ok.timing.batch_size == 1
    assert ok.protocol == "http" and ok.path == "/v2/models/add_sub/infer"
    assert ok.total_s > 0 and ok.entered >= ok.received
    assert (invalid.version, invalid.status, invalid.rows) == (1, 400, 0)
    assert invalid.batch_tensors() is None and invalid.outputs() is None
    assert "missing input" in invalid.error
    assert (unknown.model, unknown.version, unknown.status) == (UNKNOWN_MODEL, -1, 404)


async def test_refusals_before_decoding_are_counted_like_any_request(table: ModelTable) -> None:
    metrics = RequestMetrics()
    auth = TokenAuth([Token("client", TOKEN, "infer")])
    plane = DataPlane(table, observers=[metrics.observe], auth=auth)
    decodes = 0

    async def decode() -> InferRequest:
        nonlocal decodes
        decodes += 1
        return request("add_sub")

    with pytest.raises(Unauthenticated):
        await plane.infer(context("add_sub"), decode)
    assert decodes == 0  # refused before the body is read
    await plane.infer(context("add_sub", authorization=f"Bearer {TOKEN}"), decode)
    with pytest.raises(Unauthenticated):
        await plane.infer(context("nope", authorization="Bearer wrong"), decode)
    assert metrics.requests == {
        ("add_sub", "", "", "http", 401): 1,
        ("add_sub", "1", "primary", "http", 200): 1,
        (UNKNOWN_MODEL, "", "", "http", 401): 1,
    }
    assert sum(h.counts[-1] for h in metrics.durations.values()) == 0
    assert list(metrics.durations) == [("add_sub", "1", "primary")]


async def test_headers_name_the_version_and_the_routing_key(table: ModelTable) -> None:
    plane = DataPlane(table)
    ctx = context("add_sub", **{"x-turnout-version": "1", "x-turnout-routing-key": "user-7"})
    response = await plane.infer(ctx, decoded(request("add_sub")))
    assert (response.model_version, response.arm) == ("1", "explicit")


async def test_in_flight_returns_to_zero_after_success_failure_and_cancellation(
    table: ModelTable,
) -> None:
    # A lone request waits 10 s for company: long enough to be cancelled while queued.
    metrics = RequestMetrics()
    plane = DataPlane(table, observers=[metrics.observe])
    entered = asyncio.Event()
    original = table.versions["lazy"][1].batcher.submit

    def submit(*args: object, **kwargs: object) -> object:
        entered.set()
        return original(*args, **kwargs)  # type: ignore[arg-type]

    table.versions["lazy"][1].batcher.submit = submit  # type: ignore[method-assign]
    waiting = asyncio.ensure_future(plane.infer(context("lazy"), decoded(request("lazy"))))
    await asyncio.wait_for(entered.wait(), 5)
    assert plane.in_flight["lazy"] == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert plane.in_flight["lazy"] == 0
    bad = request("lazy")
    bad.inputs.pop()
    await asyncio.gather(plane.infer(context("lazy"), decoded(bad)), return_exceptions=True)
    assert plane.in_flight["lazy"] == 0
    assert metrics.requests[("lazy", "1", "primary", "http", 400)] == 1


async def test_a_full_queue_refuses_before_the_body_is_decoded(tmp_path: Path) -> None:
    model_zoo.write_repository(
        tmp_path, {"tiny": (model_zoo.add_sub, {**LAZY, "max_queue_size": 2}, [1])}
    )
    models = ModelTable(Repository(tmp_path, ServerSettings()), LocalBackend())
    await models.start()
    seen: list[RequestRecord] = []
    plane = DataPlane(models, observers=[seen.append])
    decodes = 0

    async def counting_decode() -> InferRequest:
        nonlocal decodes
        decodes += 1
        return request("tiny")

    try:
        waiting = [
            asyncio.ensure_future(plane.infer(context("tiny"), counting_decode)) for _ in range(2)
        ]
        await asyncio.sleep(0.05)  # both queued: the lazy batcher waits 10 s for company
        assert decodes == 2 and models.get("tiny").batcher.queue_depth == 2
        with pytest.raises(QueueFull, match="model 'tiny' queue is full"):
            await plane.infer(context("tiny"), counting_decode)
        assert decodes == 2  # refused on the queue's state alone: the body was never read
        refusal = seen[-1]
        assert (refusal.model, refusal.version, refusal.status) == ("tiny", -1, 429)
    finally:
        await models.stop()  # drains the two waiting requests
    answers = await asyncio.gather(*waiting)
    assert [a.model_version for a in answers] == ["1", "1"]


async def test_a_refusal_names_the_versions_loaded_now(tmp_path: Path) -> None:
    """The queue-full message is kept per model, and made again when a version comes or
    goes."""
    model_zoo.write_repository(
        tmp_path, {"tiny": (model_zoo.add_sub, {**LAZY, "max_queue_size": 2}, [1, 2])}
    )
    repository = Repository(tmp_path, ServerSettings())
    models = ModelTable(repository, LocalBackend())
    await models.start()
    plane = DataPlane(models)
    try:
        first = plane.refuse_from_head(context("tiny")).message
        assert "'tiny/1' 2, 'tiny/2' 2" in first
        assert plane.refuse_from_head(context("tiny")).message == first
        await models.unload("tiny", 2)
        assert "'tiny/1' 2)" in plane.refuse_from_head(context("tiny")).message
        (spec,) = [s for s in repository.read_all() if s.key == "tiny/2"]
        await models.load(spec)
        assert plane.refuse_from_head(context("tiny")).message == first
    finally:
        await models.stop()
