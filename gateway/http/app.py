"""The REST adapter: a plain ASGI app that converts HTTP to data plane calls.

Written against ASGI directly rather than a framework: the inference route is the hot path,
and a request/response object per call is measurable at thousands of requests a second.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from gateway import metadata
from gateway.admin.http import AdminHttp
from gateway.context import RequestContext
from gateway.dataplane import DataPlane
from gateway.errors import InvalidInput, PayloadTooLarge, QueueFull, TurnoutError, internal_error
from gateway.feedback import FeedbackForwarder
from gateway.http.codec import HEADER_LENGTH, decode_infer_request, encode_infer_response
from gateway.http.protocol import REFUSED_KEY, RESERVED_KEY
from gateway.routing import REVISION_HEADER
from gateway.types import InferRequest
from turnout_contract.trace import TRACEPARENT_HEADER, TRACESTATE_HEADER

__all__ = ["HttpApp"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_TRACEPARENT = TRACEPARENT_HEADER.encode()
_TRACE_HEADERS = frozenset({_TRACEPARENT, TRACESTATE_HEADER.encode()})
_CACHED_REFUSALS = 64
"""429s kept ready, by message (one per model's set of versions, in practice)."""


class _Reply(Exception):
    """Short-circuits a handler with a finished response (404/405 on routing)."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}


class HttpApp:
    """ASGI application serving the OIP REST endpoints."""

    def __init__(
        self,
        dataplane: DataPlane,
        max_request_bytes: int,
        admin: AdminHttp | None = None,
        feedback: FeedbackForwarder | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.admin = admin
        self.feedback = feedback
        self._refusals: dict[str, tuple[bytes, bytes]] = {}
        """A 429's head (without its traceparent) and body, by message."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except _Reply as reply:
            headers = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
            await _send(send, reply.status, orjson.dumps(reply.body), headers)
        except TurnoutError as exc:
            await _send_error(send, exc)
        except Exception:
            message = internal_error(log, f"{scope['method']} {scope['path']}")
            await _send(send, 500, orjson.dumps({"error": message}))
        finally:
            reserved = scope.pop(RESERVED_KEY, None)
            if reserved is not None:  # let in on its head but routed elsewhere (a 404, ...)
                self.dataplane.release(reserved)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        parts = scope["path"].strip("/").split("/")
        if parts[:2] == ["admin", "v1"] and self.admin is not None:
            headers = _headers(scope)
            body = await self._read_body(receive, headers.get("content-length"))
            status, document = await self.admin.handle(method, parts[2:], headers, body)
            await _send(send, status, orjson.dumps(document))
            return
        if parts == ["metrics"] and self.metrics is not None:
            _expect(method, "GET")
            encoder, content_type = choose_encoder(_headers(scope).get("accept", ""))
            await _send(send, 200, encoder(self.metrics), content_type=content_type.encode())
            return
        if not parts or parts[0] != "v2":
            raise _Reply(404, {"error": f"no route for {scope['path']}"})
        rest = parts[1:]
        models = self.dataplane.models
        if not rest:
            _expect(method, "GET")
            await _send(send, 200, orjson.dumps(metadata.server_metadata()))
            return
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            _expect(method, "GET")
            ok = models.live() if rest[1] == "live" else models.ready()
            await _send(send, 200 if ok else 503, orjson.dumps({rest[1]: ok}))
            return
        if rest[0] != "models" or len(rest) < 2:
            raise _Reply(404, {"error": f"no route for {scope['path']}"})
        if rest[1] == "stats" and len(rest) == 2:
            _expect(method, "GET")
            stats = metadata.statistics(models)
            await _send(send, 200, orjson.dumps({"model_stats": stats}))
            return
        model, tail = rest[1], rest[2:]
        version = ""
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
            if not version:  # ".../versions//infer" names no version; it is not the default
                raise _Reply(404, {"error": f"no route for {scope['path']}"})
        action = tail[0] if len(tail) == 1 else "" if not tail else None
        if action == "infer":
            _expect(method, "POST")
            await self._infer(scope, receive, send, model, version)
        elif action == "feedback" and not version and self.feedback is not None:
            _expect(method, "POST")
            await self._feedback(scope, receive, send, model)
        elif action == "":
            _expect(method, "GET")
            document = metadata.model_metadata(models, model, version)
            await _send(send, 200, orjson.dumps(document))
        elif action == "ready":
            _expect(method, "GET")
            ready = models.model_ready(model, version)
            await _send(send, 200 if ready else 503, orjson.dumps({"ready": ready}))
        elif action == "stats":
            _expect(method, "GET")
            stats = metadata.statistics(models, model, version)
            await _send(send, 200, orjson.dumps({"model_stats": stats}))
        else:
            raise _Reply(404, {"error": f"no route for {scope['path']}"})

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, model: str, version: str
    ) -> None:
        headers = _headers(scope)
        context = RequestContext.arrived("http", model, headers, scope["path"])
        trace_header = (_TRACEPARENT, context.trace.traceparent().encode())
        decoded: InferRequest | None = None

        async def decode() -> InferRequest:
            nonlocal decoded
            body = await self._read_body(receive, headers.get("content-length"))
            decoded = decode_infer_request(model, version, body, headers.get(HEADER_LENGTH))
            return decoded

        reserved = scope.pop(RESERVED_KEY, None)
        if reserved is not None:
            # In the same loop turn as the queue takes the request (infer does not yield
            # before it when the body is here), so no other head can count this place free.
            self.dataplane.release(reserved)
        try:
            response = await self.dataplane.infer(context, decode)
        except TurnoutError as exc:
            if isinstance(exc, QueueFull):
                scope[REFUSED_KEY] = True  # the connection decides whether to hold back
            await _send_error(send, exc, trace_header)
            return
        assert decoded is not None
        payload, json_length = encode_infer_response(response, decoded)
        revision = (REVISION_HEADER.encode(), str(response.revision).encode())
        if json_length is None:
            await _send(send, 200, payload, [revision, trace_header])
        else:
            await _send(
                send,
                200,
                payload,
                [(HEADER_LENGTH.encode(), str(json_length).encode()), revision, trace_header],
                content_type=_OCTETS,
            )

    def refusal(self, path: str, raw_headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The whole 429 :meth:`refusal_from_head` would send, or None, reserving nothing:
        for :class:`~gateway.http.refusing.RefusingProtocol`, which hands a request it does
        not refuse to the protocol that asks :meth:`refusal_from_head` again."""
        answer = self.refusal_from_head(path, raw_headers, reserve=False)
        return answer if isinstance(answer, bytes) else None

    def refusal_from_head(
        self, path: str, raw_headers: list[tuple[bytes, bytes]], *, reserve: bool = True
    ) -> bytes | str | None:
        """The whole 429 for an inference request the data plane refuses before its body
        (every version's queue full), recorded like any request; or the model it reserved
        a queue place for (:meth:`DataPlane.reserve`), which the connection puts in the
        request's scope so the app releases it; None: serve it as usual, nothing reserved.
        The connection sends a refusal without running the ASGI app
        (:mod:`gateway.http.protocol`). Asked of every inference request's head, so the
        common answer is cheap."""
        parts = path.strip("/").split("/")
        if parts[:2] != ["v2", "models"] or parts[-1] != "infer" or len(parts) not in (4, 6):
            return None
        if len(parts) == 6 and (parts[3] != "versions" or not parts[4]):
            return None
        # Only the trace headers matter to a refusal (uvicorn's names are lower-case).
        trace: dict[str, str] = {}
        for name, value in raw_headers:
            if name == b"expect":
                return None  # a client awaiting 100 Continue may never send the body to skip
            if name in _TRACE_HEADERS:
                trace[name.decode()] = value.decode("latin-1")
        if not self.dataplane.refusable_from_head(parts[2]):
            if not reserve or parts[2] not in self.dataplane.models.versions:
                return None  # not served (a 404 to come): no queue to keep a place in
            self.dataplane.reserve(parts[2])
            return parts[2]
        context = RequestContext.arrived("http", parts[2], trace, path)
        error = self.dataplane.refuse_from_head(context)
        refusal = self._refusals.get(error.message)
        if refusal is None:
            body = orjson.dumps({"error": error.message})
            lines = [
                b"HTTP/1.1 429 Too Many Requests",
                b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(),
                *(f"{k}: {v}".encode() for k, v in error.http_headers().items()),
            ]
            if len(self._refusals) >= _CACHED_REFUSALS:
                self._refusals.clear()
            refusal = self._refusals[error.message] = (b"\r\n".join(lines), body)
        head, body = refusal
        traceparent = context.trace.traceparent().encode()
        return head + b"\r\n" + _TRACEPARENT + b": " + traceparent + b"\r\n\r\n" + body

    async def _feedback(self, scope: Scope, receive: Receive, send: Send, model: str) -> None:
        assert self.feedback is not None
        headers = _headers(scope)
        self.dataplane.check_token(headers)
        self.dataplane.models.get(model)  # 404 before looking at the body
        body = await self._read_body(receive, headers.get("content-length"))
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"feedback is not valid JSON: {exc}") from None
        answer = await self.feedback.send(model, document)
        await _send(send, 200, orjson.dumps(answer))

    async def _read_body(self, receive: Receive, declared: str | None) -> bytes:
        limit = self.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {limit} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before sending the whole body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_error(send: Send, exc: TurnoutError, *extra: tuple[bytes, bytes]) -> None:
    headers = [(k.encode(), v.encode()) for k, v in exc.http_headers().items()]
    headers.extend(extra)
    await _send(send, exc.http_status, orjson.dumps({"error": exc.message}), headers)


def _expect(method: str, allowed: str) -> None:
    if method != allowed:
        raise _Reply(
            405, {"error": f"method {method} not allowed here; use {allowed}"}, {"allow": allowed}
        )


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def _send(
    send: Send,
    status: int,
    body: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = _JSON,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    # The server object owns start-up and shut-down; lifespan events are just acknowledged.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
