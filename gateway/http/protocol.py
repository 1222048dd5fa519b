"""The HTTP/1.1 connection: uvicorn's httptools protocol, held back after an overload refusal.

While the event loop is overrun by refusals (:class:`gateway.overload.Overload`), a
connection whose request was refused for overload (429) is not read again for a while: its
next request waits in the kernel's socket buffer, costing nothing, while the refusal itself
went out at once. New connections, and connections that were served, are read as before.
The hold never exceeds the Retry-After the refusal carried, so a client that honours it
never notices.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.overload import Overload

__all__ = ["REFUSED_KEY", "HoldingProtocol"]

REFUSED_KEY = "turnout.refused"
"""Set in a request's ASGI scope by the app when it refused the request for overload."""


class HoldingProtocol(HttpToolsProtocol):
    overload: ClassVar[Overload]

    @classmethod
    def watching(cls, overload: Overload) -> type[HoldingProtocol]:
        """The protocol class for one server (uvicorn builds protocols from a class)."""
        return type(cls.__name__, (cls,), {"overload": overload})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release: asyncio.TimerHandle | None = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        scope = cycle.scope

        def on_response() -> None:
            self.on_response_complete()
            if REFUSED_KEY not in scope or self.transport.is_closing():
                return
            hold = self.overload.hold()
            if hold:
                self.flow.pause_reading()
                self._release = self.loop.call_later(hold, self._resume)
                self.overload.held += 1

        cycle.on_response = on_response

    def _resume(self) -> None:
        self._release = None
        self.overload.held -= 1
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
            self.overload.held -= 1
        super().connection_lost(exc)
