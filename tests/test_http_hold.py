"""A connection refused for overload while the loop is overrun is not read for the hold; new
connections and served ones are read at once. A real uvicorn server on loopback with the
gateway's protocol classes (each connection starts with the refusing protocol, which hands
it to uvicorn's), in front of a two-route ASGI app (/refuse answers 429 as the gateway's
app does, anything else 200) and a refusal from the head for one path (FULL)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
import uvloop

from gateway.acceptor import Acceptor, listening_socket
from gateway.http.protocol import REFUSED_KEY, HoldingProtocol
from gateway.http.refusing import RefusingProtocol, RefusingScreen
from gateway.overload import Overload

HOLD_S = 0.4


class Storming(Overload):
    """Always overrun: the test is about the connection, not about detecting the storm."""

    @property
    def storming(self) -> bool:
        return True


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    refused = scope["path"] == "/refuse"
    if refused:
        scope[REFUSED_KEY] = True
    status = 429 if refused else 200
    headers = [(b"content-length", b"2"), (b"retry-after", b"1")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


HEAD_TIMEOUT_S = 0.3
KEEP_ALIVE_S = 0.6

FIRST_READS_PER_TURN = 4

FULL = "/v2/models/full/infer"
REFUSAL = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 6\r\nretry-after: 1\r\n\r\nfull!\n"
asked: list[tuple[str, list[tuple[bytes, bytes]]]] = []


def refusal(path: str, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """A refusal from the head for FULL, as the gateway's app answers a full model."""
    asked.append((path, headers))
    return REFUSAL if path == FULL else None


ROOMY = "/v2/models/roomy/infer"
kept: list[str] = []
given_back: list[str] = []


def refusal_or_place(path: str, headers: list[tuple[bytes, bytes]]) -> bytes | str | None:
    """The screen's question: refused (FULL), or let in with a place kept (ROOMY)."""
    if path == ROOMY:
        kept.append("roomy")
        return "roomy"
    return refusal(path, headers)


@dataclass
class Served:
    port: int
    overload: Overload
    server: uvicorn.Server
    acceptor: Acceptor
    screen: RefusingScreen


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Served]:
    """Served as the gateway serves: uvicorn with no socket of its own, the gateway's
    acceptor making each connection's protocol and screening a drained crowd."""
    overload = Storming(HOLD_S, first_reads_per_turn=FIRST_READS_PER_TURN)
    protocol = HoldingProtocol.watching(overload, HEAD_TIMEOUT_S)
    config = uvicorn.Config(app, http=protocol, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server._serve(sockets=[]))
    while not server.started:
        await asyncio.sleep(0.01)
    made = functools.partial(
        protocol, config=config, server_state=server.server_state, app_state={}
    )
    screen = RefusingScreen(
        refuse=refusal_or_place,
        release=given_back.append,
        overload=overload,
        server_state=server.server_state,
    )
    first = functools.partial(
        RefusingProtocol,
        screen=screen,
        refusal=refusal,
        protocol=made,
        overload=overload,
        server_state=server.server_state,
        head_timeout_s=HEAD_TIMEOUT_S,
        keep_alive_s=KEEP_ALIVE_S,
    )
    acceptor = Acceptor(listening_socket("127.0.0.1", 0), first, screen=screen)
    await acceptor.start()
    yield Served(acceptor.port, overload, server, acceptor, screen)
    acceptor.close()
    server.should_exit = True
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as served:
        yield served


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def to(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        return (await self.answer())[0]

    async def answer(self) -> tuple[int, bytes, bytes]:
        """The next response's status, head and body (by its content-length)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        return int(head.split(b" ", 2)[1]), head, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def test_a_refused_connection_is_not_read_until_its_hold_ends(
    served: Served,
) -> None:
    port, overload = served.port, served.overload
    kept = await Connection.to(port)
    assert await kept.get("/refuse") == 429
    assert overload.held == 1
    held = asyncio.create_task(kept.get("/ok"))
    # Meanwhile a new connection is read and answered at once.
    fresh = await Connection.to(port)
    assert await fresh.get("/ok") == 200
    assert not held.done() and overload.held == 1  # its request waits in the socket buffer
    assert await held == 200  # read once the hold ended
    assert overload.held == 0
    # Served requests are never held: several in a row on the same connection.
    for _ in range(3):
        assert await kept.get("/ok") == 200
    assert overload.held == 0
    kept.close()
    fresh.close()


async def test_a_connection_closed_while_held_releases_its_hold(
    served: Served,
) -> None:
    port, overload = served.port, served.overload
    kept = await Connection.to(port)
    assert await kept.get("/refuse") == 429
    assert overload.held == 1
    kept.close()
    for _ in range(100):
        if overload.held == 0:
            break
        await asyncio.sleep(0.01)
    assert overload.held == 0


async def test_silent_and_half_sent_connections_are_closed_after_the_head_timeout(
    served: Served,
) -> None:
    port = served.port
    silent = await Connection.to(port)
    half = await Connection.to(port)
    half.writer.write(b"POST /ok HTTP/1.1\r\nhost: t\r\ncontent-le")
    served_one = await Connection.to(port)
    assert await served_one.get("/ok") == 200  # a whole request is answered meanwhile
    assert await asyncio.wait_for(silent.reader.read(), 5) == b""  # closed, nothing said
    answer = await asyncio.wait_for(half.reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")  # then closed
    # A connection that was served stays open for its next request (keep-alive).
    assert await served_one.get("/ok") == 200
    for connection in (silent, half, served_one):
        connection.close()


async def test_a_crowd_of_new_connections_is_read_in_slices_and_all_answered(
    served: Served,
) -> None:
    """24 clients connect and send at once (the loop is blocked meanwhile): the acceptor
    takes them in one turn, the next turn reads the first bytes of 4, and the rest are read
    a millisecond later, 4 at a time; every one is answered."""
    port, overload = served.port, served.overload
    request = b"GET /ok HTTP/1.1\r\nhost: t\r\n\r\n"
    crowd = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
    for client in crowd:
        client.sendall(request)
        client.setblocking(False)
    loop = asyncio.get_running_loop()
    answers = await asyncio.wait_for(
        asyncio.gather(*(loop.sock_recv(client, 4096) for client in crowd)), 10
    )
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)
    assert overload.deferred_first_reads >= 24 - 2 * FIRST_READS_PER_TURN
    # A connection read after its wait is an ordinary one: its next request is read at once.
    crowd[-1].setblocking(True)
    crowd[-1].sendall(request)
    assert (await loop.run_in_executor(None, crowd[-1].recv, 4096)).startswith(b"HTTP/1.1 200 ")
    for client in crowd:
        client.close()


def refused_request(body: bytes = b"0123456789", *headers: str) -> bytes:
    lines = [f"POST {FULL} HTTP/1.1", "Host: t", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_a_request_refused_from_its_head_is_answered_without_the_app_or_its_body(
    served: Served,
) -> None:
    """The refusing protocol writes the refusal as soon as the head is in (the body comes
    later, in pieces, and is skipped); the connection is held, then handed to uvicorn's
    protocol for a request it does not refuse."""
    port, overload = served.port, served.overload
    asked.clear()
    kept = await Connection.to(port)
    request = refused_request(b"0123456789", "X-Custom:  spaced  ", "Traceparent: 00-ab")
    kept.writer.write(request[:-7])
    status, head, body = await kept.answer()
    assert (status, body) == (429, b"full!\n")
    assert b"\r\ndate: " in head and b"\r\nserver: uvicorn" in head  # uvicorn's own headers
    assert asked == [
        (
            FULL,
            [
                (b"host", b"t"),
                (b"content-length", b"10"),
                (b"x-custom", b"spaced"),
                (b"traceparent", b"00-ab"),
            ],
        )
    ]
    kept.writer.write(request[-7:])  # the rest of the body: skipped, not a request
    await asyncio.sleep(0.05)
    assert overload.held == 1
    assert await kept.get("/ok") == 200  # after the hold, by uvicorn's protocol
    assert overload.held == 0
    assert await kept.get("/ok") == 200
    kept.close()


async def test_pipelined_refusals_are_framed_by_their_lengths(served: Served) -> None:
    port = served.port
    kept = await Connection.to(port)
    bodies = (b"", b"x" * 70_000)
    kept.writer.write(
        b"".join(refused_request(body) for body in bodies) + b"GET /ok HTTP/1.1\r\nhost: t\r\n\r\n"
    )
    answers = [await asyncio.wait_for(kept.answer(), 5) for _ in range(3)]
    assert [status for status, _, _ in answers] == [429, 429, 200]
    assert answers[2][2] == b"{}"
    kept.close()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # Framing or answering that only uvicorn reads: the request reaches the app.
        (
            f"POST {FULL} HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            "3\r\nabc\r\n0\r\n\r\n",
            200,
        ),
        (
            f"POST {FULL} HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n"
            "connection: upgrade\r\n\r\n{}",
            200,
        ),
        (f"POST {FULL} HTTP/1.0\r\nhost: t\r\ncontent-length: 2\r\n\r\n{{}}", 200),
        (
            f"POST {FULL}?x=1 HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nupgrade: h2c\r\n\r\n{{}}",
            200,
        ),
        (f"GET {FULL} HTTP/1.1\r\nhost: t\r\n\r\n", 200),
        (f"POST {FULL} HTTP/1.1\r\nhost: t\r\n\r\n", 200),  # no length: no body
        # Malformed: uvicorn's 400, as before the refusing protocol.
        (
            f"POST {FULL} HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n"
            "content-length: 3\r\n\r\n{}",
            400,
        ),
        (f"POST {FULL} HTTP/1.1\r\nhost: t\r\ncontent-length: -2\r\n\r\n{{}}", 400),
        (f"POST {FULL} HTTP/1.1\r\nhost : t\r\ncontent-length: 2\r\n\r\n{{}}", 400),
        ("POST /v2/models/full/infer HTTP/1.1\nhost: t\ncontent-length: 2\n\n{}", 400),
        (f"POST {FULL} HTTP/1.1\r\nhost: t\r\nx: a\x00b\r\ncontent-length: 2\r\n\r\n{{}}", 400),
        (f"POST {FULL} HTTP/1.1\r\nhost: t\nx: a\rcontent-length: 2\r\n\r\n{{}}", 400),
    ],
)
async def test_anything_the_refusing_protocol_does_not_read_is_uvicorns_from_its_first_byte(
    served: Served, head: str, status: int
) -> None:
    connection = await Connection.to(served.port)
    connection.writer.write(head.encode())
    assert (await asyncio.wait_for(connection.answer(), 5))[0] == status
    connection.close()


async def test_a_refused_connection_idle_past_keep_alive_is_closed(served: Served) -> None:
    connection = await Connection.to(served.port)
    connection.writer.write(refused_request())
    assert (await connection.answer())[0] == 429
    # Held for the hold (not idle meanwhile), then idle for KEEP_ALIVE_S.
    assert await asyncio.wait_for(connection.reader.read(), 5) == b""
    assert served.overload.held == 0


async def test_a_refused_connection_open_at_shutdown_is_closed(served: Served) -> None:
    connection = await Connection.to(served.port)
    connection.writer.write(refused_request())
    assert (await connection.answer())[0] == 429
    served.server.should_exit = True
    assert await asyncio.wait_for(connection.reader.read(), 5) == b""


async def test_a_refused_request_that_asks_to_close_is_refused_then_closed(served: Served) -> None:
    """``connection: close`` (hey without keep-alive sends it): the refusal says so, and the
    connection closes once the body is in, so the client reads the refusal, not a reset."""
    connection = await Connection.to(served.port)
    request = refused_request(b"x" * 5000, "Connection: close")
    connection.writer.write(request[:-100])
    status, head, body = await asyncio.wait_for(connection.answer(), 5)
    assert (status, body) == (429, b"full!\n") and b"\r\nconnection: close\r\n" in head
    await asyncio.sleep(0.05)
    assert not connection.reader.at_eof()  # the rest of the body is still to come
    connection.writer.write(request[-100:])
    assert await asyncio.wait_for(connection.reader.read(), 5) == b""
    assert served.overload.held == 0


async def answered(client: socket.socket) -> bytes:
    """Everything a non-blocking client reads until its server closes, or 2 s pass."""
    loop = asyncio.get_running_loop()
    received = b""
    with contextlib.suppress(TimeoutError):
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 2):
            received += chunk
    return received


def a_crowd(port: int, requests: list[bytes]) -> list[socket.socket]:
    """Clients that connect and send while the loop is blocked (the loop's server takes the
    first one; the rest wait in the kernel's queue for the acceptor's drain)."""
    crowd = [socket.create_connection(("127.0.0.1", port)) for _ in requests]
    for client, request in zip(crowd, requests, strict=True):
        client.sendall(request)
        client.setblocking(False)
    return crowd


def test_a_drained_crowd_is_refused_before_it_has_a_transport() -> None:
    """On uvloop, whose server takes one connection a turn, the acceptor drains the rest of
    a crowd and the screen looks at each: a whole request it would refuse is answered on
    the socket (no protocol made), the connection held, then set up for its next request;
    ``connection: close`` is refused and closed; half a request, or one not refused, is the
    protocols' to read from its first byte."""

    async def main() -> None:
        async with serving() as served:
            requests = [
                *(refused_request() for _ in range(12)),
                *(refused_request(b"x" * 3000, "Connection: close") for _ in range(4)),
                refused_request()[:-3],  # its body is not whole
                b"GET /ok HTTP/1.1\r\nhost: t\r\n\r\n",
            ]
            crowd = a_crowd(served.port, requests)
            loop = asyncio.get_running_loop()
            firsts = await asyncio.gather(*(loop.sock_recv(c, 4096) for c in crowd))
            refusals, served_one = firsts[:17], firsts[17]
            assert all(a.startswith(b"HTTP/1.1 429 ") and a.endswith(b"full!\n") for a in refusals)
            assert all(b"\r\ndate: " in a and b"\r\nserver: uvicorn" in a for a in refusals)
            assert served_one.startswith(b"HTTP/1.1 200 ")
            # The loop's server took the first client or two; the drain took the rest, and
            # the screen answered every whole refused request among them.
            taken = served.acceptor.accepted
            assert taken in (1, 2) and served.acceptor.drained == len(crowd) - taken
            assert served.screen.refused == 16 - taken
            for client in crowd[12:16]:  # refused, then closed once the body was taken
                assert await answered(client) == b""
            assert served.overload.held == 12  # the screen's and the protocols'
            ok = b"GET /ok HTTP/1.1\r\nhost: t\r\n\r\n"
            await asyncio.gather(*(loop.sock_sendall(c, ok) for c in crowd[:12]))
            await loop.sock_sendall(crowd[16], refused_request()[-3:])
            # Held (not read) for the hold, then served on the same connection.
            seconds = await asyncio.gather(*(loop.sock_recv(c, 4096) for c in crowd[:12]))
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in seconds)
            await asyncio.sleep(HOLD_S)  # the half request's hold (refused by its protocol)
            assert served.overload.held == 0
            for client in crowd:
                client.close()

    uvloop.run(main())


def test_a_screened_connection_waiting_for_its_set_up_is_closed_with_the_acceptor() -> None:
    async def main() -> None:
        async with serving() as served:
            crowd = a_crowd(served.port, [refused_request() for _ in range(8)])
            loop = asyncio.get_running_loop()
            firsts = await asyncio.gather(*(loop.sock_recv(c, 4096) for c in crowd))
            assert all(a.startswith(b"HTTP/1.1 429 ") for a in firsts)
            taken = served.acceptor.accepted
            assert served.screen.refused == 8 - taken and served.overload.held == 8
            served.acceptor.close()  # before the holds end
            assert served.overload.held == taken  # the screen's released
            for client in crowd[taken:]:
                assert await asyncio.wait_for(loop.sock_recv(client, 1), HOLD_S / 2) == b""
            for client in crowd:
                client.close()

    uvloop.run(main())


def test_a_drained_crowd_let_in_keeps_its_queue_places_until_each_request_is_read() -> None:
    """A request the screen lets in keeps a place in its model's queue (the gateway's
    ``DataPlane.reserve``) until its protocol reads it: the rest of the crowd, screened
    meanwhile, does not see that place free too. Every place is given back."""

    async def main() -> None:
        kept.clear()
        given_back.clear()
        async with serving() as served:
            body = b'{"inputs": []}'
            request = (
                f"POST {ROOMY} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body
            crowd = a_crowd(served.port, [request] * 12)
            loop = asyncio.get_running_loop()
            answers = await asyncio.gather(*(loop.sock_recv(c, 4096) for c in crowd))
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
            screened = served.acceptor.drained
            assert screened >= 10 and served.screen.refused == 0
            assert kept == ["roomy"] * screened  # one place a connection let in
            assert given_back == kept and served.screen.kept == {}  # each given back
            for client in crowd:
                client.close()

    uvloop.run(main())


def test_a_drained_crowd_that_writes_later_is_screened_when_its_bytes_come() -> None:
    """Clients drained before they write (the usual case: a client writes once its connect
    returns) wait with a reader, not a transport, and are screened when their requests
    come; one that never writes is set up after ``first_bytes_s`` and closed by its
    protocol's head timeout."""

    async def main() -> None:
        async with serving() as served:
            crowd = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(12)]
            silent = socket.create_connection(("127.0.0.1", served.port))
            loop = asyncio.get_running_loop()
            while served.acceptor.accepted + served.acceptor.drained < 13:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)  # drained, looked at: nothing sent yet
            assert served.screen.refused == 0
            for client in crowd:
                client.setblocking(False)
                await loop.sock_sendall(client, refused_request())
            firsts = await asyncio.gather(*(loop.sock_recv(c, 4096) for c in crowd))
            assert all(a.startswith(b"HTTP/1.1 429 ") for a in firsts)
            # Every drained one was screened when its bytes came (none had a transport).
            assert served.screen.refused >= served.acceptor.drained - 1 >= 10
            silent.setblocking(False)
            assert await asyncio.wait_for(loop.sock_recv(silent, 1), 5) == b""  # timed out
            ok = b"GET /ok HTTP/1.1\r\nhost: t\r\n\r\n"
            await asyncio.gather(*(loop.sock_sendall(c, ok) for c in crowd))
            seconds = await asyncio.gather(*(loop.sock_recv(c, 4096) for c in crowd))
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in seconds)
            for client in [*crowd, silent]:
                client.close()

    uvloop.run(main())


def test_connections_waiting_for_their_first_bytes_are_closed_with_the_acceptor() -> None:
    async def main() -> None:
        async with serving() as served:
            crowd = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(8)]
            while served.acceptor.accepted + served.acceptor.drained < 8:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.01)
            served.acceptor.close()
            loop = asyncio.get_running_loop()
            for client in crowd[served.acceptor.accepted :]:
                client.setblocking(False)
                assert (
                    await asyncio.wait_for(loop.sock_recv(client, 1), 0.2) == b""
                )  # before any timeout
            for client in crowd:
                client.close()

    uvloop.run(main())
