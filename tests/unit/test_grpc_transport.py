"""The gateway's own HTTP/2 gRPC transport, frame by frame: a real server on loopback, a
raw HTTP/2 client written here, and a toy service (the data plane is not involved).

What real clients (grpcio, tritonclient) do with it is in the integration tests; this
covers what they rarely do: CONTINUATION and padding, answers larger than the client's
window, resets, deadlines, the stream cap, GOAWAY, bad requests and non-HTTP/2 bytes."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from gateway.grpc.hpack import HeaderDecoder, encode_headers
from gateway.grpc.messages import message
from gateway.grpc.transport import PREFACE, CallContext, GrpcServer
from gateway.overload import Overload

Request = message("ModelInferRequest")
Response = message("ModelInferResponse")
SERVICE = "test.Echo"
ECHO = f"/{SERVICE}/Echo"
HEAD = struct.Struct(">BHBBL")
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9,
)  # fmt: skip


async def echo(request: Any, context: CallContext) -> Any:
    """Answers ``raw_input_contents[0]`` repeated ``id`` times (default once); model
    ``slow`` sleeps 5 s first, ``abort`` aborts, ``boom`` raises."""
    if request.model_name == "slow":
        await asyncio.sleep(5)
    if request.model_name == "abort":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted: é 100%")
    if request.model_name == "boom":
        raise RuntimeError("handler bug")
    seen = dict(context.invocation_metadata())["x-who"]
    context.set_trailing_metadata((("x-seen", seen), ("x-peer", context.peer())))
    times = int(request.id or "1")
    return Response(model_name="echo", raw_output_contents=[request.raw_input_contents[0] * times])


def handlers() -> list[Any]:
    return [
        grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(
                    echo,
                    request_deserializer=Request.FromString,
                    response_serializer=Response.SerializeToString,
                )
            },
        )
    ]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def grpc_message(model: str = "m", data: bytes = b"abc", times: int = 1) -> bytes:
    body = Request(model_name=model, id=str(times), raw_input_contents=[data]).SerializeToString()
    return b"\x00" + len(body).to_bytes(4) + body


def request_headers(path: str = ECHO, **extra: str) -> bytes:
    headers = [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "t"),
        ("content-type", "application/grpc"), ("te", "trailers"), ("x-who", "tester"),
        *extra.items(),
    ]  # fmt: skip
    return encode_headers([(k.replace("_", "-"), v) for k, v in headers])


class RawClient:
    """An HTTP/2 client that shows every frame the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = HeaderDecoder()
        self.settings: dict[int, int] = {}

    async def frame(self, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        high, low, kind, flags, stream_id = HEAD.unpack(head)
        payload = await self.reader.readexactly(high << 16 | low)
        return kind, flags, stream_id, payload

    async def handshake(self, window: int = 65_535) -> None:
        settings = struct.pack(">HL", 0x4, window)
        self.writer.write(PREFACE + frame(SETTINGS, 0, 0, settings))
        kind, _, _, payload = await self.frame()
        assert kind == SETTINGS
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            self.settings[key] = value
        self.writer.write(frame(SETTINGS, 1, 0))
        while (await self.frame())[:2] != (SETTINGS, 1):  # its window update, then our ack
            pass

    def call(self, stream_id: int, body: bytes, headers: bytes | None = None) -> None:
        block = request_headers() if headers is None else headers
        self.writer.write(frame(HEADERS, 0x4, stream_id, block) + frame(DATA, 0x1, stream_id, body))

    async def answer(self, stream_id: int, *, ack_data: bool = False) -> dict[str, Any]:
        """Frames until ``stream_id`` ends: its headers, trailers and data."""
        got: dict[str, Any] = {"headers": [], "data": b"", "reset": None}
        while True:
            kind, flags, sid, payload = await self.frame()
            if kind == HEADERS and sid == stream_id:
                got["headers"] += self.decoder.decode(payload)
                if flags & 0x1:
                    return got
            elif kind == DATA and sid == stream_id:
                got["data"] += payload
                if ack_data and payload:
                    update = struct.pack(">L", len(payload))
                    self.writer.write(frame(WINDOW_UPDATE, 0, 0, update))
                    self.writer.write(frame(WINDOW_UPDATE, 0, stream_id, update))
            elif kind == RST_STREAM and sid == stream_id:
                got["reset"] = struct.unpack(">L", payload)[0]
                return got
            elif kind == GOAWAY:
                got["goaway"] = payload
                return got


def status(answer: dict[str, Any]) -> tuple[str | None, str | None]:
    headers = dict(answer["headers"])
    return headers.get("grpc-status"), headers.get("grpc-message")


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[GrpcServer, Callable[[], Any]]]:
    overload = options.pop("overload", Overload(0.5))
    server = GrpcServer(handlers(), max_message_bytes=1 << 20, overload=overload, **options)
    port = await server.start("127.0.0.1", 0)

    async def connect() -> RawClient:
        client = RawClient(*await asyncio.open_connection("127.0.0.1", port))
        return client

    try:
        yield server, connect
    finally:
        await server.stop(1.0)


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


def test_a_unary_call_answers_headers_data_and_trailers() -> None:
    async def scenario() -> None:
        async with serving() as (_, connect):
            client = await connect()
            await client.handshake()
            client.call(1, grpc_message(data=b"xyz"))
            answer = await client.answer(1)
            headers = dict(answer["headers"])
            assert headers[":status"] == "200" and headers["content-type"] == "application/grpc"
            assert status(answer) == ("0", None) and headers["x-seen"] == "tester"
            host, port = client.writer.get_extra_info("sockname")
            assert headers["x-peer"] == f"ipv4:{host}:{port}"  # the client, as the server sees it
            response = Response.FromString(answer["data"][5:])
            assert response.raw_output_contents[0] == b"xyz"
            # A second call on the same connection, headers now from the cache.
            client.call(3, grpc_message(data=b"again"))
            answer = await client.answer(3)
            assert Response.FromString(answer["data"][5:]).raw_output_contents[0] == b"again"

    run(scenario)


def test_continuation_and_padding_in_a_request() -> None:
    async def scenario() -> None:
        async with serving() as (_, connect):
            client = await connect()
            await client.handshake()
            block = request_headers()
            padded = bytes([4]) + block[:10] + b"\x00" * 4
            client.writer.write(
                frame(HEADERS, 0x8, 1, padded)  # PADDED, no END_HEADERS
                + frame(CONTINUATION, 0x4, 1, block[10:])
                + frame(DATA, 0x8 | 0x1, 1, bytes([3]) + grpc_message() + b"\x00" * 3)
            )
            assert status(await client.answer(1)) == ("0", None)

    run(scenario)


def test_an_answer_larger_than_the_window_waits_for_window_updates() -> None:
    """A 300 kB answer to a client whose windows are 65,535 bytes: the server sends what
    the windows allow, then the rest as the client gives window back."""

    async def scenario() -> None:
        async with serving() as (server, connect):
            client = await connect()
            await client.handshake(window=65_535)
            client.call(1, grpc_message(data=b"0123456789", times=30_000))
            answer = await client.answer(1, ack_data=True)
            assert status(answer) == ("0", None)
            output = Response.FromString(answer["data"][5:]).raw_output_contents[0]
            assert output == b"0123456789" * 30_000
            assert server.blocked_answers >= 1

    run(scenario)


def test_errors_are_grpc_statuses_and_the_connection_lives_on() -> None:
    async def scenario() -> None:
        async with serving() as (_, connect):
            client = await connect()
            await client.handshake()
            cases = [
                (grpc_message(), request_headers("/test.Echo/Nope"), "12"),
                (b"\x00\x00\x00\x00\x05abc", None, "13"),  # the length says 5, 3 came
                (b"\x00\x00\x00\x00\x03\xff\xff\xff", None, "3"),  # does not parse
                (b"\x01" + grpc_message()[1:], None, "12"),  # compressed
                (grpc_message("abort"), None, "9"),
                (grpc_message("boom"), None, "13"),
            ]
            for i, (body, headers, expected) in enumerate(cases):
                stream_id = 2 * i + 1
                client.call(stream_id, body, headers)
                code, text = status(await client.answer(stream_id))
                assert code == expected, (i, text)
            client.call(99, grpc_message("abort"))
            assert status(await client.answer(99))[1] == "aborted: %C3%A9 100%25"
            client.call(101, grpc_message())
            assert status(await client.answer(101)) == ("0", None)

    run(scenario)


def test_a_request_over_the_message_limit_is_refused_and_reset() -> None:
    async def scenario() -> None:
        async with serving() as (_, connect):
            client = await connect()
            await client.handshake()
            client.writer.write(frame(HEADERS, 0x4, 1, request_headers()))
            chunk = b"\x00" * 16_384
            for _ in range(70):  # 1.1 MB, over the 1 MiB limit, without END_STREAM
                client.writer.write(frame(DATA, 0, 1, chunk))
            answer = await client.answer(1)
            assert status(answer)[0] == "8" and "larger than the limit" in status(answer)[1]

    run(scenario)


def test_not_grpc_gets_an_http_status() -> None:
    async def scenario() -> None:
        async with serving() as (_, connect):
            client = await connect()
            await client.handshake()
            headers = encode_headers([
                (":method", "POST"), (":scheme", "http"), (":path", ECHO),
                (":authority", "t"), ("content-type", "application/json"),
            ])  # fmt: skip
            client.call(1, b"{}", headers)
            assert dict((await client.answer(1))["headers"])[":status"] == "415"

    run(scenario)


def test_a_reset_cancels_the_call_and_a_deadline_ends_it() -> None:
    async def scenario() -> None:
        async with serving() as (server, connect):
            client = await connect()
            await client.handshake()
            client.call(1, grpc_message("slow"))
            await asyncio.sleep(0.1)
            (connection,) = server.connections
            task = connection.streams[1].task
            assert task is not None and not task.done()
            client.writer.write(frame(RST_STREAM, 0, 1, struct.pack(">L", 8)))
            await asyncio.sleep(0.1)
            assert task.cancelled() and 1 not in connection.streams

            client.call(3, grpc_message("slow"), request_headers(grpc_timeout="100m"))
            started = asyncio.get_running_loop().time()
            code, text = status(await client.answer(3))
            assert (code, text) == ("4", "Deadline Exceeded")
            assert asyncio.get_running_loop().time() - started < 2

    run(scenario)


def test_pings_are_answered_and_streams_over_the_cap_refused() -> None:
    async def scenario() -> None:
        async with serving(max_concurrent_streams=1) as (_, connect):
            client = await connect()
            await client.handshake()
            assert client.settings[0x3] == 1
            client.writer.write(frame(PING, 0, 0, b"12345678"))
            assert await client.frame() == (PING, 1, 0, b"12345678")
            client.call(1, grpc_message("slow"))
            client.call(3, grpc_message())
            assert (await client.answer(3))["reset"] == 7  # REFUSED_STREAM

    run(scenario)


def test_stopping_lets_open_calls_finish_and_refuses_new_streams() -> None:
    async def scenario() -> None:
        server = GrpcServer(handlers(), max_message_bytes=1 << 20, overload=Overload(0.5))
        port = await server.start("127.0.0.1", 0)
        client = RawClient(*await asyncio.open_connection("127.0.0.1", port))
        await client.handshake()
        body = Request(model_name="m", id="1", raw_input_contents=[b"late"]).SerializeToString()
        # An open call: its headers, and half its message.
        client.writer.write(frame(HEADERS, 0x4, 1, request_headers()))
        message_bytes = b"\x00" + len(body).to_bytes(4) + body
        client.writer.write(frame(DATA, 0, 1, message_bytes[:4]))
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(server.stop(5.0))
        kind, _, _, payload = await client.frame()
        assert kind == GOAWAY and struct.unpack(">LL", payload[:8]) == (1, 0)
        client.writer.write(frame(DATA, 0x1, 1, message_bytes[4:]))  # the open call ends
        answer = await client.answer(1)
        assert status(answer) == ("0", None)
        await asyncio.wait_for(stopping, 5)

    run(scenario)


def test_bytes_that_are_not_http2_close_the_connection() -> None:
    async def scenario() -> None:
        async with serving() as (_, connect):
            client = await connect()
            client.writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            rest = await asyncio.wait_for(client.reader.read(), 5)  # until the server closes
            assert client.reader.at_eof() and len(rest) < 100  # its SETTINGS, nothing more

    run(scenario)


def test_a_protocol_error_is_a_goaway() -> None:
    async def scenario() -> None:
        async with serving() as (_, connect):
            client = await connect()
            await client.handshake()
            client.writer.write(frame(HEADERS, 0x4, 2, request_headers()))  # even: a server's
            while True:
                kind, _, _, payload = await client.frame()
                if kind == GOAWAY:
                    break
            assert struct.unpack(">L", payload[4:8])[0] == 1  # PROTOCOL_ERROR

    run(scenario)


@pytest.mark.parametrize("case", ["lone", "others open", "one behind", "multiplexed before"])
def test_a_refused_call_holds_its_connection_while_storming_unless_it_multiplexes(
    case: str,
) -> None:
    """An admission refusal while the loop is overrun: a connection that sends one call at
    a time is not read for the hold; one that multiplexes is read on, whether another call
    is open now, was sent behind the refused one, or was open beside another earlier."""
    overload = Overload(0.3)
    overload._loop = asyncio.new_event_loop()  # storming needs a clock: any loop's
    overload._storm_until = float("inf")

    def admission(request: Any, metadata: Any) -> Any:
        if request.model_name == "refuse":
            return grpc.StatusCode.RESOURCE_EXHAUSTED, "full", [("grpc-retry-pushback-ms", "1000")]
        return None

    async def scenario() -> None:
        async with serving(overload=overload, admissions={ECHO: admission}) as (server, connect):
            client = await connect()
            await client.handshake()
            if case == "multiplexed before":  # two calls open at once, both answered
                client.writer.write(
                    frame(HEADERS, 0x4, 1, request_headers())
                    + frame(DATA, 0x1, 1, grpc_message())
                    + frame(HEADERS, 0x4, 3, request_headers())
                    + frame(DATA, 0x1, 3, grpc_message())
                )
                assert status(await client.answer(1)) == ("0", None)
                assert status(await client.answer(3)) == ("0", None)
            if case == "others open":
                client.call(5, grpc_message("slow"))
            if case == "one behind":  # the refused call and the next in one write
                client.writer.write(
                    frame(HEADERS, 0x4, 7, request_headers())
                    + frame(DATA, 0x1, 7, grpc_message("refuse"))
                    + frame(HEADERS, 0x4, 9, request_headers())
                    + frame(DATA, 0x1, 9, grpc_message())
                )
            else:
                client.call(7, grpc_message("refuse"))
            answer = await client.answer(7)
            assert status(answer) == ("8", "full")
            assert dict(answer["headers"])["grpc-retry-pushback-ms"] == "1000"
            (connection,) = server.connections
            held = case == "lone"
            assert connection.paused is held
            assert connection.multiplexing is not held
            assert overload.held == int(held)
            assert overload.throttled == int(not held)  # its stream limit lowered instead
            if case == "one behind":  # read on at once: the call behind is answered
                assert status(await asyncio.wait_for(client.answer(9), 0.2)) == ("0", None)

    run(scenario)
    overload._loop.close()


def test_a_multiplexing_connection_refused_while_storming_gets_a_lower_stream_limit() -> None:
    """While the loop is overrun, a refused call on a connection that multiplexes lowers
    the connection's SETTINGS_MAX_CONCURRENT_STREAMS to the calls it has open (at least
    one) for the hold: in force once the client acknowledges it (a stream past it is
    refused with REFUSED_STREAM, one opened before the acknowledgement is served). Then
    the limit doubles back to the server's own, so a client's queued calls do not all
    come at once."""
    overload = Overload(0.3)
    overload._loop = asyncio.new_event_loop()
    overload._storm_until = float("inf")

    def admission(request: Any, metadata: Any) -> Any:
        if request.model_name == "refuse":
            return grpc.StatusCode.RESOURCE_EXHAUSTED, "full", [("grpc-retry-pushback-ms", "1000")]
        return None

    async def limit_said(client: RawClient) -> int:
        while True:
            kind, flags, _, payload = await client.frame()
            if kind == SETTINGS and not flags & 0x1:
                key, value = struct.unpack(">HL", payload)
                assert key == 0x3  # SETTINGS_MAX_CONCURRENT_STREAMS alone
                return int(value)

    async def scenario() -> None:
        async with serving(overload=overload, admissions={ECHO: admission}) as (server, connect):
            client = await connect()
            await client.handshake()
            assert client.settings[0x3] == 1024
            client.call(1, grpc_message("slow"))  # open while the next two are sent
            client.call(3, grpc_message("refuse"))
            assert status(await client.answer(3)) == ("8", "full")
            assert await limit_said(client) == 1  # the slow call
            (connection,) = server.connections
            assert overload.throttled == 1 and overload.held == 0 and not connection.paused
            client.call(5, grpc_message())  # sent before the acknowledgement: served
            assert status(await client.answer(5)) == ("0", None)
            client.writer.write(frame(SETTINGS, 1, 0))  # the acknowledgement
            await asyncio.sleep(0.05)
            assert connection.max_streams == 1
            client.call(7, grpc_message())  # the slow call is still open: one too many
            assert (await client.answer(7))["reset"] == 7  # REFUSED_STREAM
            # The hold (0.225-0.3 s) ends; the limit doubles every eighth of it after.
            started = asyncio.get_running_loop().time()
            limits = [await limit_said(client)]
            assert overload.throttled == 1
            while limits[-1] < 1024:
                limits.append(await limit_said(client))
            assert limits == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
            assert asyncio.get_running_loop().time() - started < 2.0
            assert overload.throttled == 0
            client.writer.write(frame(SETTINGS, 1, 0) * len(limits))
            await asyncio.sleep(0.05)
            assert connection.max_streams == 1024
            client.call(9, grpc_message())  # beside the slow call again
            assert status(await client.answer(9)) == ("0", None)

    run(scenario)
    overload._loop.close()


def test_a_peer_that_never_acknowledges_settings_is_not_sent_limits_without_end() -> None:
    """Throttling sends SETTINGS; a peer that never acknowledges them is not throttled
    again once 16 are outstanding, so what the connection keeps for them stays bounded."""
    overload = Overload(0.02)  # short holds: many throttle and raise cycles
    overload._loop = asyncio.new_event_loop()
    overload._storm_until = float("inf")

    def admission(request: Any, metadata: Any) -> Any:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "full", [("grpc-retry-pushback-ms", "1000")]

    async def scenario() -> None:
        async with serving(overload=overload, admissions={ECHO: admission}) as (server, connect):
            client = await connect()
            await client.handshake()  # acknowledges the preface's SETTINGS, and no more
            client.writer.write(  # two calls at once: it multiplexes
                frame(HEADERS, 0x4, 1, request_headers()) + frame(DATA, 0x1, 1, grpc_message())
                + frame(HEADERS, 0x4, 3, request_headers()) + frame(DATA, 0x1, 3, grpc_message())
            )  # fmt: skip
            for stream_id in range(5, 125, 2):
                client.call(stream_id, grpc_message())
                assert status(await client.answer(stream_id)) == ("8", "full")
                await asyncio.sleep(0.01)
            (connection,) = server.connections
            assert connection.multiplexing
            assert 0 < len(connection._limits_sent) <= 16 + 10  # 16 at most, then one ramp

    run(scenario)
    overload._loop.close()


def test_a_crowd_that_connects_at_once_is_read_in_slices_and_every_call_answered() -> None:
    """40 connections whose preface, SETTINGS and first call arrive together: a loop turn
    reads 4 of them (``first_reads_per_turn``), the rest a turn or more later; every call
    is answered, and a connection already open is read meanwhile."""
    overload = Overload(0.5, first_reads_per_turn=4)

    async def scenario() -> None:
        async with serving(overload=overload) as (_, connect):
            early = await connect()
            await early.handshake()
            crowd = [await connect() for _ in range(40)]
            await asyncio.sleep(0.05)  # every connection accepted before any bytes come
            for client in crowd:
                client.writer.write(
                    PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, 0x4, 1, request_headers())
                    + frame(DATA, 0x1, 1, grpc_message(data=b"crowd"))
                )  # fmt: skip
            early.call(1, grpc_message(data=b"early"))
            answer = await asyncio.wait_for(early.answer(1), 5)
            assert Response.FromString(answer["data"][5:]).raw_output_contents[0] == b"early"
            answers = await asyncio.wait_for(
                asyncio.gather(*(client.answer(1) for client in crowd)), 10
            )
            assert [status(a) for a in answers] == [("0", None)] * 40
            assert overload.deferred_first_reads > 0

    run(scenario)


def test_a_silent_connection_is_closed_after_the_preface_timeout() -> None:
    async def scenario() -> None:
        async with serving(preface_timeout_s=0.2) as (_, connect):
            client = await connect()
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(client.reader.read(), 5)  # its SETTINGS, then the close
            assert client.reader.at_eof()
            assert asyncio.get_running_loop().time() - started < 3

    run(scenario)


@pytest.mark.parametrize("end", ["reset", "deadline"])
def test_a_kept_queue_place_is_given_back_when_the_call_ends_before_it_runs(end: str) -> None:
    kept: list[str] = []

    def admission(request: Any, metadata: Any) -> Any:
        kept.append("kept")
        return lambda: kept.remove("kept")

    async def scenario() -> None:
        async with serving(admissions={ECHO: admission}) as (_, connect):
            client = await connect()
            await client.handshake()
            if end == "reset":  # the call and its reset in one write: read in one turn
                client.writer.write(
                    frame(HEADERS, 0x4, 1, request_headers())
                    + frame(DATA, 0x1, 1, grpc_message())
                    + frame(RST_STREAM, 0, 1, struct.pack(">L", 8))
                )
            else:  # a deadline already past when the call is read
                client.call(1, grpc_message("slow"), request_headers(grpc_timeout="1n"))
                assert status(await client.answer(1))[0] == "4"
            client.call(3, grpc_message())
            assert status(await client.answer(3)) == ("0", None)
            assert kept == []

    run(scenario)
