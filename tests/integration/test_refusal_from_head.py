"""Refusing for overload before the body: a request to a model whose every queue is full
is answered 429 from its head alone, recorded like any request, and its connection stays
usable (the unread body is skipped, not parsed as the next request). A real gateway."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from typing import Any

import model_zoo
import orjson
import pytest
from gateways import GatewayThread, local_settings

LAZY = {"max_batch_size": 4, "max_queue_delay_us": 30_000_000, "max_queue_size": 1}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    root = tmp_path_factory.mktemp("overload-models")
    model_zoo.write_repository(
        root,
        {
            "lazy": (model_zoo.add_sub, LAZY, [1]),
            "lazy2": (model_zoo.add_sub, {**LAZY, "max_queue_size": 2}, [1]),
            "roomy": (model_zoo.add_sub, {**LAZY, "max_queue_size": 8}, [1]),
            "quick": (model_zoo.add_sub, {"max_batch_size": 4}, [1]),
        },
    )
    server = GatewayThread(local_settings(root))
    yield server
    server.stop()


def infer_body(padding: int = 0) -> bytes:
    row = [1.0, 2.0, 3.0, 4.0]
    inputs = [{"name": n, "datatype": "FP32", "shape": [1, 4], "data": row} for n in "ab"]
    return orjson.dumps({"inputs": inputs, "parameters": {"pad": "x" * padding}})


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    writer.write(head.encode() + body)
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    data = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, data


def post(path: str, body: bytes) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )


async def refused_then_served(port: int) -> None:
    waiting_reader, waiting_writer = await asyncio.open_connection("127.0.0.1", port)
    body = infer_body()
    waiting_writer.write(post("/v2/models/lazy/infer", body).encode() + body)  # fills it
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(100):  # until the first request is queued
            big = infer_body(padding=200_000)
            status, headers, data = await exchange(
                reader, writer, post("/v2/models/lazy/versions/1/infer", big), big
            )
            if status == 429:
                break
            await asyncio.sleep(0.02)
        assert status == 429, data
        assert headers["retry-after"] == "1" and "traceparent" in headers and "date" in headers
        assert "model 'lazy' queue is full" in orjson.loads(data)["error"]
        assert "'lazy/1' 1" in orjson.loads(data)["error"]
        # A refusal continues the caller's trace: each is its own span of that trace (the
        # rest of the 429 is kept ready by message, its traceparent is not).
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        spans = set()
        for _ in range(2):
            traced = post("/v2/models/lazy/infer", body).replace(
                "host: t\r\n", f"host: t\r\ntraceparent: {caller}\r\n"
            )
            status, headers, again = await exchange(reader, writer, traced, body)
            assert status == 429 and again == data
            version, trace_id, span, _ = headers["traceparent"].split("-")
            assert (version, trace_id) == ("00", "0af7651916cd43dd8448eb211c80319c")
            spans.add(span)
        assert len(spans) == 2 and "b7ad6b7169203331" not in spans
        # The refused request's 200 kB body was skipped: the next request parses cleanly.
        status, _, data = await exchange(
            reader, writer, "GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n"
        )
        assert status == 200 and orjson.loads(data) == {"ready": True}
    finally:
        writer.close()
        waiting_writer.close()
        del waiting_reader


def test_a_full_model_is_refused_from_the_head_and_the_connection_lives_on(
    gateway: GatewayThread,
) -> None:
    port = gateway.gateway.http_port
    plane = gateway.gateway.dataplane
    from_head: list[object] = []
    refuse = plane.refuse_from_head

    def counting(context: Any) -> Any:
        error = refuse(context)
        if error is not None:
            from_head.append(error)
        return error

    plane.refuse_from_head = counting  # type: ignore[method-assign]
    try:
        asyncio.run(refused_then_served(port))
    finally:
        plane.refuse_from_head = refuse  # type: ignore[method-assign]
    assert from_head, "the refusal did not come from the head"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    refused = [
        line
        for line in text.splitlines()
        if line.startswith("turnout_requests_total{") and 'model="lazy"' in line
        and 'status="429"' in line
    ]  # fmt: skip
    assert refused and float(refused[0].split()[-1]) >= 1


async def crowd(port: int, clients: int) -> tuple[list[int], list[asyncio.StreamWriter]]:
    """``clients`` connections, each sending one request to lazy2 at the same moment; the
    statuses of those answered within a second (the queued ones wait 30 s)."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    body = infer_body()
    request = post("/v2/models/lazy2/infer", body).encode() + body
    for _, writer in connections:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader) -> int | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
        except TimeoutError:
            return None
        return int(head.split()[1])

    answers = await asyncio.gather(*(answer(reader) for reader, _ in connections))
    return [a for a in answers if a is not None], [writer for _, writer in connections]


def test_heads_read_together_keep_places_so_the_rest_are_refused_from_the_head(
    gateway: GatewayThread,
) -> None:
    """20 requests arriving together at a queue of 2: the 2 let in keep their places from
    their heads on, so the other 18 are all refused from the head (none after a task and a
    body), and no place stays kept once they are queued."""
    port = gateway.gateway.http_port
    plane = gateway.gateway.dataplane
    from_head: list[object] = []
    refuse = plane.refuse_from_head

    def counting(context: Any) -> Any:
        from_head.append(context.model)
        return refuse(context)

    async def scenario() -> list[int]:
        statuses, writers = await crowd(port, 20)
        for writer in writers:
            writer.close()
        return statuses

    plane.refuse_from_head = counting  # type: ignore[method-assign]
    try:
        statuses = asyncio.run(scenario())
    finally:
        plane.refuse_from_head = refuse  # type: ignore[method-assign]
    assert statuses == [429] * 18
    assert from_head == ["lazy2"] * 18
    assert plane.arriving == {}


def test_a_request_let_in_on_its_head_gives_its_place_back_when_it_fails(
    gateway: GatewayThread,
) -> None:
    """A kept place is released whatever becomes of the request: a body that is not JSON
    (400) and a version that is not loaded (404) leave nothing kept."""
    port = gateway.gateway.http_port
    plane = gateway.gateway.dataplane
    kept: list[str] = []
    reserve = plane.reserve

    def counting(model: str) -> None:
        kept.append(model)
        reserve(model)

    async def scenario() -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        statuses = []
        for path, body in [
            ("/v2/models/roomy/infer", b"{not json"),
            ("/v2/models/roomy/versions/7/infer", infer_body()),
        ]:
            status, _, _ = await exchange(reader, writer, post(path, body), body)
            statuses.append(status)
        writer.close()
        return statuses

    plane.reserve = counting  # type: ignore[method-assign]
    try:
        statuses = asyncio.run(scenario())
    finally:
        plane.reserve = reserve  # type: ignore[method-assign]
    assert statuses == [400, 404]
    assert kept == ["roomy", "roomy"]
    assert plane.arriving == {}


def test_expect_100_continue_gets_its_interim_answer_before_the_body(
    gateway: GatewayThread,
) -> None:
    """A client that waits for 100 Continue before sending its body gets it at once (the
    connection writes each response's head and body together, but never holds this)."""
    port = gateway.gateway.http_port

    async def scenario() -> tuple[bytes, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = infer_body()
        head = post("/v2/models/quick/infer", body).replace(
            "\r\n\r\n", "\r\nexpect: 100-continue\r\n\r\n"
        )
        writer.write(head.encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(body)
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        return interim, int(raw.split()[1])

    interim, status = asyncio.run(scenario())
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert status == 200
