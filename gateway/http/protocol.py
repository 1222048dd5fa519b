"""The HTTP/1.1 connection: uvicorn's httptools protocol, with three things for overload.

A connection starts with :class:`gateway.http.refusing.RefusingProtocol`, which refuses
from the head by itself (and reads a crowd's first bytes in slices); this protocol takes
the connection over at the first request that one does not refuse (:meth:`take_over`).

- **Refusal from the head.** As soon as an inference request's head is parsed, the data
  plane may refuse it (every queue of the model full): the connection writes the whole 429
  itself, without running the ASGI app, and skips the body as it arrives.
- **Holding back.** While the event loop is overrun by refusals
  (:class:`gateway.overload.Overload`), a connection refused for overload (429) is not
  read again for a while: its next request waits in the kernel's socket buffer, costing
  nothing, while the refusal itself went out at once. New connections, and connections
  that were served, are read as before. The hold never exceeds the Retry-After the refusal
  carried, so a client that honours it never notices.
- **A head timeout.** A connection that sends no head, or part of one, is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.overload import Overload

__all__ = ["REFUSED_KEY", "RESERVED_KEY", "HoldingProtocol", "Refuse", "with_default_headers"]

REFUSED_KEY = "turnout.refused"
"""Set in a request's ASGI scope by the app when it refused the request for overload."""

RESERVED_KEY = "turnout.reserved"
"""Set in a request's ASGI scope by the connection: the model whose queue keeps a place for
the request (the refuser reserved it); the app releases it."""


_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


Refuse = Callable[[str, list[tuple[bytes, bytes]]], bytes | str | None]
"""Given an inference request's path and raw headers: the whole refusal to send at once,
when the data plane refuses it before its body is read; else the model that keeps a queue
place for it (for the request's scope, :data:`RESERVED_KEY`), or None (nothing kept)."""


class _OneWrite:
    """The transport as a response cycle sees it: a response's head is held until its body
    is written, so head and body leave in one ``write`` (one send syscall, not two, per
    response; uvicorn writes them apart)."""

    __slots__ = ("_head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._head = b""

    def write(self, data: bytes) -> None:
        if (
            not self._head
            and data.startswith(b"HTTP/1.1 ")
            and not data.startswith(b"HTTP/1.1 100 ")  # 100 Continue: the client waits on it
            and data.endswith(b"\r\n\r\n")
        ):
            self._head = data  # the status line and headers: the body follows
            return
        head, self._head = self._head, b""
        self.transport.write(head + data if head else data)

    def _flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            self.transport.write(head)

    def close(self) -> None:
        self._flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class HoldingProtocol(HttpToolsProtocol):
    overload: ClassVar[Overload]
    head_timeout_s: ClassVar[float] = 10.0
    refusers: ClassVar[tuple[Refuse, ...]] = ()  # a tuple: a bare function would bind

    @classmethod
    def watching(
        cls, overload: Overload, head_timeout_s: float = 10.0, refuse: Refuse | None = None
    ) -> type[HoldingProtocol]:
        """The protocol class for one server (uvicorn builds protocols from a class)."""
        attributes = {
            "overload": overload,
            "head_timeout_s": head_timeout_s,
            "refusers": (refuse,) if refuse is not None else (),
        }
        return type(cls.__name__, (cls,), attributes)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._discarding = False  # the body of a request already refused from its head
        self._one_write: _OneWrite | None = None

    # A connection that sends nothing, or half a request head, is closed after
    # head_timeout_s (a 408 for the half head): slow clients cannot hold sockets forever.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def take_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """The connection from :class:`~gateway.http.refusing.RefusingProtocol`, with the
        bytes of the request it did not answer (from the request's first byte)."""
        self.connection_made(transport)
        transport.set_protocol(self)
        if data:
            self.data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._head_timer is None:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            if self._in_head:  # part of a head came
                self.transport.write(_TIMED_OUT)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        reserved = self._refused_from_head()
        if reserved is True:
            return
        super().on_headers_complete()
        cycle = self.cycle
        if self._one_write is None:
            self._one_write = _OneWrite(self.transport)
        cycle.transport = self._one_write  # type: ignore[assignment]  # write, close, is_closing
        scope = cycle.scope
        if reserved:
            # The app's task was created, not run yet: it finds the key (and releases it).
            cast(dict[str, Any], scope)[RESERVED_KEY] = reserved

        def on_response() -> None:
            self.overload.answers += 1
            self.on_response_complete()
            if REFUSED_KEY not in scope or self.transport.is_closing():
                return
            self._hold()

        cycle.on_response = on_response

    # A refusal from the head alone skips the ASGI app: no task, no scope, no cycle, about
    # 100 us less of the event loop per refused request, which under overload is the loop
    # time admitted requests get back. Only for a request with no response ahead of it on
    # its connection (HTTP/1.1 answers in order) that keeps the connection alive.
    def _refused_from_head(self) -> bool | str:
        """True: refused and answered; a model's name: let in, a place kept in its queue;
        False: neither."""
        if (
            not self.refusers
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.pipeline
            or self.parser.get_method() != b"POST"
            or not self.parser.should_keep_alive()
            or self.parser.should_upgrade()
        ):
            return False
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        if not path.endswith("/infer"):
            return False
        answer = self.refusers[0](path, self.headers)
        if answer is None:
            return False
        if isinstance(answer, str):
            return answer
        self.transport.write(with_default_headers(answer, self.server_state.default_headers))
        self._discarding = True
        return True

    def on_body(self, body: bytes) -> None:
        if not self._discarding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._discarding:
            super().on_message_complete()
            return
        self._discarding = False
        self.server_state.total_requests += 1
        self.overload.answers += 1
        if self.transport.is_closing():
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._hold()

    def _hold(self) -> None:
        self._release = self.overload.hold_reads(self.flow.pause_reading, self._resume)

    def _resume(self) -> None:
        self._release = None
        self.overload.held -= 1
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._release is not None:
            self._release.cancel()
            self._release = None
            self.overload.held -= 1
        super().connection_lost(exc)


def with_default_headers(answer: bytes, defaults: list[tuple[bytes, bytes]]) -> bytes:
    """A whole response with the server's default headers (uvicorn's date and server) after
    its status line, as uvicorn writes every response."""
    status_line, _, rest = answer.partition(b"\r\n")
    return status_line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in defaults) + rest
