"""gRPC adapter of the admin API: ``turnout.admin.v1.TrafficService`` on the gateway's
grpc.aio server (protos/turnout/admin/v1/traffic.proto).

Every RPC authenticates the ``authorization: Bearer <token>`` metadata (role ``admin``),
converts the request to a :class:`TrafficAdmin` call and converts the answer back; errors go
through the inference servicer's one mapping, so each :class:`TurnoutError` keeps its code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from gateway.admin.traffic import TrafficAdmin
from gateway.auth import TokenAuth
from gateway.errors import InvalidInput, checked_model_name
from gateway.grpc.messages import load_messages
from gateway.grpc.servicer import Context, Handler, guarded, invocation_headers

__all__ = ["SERVICE", "TrafficServicer", "admin_handler", "authenticated", "message"]

PACKAGE = "turnout.admin.v1"
SERVICE = f"{PACKAGE}.TrafficService"
_CLASSES = load_messages(Path(__file__).with_name("traffic.desc"))

Operation = Callable[[Any, str], Awaitable[Any]]


def message(name: str) -> Any:
    """The message class ``turnout.admin.v1.<name>`` (e.g. ``SetWeightsRequest``)."""
    return _CLASSES[f"{PACKAGE}.{name}"]


_Policy = message("Policy")
_Shadow = message("Shadow")
_ShadowStats = message("ShadowStats")
_PolicyStatus = message("PolicyStatus")
_HistoryEntry = message("HistoryEntry")

# -- conversions --------------------------------------------------------------------------


def _model(request: Any) -> str:
    if not request.model:
        raise InvalidInput("'model' is required")
    return checked_model_name(str(request.model))


def _version(request: Any) -> int:
    if request.version < 1:
        raise InvalidInput(f"'version' must be a positive integer, got {request.version}")
    return int(request.version)


def _guard(request: Any) -> dict[str, Any]:
    """The ``if_revision`` of a change request, as TrafficAdmin's body key."""
    return {"if_revision": request.if_revision} if request.HasField("if_revision") else {}


def policy_to_proto(public: dict[str, Any]) -> Any:
    """:meth:`TrafficPolicy.public` -> ``Policy``."""
    policy = _Policy(
        model=public["model"],
        revision=public["revision"],
        kind=public["kind"],
        weights={int(version): weight for version, weight in public["weights"].items()},
        allow_explicit_version=public["allow_explicit_version"],
    )
    if public["standby"] is not None:
        policy.standby = public["standby"]
    if public["shadow"] is not None:
        policy.shadow.CopyFrom(_Shadow(**public["shadow"]))
    return policy


def _shadow_stats(stats: dict[str, Any]) -> Any:
    return _ShadowStats(**{k: v for k, v in stats.items() if v is not None})


def status_to_proto(status: dict[str, Any]) -> Any:
    """:meth:`TrafficAdmin.status` -> ``PolicyStatus``."""
    return _PolicyStatus(
        policy=policy_to_proto(status),
        loaded_versions=status["loaded_versions"],
        shadow_stats={int(v): _shadow_stats(s) for v, s in status["shadow_stats"].items()},
    )


def history_entry_to_proto(entry: dict[str, Any]) -> Any:
    proto = _HistoryEntry(
        revision=entry["revision"], actor=entry["actor"], operation=entry["operation"]
    )
    proto.time.FromNanoseconds(round(entry["time"] * 1e9))
    if entry.get("old") is not None:
        proto.old_policy.CopyFrom(policy_to_proto(entry["old"]))
    proto.new_policy.CopyFrom(policy_to_proto(entry["new"]))
    return proto


# -- the service --------------------------------------------------------------------------


def authenticated(auth: TokenAuth, operation: Operation) -> Handler:
    """``operation(request, actor)`` behind the admin token of the call's metadata."""

    async def call(request: Any, context: Context) -> Any:
        header = invocation_headers(context).get("authorization")
        return await operation(request, auth.authenticate(header, "admin"))

    call.__name__ = operation.__name__
    return call


def admin_handler(
    service: str,
    rpcs: dict[str, tuple[Operation, str, str]],
    messages: Callable[[str], Any],
    auth: TokenAuth,
) -> grpc.GenericRpcHandler[Any, Any]:
    """One admin service: RPC name -> (operation, request message, response message), each
    behind the admin token and the one error mapping."""
    return grpc.method_handlers_generic_handler(
        service,
        {
            name: grpc.unary_unary_rpc_method_handler(
                guarded(authenticated(auth, method)),
                request_deserializer=messages(request).FromString,
                response_serializer=messages(response).SerializeToString,
            )
            for name, (method, request, response) in rpcs.items()
        },
    )


class TrafficServicer:
    """The admin RPCs; each authenticates, converts, calls TrafficAdmin, converts back."""

    def __init__(self, admin: TrafficAdmin, auth: TokenAuth) -> None:
        self.admin = admin
        self.auth = auth

    async def get_policy(self, request: Any, actor: str) -> Any:
        return status_to_proto(self.admin.status(_model(request)))

    async def list_policies(self, request: Any, actor: str) -> Any:
        return message("ListPoliciesResponse")(
            models=[status_to_proto(status) for status in self.admin.models()]
        )

    async def set_weights(self, request: Any, actor: str) -> Any:
        model = _model(request)
        if not request.weights:
            raise InvalidInput("'weights' must name at least one version, e.g. {1: 90, 2: 10}")
        body: dict[str, Any] = {"weights": dict(request.weights), **_guard(request)}
        if request.HasField("standby"):
            body["standby"] = request.standby
        if request.HasField("allow_explicit_version"):
            body["allow_explicit_version"] = request.allow_explicit_version
        return status_to_proto(await self.admin.apply(model, "set", body, actor))

    async def switch(self, request: Any, actor: str) -> Any:
        return status_to_proto(
            await self.admin.apply(_model(request), "switch", _guard(request), actor)
        )

    async def promote(self, request: Any, actor: str) -> Any:
        model = _model(request)
        body = {"version": _version(request), **_guard(request)}
        return status_to_proto(await self.admin.apply(model, "promote", body, actor))

    async def rollback(self, request: Any, actor: str) -> Any:
        model = _model(request)
        return status_to_proto(await self.admin.apply(model, "rollback", _guard(request), actor))

    async def set_shadow(self, request: Any, actor: str) -> Any:
        model = _model(request)
        body: dict[str, Any] = {"version": _version(request), **_guard(request)}
        if request.HasField("percent"):
            body["percent"] = request.percent
        return status_to_proto(await self.admin.apply(model, "shadow", body, actor))

    async def clear_shadow(self, request: Any, actor: str) -> Any:
        model = _model(request)
        return status_to_proto(
            await self.admin.apply(model, "clear_shadow", _guard(request), actor)
        )

    async def history(self, request: Any, actor: str) -> Any:
        model = _model(request)
        entries = [history_entry_to_proto(entry) for entry in self.admin.history(model)]
        return message("HistoryResponse")(model=model, entries=entries)

    async def load_model(self, request: Any, actor: str) -> Any:
        return status_to_proto(await self.admin.load(_model(request), _version(request)))

    async def unload_model(self, request: Any, actor: str) -> Any:
        result = await self.admin.unload(_model(request), _version(request))
        return message("UnloadModelResponse")(**result)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        # RPC -> (method, request message, response message)
        rpcs: dict[str, tuple[Operation, str, str]] = {
            "GetPolicy": (self.get_policy, "GetPolicyRequest", "PolicyStatus"),
            "ListPolicies": (self.list_policies, "ListPoliciesRequest", "ListPoliciesResponse"),
            "SetWeights": (self.set_weights, "SetWeightsRequest", "PolicyStatus"),
            "Switch": (self.switch, "SwitchRequest", "PolicyStatus"),
            "Promote": (self.promote, "PromoteRequest", "PolicyStatus"),
            "Rollback": (self.rollback, "RollbackRequest", "PolicyStatus"),
            "SetShadow": (self.set_shadow, "SetShadowRequest", "PolicyStatus"),
            "ClearShadow": (self.clear_shadow, "ClearShadowRequest", "PolicyStatus"),
            "History": (self.history, "HistoryRequest", "HistoryResponse"),
            "LoadModel": (self.load_model, "LoadModelRequest", "PolicyStatus"),
            "UnloadModel": (self.unload_model, "UnloadModelRequest", "UnloadModelResponse"),
        }
        return admin_handler(SERVICE, rpcs, message, self.auth)
