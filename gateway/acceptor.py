"""Listening sockets, and accepting every waiting connection in one loop turn.

uvloop's servers accept one connection per loop turn: libuv 1.45 stopped calling
``accept`` in a loop (one connection per readiness, the next on the next poll). An idle
loop's turns are microseconds long and nobody notices; under load each turn takes 1-2 ms,
so a crowd of 256 clients that connect at once is taken in one per turn: the listening
socket's queue held 140-238 connections for 200-400 ms, and a client that connected just
after the crowd waited up to 330 ms for its connection to be accepted, then under a
millisecond for its answer (``ss -ltn`` and a per-connection timeline under the chaos
bench's crowd). asyncio's own loop accepts in a loop; :class:`Acceptor` does the same on
any loop: when the socket is readable it accepts until the queue is empty, and each
connection gets its transport and protocol from ``loop.connect_accepted_socket``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable

__all__ = ["Acceptor", "listening_socket"]

log = logging.getLogger(__name__)

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_RETRY_S = 0.1
"""How long accepting pauses after it failed for want of descriptors or memory: the
connections wait in the kernel's queue instead of the loop retrying every turn."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host`` and ``port`` (0: the kernel picks), not listening
    yet: its port is known before the server that will accept on it exists."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Acceptor:
    """Accepts ``sock``'s connections, all that wait, each turn the socket is readable.

    ``protocol_factory`` makes each connection's protocol; with ``ssl_context`` the
    connection is TLS and the protocol sees it once the handshake is done (a handshake
    that fails closes the connection, logged at debug level as asyncio's servers do)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 4096,
        per_turn: int = 4096,
    ) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        self.backlog = backlog
        self.per_turn = per_turn
        """At most this many accepted in one turn (the rest in the next turns)."""
        self.accepted = 0
        """Connections accepted so far (for tests and the curious)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: set[asyncio.Task[object]] = set()
        self._retry: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        """Listen and accept on the running loop."""
        self._loop = asyncio.get_running_loop()
        self.sock.listen(self.backlog)
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._accept_waiting)

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections already accepted
        are their protocols' to close."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._loop is not None and self.sock.fileno() != -1:
            self._loop.remove_reader(self.sock.fileno())
        self._loop = None
        self.sock.close()

    def _accept_waiting(self) -> None:
        for _ in range(self.per_turn):
            try:
                connection, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the queue
            except OSError as exc:
                self._pause(exc)
                return
            self.accepted += 1
            connection.setblocking(False)
            self._serve(connection)

    def _serve(self, connection: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        # A task, not a wait: the transport and the protocol are made when it first runs (the
        # next turn, with every other connection accepted in this one); it ends once the
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

    def _pause(self, exc: OSError) -> None:
        loop = self._loop
        assert loop is not None
        if exc.errno in _OUT_OF_RESOURCES:
            log.warning("accepting paused for %.1f s: %s", _RETRY_S, exc)
        else:
            log.error("accepting paused for %.1f s after an unexpected error: %s", _RETRY_S, exc)
        loop.remove_reader(self.sock.fileno())
        self._retry = loop.call_later(_RETRY_S, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept_waiting)
