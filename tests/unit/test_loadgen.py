"""bench/loadgen.py, the chaos bench's clients, against a small asyncio HTTP server: the
open loop sends what is due and counts every answer by status; a request on a kept-alive
connection the server closed is sent again; the kept probe waits the Retry-After it is
sent, the new-connection probe (a new client each time) does not."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from bench import loadgen


class Server:
    """Answers every other request 429 (Retry-After: 1), the rest 200; closes a connection
    after ``close_after`` requests on it, without answering the last (a keep-alive race)."""

    def __init__(self, close_after: int | None = None) -> None:
        self.close_after = close_after
        self.counter = itertools.count()
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if self.close_after is not None and served == self.close_after:
                    break
                served += 1
                self.requests += 1
                refused = next(self.counter) % 2 == 1
                status = b"429 Too Many Requests" if refused else b"200 OK"
                extra = b"retry-after: 1\r\n" if refused else b""
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n" + extra)
                writer.write(b"\r\n{}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def serving() -> AsyncIterator[tuple[int, Server]]:
    server = Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    yield listener.sockets[0].getsockname()[1], server
    listener.close()


async def test_the_open_loop_sends_what_is_due_and_counts_each_answer(
    serving: tuple[int, Server],
) -> None:
    port, server = serving
    result = await loadgen.open_loop("127.0.0.1", port, "/x", b"{}", [(200, 0.5)])
    assert result["sent"] == 100
    assert result["statuses"] == {"200": 50, "429": 50}
    assert server.requests == 100
    assert set(result["latency"]) == {"200", "429"}


async def test_a_request_on_a_connection_the_server_closed_is_sent_again() -> None:
    server = Server(close_after=3)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        result = await loadgen.open_loop("127.0.0.1", port, "/x", b"{}", [(100, 0.3)])
    finally:
        listener.close()
    assert result["sent"] == 30
    assert sum(result["statuses"].values()) == 30 and "error" not in result["statuses"]


async def test_only_the_kept_probe_waits_its_retry_after(serving: tuple[int, Server]) -> None:
    port, _ = serving
    kept = await loadgen.probe("127.0.0.1", port, "/x", b"{}", 0.02, 0.5, kept=True)
    new = await loadgen.probe("127.0.0.1", port, "/x", b"{}", 0.02, 0.5, kept=False)
    # The kept client is told to wait 1 s after its first 429: two requests in 0.5 s.
    assert sum(kept["statuses"].values()) == 2
    # Each new client is answered and goes on at the probe's own pace.
    assert sum(new["statuses"].values()) >= 10
    assert kept["connection"] == "kept" and new["connection"] == "new"


async def test_kept_probe_clients_each_wait_their_own_retry_after(
    serving: tuple[int, Server],
) -> None:
    port, server = serving
    kept = await loadgen.probe("127.0.0.1", port, "/x", b"{}", 0.02, 0.5, kept=True, clients=4)
    # The server alternates 200 and 429 over all connections: each client goes on at the
    # probe's pace until its own first 429, then waits 1 s, past the 0.5 s run.
    assert kept["statuses"]["429"] == 4
    assert kept["clients"] == 4
    assert sum(kept["statuses"].values()) == server.requests
    # Every latency is kept, by outcome, so runs can be pooled.
    assert {k: len(v) for k, v in kept["samples_ms"].items()} == kept["statuses"]


def test_a_schedule_steps_the_rate_and_answers_group_by_the_second_they_were_due() -> None:
    times = loadgen.due_times([(4, 1.0), (8, 0.5)], start=10.0)
    assert times == [10.0, 10.25, 10.5, 10.75, 11.0, 11.125, 11.25, 11.375]
    answers = [(10.1, "200", 5.0), (10.9, "200", 7.0), (11.2, "429", 1.0), (11.3, "200", 9.0)]
    series = loadgen.per_second(answers, start=10.0)
    assert [(s["t"], s["sent"], s["ok"]) for s in series] == [(0, 2, 2), (1, 2, 1)]
    assert series[0]["p50_ms"] == 6.0
    assert series[1]["p99_ms"] == 9.0


async def test_the_grpc_open_loop_reads_each_calls_status_from_its_trailers() -> None:
    """The gRPC open loop against the gateway's own transport (a toy ModelInfer that
    refuses every other call): every call is answered once, with the status it got."""
    import grpc

    from gateway.grpc.messages import message
    from gateway.grpc.transport import GrpcServer
    from gateway.overload import Overload

    response = message("ModelInferResponse")
    request = message("ModelInferRequest")
    turn = itertools.count()

    async def infer(call: object, context: object) -> object:
        return response(model_name="m")

    def admission(call: object, metadata: object) -> object:
        if next(turn) % 2:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, "full", []
        return None

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        },
    )
    path = "/inference.GRPCInferenceService/ModelInfer"
    server = GrpcServer(
        [handler], max_message_bytes=1 << 20, overload=Overload(0.0),
        admissions={path: admission},
    )  # fmt: skip
    port = await server.start("127.0.0.1", 0)
    try:
        body = request(model_name="m").SerializeToString()
        framed = b"\x00" + len(body).to_bytes(4) + body
        result = await loadgen.grpc_open_loop(
            "127.0.0.1", port, "m", framed, [(200.0, 0.5)], connections=2
        )
        probe = await loadgen.grpc_probe(f"127.0.0.1:{port}", "m", 0.05, 0.3, kept=False)
    finally:
        await server.stop(1.0)
    assert result["sent"] == 100 and result["connections"] == 2
    assert result["statuses"] == {"OK": 50, "RESOURCE_EXHAUSTED": 50}
    assert sum(probe["statuses"].values()) >= 3
    assert set(probe["statuses"]) <= {"OK", "RESOURCE_EXHAUSTED"}


def test_a_calls_status_is_read_without_the_decoder_only_where_the_table_is_untouched() -> None:
    """The gRPC open loop reads ``grpc-status`` straight from a block of static indexes and
    plain literals that leave the table alone (what the gateway sends); a block that
    indexes a field, uses Huffman or a table size update goes to the HPACK decoder."""
    from hpack import Encoder

    from gateway.grpc.hpack import HeaderDecoder, encode_headers

    trailers = [
        (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "8"),
        ("grpc-message", "full"), ("traceparent", "00-1-2-01"),
    ]  # fmt: skip
    assert loadgen._grpc_status(encode_headers(trailers)) == "8"
    assert loadgen._grpc_status(encode_headers([(":status", "200")])) is None
    assert loadgen._grpc_status(b"\x88\x00\x0bgrpc-status\x05") is loadgen._UNREAD  # cut
    for huffman in (False, True):
        block = Encoder().encode(trailers, huffman=huffman)  # indexes, maybe Huffman
        assert loadgen._grpc_status(block) is loadgen._UNREAD
        assert dict(HeaderDecoder().decode(block))["grpc-status"] == "8"
    assert loadgen._grpc_status(b"\x3f\xe1\x1f" + encode_headers(trailers)) is loadgen._UNREAD


async def test_the_open_loop_opens_no_more_connections_than_its_pool_holds() -> None:
    """A slow server: requests due while every connection is busy wait for one (their
    latency still counted from when they were due) instead of opening more."""
    server = Server()
    open_now = 0
    most = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        original = writer.write

        def late(data: bytes) -> None:
            asyncio.get_running_loop().call_later(0.02, original, data)

        writer.write = late  # type: ignore[method-assign]
        await server.handle(reader, writer)
        open_now -= 1

    listener = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        result = await loadgen.open_loop(
            "127.0.0.1", port, "/x", b"{}", [(400, 0.25)], max_connections=3
        )
    finally:
        listener.close()
    assert result["connections"] <= 3 and most <= 3
    assert result["statuses"] == {"200": 50, "429": 50}  # every request answered
    # 100 requests due in 0.25 s over 3 connections answering in 20 ms each: the last
    # waited for a connection far longer than one answer takes.
    assert max(v["max_ms"] for v in result["latency"].values()) > 200


def test_the_grpc_open_loop_keeps_to_the_servers_stream_limit() -> None:
    """When the server lowers SETTINGS_MAX_CONCURRENT_STREAMS (the gateway does, while
    overrun), calls past the limit wait, oldest first, and go out as calls end or the
    limit rises: as HTTP/2 clients queue, instead of opening streams the server refuses."""
    import struct

    from gateway.grpc.hpack import encode_headers

    class Transport:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(bytes(data))

    def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
        return loadgen._h2_frame(kind, flags, stream_id, payload)

    def limit(streams: int) -> bytes:
        return frame(0x4, 0, 0, struct.pack(">HL", 0x3, streams))

    run = loadgen._GrpcOpenLoop("127.0.0.1", 1, b"\0\0\0\0\0")
    clients = [loadgen._GrpcClient(run) for _ in range(2)]
    for client in clients:
        client.connection_made(Transport())  # type: ignore[arg-type]
        client.data_received(limit(1))
    run.clients = clients
    for i, due in enumerate([1.0, 2.0, 3.0, 4.0]):
        run.send(i, due)
    run.flush()
    assert [client.due for client in clients] == [{1: 1.0}, {1: 2.0}]
    assert list(run.waiting) == [3.0, 4.0]
    ok = encode_headers([(":status", "200"), ("grpc-status", "0")])
    clients[0].data_received(frame(0x1, 0x5, 1, ok))  # its call ends: the oldest goes out
    assert run.statuses == {"OK": 1}
    assert clients[0].due == {3: 3.0} and list(run.waiting) == [4.0]
    clients[1].data_received(limit(4))  # the limit rises: the last one goes out at once
    assert clients[1].due == {1: 2.0, 3: 4.0} and not run.waiting
    sent = b"".join(clients[1].transport.written)  # type: ignore[union-attr]
    assert sent.count(run.header_block) == 2
