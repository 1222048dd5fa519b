"""Listening sockets, and taking a crowd of waiting connections in one loop turn.

uvloop's servers accept one connection per loop turn: libuv 1.45 stopped calling
``accept`` in a loop (one connection per readiness, the next on the next poll). An idle
loop's turns are microseconds long and nobody notices; under load each turn takes 1-2 ms,
so a crowd of 256 clients that connect at once is taken in one per turn: the listening
socket's queue held 140-238 connections for 200-400 ms, and a client that connected just
after the crowd waited up to 330 ms for its connection to be accepted, then under a
millisecond for its answer (``ss -ltn`` and a per-connection timeline under the chaos
bench's crowd).

:class:`Acceptor` keeps the loop's own server, whose accept path is C and cheapest for a
connection that comes alone, and adds a drain: when the server accepts a connection and
the kernel's queue still holds more (the listening socket's ``TCP_INFO`` says how many),
a reader on a duplicate of the socket's descriptor accepts every waiting connection in
its turn, each given its transport and protocol by ``loop.connect_accepted_socket``, and
stops once the queue is empty. Accepting everything from Python, every time, cost a
connection that came alone about 50 us more of the loop than the server's own path
(``python -m bench.revisions --new-connections``).

A drained connection is set up in a later turn, a slice at a time, newest first; before
that a :class:`Screen` may look at it (over HTTP, one that refuses a whole request on the
socket and keeps a held connection waiting for its transport until the hold ends).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol

__all__ = ["NOTHING_YET", "Acceptor", "Screen", "listening_socket"]

log = logging.getLogger(__name__)

_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux
_QUEUED_AT = 24
"""Where ``tcpi_unacked`` sits in ``struct tcp_info``: for a listening socket, the
connections in its accept queue (eight one-byte fields, then rto, ato, snd_mss, rcv_mss)."""
_REST_S = 1.0
"""How long the drain rests after an accept failed (out of descriptors): the loop's server
goes on taking one a turn meanwhile, and the log gets one line a second, not one a turn."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host`` and ``port`` (0: the kernel picks), not listening
    yet: its port is known before the server that will accept on it exists."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


NOTHING_YET = -1.0
"""What :meth:`Screen.first_look` says of a connection that has sent nothing yet."""


class Screen(Protocol):
    """Looks at each drained connection before it has a transport (plain text only)."""

    def first_look(self, connection: socket.socket) -> float | None:
        """None: the screen answered the connection and closed it; :data:`NOTHING_YET`:
        nothing to look at yet (the acceptor looks again when the first bytes come, or
        sets it up after ``first_bytes_s``); else the seconds to wait before setting it
        up (0: now), each wait ended by :meth:`released`."""

    def released(self) -> None:
        """A wait :meth:`first_look` asked for is over (the connection is set up, or
        closed with the acceptor)."""


class Acceptor:
    """Serves ``sock``: the loop's server accepts, and a crowd waiting in the kernel's
    queue is drained in one turn.

    ``protocol_factory`` makes each connection's protocol; with ``ssl_context`` the
    connection is TLS and the protocol sees it once the handshake is done (a handshake
    that fails closes the connection, logged at debug level as asyncio's servers do).
    Without TLS, a ``screen`` sees each drained connection first (:class:`Screen`)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 4096,
        per_turn: int = 4096,
        set_ups_per_turn: int = 32,
        on_drained: Callable[[int], None] | None = None,
        screen: Screen | None = None,
        first_bytes_s: float = 0.1,
    ) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        self.backlog = backlog
        self.per_turn = per_turn
        """At most this many drained in one turn (the rest in the next turns)."""
        self.set_ups_per_turn = set_ups_per_turn
        """At most this many drained connections given a transport and protocol a turn,
        newest first; the rest wait, accepted, for the next turns."""
        self.on_drained = on_drained
        """Told how many connections each drain took (a crowd's size, as it arrives)."""
        self.screen = screen if ssl_context is None else None
        self.first_bytes_s = first_bytes_s
        """How long a screened connection that has sent nothing waits, without a transport,
        for its first bytes before it is set up anyway (its protocol times it out)."""
        self.accepted = 0
        """Connections accepted by the loop's server (for tests and the curious)."""
        self.drained = 0
        """Connections accepted by the drain."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._watched = -1  # a duplicate of sock's descriptor, for the drain's reader
        self._draining = False
        self._rest_until = 0.0
        self._starting: set[asyncio.Task[object]] = set()
        self._accepted: list[socket.socket] = []  # drained, not set up yet; newest last
        self._setting_up = False
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}  # screened, set up later
        self._silent: dict[socket.socket, asyncio.TimerHandle] = {}  # nothing sent yet
        self._looked: set[socket.socket] = set()  # waited for its first bytes

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        """Listen and accept on the running loop."""
        self._loop = loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, sock=self.sock, ssl=self.ssl_context, backlog=self.backlog
        )
        self.sock.setblocking(False)
        # The loop's server polls the socket's own descriptor; a second reader on it would
        # clash, so the drain polls a duplicate (one socket, one queue).
        self._watched = os.dup(self.sock.fileno())

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections already accepted
        are their protocols' to close (those not set up yet are closed here)."""
        self._stop_draining()
        for connection in self._accepted:
            connection.close()
        self._accepted.clear()
        for connection, timer in self._silent.items():
            timer.cancel()
            if self._loop is not None:
                self._loop.remove_reader(connection.fileno())
            connection.close()
        self._silent.clear()
        self._looked.clear()
        for connection, timer in self._waiting.items():
            timer.cancel()
            connection.close()
            assert self.screen is not None
            self.screen.released()
        self._waiting.clear()
        if self._watched != -1:
            os.close(self._watched)
            self._watched = -1
        if self._server is not None:
            self._server.close()
            self._server = None
        self._loop = None

    def _protocol(self) -> asyncio.Protocol:
        """The loop's server accepted a connection: its protocol, and a drain when more
        connections wait behind it."""
        self.accepted += 1
        if not self._draining and self._queued():
            self._start_draining()
        return self.protocol_factory()

    def _queued(self) -> bool:
        if _TCP_INFO is None:
            return False
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _QUEUED_AT + 4)
        except OSError:
            return False
        return len(info) >= _QUEUED_AT + 4 and struct.unpack_from("I", info, _QUEUED_AT)[0] > 0

    def _start_draining(self) -> None:
        loop = self._loop
        if loop is None or self._watched == -1 or loop.time() < self._rest_until:
            return
        self._draining = True
        loop.add_reader(self._watched, self._drain)

    def _stop_draining(self) -> None:
        if self._draining and self._loop is not None and self._watched != -1:
            self._loop.remove_reader(self._watched)
        self._draining = False

    def _drain(self) -> None:
        taken: list[socket.socket] = []
        try:
            for _ in range(self.per_turn):
                try:
                    connection, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    self._stop_draining()  # the queue is empty: the loop's server will do
                    return
                except ConnectionAbortedError:
                    continue  # the client gave up while it waited in the queue
                except OSError as exc:  # out of descriptors or memory
                    log.warning("draining the accept queue paused for %.0f s: %s", _REST_S, exc)
                    self._stop_draining()
                    assert self._loop is not None
                    self._rest_until = self._loop.time() + _REST_S
                    return
                connection.setblocking(False)
                taken.append(connection)
        finally:
            self._accepted += taken
            if taken:
                self._set_up_later()
            self.drained += len(taken)
            if taken and self.on_drained is not None:
                self.on_drained(len(taken))

    # A crowd drained in one turn was set up in the next: 100-180 transports and protocols
    # in one turn of 5-10 ms under load, and a newcomer accepted meanwhile waited for that
    # turn to end and then behind all of them. Set-ups now go a slice a turn, and newest
    # first (adaptive LIFO: in order while nothing waits; once a queue has formed, the
    # connection that has waited least is the one whose client is still there, and the
    # crowd's oldest wait a few turns more), so the loop polls its other connections
    # between slices and a newcomer waits for one slice. A screened connection answered
    # and held waits for its set-up until the hold ends: a crowd refused at its onset
    # takes no transports while the newcomers behind it wait. Most of a crowd's
    # connections are drained before their clients write: each waits for its first bytes
    # with a reader (microseconds, against a transport's tens), then is looked at again,
    # in a later turn's slice (:meth:`_set_up_later`).
    def _set_up(self) -> None:
        waiting = self._accepted
        if self._loop is None:  # closed meanwhile
            self._setting_up = False
            return
        for _ in range(min(self.set_ups_per_turn, len(waiting))):
            connection = waiting.pop()
            wait = self.screen.first_look(connection) if self.screen is not None else 0.0
            if wait == NOTHING_YET and connection not in self._looked:
                self._await_first_bytes(connection)
                continue
            self._looked.discard(connection)
            if wait is None:
                continue
            if wait > 0:
                self._waiting[connection] = self._loop.call_later(wait, self._waited, connection)
                continue
            self._serve(connection)
        self._setting_up = False
        if waiting:
            self._set_up_later()

    def _await_first_bytes(self, connection: socket.socket) -> None:
        """A reader and a timer, not a transport, until the client writes (a drained
        connection often has not yet: its client writes once its connect returns)."""
        assert self._loop is not None
        self._looked.add(connection)
        self._loop.add_reader(connection.fileno(), self._first_bytes, connection)
        self._silent[connection] = self._loop.call_later(
            self.first_bytes_s, self._first_bytes, connection
        )

    def _first_bytes(self, connection: socket.socket) -> None:
        """Bytes came (or the wait ended): looked at again, newest first."""
        timer = self._silent.pop(connection, None)
        if timer is None or self._loop is None:
            return
        timer.cancel()
        self._loop.remove_reader(connection.fileno())
        self._accepted.append(connection)
        self._set_up_later()

    def _set_up_later(self) -> None:
        """Slices of set-ups from the next turn on, never in the turn that drained or
        heard from the connections: the first bytes of a crowd's clients come in a burst,
        one reader each in one turn, and each had been looked at (and refused) in its
        reader's callback, a 5-6 ms turn for a crowd of 256 (py-spy under the chaos
        bench) that every established connection waited out."""
        if not self._setting_up and self._loop is not None:
            self._setting_up = True
            self._loop.call_soon(self._set_up)

    def _waited(self, connection: socket.socket) -> None:
        del self._waiting[connection]
        assert self.screen is not None
        self.screen.released()
        self._serve(connection)

    def _serve(self, connection: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        # A task, not a wait: the transport and the protocol are made when it first runs (the
        # next turn, with every other connection drained in this one); it ends once the
        # protocol has the connection (after the handshake, for TLS).
        task: asyncio.Task[object] = loop.create_task(
            loop.connect_accepted_socket(self.protocol_factory, connection, ssl=self.ssl_context)
        )
        self._starting.add(task)
        task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[object]) -> None:
        self._starting.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, OSError):  # ssl.SSLError is one
            # A TLS handshake that failed (no client certificate under mTLS, a plain-text
            # client on a TLS port) or a connection reset before it began.
            log.debug("a connection closed before it was set up: %r", exc)
        elif exc is not None:
            log.error("a connection could not be set up", exc_info=exc)
