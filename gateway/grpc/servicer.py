"""The gRPC adapter: ``inference.GRPCInferenceService`` on grpc.aio, calling the data plane."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.admin.auth import TokenAuth
from gateway.dataplane import DataPlane
from gateway.errors import TurnoutError
from gateway.grpc.converters import (
    infer_request_from_proto,
    infer_response_to_proto,
    model_metadata_to_proto,
)
from gateway.grpc.messages import SERVICE, message
from gateway.routing import REVISION_HEADER, ROUTING_KEY_HEADER, VERSION_HEADER, routing_key
from gateway.tracing import TRACEPARENT_HEADER, TRACESTATE_HEADER, TraceContext

__all__ = ["Context", "Handler", "InferenceServicer", "build_grpc_server", "guarded"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]

_ServerLiveResponse = message("ServerLiveResponse")
_ServerReadyResponse = message("ServerReadyResponse")
_ModelReadyResponse = message("ModelReadyResponse")
_ServerMetadataResponse = message("ServerMetadataResponse")


def guarded(handler: Handler) -> Handler:
    """One error mapping for every RPC: TurnoutError keeps its code, anything else is INTERNAL."""

    async def call(request: Any, context: Context) -> Any:
        try:
            return await handler(request, context)
        except TurnoutError as exc:
            await context.abort(exc.grpc_code, exc.message)
        except Exception as exc:
            log.exception("unhandled error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    call.__name__ = handler.__name__
    return call


class InferenceServicer:
    """The six OIP RPCs; each converts, calls the data plane, converts back."""

    def __init__(self, dataplane: DataPlane, infer_auth: TokenAuth | None = None) -> None:
        self.dataplane = dataplane
        self.infer_auth = infer_auth

    async def server_live(self, request: Any, context: Context) -> Any:
        return _ServerLiveResponse(live=self.dataplane.live())

    async def server_ready(self, request: Any, context: Context) -> Any:
        return _ServerReadyResponse(ready=self.dataplane.ready())

    async def model_ready(self, request: Any, context: Context) -> Any:
        return _ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    async def server_metadata(self, request: Any, context: Context) -> Any:
        return _ServerMetadataResponse(**self.dataplane.server_metadata())

    async def model_metadata(self, request: Any, context: Context) -> Any:
        return model_metadata_to_proto(self.dataplane.model_metadata(request.name, request.version))

    async def model_infer(self, request: Any, context: Context) -> Any:
        received = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        traceparent, tracestate = metadata.get(TRACEPARENT_HEADER), metadata.get(TRACESTATE_HEADER)
        trace = TraceContext.start(
            str(traceparent) if traceparent else None, str(tracestate) if tracestate else None
        )
        answer_trace = (TRACEPARENT_HEADER, trace.traceparent())
        # Set first so an error's trailers carry it too (abort keeps what was set).
        context.set_trailing_metadata((answer_trace,))
        dp = self.dataplane
        try:
            if self.infer_auth is not None:
                authorization = metadata.get("authorization")
                self.infer_auth.authenticate(str(authorization) if authorization else None, "infer")
            infer_request = infer_request_from_proto(request, context.time_remaining())
        except TurnoutError as exc:
            dp.metrics.rejected(dp.model_label(request.model_name), "grpc", exc.http_status)
            raise
        if not infer_request.model_version:
            infer_request.model_version = str(metadata.get(VERSION_HEADER, ""))
        header_key = metadata.get(ROUTING_KEY_HEADER)
        infer_request.routing_key = routing_key(
            str(header_key) if header_key else None, infer_request.parameters
        )
        infer_request.trace = trace
        infer_request.protocol = "grpc"
        infer_request.received = received
        response = await dp.infer(infer_request)
        context.set_trailing_metadata(((REVISION_HEADER, str(response.revision)), answer_trace))
        return infer_response_to_proto(response)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        methods = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    guarded(method),
                    request_deserializer=message(f"{name}Request").FromString,
                    response_serializer=message(f"{name}Response").SerializeToString,
                )
                for name, method in methods.items()
            },
        )


def build_grpc_server(
    dataplane: DataPlane,
    max_message_bytes: int,
    max_concurrent_streams: int | None = None,
    infer_auth: TokenAuth | None = None,
) -> grpc.aio.Server:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([InferenceServicer(dataplane, infer_auth).handler()])
    return server
