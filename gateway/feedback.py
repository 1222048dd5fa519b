"""Label feedback: the true labels of earlier requests, forwarded to the monitor sidecar.

``POST /v2/models/{model}/feedback`` (REST) and ``turnout.monitor.v1.FeedbackService/
SendFeedback`` (gRPC, protos/turnout/monitor/v1/feedback.proto) take labels of one model::

    {"labels": [{"id": "r-17", "label": 1}, {"id": "4bf92f35...", "label": [1, 0]}]}

``id`` is the request's OIP id or its trace id; ``label`` one value, or a list with one per
row of the request. The gateway checks the model is served and the body is well formed,
then posts the documents to the sidecar's ``POST /feedback`` (``monitor_http``), which joins
them with the predictions it recorded and counts accuracy per version (``monitor.feedback``).
The post runs in a worker thread with a short timeout, so the event loop never waits on it;
a sidecar that cannot be reached answers 503 (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from gateway.dataplane import DataPlane
from gateway.errors import InvalidInput, MonitorUnavailable
from gateway.grpc.messages import load_messages
from gateway.grpc.servicer import Context, guarded, invocation_headers

__all__ = [
    "SERVICE",
    "FeedbackForwarder",
    "FeedbackServicer",
    "feedback_documents",
]

PACKAGE = "turnout.monitor.v1"
SERVICE = f"{PACKAGE}.FeedbackService"
_CLASSES = load_messages(Path(__file__).with_name("feedback.desc"))
_Request = _CLASSES[f"{PACKAGE}.SendFeedbackRequest"]
_Response = _CLASSES[f"{PACKAGE}.SendFeedbackResponse"]

MAX_LABELS = 100_000


def _label_value(value: Any, where: str) -> Any:
    scalar = (int, float, str)
    if isinstance(value, bool) or value is None:
        raise InvalidInput(f"'{where}' must be a number, a string or a list of them")
    if isinstance(value, scalar):
        return value
    if isinstance(value, list) and value:
        for item in value:
            if isinstance(item, bool) or not isinstance(item, scalar):
                raise InvalidInput(f"'{where}' must be a number, a string or a list of them")
        return value
    raise InvalidInput(f"'{where}' must be a number, a string or a non-empty list of them")


def feedback_documents(model: str, body: Any) -> list[dict[str, Any]]:
    """A feedback body (``{"labels": [{"id": ..., "label": ...}, ...]}``) as the sidecar's
    documents; InvalidInput names the field that is wrong."""
    if not isinstance(body, dict):
        raise InvalidInput("feedback must be a JSON object with a 'labels' list")
    labels = body.get("labels")
    if not isinstance(labels, list) or not labels:
        raise InvalidInput('\'labels\' must be a non-empty list of {"id": ..., "label": ...}')
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"'labels' has {len(labels)} entries, at most {MAX_LABELS}")
    documents = []
    for i, entry in enumerate(labels):
        if not isinstance(entry, dict):
            raise InvalidInput(f"'labels[{i}]' must be an object with 'id' and 'label'")
        key = entry.get("id")
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"'labels[{i}].id' must be a non-empty string (request or trace id)")
        if "label" not in entry and "reward" in entry:
            reward = entry["reward"]
            if isinstance(reward, bool) or not isinstance(reward, int | float):
                raise InvalidInput(f"'labels[{i}].reward' must be a number")
            documents.append({"model": model, "request_id": key, "reward": reward})
            continue
        if "label" not in entry:
            raise InvalidInput(f"'labels[{i}].label' (or a numeric 'reward') is required")
        label = _label_value(entry["label"], f"labels[{i}].label")
        documents.append({"model": model, "request_id": key, "labels": label})
    return documents


class FeedbackForwarder:
    """Checks a model's feedback and posts it to the sidecar's ``/feedback``."""

    def __init__(self, dataplane: DataPlane, url: str, timeout_s: float = 2.0) -> None:
        self.dataplane = dataplane
        self.url = url.rstrip("/") + "/feedback"
        self.timeout_s = timeout_s

    async def send(self, model: str, body: Any) -> dict[str, Any]:
        self.dataplane.models.get(model)  # 404 for a model that is not served
        documents = feedback_documents(model, body)
        return await asyncio.to_thread(self._post, json.dumps(documents).encode())

    def _post(self, payload: bytes) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url, payload, {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 400:
                try:
                    message = json.loads(exc.read()).get("error", "invalid feedback")
                except ValueError:
                    message = "invalid feedback"
                raise InvalidInput(str(message)) from None
            raise MonitorUnavailable(
                f"monitor sidecar at {self.url} answered {exc.code} to feedback"
            ) from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MonitorUnavailable(
                f"monitor sidecar at {self.url} cannot be reached for feedback: {reason}"
            ) from None
        return {"matched": int(answer["matched"]), "unmatched": int(answer["unmatched"])}


class FeedbackServicer:
    """``turnout.monitor.v1.FeedbackService``: SendFeedback through a FeedbackForwarder."""

    def __init__(self, forwarder: FeedbackForwarder) -> None:
        self.forwarder = forwarder

    async def send_feedback(self, request: Any, context: Context) -> Any:
        self.forwarder.dataplane.check_token(invocation_headers(context))
        if not request.model:
            raise InvalidInput("'model' is required")
        labels = []
        for i, entry in enumerate(request.labels):
            if not entry.HasField("label"):
                if entry.HasField("reward"):
                    labels.append({"id": entry.id, "reward": entry.reward})
                    continue
                raise InvalidInput(f"'labels[{i}].label' (or a 'reward') is required")
            value = json_format.MessageToDict(entry.label)
            labels.append({"id": entry.id, "label": value})
        answer = await self.forwarder.send(request.model, {"labels": labels})
        return _Response(**answer)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "SendFeedback": grpc.unary_unary_rpc_method_handler(
                    guarded(self.send_feedback),
                    request_deserializer=_Request.FromString,
                    response_serializer=_Response.SerializeToString,
                )
            },
        )
