"""The gateway's end of the same-node channel to Ray replicas.

Each replica of a model version that Serve placed on this node listens on a Unix socket in
the version's directory (gateway/backends/_ray_replica.py). A batch sent there skips Serve's
router and Ray's task machinery (milliseconds of CPU per call on a small machine, see
../shared/design.md section 1) and pickling: it is one frame each way. Replicas on other
nodes, and BYTES tensors, still go through Serve's handles.

The directory is rescanned at most every ``RESCAN_S``: a replica Serve restarted or added
appears with its new socket; one that died is dropped at its first failed call, and the
batch is sent again elsewhere (inference is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path

from gateway.backends import _wire
from gateway.backends.base import Tensors
from gateway.errors import BackendError, InvalidInput

__all__ = ["Channel", "ChannelBroken", "Channels", "channel_dir"]

RESCAN_S = 1.0
"""How often a version's socket directory is listed for replicas Serve added or restarted."""

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def channel_dir(namespace: str, app: str) -> Path:
    """A private, short directory for one Serve application's sockets (a Unix socket path
    must fit in 108 bytes, and model names may be long)."""
    digest = hashlib.sha256(f"{namespace}\0{app}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"turnout-{os.getuid()}" / digest


class ChannelBroken(Exception):
    """The replica went away under a batch (or before it): send the batch elsewhere."""


class Channel:
    """One replica's socket: idle connections are kept, one batch runs on each at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inflight = 0
        self.broken = False
        self._idle: list[_Connection] = []

    async def call(self, inputs: Tensors) -> tuple[Tensors, str, str]:
        """(outputs, replica identity, device) of one batch."""
        self.inflight += 1
        connection: _Connection | None = None
        try:
            connection = self._idle.pop() if self._idle else await self._connect()
            reader, writer = connection
            writer.writelines(_wire.encode({}, inputs))
            await writer.drain()
            meta_bytes, payload_bytes = _wire.lengths(await reader.readexactly(_wire.HEADER.size))
            meta, outputs = _wire.decode(
                await reader.readexactly(meta_bytes), await reader.readexactly(payload_bytes)
            )
        except (OSError, EOFError, ValueError) as exc:  # IncompleteReadError is an EOFError
            self._fail(connection)
            raise ChannelBroken(f"replica socket {self.path.name}: {exc!r}") from exc
        except BaseException:
            self._discard(connection)  # cancelled mid-frame: the stream is out of step
            raise
        finally:
            self.inflight -= 1
        self._idle.append(connection)
        if "error" in meta:
            error = InvalidInput if meta.get("kind") == "invalid" else BackendError
            raise error(str(meta["error"]))
        return outputs, str(meta["replica"]), str(meta["device"])

    async def _connect(self) -> _Connection:
        try:
            return await asyncio.open_unix_connection(str(self.path))
        except ConnectionRefusedError:
            # Nobody listens: the replica that bound it is gone. Later scans skip it.
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise

    def _fail(self, connection: _Connection | None) -> None:
        self.broken = True
        self._discard(connection)
        self.close()

    @staticmethod
    def _discard(connection: _Connection | None) -> None:
        if connection is not None:
            connection[1].close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()


class Channels:
    """The replicas of one model version that listen on this node."""

    def __init__(self, directory: Path, per_replica: int) -> None:
        self.directory = directory
        self.per_replica = per_replica
        """Batches one replica runs at a time; more go to Serve's handle."""
        self._channels: dict[str, Channel] = {}
        self._scanned = 0.0
        self._turn = 0

    def __len__(self) -> int:
        return len(self._channels)

    def pick(self) -> Channel | None:
        """The least busy replica here with room for a batch, if any; ties in turn."""
        if time.monotonic() - self._scanned > RESCAN_S:
            self.scan()
        channels = list(self._channels.values())
        self._turn += 1
        best: Channel | None = None
        for i in range(len(channels)):
            channel = channels[(self._turn + i) % len(channels)]
            if channel.inflight < self.per_replica and (
                best is None or channel.inflight < best.inflight
            ):
                best = channel
        return best

    def scan(self) -> None:
        self._scanned = time.monotonic()
        try:
            names = {e.name for e in os.scandir(self.directory) if e.name.endswith(".sock")}
        except OSError:
            names = set()
        for name in list(self._channels):
            if name not in names:
                self._channels.pop(name).close()
        for name in names - self._channels.keys():
            self._channels[name] = Channel(self.directory / name)

    def prune(self) -> None:
        """Remove the sockets nobody listens on (replicas killed before they could remove
        theirs), so that a new load starts from the live ones."""
        for path in self.directory.glob("*.sock"):
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                except ConnectionRefusedError:
                    with contextlib.suppress(OSError):
                        path.unlink()
                except OSError:
                    pass

    def drop(self, channel: Channel) -> None:
        """Forget a replica whose socket failed (until a scan finds it listening again)."""
        if self._channels.get(channel.path.name) is channel:
            del self._channels[channel.path.name]
        channel.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
