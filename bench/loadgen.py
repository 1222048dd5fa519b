"""Load that hey and h2load do not make: open-loop HTTP arrivals, latency probes, slow clients.

Each mode runs as its own process (``python -m bench.loadgen MODE ...``) and prints one JSON
document, so a probe's clock is not the generator's busy event loop:

- ``open``: requests arrive at ``--rate`` per second whatever the server answers (an open
  loop, as traffic from many independent users does); each goes out on an idle kept-alive
  connection, or a new one when none is idle, up to ``--max-connections`` (256, a client
  pool's bound: unbounded, a lagging server made the generator open tens of thousands of
  connections, whose set-up then took the server's loop); its latency counts from when
  it was due, so a slow server cannot hide its queue by slowing the generator (no
  coordinated omission);
  ``--schedule 300:30,900:60`` changes the rate in steps, ``--series`` adds per-second
  counts and percentiles (by when requests were due);
- ``probe``: one request every ``--interval`` seconds, on a new connection each time
  (``--connection new``: a new client each time) or on one kept-alive connection
  (``kept``: one client, which waits the Retry-After it is sent, as clients are asked to);
- ``grpc-probe``: the same over gRPC (``ModelInfer`` in raw HTTP/2 frames, a new
  connection each time or one kept connection);
- ``grpc-open``: the open loop over gRPC: ``ModelInfer`` calls (``--body``: one
  length-prefixed message) due at ``--rate`` per second, evenly, round robin over
  ``--connections`` HTTP/2 connections as concurrent streams; outcomes are gRPC status names.
  h2load's ``--rps`` releases each client's calls in bursts (a tick's worth at once), which a
  short queue refuses whatever the server's speed, so this mode writes its own frames;
- ``slow``: ``--idle`` connections that send nothing and ``--partial`` that send half a
  request's head and stall, held open for ``--duration`` seconds.

The probes raise their own scheduling priority where allowed (``nice -10``, as root): on
cores the load saturates, a probe's own wait for a core would otherwise be counted as the
server's latency. The load modes keep the default priority.

Bare asyncio streams on uvloop rather than an HTTP library: the generator shares two cores
with the gateway it loads, and every microsecond it spends is taken from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gateway.grpc.hpack import HeaderDecoder, HpackError, decode_integer, encode_headers

TIMEOUT_S = 10.0
_TICK_S = 0.001  # the open loops' shortest sleep: uvloop's timer resolution


def _request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str]]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ", 2)[1]), headers


def _summary(
    latencies: dict[str, list[float]],
    statuses: Counter[str],
    samples: bool = False,
    sent_at: dict[str, list[float]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Counts by outcome and latency percentiles (ms) for each outcome ("200", "429", ...);
    with ``samples``, every latency too (µs-rounded ms), so runs can be pooled, and with
    ``sent_at`` when each was sent (``time.perf_counter()``, CLOCK_MONOTONIC on Linux: the
    same clock in every process, so a caller can tell a crowd's onset from its steady
    state)."""
    percentiles = {}
    for outcome, values in latencies.items():
        if values:
            p50, p99, top = np.percentile(values, [50, 99, 100])
            percentiles[outcome] = {"p50_ms": p50, "p99_ms": p99, "max_ms": top}
    document = {"statuses": dict(statuses), "latency": percentiles, **extra}
    if samples:
        document["samples_ms"] = {k: [round(v, 3) for v in vs] for k, vs in latencies.items()}
    if sent_at is not None:
        document["sent_at"] = {k: [round(t, 4) for t in ts] for k, ts in sent_at.items()}
    return document


class _Client(asyncio.Protocol):
    """One kept-alive connection of the open loop: a protocol, not streams, and no task per
    request, so the generator spends a fraction of the CPU it shares with the server."""

    def __init__(self, run: _OpenLoop) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due: float | None = None  # when the request in flight was due
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def send(self, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.due is None:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        at = head.find(b"content-length:")
        if at >= 0:
            line_end = head.find(b"\r\n", at)
            length = int(head[at + 15 : line_end if line_end >= 0 else None])
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        due, self.due = self.due, None
        self.run.record(head[9:12].decode(), due)
        if b"connection: close" in head:
            assert self.transport is not None
            self.transport.close()
        else:
            self.reused = True
            self.run.idle_again(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.lost(self)
        if self.due is not None:
            due, self.due = self.due, None
            if self.reused and not self.buffer:
                # The server closed an idle kept-alive connection as the request went out:
                # nothing was answered, so send it again, as HTTP clients do.
                self.run.send(due)
            else:
                self.run.record("error", due)


class _Answers:
    """Outcomes of an open loop, each timed from when its request was due."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {}
        self.statuses: Counter[str] = Counter()
        self.answers: list[tuple[float, str, float]] = []  # (due, outcome, latency ms)

    def record(self, outcome: str, due: float) -> None:
        self.statuses[outcome] += 1
        latency_ms = (time.perf_counter() - due) * 1e3
        self.latencies.setdefault(outcome, []).append(latency_ms)
        self.answers.append((due, outcome, latency_ms))


class _OpenLoop(_Answers):
    """Requests go out on an idle connection, else on a new one, up to ``max_connections``
    open at once (a client's pool); past it they wait for one to be idle, their latency
    still counted from when they were due."""

    def __init__(self, host: str, port: int, request: bytes, max_connections: int) -> None:
        super().__init__()
        self.host, self.port, self.request = host, port, request
        self.max_connections = max_connections
        self.idle: list[_Client] = []
        self.waiting: deque[float] = deque()  # due times of requests waiting for a connection
        self.opened = 0
        self.loop = asyncio.get_running_loop()
        self.pending: set[asyncio.Task[None]] = set()
        self.clients: list[_Client] = []

    def send(self, due: float) -> None:
        if self.idle:
            self.idle.pop().send(due)
            return
        if len(self.clients) + len(self.pending) >= self.max_connections:
            self.waiting.append(due)
            return
        task = self.loop.create_task(self._open(due))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    def idle_again(self, client: _Client) -> None:
        if self.waiting:
            client.send(self.waiting.popleft())
        else:
            self.idle.append(client)

    def lost(self, client: _Client) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(client)
        with contextlib.suppress(ValueError):
            self.clients.remove(client)
        if self.waiting and len(self.clients) + len(self.pending) < self.max_connections:
            self.send(self.waiting.popleft())

    async def _open(self, due: float) -> None:
        self.opened += 1
        try:
            _, client = await self.loop.create_connection(
                lambda: _Client(self), self.host, self.port
            )
        except OSError:
            self.record("error", due)
            return
        self.clients.append(client)
        client.send(due)


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_HEAD = struct.Struct(">BHBBL")
_H2_WINDOW = 1 << 30
_GRPC_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _H2_HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


_UNREAD = "unread"
_GRPC_STATUS_NAME = b"grpc-status"


def _grpc_status(block: bytes) -> str | None:
    """``grpc-status`` from a header block, without the HPACK decoder, when every field is
    a static-table index or a literal that leaves the table alone (RFC 7541 6.1, 6.2.2,
    6.2.3; what turnout sends) with plain (not Huffman) strings; else ``_UNREAD``, and the
    connection's decoder reads the block. A refusal's block is unique (its traceparent),
    and decoding it cost the generator more per answer than the refusal cost the gateway."""
    i, end = 0, len(block)
    status: str | None = None
    try:
        while i < end:
            first = block[i]
            if first & 0x80:  # an indexed field: the static table's only
                index, i = decode_integer(block, i, 7)
                if index > 61:
                    return _UNREAD
                continue
            if first & 0xE0:
                return _UNREAD  # incremental indexing (0x40) or a table size update (0x20)
            index, i = decode_integer(block, i, 4)
            name = b""
            if index == 0:  # a literal name
                if block[i] & 0x80:
                    return _UNREAD
                n, i = decode_integer(block, i, 7)
                name, i = block[i : i + n], i + n
            elif index > 61:
                return _UNREAD
            if block[i] & 0x80:
                return _UNREAD
            n, i = decode_integer(block, i, 7)
            if name == _GRPC_STATUS_NAME:
                status = block[i : i + n].decode("latin-1")
            i += n
    except (IndexError, HpackError):
        return _UNREAD
    return status if i == end else _UNREAD


class _GrpcClient(asyncio.Protocol):
    """One HTTP/2 connection of the gRPC open loop: every call a stream, prebuilt frames."""

    def __init__(self, run: _GrpcOpenLoop) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.decoder = HeaderDecoder()
        self.next_id = 1
        self.due: dict[int, float] = {}
        self.received = 0
        self.last: str | None = None  # the outcome of the last call answered
        self.outgoing: list[bytes] = []  # calls framed and not yet written
        self.waiter: asyncio.Future[None] | None = None  # a probe's: set when none is open
        self.limit = 1 << 31
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS: no more calls open at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        settings = struct.pack(">HL", 0x4, _H2_WINDOW)  # SETTINGS_INITIAL_WINDOW_SIZE
        transport.write(  # type: ignore[attr-defined]
            _H2_PREFACE + _h2_frame(0x4, 0, 0, settings)
            + _h2_frame(0x8, 0, 0, struct.pack(">L", _H2_WINDOW - 65_535))
        )  # fmt: skip

    @property
    def room(self) -> bool:
        """Whether one more call may be opened under the server's stream limit."""
        return len(self.due) < self.limit

    def send(self, due: float) -> None:
        """Frames the call; :meth:`flush` writes every call due at once in one send."""
        stream_id, self.next_id = self.next_id, self.next_id + 2
        self.due[stream_id] = due
        run = self.run
        if not self.outgoing:
            run.unflushed.append(self)
        self.outgoing.append(
            _h2_frame(0x1, 0x4, stream_id, run.header_block)  # HEADERS, END_HEADERS
            + _h2_frame(0x0, 0x1, stream_id, run.message)  # DATA, END_STREAM
        )

    def flush(self) -> None:
        if self.transport is not None and self.outgoing:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buffer
        buf += data
        i = 0
        while len(buf) - i >= 9:
            high, low, kind, flags, stream_id = _H2_HEAD.unpack_from(buf, i)
            length = high << 16 | low
            if len(buf) - i - 9 < length:
                break
            payload = bytes(buf[i + 9 : i + 9 + length])
            i += 9 + length
            if kind == 0x1:  # HEADERS (the server's answers fit one frame)
                status = _grpc_status(payload)
                if status is _UNREAD:
                    headers = self.decoder.decode(payload)
                    status = next((v for n, v in headers if n == "grpc-status"), None)
                if flags & 0x1:
                    outcome = _GRPC_STATUS_NAMES.get(int(status), status) if status else "http"
                    self._answered(stream_id, str(outcome))
            elif kind == 0x0:
                self.received += length
                if flags & 0x1:
                    self._answered(stream_id, "no trailers")
            elif kind == 0x3:  # RST_STREAM
                self._answered(stream_id, "reset")
            elif kind == 0x4 and not flags & 0x1:  # SETTINGS: heed, acknowledge
                for at in range(0, length - length % 6, 6):
                    key, value = struct.unpack_from(">HL", payload, at)
                    if key == 0x3:  # SETTINGS_MAX_CONCURRENT_STREAMS
                        self.limit = value
                self.transport.write(_h2_frame(0x4, 0x1, 0))
                self.run.send_waiting(self)
            elif kind == 0x6 and not flags & 0x1:  # PING: answer
                self.transport.write(_h2_frame(0x6, 0x1, 0, payload))
        del buf[:i]
        if self.received > _H2_WINDOW // 2:
            self.transport.write(_h2_frame(0x8, 0, 0, struct.pack(">L", self.received)))
            self.received = 0

    def _answered(self, stream_id: int, outcome: str) -> None:
        due = self.due.pop(stream_id, None)
        if due is not None:
            self.last = outcome
            self.run.record(outcome, due)
            self.run.send_waiting(self)
            if not self.due:
                self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        for due in self.due.values():
            self.run.record("error", due)
        self.due.clear()
        self.transport = None
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _GrpcOpenLoop(_Answers):
    def __init__(self, host: str, port: int, message: bytes) -> None:
        super().__init__()
        self.host, self.port, self.message = host, port, message
        path = "/inference.GRPCInferenceService/ModelInfer"
        self.unflushed: list[_GrpcClient] = []  # clients with calls framed, not yet sent
        self.clients: list[_GrpcClient] = []
        self.waiting: collections.deque[float] = collections.deque()
        """Calls due while every connection had as many open as the server allows, by
        due time: each is sent as a call ends (HTTP/2 clients queue so, as grpc-core
        does), its latency counted from when it was due."""
        self.header_block = encode_headers([
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", f"{host}:{port}"), ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])  # fmt: skip

    def flush(self) -> None:
        """Write every call framed since the last flush: one send per connection."""
        for client in self.unflushed:
            client.flush()
        self.unflushed.clear()

    def send(self, i: int, due: float) -> None:
        """Call ``i``, due at ``due``: on the next connection round robin with room under
        its stream limit, or behind the calls already waiting for one."""
        clients = self.clients
        if self.waiting:
            self.waiting.append(due)
            return
        for k in range(len(clients)):
            client = clients[(i + k) % len(clients)]
            if client.transport is not None and client.room:
                client.send(due)
                return
        if all(client.transport is None for client in clients):
            self.record("error", due)
        else:
            self.waiting.append(due)

    def send_waiting(self, client: _GrpcClient) -> None:
        """A call ended on ``client`` (or its limit rose): send the calls waiting there
        while it has room; written when the read that freed it ends."""
        while self.waiting and client.room and client.transport is not None:
            client.send(self.waiting.popleft())
        if client.outgoing:
            client.flush()
            if client in self.unflushed:
                self.unflushed.remove(client)


async def grpc_open_loop(
    host: str, port: int, model: str, message: bytes, schedule: list[tuple[float, float]],
    connections: int, series: bool = False,
) -> dict[str, Any]:  # fmt: skip
    run = _GrpcOpenLoop(host, port, message)
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(connections):
        _, client = await loop.create_connection(lambda: _GrpcClient(run), host, port)
        clients.append(client)
    run.clients = clients
    await asyncio.sleep(0.05)  # the SETTINGS exchange

    def close() -> None:
        for client in clients:
            if client.transport is not None:
                client.transport.close()

    return await _drive(run, schedule, run.send, close, lambda: connections, series, run.flush)


async def _drive(
    run: _Answers,
    schedule: list[tuple[float, float]],
    send: Callable[[int, float], None],
    close: Callable[[], None],
    connections: Callable[[], int],
    series: bool,
    flush: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Send request ``i`` when it is due (``send(i, due)``; ``flush()`` after each round of
    sends), wait for the answers (up to TIMEOUT_S; the rest count as timeouts), close, and
    summarise. It wakes at most once a millisecond: uvloop's timers count whole
    milliseconds, and a shorter sleep returns at once, so at 10,000 requests a second the
    generator spun a whole core between them (a core taken from the server it loads) and,
    behind, sent them in bursts. A request is at most a millisecond late going out, and its
    latency still counts from when it was due."""
    start = time.perf_counter() + 0.05
    times = due_times(schedule, start)
    count = len(times)
    sent = 0
    while sent < count:
        now = time.perf_counter()
        while sent < count and times[sent] <= now:
            send(sent, times[sent])
            sent += 1
        if flush is not None:
            flush()
        if sent < count:
            await asyncio.sleep(max(_TICK_S, times[sent] - time.perf_counter()))
    sent_for = time.perf_counter() - start
    deadline = time.perf_counter() + TIMEOUT_S
    while sum(run.statuses.values()) < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    answered = sum(run.statuses.values())
    if answered < count:
        run.statuses["timeout"] += count - answered
        run.latencies.setdefault("timeout", []).append(TIMEOUT_S * 1e3)
    close()
    extra: dict[str, Any] = {"series": per_second(run.answers, start)} if series else {}
    rate = count / max(sum(seconds for _, seconds in schedule), 1e-9)
    return _summary(
        run.latencies, run.statuses, rate=rate, duration_s=sent_for, sent=count,
        connections=connections(), **extra,
    )  # fmt: skip


def due_times(schedule: list[tuple[float, float]], start: float) -> list[float]:
    """When each request is due: ``rate`` per second, evenly, for each (rate, seconds)."""
    times: list[float] = []
    at = start
    for rate, seconds in schedule:
        count = int(rate * seconds)
        times.extend(at + i / rate for i in range(count))
        at += seconds
    return times


def per_second(answers: list[tuple[float, str, float]], start: float) -> list[dict[str, Any]]:
    """Answers grouped by the second they were due in: counts and success percentiles."""
    seconds: dict[int, list[tuple[str, float]]] = {}
    for due, outcome, latency_ms in answers:
        seconds.setdefault(int(due - start), []).append((outcome, latency_ms))
    series = []
    for second in sorted(seconds):
        rows = seconds[second]
        ok = [latency for outcome, latency in rows if outcome == "200"]
        p50, p99 = np.percentile(ok, [50, 99]) if ok else (None, None)
        series.append({"t": second, "sent": len(rows), "ok": len(ok), "p50_ms": p50, "p99_ms": p99})
    return series


async def open_loop(
    host: str,
    port: int,
    path: str,
    body: bytes,
    schedule: list[tuple[float, float]],
    series: bool = False,
    max_connections: int = 256,
) -> dict[str, Any]:
    run = _OpenLoop(host, port, _request_bytes(host, port, path, body), max_connections)

    def close() -> None:
        run.waiting.clear()  # counted as timeouts already
        for client in list(run.clients):
            if client.transport is not None:
                client.transport.close()

    return await _drive(
        run, schedule, lambda _, due: run.send(due), close, lambda: run.opened, series
    )


async def probe(
    host: str, port: int, path: str, body: bytes, interval: float, duration: float,
    kept: bool, clients: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """``clients`` probes side by side, each sending every ``interval``: more clients, more
    samples of the tail in the same seconds (a kept client asks at most once per
    Retry-After while refused)."""
    request = _request_bytes(host, port, path, body)
    latencies: dict[str, list[float]] = {}
    sent_at: dict[str, list[float]] = {}
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + duration

    async def one_client(start: float) -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        await asyncio.sleep(start)  # spread the clients over one interval
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            wait = interval
            outcome = "error"
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    if connection is None:
                        connection = await asyncio.open_connection(host, port)
                    status, headers = await _exchange(*connection, request)
                    outcome = str(status)
                    # Only a kept connection is a client that was told to wait; each new
                    # connection is a client of its own.
                    if kept and status in (429, 503) and headers.get("retry-after", "").isdigit():
                        wait = max(interval, float(headers["retry-after"]))
            except TimeoutError:
                outcome = "timeout"
            except (OSError, asyncio.IncompleteReadError, ValueError):
                outcome = "error"
            statuses[outcome] += 1
            latencies.setdefault(outcome, []).append((time.perf_counter() - began) * 1e3)
            sent_at.setdefault(outcome, []).append(began)
            if connection is not None and (not kept or outcome in ("timeout", "error")):
                connection[1].close()
                connection = None
            await asyncio.sleep(max(0.0, began + wait - time.perf_counter()))
        if connection is not None:
            connection[1].close()

    await asyncio.gather(*(one_client(interval * i / clients) for i in range(clients)))
    return _summary(
        latencies, statuses, samples=True, sent_at=sent_at,
        connection="kept" if kept else "new", clients=clients,
    )  # fmt: skip


async def grpc_probe(
    address: str, model: str, interval: float, duration: float, kept: bool, clients: int = 1
) -> dict[str, Any]:
    """``ModelInfer`` every ``interval`` over raw HTTP/2 frames (as the HTTP probe writes
    raw requests), from ``clients`` probes side by side: the time from writing the call
    (and, for a new connection, connecting and the preface) to its trailers, so the figure
    is the server's, not a client library's threads on a saturated machine."""
    from bench.harness import infer_request
    from bench.models import INPUT_DIM

    x = np.random.default_rng(1).standard_normal((1, INPUT_DIM)).astype(np.float32)
    body = infer_request(x, model).SerializeToString()
    host, _, port_text = address.rpartition(":")
    run = _GrpcOpenLoop(host, int(port_text), b"\x00" + len(body).to_bytes(4) + body)
    loop = asyncio.get_running_loop()
    deadline = time.perf_counter() + duration

    async def one_client(start: float) -> None:
        client: _GrpcClient | None = None
        await asyncio.sleep(start)
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            wait = interval
            try:
                if client is None or client.transport is None:
                    _, client = await loop.create_connection(
                        lambda: _GrpcClient(run), host, int(port_text)
                    )
                client.last = None
                # Awaited, not polled: a 0.5 ms sleep returns at once on uvloop, and the
                # probe (at nice -10) spun a core the gateway needed while it waited.
                client.waiter = loop.create_future()
                client.send(began)
                run.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.waiter, TIMEOUT_S)
            except OSError:
                run.record("error", began)
            if kept and client is not None and client.last == "RESOURCE_EXHAUSTED":
                wait = max(interval, 1.0)  # the pushback it was sent
            if not kept and client is not None and client.transport is not None:
                client.transport.close()
                client = None
            await asyncio.sleep(max(0.0, began + wait - time.perf_counter()))
        if client is not None and client.transport is not None:
            client.transport.close()

    await asyncio.gather(*(one_client(interval * i / clients) for i in range(clients)))
    sent_at: dict[str, list[float]] = {}
    for due, outcome, _ in run.answers:  # in the order of run.latencies, by outcome
        sent_at.setdefault(outcome, []).append(due)
    return _summary(
        run.latencies, run.statuses, samples=True, sent_at=sent_at,
        connection="kept" if kept else "new", clients=clients,
    )  # fmt: skip


async def slow_clients(
    host: str, port: int, idle: int, partial: int, duration: float
) -> dict[str, Any]:
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]] = []
    refused = 0
    for i in range(idle + partial):
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            refused += 1
            continue
        half = i >= idle
        if half:
            writer.write(
                f"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: {host}\r\ncontent-le".encode()
            )
        connections.append((reader, writer, half))
    await asyncio.sleep(duration)
    closed = {"idle": 0, "partial": 0}
    timed_out = 0  # half-sent heads answered 408
    for reader, writer, half in connections:
        buffered = bytes(getattr(reader, "_buffer", b""))  # no public peek at unread bytes
        if buffered or reader.at_eof():
            closed["partial" if half else "idle"] += bool(getattr(reader, "_eof", False))
            answer = buffered
            timed_out += answer.startswith(b"HTTP/1.1 408")
        writer.close()
    writers = connections
    closed_by_server = closed
    return {
        "opened": len(writers),
        "refused": refused,
        "closed_by_server": closed_by_server,
        "answered_408": timed_out,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.split("\n")[0]
    )
    parser.add_argument("mode", choices=["open", "grpc-open", "probe", "grpc-probe", "slow"])
    parser.add_argument("--address", required=True, help="host:port")
    parser.add_argument("--path", default="/v2/models/mlp/infer")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--body", type=Path, help="the request body (open, probe)")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connection", choices=["new", "kept"], default="new")
    parser.add_argument("--clients", type=int, default=1, help="probe: probes side by side")
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--partial", type=int, default=0)
    parser.add_argument("--schedule", help="open: RATE:SECONDS,... instead of --rate/--duration")
    parser.add_argument("--series", action="store_true", help="open: per-second figures")
    parser.add_argument("--connections", type=int, default=16, help="grpc-open: connections")
    parser.add_argument(
        "--max-connections", type=int, default=256, help="open: connections open at once"
    )
    args = parser.parse_args(argv)
    host, _, port_text = args.address.rpartition(":")
    port = int(port_text)
    body = args.body.read_bytes() if args.body else b""
    kept = args.connection == "kept"
    schedule = [(args.rate, args.duration)]
    if args.schedule:
        steps = [step.split(":") for step in args.schedule.split(",")]
        schedule = [(float(rate), float(seconds)) for rate, seconds in steps]
    if args.mode in ("probe", "grpc-probe"):
        with contextlib.suppress(OSError):
            os.nice(-10)
    if args.mode == "open":
        work = open_loop(host, port, args.path, body, schedule, args.series, args.max_connections)
    elif args.mode == "grpc-open":
        work = grpc_open_loop(host, port, args.model, body, schedule, args.connections, args.series)
    elif args.mode == "probe":
        work = probe(host, port, args.path, body, args.interval, args.duration, kept, args.clients)
    elif args.mode == "grpc-probe":
        work = grpc_probe(
            args.address, args.model, args.interval, args.duration, kept, args.clients
        )
    else:
        work = slow_clients(host, port, args.idle, args.partial, args.duration)
    import uvloop

    result = uvloop.run(work)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
