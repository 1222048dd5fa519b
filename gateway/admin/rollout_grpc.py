"""gRPC adapter of rollouts and faults: ``turnout.admin.v1.RolloutService``
(protos/turnout/admin/v1/rollout.proto). Documents travel as ``google.protobuf.Struct``:
the very JSON the REST API answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from gateway.admin.experiment import ExperimentAdmin
from gateway.admin.grpc import admin_handler
from gateway.admin.rollout import RolloutAdmin
from gateway.admin.traffic import TrafficAdmin
from gateway.auth import TokenAuth
from gateway.errors import InvalidInput, checked_model_name
from gateway.grpc.messages import load_messages

__all__ = ["SERVICE", "RolloutServicer", "message"]

PACKAGE = "turnout.admin.v1"
SERVICE = f"{PACKAGE}.RolloutService"
_CLASSES = load_messages(Path(__file__).with_name("rollout.desc"))


def message(name: str) -> Any:
    """The message class ``turnout.admin.v1.<name>`` of rollout.proto."""
    return _CLASSES[f"{PACKAGE}.{name}"]


def _document(kind: str, document: dict[str, Any]) -> Any:
    answer = message(kind)()
    json_format.ParseDict(document, answer.document)
    return answer


def _model(request: Any) -> str:
    if not request.model:
        raise InvalidInput("'model' is required")
    return checked_model_name(str(request.model))


class RolloutServicer:
    def __init__(
        self,
        rollouts: RolloutAdmin,
        traffic: TrafficAdmin,
        auth: TokenAuth,
        experiments: ExperimentAdmin | None = None,
    ) -> None:
        self.rollouts = rollouts
        self.traffic = traffic
        self.auth = auth
        self.experiments = experiments

    def _experiments(self) -> ExperimentAdmin:
        if self.experiments is None:
            raise InvalidInput("experiments are not served here")
        return self.experiments

    async def start_experiment(self, request: Any, actor: str) -> Any:
        body: dict[str, Any] = {"arms": list(request.arms), "metric": request.metric or "accuracy"}
        if request.split:
            body["split"] = list(request.split)
        if request.HasField("alpha"):
            body["alpha"] = request.alpha
        document = await self._experiments().start(_model(request), body, actor)
        return _document("ExperimentStatus", document)

    async def get_experiment(self, request: Any, actor: str) -> Any:
        document = await self._experiments().status(_model(request))
        return _document("ExperimentStatus", document)

    async def stop_experiment(self, request: Any, actor: str) -> Any:
        body = {"winner": request.winner} if request.HasField("winner") else {}
        document = await self._experiments().stop(_model(request), body, actor)
        return _document("ExperimentStatus", document)

    async def start(self, request: Any, actor: str) -> Any:
        body: dict[str, Any] = {"canary": request.canary, "dry_run": request.dry_run}
        if request.steps:
            body["steps"] = list(request.steps)
        if request.HasField("step_seconds"):
            body["step_seconds"] = request.step_seconds
        if request.HasField("min_requests"):
            body["min_requests"] = request.min_requests
        if request.HasField("config"):
            body["config"] = json_format.MessageToDict(request.config)
        document = await self.rollouts.start(_model(request), body, actor)
        return _document("RolloutStatus", document)

    async def get(self, request: Any, actor: str) -> Any:
        return _document("RolloutStatus", self.rollouts.status(_model(request)))

    def _action(self, action: str) -> Any:
        async def act(request: Any, actor: str) -> Any:
            document = await self.rollouts.act(_model(request), action, actor)
            return _document("RolloutStatus", document)

        act.__name__ = f"{action}_rollout"
        return act

    async def set_fault(self, request: Any, actor: str) -> Any:
        body: dict[str, Any] = {
            "version": request.version,
            "abort_percent": request.abort_percent,
            "abort_status": request.abort_status or 500,
            "delay_ms": request.delay_ms,
        }
        if request.HasField("delay_percent"):
            body["delay_percent"] = request.delay_percent
        document = await self.traffic.apply(_model(request), "fault", body, actor)
        return _document("FaultStatus", document)

    async def clear_fault(self, request: Any, actor: str) -> Any:
        body = {"version": request.version, "clear": True}
        document = await self.traffic.apply(_model(request), "fault", body, actor)
        return _document("FaultStatus", document)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        rpcs: dict[str, tuple[Any, str, str]] = {
            "StartRollout": (self.start, "StartRolloutRequest", "RolloutStatus"),
            "GetRollout": (self.get, "RolloutRequest", "RolloutStatus"),
            "PauseRollout": (self._action("pause"), "RolloutRequest", "RolloutStatus"),
            "ResumeRollout": (self._action("resume"), "RolloutRequest", "RolloutStatus"),
            "AbortRollout": (self._action("abort"), "RolloutRequest", "RolloutStatus"),
            "PromoteRollout": (self._action("promote"), "RolloutRequest", "RolloutStatus"),
            "SetFault": (self.set_fault, "SetFaultRequest", "FaultStatus"),
            "ClearFault": (self.clear_fault, "ClearFaultRequest", "FaultStatus"),
            "StartExperiment": (
                self.start_experiment,
                "StartExperimentRequest",
                "ExperimentStatus",
            ),
            "GetExperiment": (self.get_experiment, "ExperimentRequest", "ExperimentStatus"),
            "StopExperiment": (self.stop_experiment, "StopExperimentRequest", "ExperimentStatus"),
        }
        return admin_handler(SERVICE, rpcs, message, self.auth)
