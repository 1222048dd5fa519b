"""The sending end of the record socket: one non-blocking Unix datagram socket."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from typing import Final

from turnout_contract.address import socket_path

__all__ = ["DatagramSocket"]

log = logging.getLogger(__name__)

_SEND_BUFFER_BYTES: Final = 4 * 1024 * 1024  # the kernel caps it at net.core.wmem_max
# A sidecar that is absent, restarting or behind: expected, counted, never logged.
_EXPECTED_ERRNOS: Final = frozenset(
    {
        errno.ENOENT,
        errno.ECONNREFUSED,
        errno.EAGAIN,
        errno.EWOULDBLOCK,
        errno.ENOBUFS,
        errno.EMSGSIZE,
        errno.ENOTCONN,
    }
)


class DatagramSocket:
    """``send`` never blocks and never raises: it answers whether the frame left."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.path = str(socket_path(address))
        self._socket: socket.socket | None = None
        self._last_error: int | None = -1  # log each new kind of failure once

    def open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # the kernel's default still works
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        self._socket = sock

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def send(self, frame: bytes) -> bool:
        sock = self._socket
        if sock is None:
            return False
        try:
            sock.sendto(frame, self.path)
        except OSError as exc:
            if exc.errno not in _EXPECTED_ERRNOS and exc.errno != self._last_error:
                log.warning("sending records to %s failed: %s", self.address, exc)
            self._last_error = exc.errno
            return False
        return True
