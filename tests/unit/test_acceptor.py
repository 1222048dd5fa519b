"""The acceptor drains a crowd waiting to be accepted in one loop turn, on uvloop and
asyncio, and leaves a connection that comes alone to the loop's own server.

TLS on the gateway's ports (tritonclient, plain clients and clients without a certificate
refused) is tested in ``tests/integration/test_tls.py``; here, a drained crowd's handshakes."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import uvloop
from certificates import certificate, new_key, write_pem

from gateway.acceptor import NOTHING_YET, Acceptor, listening_socket

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


class Echo(asyncio.Protocol):
    made: list[int]  # the loop turn each connection was made in
    turn: list[int]
    peers: list[int]  # each connection's client port, in the order they were made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(self.turn[0])
        self.peers.append(transport.get_extra_info("peername")[1])
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def counting_turns(loop: asyncio.AbstractEventLoop, turn: list[int]) -> None:
    def tick() -> None:
        turn[0] += 1
        loop.call_soon(tick)

    loop.call_soon(tick)


def echo_protocol() -> tuple[type[Echo], list[int], list[int]]:
    made: list[int] = []
    turn = [0]
    return type("Counted", (Echo,), {"made": made, "turn": turn, "peers": []}), made, turn


@pytest.mark.parametrize("runner", LOOPS.values(), ids=LOOPS.keys())
def test_a_crowd_waiting_to_be_accepted_is_taken_in_one_turn_and_set_up_newest_first(
    runner: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    protocol, made, turn = echo_protocol()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        crowds: list[int] = []
        acceptor = Acceptor(
            listening_socket("127.0.0.1", 0),
            protocol,
            on_drained=crowds.append,
            set_ups_per_turn=32,
        )
        await acceptor.start()
        # The loop is blocked while 200 clients connect: all wait in the kernel's queue.
        clients = [socket.create_connection(("127.0.0.1", acceptor.port)) for _ in range(200)]
        counting_turns(loop, turn)
        while len(made) < 200:
            await asyncio.sleep(0)
        # uvloop's own servers take one a turn: 200 turns for this crowd. Here the server
        # takes the first, sees more waiting, and the drain takes the rest the next turn.
        assert acceptor.accepted + acceptor.drained == 200
        if isinstance(loop, uvloop.Loop):  # asyncio's server accepts in a loop itself
            assert acceptor.drained >= 190, (acceptor.accepted, acceptor.drained)
            assert max(crowds) >= 190  # the overload is told of the crowd as it arrives
        assert sum(crowds) == acceptor.drained
        if isinstance(loop, uvloop.Loop):
            # Drained connections are set up 32 a turn (with those the loop's server took),
            # newest first: the first slice is the last 32 clients to connect, the last
            # slice the first ones.
            per_turn = [made.count(t) for t in sorted(set(made))]
            assert max(per_turn) <= 32 + acceptor.accepted and len(per_turn) >= 6, per_turn
            order = {client.getsockname()[1]: i for i, client in enumerate(clients)}
            drained = [order[port] for port in protocol.peers][acceptor.accepted :]
            assert min(drained[:32]) >= 200 - 32 and max(drained[-32:]) < 40, drained
        for client in clients:  # each is served: its bytes come back
            client.sendall(b"ping")
        for client in clients:
            client.settimeout(5)
            assert await loop.run_in_executor(None, client.recv, 4) == b"ping"
            client.close()
        acceptor.close()

    runner(main())


@pytest.mark.parametrize("runner", LOOPS.values(), ids=LOOPS.keys())
def test_a_closed_acceptor_takes_no_more_connections(
    runner: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    protocol, made, _ = echo_protocol()

    async def main() -> None:
        acceptor = Acceptor(listening_socket("127.0.0.1", 0), protocol)
        await acceptor.start()
        port = acceptor.port
        acceptor.close()
        await asyncio.sleep(0.01)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        await asyncio.sleep(0.01)
        assert made == [] and acceptor.accepted == acceptor.drained == 0

    runner(main())


def test_a_connection_that_comes_alone_is_the_loop_servers_own() -> None:
    """One client at a time, as a client without keep-alive at low load: the loop's server
    accepts each (its path is C, the cheapest) and the drain never starts."""
    protocol, made, _ = echo_protocol()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        crowds: list[int] = []
        acceptor = Acceptor(
            listening_socket("127.0.0.1", 0),
            protocol,
            on_drained=crowds.append,
            set_ups_per_turn=32,
        )
        await acceptor.start()
        for _ in range(20):
            client = socket.create_connection(("127.0.0.1", acceptor.port))
            client.sendall(b"ping")
            client.settimeout(5)
            assert await loop.run_in_executor(None, client.recv, 4) == b"ping"
            client.close()
        assert (acceptor.accepted, acceptor.drained) == (20, 0)
        assert len(made) == 20 and crowds == []
        acceptor.close()

    uvloop.run(main())


class RunningOutOfDescriptors:
    """A listening socket whose next ``accept`` from Python fails as if the process had no
    descriptor left (EMFILE), once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failures = 1

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_a_drain_out_of_descriptors_rests_while_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    protocol, made, _ = echo_protocol()

    async def main() -> None:
        acceptor = Acceptor(listening_socket("127.0.0.1", 0), protocol)
        await acceptor.start()
        acceptor.sock = RunningOutOfDescriptors(acceptor.sock)  # type: ignore[assignment]
        clients = [socket.create_connection(("127.0.0.1", acceptor.port)) for _ in range(20)]
        while len(made) < 20:
            await asyncio.sleep(0)
        # The drain failed once and rested; the loop's server took the rest, one a turn.
        assert acceptor.drained == 0 and acceptor.accepted == 20
        for client in clients:
            client.close()
        acceptor.close()

    uvloop.run(main())
    assert "draining the accept queue paused" in caplog.text
    assert "Too many open files" in caplog.text


def test_a_drained_crowd_gets_its_tls_handshakes(tmp_path: Path) -> None:
    """The drain's own path to a protocol (``connect_accepted_socket`` with the server's TLS
    context): 40 clients queued at once each complete a handshake and are echoed, and a
    plain-text client among them is closed without harm to the rest."""
    key = new_key()
    cert, key_file = write_pem(
        tmp_path, "server", certificate("acceptor test", key, hosts=["127.0.0.1"]), key
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key_file)
    client_context = ssl.create_default_context(cafile=str(cert))
    protocol, made, _ = echo_protocol()

    def talk(raw: socket.socket) -> bytes:
        raw.settimeout(10)
        with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as client:
            client.sendall(b"ping")
            return client.recv(4)

    def plain(raw: socket.socket) -> bytes:
        raw.settimeout(10)
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with raw:
            return raw.recv(100)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        acceptor = Acceptor(listening_socket("127.0.0.1", 0), protocol, ssl_context=server_context)
        await acceptor.start()
        # The loop is blocked while they connect: all wait in the kernel's queue.
        crowd = [socket.create_connection(("127.0.0.1", acceptor.port)) for _ in range(41)]
        with ThreadPoolExecutor(max_workers=41) as pool:
            answers = await asyncio.gather(
                loop.run_in_executor(pool, plain, crowd[20]),
                *(loop.run_in_executor(pool, talk, c) for c in crowd[:20] + crowd[21:]),
            )
        assert answers[0] == b""  # the plain-text client: closed, nothing said
        assert answers[1:] == [b"ping"] * 40
        assert len(made) == 40 and acceptor.accepted + acceptor.drained == 41
        assert acceptor.drained >= 30, (acceptor.accepted, acceptor.drained)
        acceptor.close()

    uvloop.run(main())


class PeekingScreen:
    """Looks at a connection's bytes without taking them: nothing yet, or set it up now;
    records the loop turn of every look."""

    def __init__(self, turn: list[int]) -> None:
        self.turn = turn
        self.looks: list[tuple[int, bool]] = []  # (turn, whether bytes had come)

    def first_look(self, connection: socket.socket) -> float | None:
        try:
            connection.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            self.looks.append((self.turn[0], False))
            return NOTHING_YET
        self.looks.append((self.turn[0], True))
        return 0.0

    def released(self) -> None:
        raise AssertionError("this screen asks for no waits")


def test_a_crowds_first_bytes_heard_in_one_turn_are_looked_at_a_slice_a_turn() -> None:
    """A crowd drained before its clients write waits for their first bytes with a reader
    each; the bytes come in a burst, every reader in one turn. The looks go a slice a turn
    from the next turn on, not one in each reader's callback: a crowd's burst of refusals
    had made one long turn that every established connection waited out."""
    protocol, made, turn = echo_protocol()
    screen = PeekingScreen(turn)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        acceptor = Acceptor(
            listening_socket("127.0.0.1", 0),
            protocol,
            set_ups_per_turn=8,
            screen=screen,
            first_bytes_s=30.0,  # no silent connection is set up for want of bytes here
        )
        await acceptor.start()
        clients = [socket.create_connection(("127.0.0.1", acceptor.port)) for _ in range(64)]
        counting_turns(loop, turn)
        while acceptor.accepted + len(screen.looks) < 64:
            await asyncio.sleep(0)
        screened = len(screen.looks)
        assert screened >= 56 and not any(sent for _, sent in screen.looks), screen.looks
        drained_in = turn[0]
        for client in clients:  # the loop is not running: every reader is ready at once
            client.sendall(b"ping")
        while len(made) < 64:
            await asyncio.sleep(0)
        second = [t for t, sent in screen.looks if sent]
        assert len(second) == screened
        per_turn = {t: second.count(t) for t in set(second)}
        assert max(per_turn.values()) <= 8, per_turn
        assert len(per_turn) >= screened // 8 and min(per_turn) > drained_in, per_turn
        for client in clients:
            client.settimeout(5)
            assert await loop.run_in_executor(None, client.recv, 4) == b"ping"
            client.close()
        acceptor.close()

    uvloop.run(main())
