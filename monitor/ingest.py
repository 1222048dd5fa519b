"""Receives record frames from the gateway: a Unix datagram socket, one frame a datagram.

Two threads, so the socket is always drained and the gateway never waits on us:

    receiver: recv -> bounded queue (full: drop the frame, count it)
    worker:   queue -> decode_frame (malformed: count it) -> MonitorState.apply; ticks the
              window clock at least every ``tick_s``

A datagram socket never blocks the sender on a slow reader beyond the socket buffer; the
gateway sends without blocking and counts its own drops when that buffer is full.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.state import MonitorState
from turnout_contract.records import decode_frame

if TYPE_CHECKING:
    from monitor.tracing import Tracer

__all__ = ["Ingest"]

log = logging.getLogger("turnout.monitor")

#: Largest datagram read (frames larger than the socket allows never arrive anyway).
MAX_DATAGRAM = 4 * 1024 * 1024
RECEIVE_BUFFER = 8 * 1024 * 1024


class Ingest:
    """The receiving end of the gateway's telemetry: start(), stop()."""

    def __init__(
        self,
        state: MonitorState,
        path: Path,
        *,
        queue_size: int = 4096,
        tick_s: float = 0.2,
        on_tick: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.time,
        tracer: Tracer | None = None,
    ) -> None:
        self.state = state
        self.tracer = tracer
        self.path = path
        self.tick_s = tick_s
        self.on_tick = on_tick
        self.clock = clock
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socket: socket.socket | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind(str(self.path))
        sock.settimeout(0.2)
        self._socket = sock
        for name, target in (("receiver", self._receive), ("worker", self._work)):
            thread = threading.Thread(target=target, name=f"turnout-monitor-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(5)
        self._threads = []
        if self._socket is not None:  # only a socket we bound is ours to remove
            self._socket.close()
            self._socket = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _receive(self) -> None:
        assert self._socket is not None
        sock = self._socket
        buffer = bytearray(MAX_DATAGRAM)
        while not self._stopping.is_set():
            try:
                size = sock.recv_into(buffer)
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("monitor socket failed")
                return
            # Only this thread writes these two counters: no lock, so a long apply never
            # holds the socket up.
            self.state.frames_received += 1
            try:
                self.queue.put_nowait(bytes(buffer[:size]))
            except queue.Full:
                self.state.frames_dropped += 1

    def _work(self) -> None:
        next_tick = 0.0
        while not self._stopping.is_set():
            try:
                payload: bytes | None = self.queue.get(timeout=self.tick_s)
            except queue.Empty:
                payload = None
            now = self.clock()
            if payload is not None:
                self.handle(payload, now)
            if now >= next_tick:
                next_tick = now + self.tick_s
                try:
                    self.state.tick(now)
                    if self.on_tick is not None:
                        self.on_tick(now)
                    if self.tracer is not None:
                        self.tracer.tick(now)
                except Exception:  # a bug in statistics or alerting must not stop ingestion
                    log.exception("monitor tick failed")

    def handle(self, payload: bytes, now: float) -> None:
        """Decode and apply one frame; count it as invalid when it cannot be."""
        try:
            batch = decode_frame(payload)
            self.state.apply(batch, now)
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            self.state.frames_invalid += 1
            log.debug("invalid record frame: %s", exc)
            return
        except Exception:  # never let one frame stop the worker
            self.state.frames_invalid += 1
            log.exception("record frame could not be applied")
            return
        if self.tracer is not None:
            try:
                self.tracer.add(batch, now)
            except Exception:  # tracing must never cost the statistics
                self.state.frames_untraced += 1
                log.exception("spans of a record frame could not be built")
