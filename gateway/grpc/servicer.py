"""The gRPC adapter: ``inference.GRPCInferenceService`` on grpc.aio, calling the data plane."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from gateway import metadata
from gateway.context import RequestContext
from gateway.dataplane import DataPlane
from gateway.errors import TurnoutError, internal_error
from gateway.grpc.converters import (
    infer_request_from_proto,
    infer_response_to_proto,
    model_metadata_to_proto,
)
from gateway.grpc.messages import SERVICE, message
from gateway.routing import REVISION_HEADER
from gateway.types import InferRequest
from turnout_contract.trace import TRACEPARENT_HEADER

__all__ = [
    "Context",
    "Handler",
    "InferenceServicer",
    "build_grpc_server",
    "guarded",
    "invocation_headers",
]

log = logging.getLogger(__name__)

RETRY_PUSHBACK_HEADER = "grpc-retry-pushback-ms"
"""gRFC A6: how long a client's retry policy should wait; sent with refusals for overload
(the Retry-After of HTTP's 429)."""

MODEL_INFER = f"/{SERVICE}/ModelInfer"

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
        except Exception:
            await context.abort(grpc.StatusCode.INTERNAL, internal_error(log, handler.__name__))

    call.__name__ = handler.__name__
    return call


def invocation_headers(context: Context) -> dict[str, str]:
    """The call's text metadata (binary ``-bin`` entries are not headers the gateway reads)."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


class InferenceServicer:
    """The six OIP RPCs; each converts, calls the data plane, converts back."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def server_live(self, request: Any, context: Context) -> Any:
        return _ServerLiveResponse(live=self.dataplane.models.live())

    async def server_ready(self, request: Any, context: Context) -> Any:
        return _ServerReadyResponse(ready=self.dataplane.models.ready())

    async def model_ready(self, request: Any, context: Context) -> Any:
        ready = self.dataplane.models.model_ready(request.name, request.version)
        return _ModelReadyResponse(ready=ready)

    async def server_metadata(self, request: Any, context: Context) -> Any:
        return _ServerMetadataResponse(**metadata.server_metadata())

    async def model_metadata(self, request: Any, context: Context) -> Any:
        document = metadata.model_metadata(self.dataplane.models, request.name, request.version)
        return model_metadata_to_proto(document)

    async def model_infer(self, request: Any, context: Context) -> Any:
        call = RequestContext.arrived("grpc", request.model_name, invocation_headers(context))
        answer_trace = (TRACEPARENT_HEADER, call.trace.traceparent())
        # Set first so an error's trailers carry it too (abort keeps what was set).
        context.set_trailing_metadata((answer_trace,))
        time_remaining = context.time_remaining()

        async def decode() -> InferRequest:
            return infer_request_from_proto(request, time_remaining)

        response = await self.dataplane.infer(call, decode)
        context.set_trailing_metadata(((REVISION_HEADER, str(response.revision)), answer_trace))
        return infer_response_to_proto(response)

    def admission(
        self, request: Any, metadata: Sequence[tuple[str, str | bytes]]
    ) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]] | Callable[[], None] | None:
        """For a transport that reads calls before it runs them (:mod:`.transport`): the
        refusal of a ModelInfer whose model's queues are full, sent before any task runs
        it and recorded like any request; else, for a served model, the release of the
        queue place kept for it meanwhile (:meth:`DataPlane.reserve`)."""
        plane = self.dataplane
        model = request.model_name
        if plane.refusable_from_head(model):
            headers = {k: v for k, v in metadata if isinstance(v, str)}
            call = RequestContext.arrived("grpc", model, headers)
            error = plane.refuse_from_head(call)
            trailing = [
                (TRACEPARENT_HEADER, call.trace.traceparent()),
                (RETRY_PUSHBACK_HEADER, str(error.retry_after_s * 1000)),
            ]
            return error.grpc_code, error.message, trailing
        if model not in plane.models.versions:
            return None
        plane.reserve(model)
        return lambda: plane.release(model)

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
    *,
    reuse_port: bool = False,
) -> grpc.aio.Server:
    """A grpc.aio server with the inference service; ``reuse_port`` lets several of them
    listen on one port (the caller makes sure no other process holds it)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([InferenceServicer(dataplane).handler()])
    return server
