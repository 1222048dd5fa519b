"""A new HTTP connection's first protocol: it refuses from the head by itself, and hands the
connection to uvicorn's (:class:`gateway.http.protocol.HoldingProtocol`) for anything else.

Under a crowd of new clients most connections are refused for overload, once or several
times, before any of them is served. Each one made uvicorn's protocol (a parser, its
state, two address lookups, a scope per request): 81-85 us of an idle event loop for a
connection and its first refusal, against 38-45 us here (a side script; under load,
``python -m bench.refusal_cost --new-connections``: 232 against 193 us). A crowd's
set-up is the queue a newcomer waits in. This protocol reads a request's head itself
only while it looks like the one case it answers, an inference ``POST`` over HTTP/1.1
with a ``content-length`` and nothing that changes the framing; asks the app for a
refusal (:data:`Refusal`); writes it, skips the body by its length and waits for the
next head.
A refused request that asked for ``connection: close`` is answered so, and the connection
closed once its body is in. At the first request it does not refuse, or anything it does
not read (another method, chunked bodies, ``expect``, an upgrade, a malformed head), it
gives the connection and every byte of that request to uvicorn's protocol, which parses it
from the start, so what is served, and every error, is uvicorn's as before.

What it keeps from that protocol's overload handling: a crowd's first reads in slices
(:meth:`Overload.first_read_now`), the hold of a refused connection, the head timeout
(408 for half a head) and the keep-alive timeout.

Before either protocol, :class:`RefusingScreen` answers the same refusals for a crowd the
acceptor drained from the kernel's queue, on each socket before it has a transport.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from typing import Any, cast

from gateway.acceptor import NOTHING_YET
from gateway.http.protocol import HoldingProtocol, Refuse, with_default_headers
from gateway.overload import Overload

__all__ = ["Refusal", "RefusingProtocol", "RefusingScreen"]

Refusal = Callable[[str, list[tuple[bytes, bytes]]], bytes | None]
"""Given an inference request's path and raw headers (names lower-case): the whole refusal
to send when the data plane refuses it before its body, else None (nothing reserved)."""

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_MAX_HEAD = 16384
"""A head not complete within this many bytes is uvicorn's to judge."""
_FRAMING = frozenset((b"transfer-encoding", b"upgrade", b"expect", b"connection"))
"""Headers that change how a request is framed or answered: uvicorn reads such a request
(but ``connection: keep-alive`` or ``close``)."""
_PEEK = 32768
"""How much of a drained connection :class:`RefusingScreen` looks at: a request not whole
within it is set up and read as usual."""
_CLOSE = [(b"connection", b"close")]
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Bytes no head may hold (tab, CR and LF aside)."""


class RefusingProtocol(asyncio.Protocol):
    """One connection, until uvicorn's protocol takes it over (:meth:`_hand_over`)."""

    def __init__(
        self,
        *,
        refusal: Refusal,
        protocol: Callable[[], HoldingProtocol],
        overload: Overload,
        server_state: Any,
        head_timeout_s: float,
        keep_alive_s: float,
        screen: RefusingScreen | None = None,
    ) -> None:
        self._refusal = refusal
        self._screen = screen
        self._socket = -1  # this connection's descriptor while the screen keeps it a place
        self._protocol = protocol
        self._overload = overload
        self._state = server_state  # uvicorn's: connections to close at shutdown, headers
        self._head_timeout_s = head_timeout_s
        self._keep_alive_s = keep_alive_s
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buffer = b""  # from the start of the request not yet answered
        self._skip = 0  # body bytes of a refused request still to come
        self._close = False  # the refused request asked for "connection: close"
        self._fresh = True  # nothing read on this connection yet
        self._timer: asyncio.TimerHandle | None = None
        self._timing_head = False  # the timer is the head timeout (else keep-alive)
        self._release: asyncio.TimerHandle | None = None  # the end of a hold
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._state.connections.add(self)
        if self._screen is not None and self._screen.kept:
            self._socket = transport.get_extra_info("socket").fileno()
        self._time(head=True)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._fresh:
            self._fresh = False
            if not self._overload.first_read_now():
                self._buffer = data
                transport.pause_reading()
                self._overload.put_off(self._first_read)
                return
            self._give_back_place()
        self._buffer = self._buffer + data if self._buffer else data
        self._read()

    def _first_read(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._give_back_place()
        self._transport.resume_reading()
        self._read()

    def _read(self) -> None:
        """Answer every whole refused request in the buffer; hand over at anything else."""
        transport = self._transport
        assert transport is not None
        while self._buffer and not self._writing_paused and self._release is None:
            buffer = self._buffer
            if self._skip:
                skipped = min(self._skip, len(buffer))
                self._skip -= skipped
                self._buffer = buffer[skipped:]
                if self._skip:
                    return
                self._answered()
                continue
            if not buffer.startswith(b"POST /"[: len(buffer)]):
                self._hand_over()
                return
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD or b"\n\n" in buffer:
                    self._hand_over()
                elif not self._timing_head:  # part of a head: the head timeout again
                    self._time(head=True)
                return
            head = _inference_head(buffer, end)
            answer = self._refusal(*head[:2]) if head is not None else None
            if answer is None or head is None:
                self._hand_over()
                return
            self._cancel_timer()
            defaults = self._state.default_headers
            self._close = head[3]
            transport.write(
                with_default_headers(answer, defaults + _CLOSE if self._close else defaults)
            )
            self._buffer = buffer[end + 4 :]
            self._skip = head[2]
            if not self._skip:
                self._answered()
        if not self._buffer and not self._skip and self._timer is None and self._release is None:
            self._time(head=False)  # idle (a held connection is not idle: it is not read)

    def _answered(self) -> None:
        """A refused request is whole (its body skipped): counted, and perhaps held; or the
        connection closed, when the request asked for that (after its body, so the client
        reads the refusal rather than a reset)."""
        self._state.total_requests += 1
        self._overload.answers += 1
        if self._transport is None:
            return
        if self._close:
            self._overload.refusals += 1
            self._buffer = b""
            self._transport.close()
            return
        self._release = self._overload.hold_reads(self._transport.pause_reading, self._resume)

    def _resume(self) -> None:
        self._release = None
        self._overload.held -= 1
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not self._writing_paused:
            transport.resume_reading()
        self._read()

    def _hand_over(self) -> None:
        """uvicorn's protocol takes the connection, with the request read so far."""
        transport = self._transport
        assert transport is not None
        self._cancel_timers()
        self._state.connections.discard(self)
        self._transport = None
        data, self._buffer = self._buffer, b""
        self._protocol().take_over(transport, data)

    def _time(self, *, head: bool) -> None:
        self._cancel_timer()
        seconds = self._head_timeout_s if head else self._keep_alive_s
        self._timer = self._loop.call_later(seconds, self._timed_out)
        self._timing_head = head

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timing_head = False

    def _timed_out(self) -> None:
        """No whole head in time (408 for half of one), or idle past keep-alive: closed."""
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._timing_head and self._buffer:
            transport.write(_TIMED_OUT)
        transport.close()

    def pause_writing(self) -> None:
        # A client that sends and never reads: stop reading its requests until it does.
        self._writing_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        transport = self._transport
        if transport is None or transport.is_closing() or self._release is not None:
            return
        transport.resume_reading()
        self._read()

    def shutdown(self) -> None:
        """Called by uvicorn at shutdown: nothing is in flight here, close at once."""
        if self._transport is not None:
            self._transport.close()

    def _give_back_place(self) -> None:
        """The first request is read now: a queue place the screen kept for it goes back,
        and the request is refused or let in (a place kept again) as any other."""
        if self._socket != -1:
            assert self._screen is not None
            self._screen.give_back(self._socket)
            self._socket = -1

    def connection_lost(self, exc: Exception | None) -> None:
        self._give_back_place()
        self._cancel_timers()
        self._state.connections.discard(self)
        self._transport = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        if self._release is not None:
            self._release.cancel()
            self._release = None
            self._overload.held -= 1


class RefusingScreen:
    """Refuses a crowd's connections before they have a transport
    (:class:`gateway.acceptor.Screen`).

    A connection the acceptor drained from the kernel's queue has usually sent its first
    request already. When the request is whole (head and body) and one this module's
    protocol would refuse, the screen answers it straight on the socket: a look at the
    bytes without taking them, the refusal, the bytes taken and the answer sent, no
    transport, protocol or loop turn. Held for overload as the protocol would hold it, the
    connection gets its transport only when the hold ends (the acceptor waits), so a crowd
    refused at its onset costs no set-up until then; a newcomer behind the crowd waits for
    less. Anything else (no whole request yet, one not refused, not an inference head) is
    left in the kernel for the protocol to read from the first byte; a request let in
    keeps a place in its model's queue until then (:attr:`kept`)."""

    def __init__(
        self,
        *,
        refuse: Refuse,
        release: Callable[[str], None],
        overload: Overload,
        server_state: Any,
    ) -> None:
        self._refuse = refuse
        self._release = release
        self._overload = overload
        self._state = server_state
        self.kept: dict[int, str] = {}
        """Connections let in (by descriptor) and the model whose queue keeps a place for
        each one's first request until its protocol reads it (:meth:`give_back`)."""
        self.refused = 0
        """Requests refused here (for tests and the curious)."""

    def first_look(self, connection: socket.socket) -> float | None:
        try:
            data = connection.recv(_PEEK, socket.MSG_PEEK)
        except BlockingIOError:
            return NOTHING_YET
        except OSError:  # reset: the protocol will see it
            return 0.0
        end = data.find(b"\r\n\r\n")
        if end < 0 or not data.startswith(b"POST /"):
            return 0.0
        head = _inference_head(data, end)
        if head is None or len(data) < end + 4 + head[2]:
            return 0.0
        answer = self._refuse(head[0], head[1])
        if answer is None:
            return 0.0
        if isinstance(answer, str):
            # Let in: a place is kept in the model's queue until the protocol reads the
            # request, so the rest of the crowd screened before then does not see that
            # place free too (the screen would have let all of a crowd's first slices in).
            self.give_back(connection.fileno())  # a descriptor closed without a read
            self.kept[connection.fileno()] = answer
            return 0.0
        close = head[3]
        defaults = self._state.default_headers
        answer = with_default_headers(answer, defaults + _CLOSE if close else defaults)
        try:
            connection.recv(end + 4 + head[2])  # there: it was just seen
            sent = connection.send(answer)
        except OSError:
            sent = -1  # reset meanwhile
        self.refused += 1
        self._state.total_requests += 1
        self._overload.answers += 1
        if close or sent != len(answer):
            # An empty send buffer takes a refusal whole; were it not, the client reads a
            # reset, not half an answer (it was refused either way).
            self._overload.refusals += 1
            connection.close()
            return None
        hold = self._overload.hold()
        if hold:
            self._overload.held += 1
        return hold

    def released(self) -> None:
        self._overload.held -= 1

    def give_back(self, descriptor: int) -> None:
        """The place kept for the connection on ``descriptor`` (read now, or closed)."""
        model = self.kept.pop(descriptor, None)
        if model is not None:
            self._release(model)


def _inference_head(
    buffer: bytes, end: int
) -> tuple[str, list[tuple[bytes, bytes]], int, bool] | None:
    """(path, headers, content length, close) of a head ``buffer[:end]`` that this protocol
    may refuse: ``POST <path ending in /infer> HTTP/1.1``, well-formed lines, one decimal
    ``content-length``, no header in :data:`_FRAMING` but ``connection: keep-alive`` or
    ``close`` (then ``close`` is true). None for anything else (uvicorn's to read)."""
    lines_ended = buffer.count(b"\r\n", 0, end)
    if buffer.count(b"\n", 0, end) != lines_ended or buffer.count(b"\r", 0, end) != lines_ended:
        return None  # a bare CR or LF
    if _CONTROL.search(buffer, 0, end) is not None:
        return None  # a control character (uvicorn's parser refuses them)
    lines = buffer[:end].split(b"\r\n")
    request = lines[0].split(b" ")
    if len(request) != 3 or request[2] != b"HTTP/1.1":
        return None
    path = request[1].split(b"?", 1)[0]
    if not path.endswith(b"/infer"):
        return None
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    close = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name or b"\t" in name:
            return None  # also a folded line (it starts with white space)
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name in _FRAMING:
            option = value.lower() if name == b"connection" else b""
            if option not in (b"keep-alive", b"close"):
                return None
            close = close or option == b"close"
        headers.append((name, value))
    if length < 0:
        return None
    return path.decode("latin-1"), headers, length, close
