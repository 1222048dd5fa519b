"""The gRPC adapter: ``inference.GRPCInferenceService`` on grpc.aio, delegating to the data plane."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gateway._generated import inference_pb2 as pb
from gateway._generated import inference_pb2_grpc as pb_grpc
from gateway.dataplane import DataPlane
from gateway.errors import TurnoutError
from gateway.grpc.converters import (
    infer_request_from_proto,
    infer_response_to_proto,
    model_metadata_to_proto,
)

__all__ = ["InferenceServicer", "build_grpc_server"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _guard(context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
    """One error mapping for every RPC: TurnoutError keeps its code, anything else is INTERNAL."""
    try:
        return await call()
    except TurnoutError as exc:
        await context.abort(exc.grpc_code, exc.message)
    except Exception as exc:
        log.exception("unhandled error in gRPC call")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
    raise AssertionError("unreachable: abort raises")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC names)
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def call() -> Any:
            ready = self.dataplane.model_ready(request.name, request.version)
            return pb.ModelReadyResponse(ready=ready)

        return await _guard(context, call)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def call() -> Any:
            meta = self.dataplane.model_metadata(request.name, request.version)
            return model_metadata_to_proto(meta)

        return await _guard(context, call)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def call() -> Any:
            remaining = context.time_remaining()
            infer_request = infer_request_from_proto(request, remaining)
            response = await self.dataplane.infer(infer_request)
            return infer_response_to_proto(response)

        return await _guard(context, call)


def build_grpc_server(
    dataplane: DataPlane,
    max_message_bytes: int,
    max_concurrent_streams: int | None = None,
) -> grpc.aio.Server:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), server)
    return server
