"""REST adapter of the admin API, under ``/admin/v1``; every route needs a bearer token.

GET  /admin/v1/models                                  every model's traffic status
GET  /admin/v1/models/{m}/traffic                      one model's policy and shadow stats
GET  /admin/v1/models/{m}/traffic/history              audit entries, oldest first
POST /admin/v1/models/{m}/traffic                      {"op": "set"|"switch"|..., ...}
PUT  /admin/v1/models/{m}/traffic                      {"weights": {...}, ...} (op "set")
POST /admin/v1/models/{m}/versions/{v}/load|unload     load or unload a version
PUT  /admin/v1/models/{m}/versions/{v}/fault           inject faults (abort_percent, ...)
DELETE /admin/v1/models/{m}/versions/{v}/fault         stop injecting them
GET  /admin/v1/models/{m}/rollout                      the rollout: phase, step, every gate
POST /admin/v1/models/{m}/rollout                      start one: {"canary": 2, "steps": ...}
POST /admin/v1/models/{m}/rollout/{action}             pause, resume, abort, promote
GET  /admin/v1/models/{m}/experiment                   per arm n, metric, lift, SRM, decision
POST /admin/v1/models/{m}/experiment                   start: {"arms": [1, 2], "split": ...}
POST /admin/v1/models/{m}/experiment/stop              {"winner": 2} (default: the control)
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.admin.experiment import ExperimentAdmin
from gateway.admin.rollout import RolloutAdmin
from gateway.admin.traffic import TrafficAdmin
from gateway.auth import TokenAuth
from gateway.errors import InvalidInput, ModelNotFound, checked_model_name
from gateway.repository import parse_version

__all__ = ["AdminHttp"]


class AdminHttp:
    def __init__(
        self,
        admin: TrafficAdmin,
        auth: TokenAuth,
        rollouts: RolloutAdmin | None = None,
        experiments: ExperimentAdmin | None = None,
    ) -> None:
        self.admin = admin
        self.auth = auth
        self.rollouts = rollouts
        self.experiments = experiments

    async def handle(
        self, method: str, parts: list[str], headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        """``parts``: the path split on '/', after ``admin/v1``. Returns (status, JSON)."""
        actor = self.auth.authenticate(headers.get("authorization"), "admin")
        if len(parts) >= 2 and parts[0] == "models":
            checked_model_name(parts[1])  # before it names a file, a policy or a backend
        admin = self.admin
        if parts == ["models"] and method == "GET":
            return 200, {"models": admin.models()}
        if len(parts) >= 3 and parts[0] == "models" and parts[2] == "traffic":
            model, rest = parts[1], parts[3:]
            if rest == ["history"] and method == "GET":
                return 200, {"model": model, "history": admin.history(model)}
            if rest:
                raise ModelNotFound(f"no admin route for {'/'.join(parts)}")
            if method == "GET":
                return 200, admin.status(model)
            if method in ("POST", "PUT"):
                document = _json_object(body)
                operation = "set" if method == "PUT" else document.get("op")
                if not isinstance(operation, str):
                    raise InvalidInput(
                        "'op' is required: set, switch, promote, rollback, shadow, clear_shadow"
                    )
                return 200, await admin.apply(model, operation, document, actor)
        if len(parts) == 5 and parts[0] == "models" and parts[2] == "versions":
            model, version = parts[1], parse_version(parts[1], parts[3])
            if parts[4] == "load" and method == "POST":
                return 200, await admin.load(model, version)
            if parts[4] == "unload" and method == "POST":
                return 200, await admin.unload(model, version)
            if parts[4] == "fault" and method in ("PUT", "DELETE"):
                fault = _json_object(body) if method == "PUT" else {"clear": True}
                fault = {**fault, "version": version}
                return 200, await admin.apply(model, "fault", fault, actor)
        rollouts = self.rollouts
        if rollouts is not None and len(parts) in (3, 4) and parts[0] == "models":
            model = parts[1]
            if parts[2] == "rollout" and len(parts) == 3:
                if method == "GET":
                    return 200, rollouts.status(model)
                if method == "POST":
                    return 200, await rollouts.start(model, _json_object(body), actor)
            if parts[2] == "rollout" and len(parts) == 4 and method == "POST":
                return 200, await rollouts.act(model, parts[3], actor)
        experiments = self.experiments
        if experiments is not None and len(parts) in (3, 4) and parts[0] == "models":
            model = parts[1]
            if parts[2:] == ["experiment"] and method == "GET":
                return 200, await experiments.status(model)
            if parts[2:] == ["experiment"] and method == "POST":
                return 200, await experiments.start(model, _json_object(body), actor)
            if parts[2:] == ["experiment", "stop"] and method == "POST":
                return 200, await experiments.stop(model, _json_object(body), actor)
        raise ModelNotFound(f"no admin route for {method} /admin/v1/{'/'.join(parts)}")


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in request body: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput("request body must be a JSON object")
    return document
