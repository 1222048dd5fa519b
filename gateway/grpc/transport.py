"""gRPC on the gateway's own HTTP/2 (RFC 9113): unary calls, straight into the event loop.

grpc.aio costs about 150 us of event-loop CPU per call whatever the call does (the servicer
itself ~12 us), and takes one new call off its transport per loop turn, so under load its
calls reach the batcher one by one and under overload its refusals cost as much as its
successes (docs/architecture.md#grpc). Every RPC turnout serves is unary, which needs a
small part of HTTP/2: this module parses frames in the connection's ``data_received``,
answers a call the data plane refuses before any task exists, and runs the rest as one
task each on the servicers grpc.aio uses (their generic handlers and deserializers).

What it does: the connection preface and SETTINGS (both ways), HPACK (:mod:`.hpack`),
CONTINUATION, padding, PING, WINDOW_UPDATE and flow control both ways (responses larger
than the peer's windows wait for its updates), RST_STREAM (the call's task is cancelled),
GOAWAY both ways (a stopping server lets open calls finish), ``grpc-timeout`` deadlines,
metadata (``-bin`` values base64), trailers-only errors, TLS with ALPN ``h2`` (and mTLS)
from the gateway's reloading certificates, a cap on concurrent streams, and holding a
connection that was refused for overload while the loop is overrun (as HTTP does). What
it does not: streaming RPCs (none is served), compressed messages (UNIMPLEMENTED; the
server accepts ``identity`` only), server push, priorities (ignored, as RFC 9113 allows).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, cast

import grpc

from gateway.acceptor import Acceptor, listening_socket
from gateway.grpc.hpack import HeaderDecoder, HpackError, encode_headers
from gateway.overload import Overload

__all__ = ["Admission", "CallContext", "GrpcServer"]

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEAD = struct.Struct(">BHBBL")  # 24-bit length (8 + 16), type, flags, stream id

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9

_SETTINGS_TABLE_SIZE, _SETTINGS_MAX_STREAMS, _SETTINGS_WINDOW = 0x1, 0x3, 0x4
_SETTINGS_FRAME_SIZE, _SETTINGS_HEADER_LIST = 0x5, 0x6

_DEFAULT_WINDOW = 65_535
_WINDOW = 4 << 20
"""What each stream and the connection may send us before we acknowledge: one window
update per 2 MiB received, so large tensors flow without waiting for round trips."""
_MAX_FRAME_IN = 1 << 20
_MAX_HEADER_LIST = 64 << 10
_DEFAULT_MAX_STREAMS = 1024
_UNACKNOWLEDGED_LIMITS = 16  # stream limits sent and not acknowledged, past which none more
_MAX_WINDOW = (1 << 31) - 1

_GRPC_CONTENT_TYPE = "application/grpc"
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_NOT_METADATA = frozenset(
    {"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
)
_MESSAGE_LIMIT = 4096  # grpc-message characters sent (a long error is cut)

_TRAILERS_ONLY: dict[tuple[grpc.StatusCode, str], bytes] = {}
"""The encoded head of an error answer, by status and message: under overload every refusal
sends the same one (64 kept, the oldest dropped: messages that name a request vary)."""
_CACHED_ANSWERS = 64

Header = tuple[str, str]
Metadata = tuple[tuple[str, str | bytes], ...]

Admission = Callable[
    [Any, Metadata], "tuple[grpc.StatusCode, str, Sequence[Header]] | Callable[[], None] | None"
]
"""Asked of a call whose method registered one, once its request is deserialized and
before any task runs it: a refusal to send at once (code, message, trailing metadata),
a release to call just before the handler runs (the data plane kept a queue place for
the call), or None (nothing decided)."""


class _Details(NamedTuple):
    method: str
    invocation_metadata: Metadata


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


class CallContext:
    """The part of grpc.aio's ``ServicerContext`` the gateway's servicers use."""

    __slots__ = ("_deadline", "_loop", "_metadata", "_peer", "trailing")

    def __init__(
        self,
        metadata: Metadata,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        peer: str,
    ) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self._loop = loop
        self._peer = peer
        self.trailing: tuple[tuple[str, str | bytes], ...] = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self.trailing = tuple(metadata)

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._loop.time())

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)


class _Stream:
    __slots__ = (
        "body", "deadline_timer", "headers", "id", "outbox", "release",
        "remote_closed", "task", "trailers", "unacked", "window",
    )  # fmt: skip

    def __init__(self, stream_id: int, window: int) -> None:
        self.id = stream_id
        self.headers: list[Header] = []
        self.body = bytearray()
        self.window = window
        self.unacked = 0
        self.remote_closed = False
        self.task: asyncio.Task[None] | None = None
        self.outbox = b""  # the answer's DATA not sent yet: waiting for the peer's window
        self.trailers = b""
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.release: Callable[[], None] | None = None  # a queue place kept for the call


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def _status(code: grpc.StatusCode) -> str:
    return str(code.value[0])


def _percent(message: str) -> str:
    """grpc-message: printable ASCII but '%' as is, everything else percent-encoded UTF-8."""
    if len(message) > _MESSAGE_LIMIT:
        message = message[:_MESSAGE_LIMIT] + "..."
    if message.isascii() and message.isprintable() and "%" not in message:
        return message
    out = []
    for char in message:
        if " " <= char <= "~" and char != "%":
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode())
    return "".join(out)


def _timeout_s(value: str) -> float | None:
    """``grpc-timeout``: up to 8 digits and a unit; None when it does not parse."""
    if 2 <= len(value) <= 9 and value[:-1].isdigit() and value[-1] in _TIMEOUT_UNITS:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    return None


def _metadata(headers: list[Header]) -> Metadata:
    pairs: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        if name[0] == ":" or name in _NOT_METADATA:
            continue
        if name.endswith("-bin"):
            try:
                pairs.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
            except ValueError:
                continue
        else:
            pairs.append((name, value))
    return tuple(pairs)


def _trailing(metadata: Iterable[tuple[str, str | bytes]]) -> list[Header]:
    out = []
    for name, value in metadata:
        if isinstance(value, bytes):
            out.append((name, base64.b64encode(value).decode().rstrip("=")))
        else:
            out.append((name, value))
    return out


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection: frames in, calls out."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface_read = False
        self.decoder = HeaderDecoder(max_header_list_size=_MAX_HEADER_LIST)
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0
        self.send_window = _DEFAULT_WINDOW
        self.peer_window = _DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = 16_384  # the peer's SETTINGS_MAX_FRAME_SIZE
        self.unacked = 0  # DATA bytes received that no WINDOW_UPDATE gave back yet
        self.continued: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self.going_away = False
        self.paused = False
        self.multiplexing = False
        """It sent a call while another was open: never held, throttled (:meth:`_hold`)."""
        self.max_streams = server.max_concurrent_streams
        """The stream limit in force: the last one the peer acknowledged."""
        self._limits_sent: collections.deque[int] = collections.deque(
            [server.max_concurrent_streams]  # the preface's
        )
        """Stream limits sent in SETTINGS and not acknowledged yet, oldest first."""
        self._throttle: asyncio.TimerHandle | None = None  # raises a lowered stream limit
        self._next_frame = 0  # where the frame after the one being read starts
        self._release: asyncio.TimerHandle | None = None
        self._preface_timer: asyncio.TimerHandle | None = None
        self._gathering: list[bytes] | None = None  # writes held while frames are read
        self._peer: str | None = None

    # -- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        self.server.connections.add(self)
        transport.write(self.server.preface)
        if self.server.stopping:
            self.go_away()
        # A connection that never says it speaks HTTP/2 is not kept (slow or idle clients).
        self._preface_timer = self.loop.call_later(self.server.preface_timeout_s, self._close_now)

    @property
    def peer(self) -> str:
        """``ipv4:host:port``, asked of the socket once it is needed (a served call's
        context, a log line): a crowd's refused connections never need it."""
        if self._peer is None:
            address = self.transport.get_extra_info("peername") if self.transport else None
            self._peer = f"ipv4:{address[0]}:{address[1]}" if isinstance(address, tuple) else ""
        return self._peer

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._preface_timer is not None:
            self._preface_timer.cancel()
            self._preface_timer = None
        if self._release is not None:
            self._release.cancel()
            self._release = None
            self.server.overload.held -= 1
        if self._throttle is not None:
            self._throttle.cancel()
            self._throttle = None
            self.server.overload.throttled -= 1
        for stream in list(self.streams.values()):
            self._forget(stream, cancel=True)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.paused:
            return
        if not self.preface_read and not self.server.overload.first_read_now():
            self._defer_first_read()
            return
        self._read_frames()

    def _defer_first_read(self) -> None:
        """A new connection past this loop turn's share of first reads waits in the
        overload's queue of them (:meth:`Overload.put_off`)."""
        assert self.transport is not None
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.server.overload.put_off(self.first_read)

    def first_read(self) -> None:
        """Its turn came in the overload's queue of first reads put off."""
        if self.transport is None or self.transport.is_closing():
            return
        self.paused = False
        self.transport.resume_reading()
        self._read_frames()

    def _read_frames(self) -> None:
        buf = self.buffer
        if not self.preface_read:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    self._close_now()
                return
            if buf[: len(PREFACE)] != PREFACE:
                self._close_now()  # not HTTP/2 (an HTTP/1 client on the gRPC port)
                return
            del buf[: len(PREFACE)]
            self.preface_read = True
            if self._preface_timer is not None:
                self._preface_timer.cancel()
                self._preface_timer = None
        i, end = 0, len(buf)
        self._gathering = []
        try:
            while end - i >= 9 and not self.paused and self.transport is not None:
                high, low, kind, flags, stream_id = _HEAD.unpack_from(buf, i)
                length = high << 16 | low
                if length > _MAX_FRAME_IN:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - i - 9 < length:
                    break
                payload = bytes(buf[i + 9 : i + 9 + length])
                i += 9 + length
                self._next_frame = i
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
        except _ConnectionError as exc:
            self._fail(exc.code, exc.message)
            return
        except Exception:
            log.exception("gRPC connection from %s failed on a frame", self.peer)
            self._fail(INTERNAL_ERROR, "internal error")
            return
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self._flush_gathered()
            self._gathering = None
        del buf[:i]

    def _write(self, data: bytes) -> None:
        """While frames are being read, what they answer is gathered and written once at
        the end (one send for every call a read answered at once); otherwise at once."""
        if self._gathering is not None:
            self._gathering.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _flush_gathered(self) -> None:
        if self._gathering and self.transport is not None:
            self.transport.write(b"".join(self._gathering))
            self._gathering.clear()

    def _close_now(self) -> None:
        if self.transport is not None:
            self._flush_gathered()
            self.transport.close()

    def _fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY naming it, then close."""
        log.debug("gRPC connection error %d from %s: %s", code, self.peer, message)
        if self.transport is not None:
            debug = message.encode()[:256]
            self._flush_gathered()
            self.transport.write(
                _frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_stream, code) + debug)
            )
            self.transport.close()
        self.buffer.clear()

    def go_away(self) -> None:
        """No new streams (a stopping server); the open ones finish, then it closes."""
        if self.going_away or self.transport is None:
            return
        self.going_away = True
        self.transport.write(_frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_stream, 0)))
        if not self.streams:
            self.transport.close()

    # -- frames --------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continued is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
            payload = _unpadded(flags, payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers(stream_id, flags, payload)
            else:
                self.continued = (stream_id, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self.continued is None or self.continued[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            block = self.continued[2]
            block += payload
            if len(block) > _MAX_HEADER_LIST:
                raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                first_flags = self.continued[1]
                self.continued = None
                self._headers(stream_id, first_flags, bytes(block))
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8 or stream_id != 0:
                raise _ConnectionError(FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK and self.transport is not None:
                self._write(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._forget(stream, cancel=True)
        elif kind == GOAWAY:
            self.going_away = True
            if not self.streams:
                self._close_now()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown frame types are ignored (RFC 9113 5.3.2, 5.5).

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) % 6:
            raise _ConnectionError(PROTOCOL_ERROR, "bad SETTINGS")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self._limits_sent:
                self.max_streams = self._limits_sent.popleft()
            return
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == _SETTINGS_WINDOW:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "window above 2^31-1")
                delta = value - self.peer_window
                self.peer_window = value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == _SETTINGS_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise _ConnectionError(PROTOCOL_ERROR, f"max frame size {value}")
                self.max_frame = value
        assert self.transport is not None
        self._write(_frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = struct.unpack(">L", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "window update of 0")
            self.send_window += increment
            if self.send_window > _MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.window += increment
            if stream.outbox:  # an answer waiting for this window
                self._flush(stream)

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block)
        except HpackError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, str(exc)) from None
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id <= self.last_stream:
                return  # trailers of a stream already answered and forgotten
            if stream_id % 2 == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "a client stream id must be odd")
            self.last_stream = stream_id
            if self.going_away or len(self.streams) >= self.max_streams:
                self._reset(stream_id, REFUSED_STREAM)
                return
            if self.streams:
                self.multiplexing = True
            stream = _Stream(stream_id, self.peer_window)
            stream.headers = headers
            self.streams[stream_id] = stream
        if flags & END_STREAM:
            stream.remote_closed = True
            self._call(stream)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self.unacked += size
        if self.unacked >= _WINDOW // 2 and self.transport is not None:
            self._write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self.unacked)))
            self.unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # a stream already answered (or reset): its data is dropped
        stream.body += _unpadded(flags, payload)
        if len(stream.body) > self.server.max_message_bytes + 5:
            self._answer_error(
                stream,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request message larger than the limit of {self.server.max_message_bytes} bytes",
            )
            return
        if flags & END_STREAM:
            stream.remote_closed = True
            self._call(stream)
            return
        stream.unacked += size
        if stream.unacked >= _WINDOW // 2 and self.transport is not None:
            self._write(_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", stream.unacked)))
            stream.unacked = 0

    def _reset(self, stream_id: int, code: int) -> None:
        if self.transport is not None:
            self._write(_frame(RST_STREAM, 0, stream_id, struct.pack(">L", code)))

    # -- calls ---------------------------------------------------------------------------

    def _call(self, stream: _Stream) -> None:
        """The request is complete: refuse it, answer an error, or start its task."""
        server = self.server
        path = method = content_type = ""
        encoding = "identity"
        timeout = ""
        for name, value in stream.headers:
            if name == ":path":
                path = value
            elif name == ":method":
                method = value
            elif name == "content-type":
                content_type = value
            elif name == "grpc-encoding":
                encoding = value
            elif name == "grpc-timeout":
                timeout = value
        if method != "POST" or not content_type.startswith(_GRPC_CONTENT_TYPE):
            self._answer_http(stream, "415" if method == "POST" else "405")
            return
        handler = server.method(path)
        if handler is None:
            self._answer_error(stream, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path}")
            return
        body = stream.body
        if len(body) < 5 or int.from_bytes(body[1:5]) != len(body) - 5:
            self._answer_error(
                stream, grpc.StatusCode.INTERNAL, "the request is not one length-prefixed message"
            )
            return
        if body[0]:
            code = grpc.StatusCode.UNIMPLEMENTED
            self._answer_error(stream, code, f"compressed messages ({encoding}) are not accepted")
            return
        try:
            request = handler.request_deserializer(bytes(body[5:]))
        except Exception:
            code = grpc.StatusCode.INVALID_ARGUMENT
            self._answer_error(stream, code, f"the request message does not parse as {path}")
            return
        stream.body = bytearray()
        metadata = _metadata(stream.headers)
        release: Callable[[], None] | None = None
        admission = server.admissions.get(path)
        if admission is not None:
            answer = admission(request, metadata)
            if isinstance(answer, tuple):
                code, message, trailing = answer
                self._answer_error(stream, code, message, list(trailing))
                self._hold()
                return
            release = answer
        deadline = None
        if timeout:
            seconds = _timeout_s(timeout)
            if seconds is not None:
                deadline = self.loop.time() + seconds
                stream.deadline_timer = self.loop.call_at(deadline, self._expire, stream)
        context = CallContext(metadata, deadline, self.loop, self.peer)
        stream.release = release
        stream.task = self.loop.create_task(self._run(stream, handler, request, context))

    async def _run(self, stream: _Stream, handler: Any, request: Any, context: CallContext) -> None:
        release, stream.release = stream.release, None
        if release is not None:
            # The same loop turn in which the handler reaches the queue (nothing in between
            # waits): no other call can count this place as free.
            release()
        behaviour: Callable[[Any, CallContext], Awaitable[Any]] = handler.unary_unary
        try:
            response = await behaviour(request, context)
            payload = handler.response_serializer(response)
        except _Aborted as aborted:
            self._answer_error(stream, aborted.code, aborted.details, _trailing(context.trailing))
            return
        except Exception:
            log.exception("gRPC handler for %s failed", handler)
            self._answer_error(stream, grpc.StatusCode.INTERNAL, "internal error")
            return
        self._answer(stream, payload, _trailing(context.trailing))

    def _expire(self, stream: _Stream) -> None:
        """The call's deadline passed: DEADLINE_EXCEEDED now, and its task cancelled (a
        task cancelled before its first step runs none of its code: forgetting the stream
        gives back what the call held)."""
        stream.deadline_timer = None
        self._answer_error(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _hold(self) -> None:
        """A call refused for overload: while the loop is overrun, a connection that sends
        one call at a time is not read for a while (its next call waits in the kernel), as
        HTTP holds a refused connection; one that multiplexes is throttled instead. The
        hold never exceeds the refusal's ``grpc-retry-pushback-ms``.

        A connection multiplexes (a pool, a proxy, an open loop) when it sent a call while
        another was open, here or already read behind this one. Not reading it would stall
        every call it sends meanwhile and release them as one burst (an open loop of 16
        such connections served a quarter of capacity once they were held between their
        calls), so its SETTINGS lower its stream limit to the calls it has open (at least
        one) for the hold: a client that honours the limit, as HTTP/2 clients must, sends
        a call as one of its calls ends and queues the rest, as a held HTTP client's
        requests wait for its connection, instead of having half of them refused."""
        buf, at = self.buffer, self._next_frame
        if not self.multiplexing and len(buf) - at >= 9 and buf[at + 3] == HEADERS:
            self.multiplexing = True
        if self.streams or self.multiplexing:
            if self.transport is not None:
                self._throttle_streams()
            return
        hold = self.server.overload.hold()
        if hold and self.transport is not None and self._release is None:
            self.paused = True
            self.transport.pause_reading()
            self._release = self.loop.call_later(hold, self._resume)
            self.server.overload.held += 1

    def _throttle_streams(self) -> None:
        """While the loop is overrun, a refused call lowers the connection's stream limit to
        the calls it has open (at least one) for a hold, then the limit doubles every
        eighth of a hold back to the server's: a client queueing calls behind the limit
        (an open loop's backlog) would send them all at once if it came back in one step,
        and most of such a burst is refused."""
        hold = self.server.overload.hold()  # counted whatever is done with it
        open_now = max(1, len(self.streams))
        if not hold or (self._throttle is not None and open_now >= self._limit_said):
            return  # not overrun, or already held down at least as far
        if len(self._limits_sent) >= _UNACKNOWLEDGED_LIMITS:
            return  # a peer that does not acknowledge SETTINGS is not sent more of them
        if self._throttle is None:
            self.server.overload.throttled += 1
        else:
            self._throttle.cancel()
        self._limit_streams(open_now)
        self._throttle = self.loop.call_later(hold, self._raise_limit, hold / 8)

    @property
    def _limit_said(self) -> int:
        """The last stream limit sent, acknowledged or not."""
        return self._limits_sent[-1] if self._limits_sent else self.max_streams

    def _limit_streams(self, limit: int) -> None:
        """Say a new SETTINGS_MAX_CONCURRENT_STREAMS; it is in force once acknowledged
        (RFC 9113 6.5.3: until then the peer may still open streams up to the old one)."""
        self._limits_sent.append(limit)
        self._write(_frame(SETTINGS, 0, 0, struct.pack(">HL", _SETTINGS_MAX_STREAMS, limit)))

    def _raise_limit(self, step_s: float) -> None:
        self._throttle = None
        if self.transport is None or self.transport.is_closing():
            self.server.overload.throttled -= 1
            return
        full = self.server.max_concurrent_streams
        limit = min(full, 2 * self._limit_said)
        self._limit_streams(limit)
        if limit < full:
            self._throttle = self.loop.call_later(step_s, self._raise_limit, step_s)
        else:
            self.server.overload.throttled -= 1

    def _resume(self) -> None:
        self._release = None
        self.server.overload.held -= 1
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._read_frames()

    # -- answers -------------------------------------------------------------------------

    def _headers_frames(self, stream_id: int, block: bytes, end_stream: bool) -> bytes:
        limit = self.max_frame
        flags = END_STREAM if end_stream else 0
        if len(block) <= limit:
            return _frame(HEADERS, flags | END_HEADERS, stream_id, block)
        frames = [_frame(HEADERS, flags, stream_id, block[:limit])]
        rest = block[limit:]
        while rest:
            piece, rest = rest[:limit], rest[limit:]
            frames.append(_frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, piece))
        return b"".join(frames)

    def _answer_http(self, stream: _Stream, status: str) -> None:
        block = encode_headers([(":status", status)])
        self._send_last(stream, self._headers_frames(stream.id, block, True))

    def _answer_error(
        self,
        stream: _Stream,
        code: grpc.StatusCode,
        message: str,
        trailing: list[Header] | None = None,
    ) -> None:
        """A trailers-only answer: status, content type and the gRPC status at once."""
        block = _TRAILERS_ONLY.get((code, message))
        if block is None:
            block = encode_headers([
                (":status", "200"),
                ("content-type", _GRPC_CONTENT_TYPE),
                ("grpc-status", _status(code)),
                ("grpc-message", _percent(message)),
            ])  # fmt: skip
            if len(_TRAILERS_ONLY) >= _CACHED_ANSWERS:
                del _TRAILERS_ONLY[next(iter(_TRAILERS_ONLY))]
            _TRAILERS_ONLY[code, message] = block
        if trailing:
            block += encode_headers(trailing)
        self._send_last(stream, self._headers_frames(stream.id, block, True))

    def _send_last(self, stream: _Stream, frames: bytes) -> None:
        if self.transport is None or self.streams.get(stream.id) is not stream:
            return
        if not stream.remote_closed:  # it still sends: tell it to stop
            frames += _frame(RST_STREAM, 0, stream.id, struct.pack(">L", NO_ERROR))
        self._write(frames)
        self.server.overload.answers += 1
        self._forget(stream, cancel=True)

    def _answer(self, stream: _Stream, payload: bytes, trailing: list[Header]) -> None:
        if self.transport is None or self.streams.get(stream.id) is not stream:
            return
        head = encode_headers([(":status", "200"), ("content-type", _GRPC_CONTENT_TYPE)])
        stream.outbox = b"\x00" + len(payload).to_bytes(4) + payload
        stream.trailers = encode_headers([("grpc-status", "0"), *trailing])
        self._write(self._headers_frames(stream.id, head, False))
        self._flush(stream)

    def _flush(self, stream: _Stream) -> None:
        """Send what the windows allow of the stream's answer, then its trailers."""
        assert self.transport is not None
        frames = []
        out = stream.outbox
        while out:
            n = min(len(out), stream.window, self.send_window, self.max_frame)
            if n <= 0:
                break
            frames.append(_frame(DATA, 0, stream.id, out[:n]))
            out = out[n:]
            stream.window -= n
            self.send_window -= n
        stream.outbox = out
        if out:
            self.server.blocked_answers += 1
            if frames:
                self._write(b"".join(frames))
            return
        frames.append(self._headers_frames(stream.id, stream.trailers, True))
        self._send_last(stream, b"".join(frames))

    def _flush_blocked(self) -> None:
        for stream in [s for s in self.streams.values() if s.outbox]:
            if self.send_window <= 0:
                return
            self._flush(stream)

    def _forget(self, stream: _Stream, cancel: bool = False) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if stream.deadline_timer is not None:
            stream.deadline_timer.cancel()
            stream.deadline_timer = None
        task = stream.task
        if cancel and task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()  # reset, expired, or the connection lost: not the answering task
        release, stream.release = stream.release, None
        if release is not None:  # cancelled before its task ran
            release()
        if self.going_away and not self.streams:
            self._close_now()


def _unpadded(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


class GrpcServer:
    """A listening socket whose connections serve the registered unary methods."""

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler[Any, Any]],
        *,
        max_message_bytes: int,
        overload: Overload,
        max_concurrent_streams: int | None = None,
        admissions: dict[str, Admission] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        preface_timeout_s: float = 10.0,
    ) -> None:
        self.handlers = list(handlers)
        self.preface_timeout_s = preface_timeout_s
        """A connection that has not sent HTTP/2's preface by then is closed."""
        self.max_message_bytes = max_message_bytes
        self.overload = overload
        self.max_concurrent_streams = max_concurrent_streams or _DEFAULT_MAX_STREAMS
        settings = [
            (_SETTINGS_MAX_STREAMS, self.max_concurrent_streams),
            (_SETTINGS_WINDOW, _WINDOW),
            (_SETTINGS_FRAME_SIZE, _MAX_FRAME_IN),
            (_SETTINGS_HEADER_LIST, _MAX_HEADER_LIST),
        ]
        payload = b"".join(struct.pack(">HL", k, v) for k, v in settings)
        self.preface = _frame(SETTINGS, 0, 0, payload) + _frame(
            WINDOW_UPDATE, 0, 0, struct.pack(">L", _WINDOW - _DEFAULT_WINDOW)
        )
        """What the server says first on every connection (RFC 9113 3.4): its SETTINGS
        and the connection's larger receive window."""
        self.admissions = admissions or {}
        self.ssl_context = ssl_context
        self.connections: set[GrpcConnection] = set()
        self.stopping = False
        self.blocked_answers = 0
        """Answers that waited for the peer's flow-control window (for tests)."""
        self._methods: dict[str, Any] = {}
        self._acceptor: Acceptor | None = None

    def method(self, path: str) -> Any:
        """The method handler for ``/package.Service/Method``, or None."""
        found = self._methods.get(path)
        if found is None:
            details = _Details(path, ())
            for generic in self.handlers:
                found = generic.service(details)  # type: ignore[arg-type]
                if found is not None:
                    if found.unary_unary is None:
                        return None  # only unary methods are served here
                    if len(self._methods) < 1024:
                        self._methods[path] = found
                    break
        return found

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (the one picked when ``port`` is 0)."""
        # The gateway's acceptor: the loop's server, which accepts one connection a loop
        # turn on uvloop, and a drain that takes a crowd waiting behind it in one turn.
        self._acceptor = Acceptor(
            listening_socket(host, port),
            lambda: GrpcConnection(self),
            ssl_context=self.ssl_context,
            backlog=1024,
            on_drained=self.overload.arrived,
        )
        await self._acceptor.start()
        return self._acceptor.port

    async def stop(self, grace: float) -> None:
        """Stop listening, let open calls finish for up to ``grace`` seconds, then close."""
        self.stopping = True
        if self._acceptor is not None:
            self._acceptor.close()
        for connection in list(self.connections):
            connection.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.streams for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
