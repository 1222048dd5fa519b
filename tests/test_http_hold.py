"""A connection refused for overload while the loop is overrun is not read for the hold; new
connections and served ones are read at once. A real uvicorn server on loopback with the
gateway's protocol class, in front of a two-route ASGI app (/refuse answers 429 as the
gateway's app does, /ok answers 200)."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from gateway.acceptor import Acceptor, listening_socket
from gateway.http.protocol import REFUSED_KEY, HoldingProtocol
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


FIRST_READS_PER_TURN = 4


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Overload]]:
    """Served as the gateway serves: uvicorn with no socket of its own, the gateway's
    acceptor making each connection's protocol."""
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
    acceptor = Acceptor(listening_socket("127.0.0.1", 0), made)
    await acceptor.start()
    yield acceptor.port, overload
    acceptor.close()
    server.should_exit = True
    await task


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def to(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        await self.reader.readexactly(2)
        return int(head.split(b" ", 2)[1])

    def close(self) -> None:
        self.writer.close()


async def test_a_refused_connection_is_not_read_until_its_hold_ends(
    served: tuple[int, Overload],
) -> None:
    port, overload = served
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
    served: tuple[int, Overload],
) -> None:
    port, overload = served
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
    served: tuple[int, Overload],
) -> None:
    port, _ = served
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
    served: tuple[int, Overload],
) -> None:
    """24 clients connect and send at once (the loop is blocked meanwhile): the acceptor
    takes them in one turn, the next turn reads the first bytes of 4, and the rest are read
    a millisecond later, 4 at a time; every one is answered."""
    port, overload = served
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
