"""The transport-agnostic data plane: inference, from an admitted request to its outcome.

REST and gRPC adapters hand over a :class:`gateway.context.RequestContext` and a decoder;
every decision is made here, once for both transports: the inference token, decoding, the
version (the selector), input validation, batching, the shadow copy. Whatever happens, the
request ends as one :class:`turnout_contract.records.RequestRecord` handed to every
observer (the gateway's metrics, the record emitter), refusals before routing included.
Which versions are loaded is the model table's business (:mod:`gateway.models`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from gateway.auth import TokenAuth
from gateway.context import Decode, RequestContext
from gateway.errors import (
    InjectedFault,
    InjectedUnavailable,
    InvalidInput,
    ModelNotFound,
    QueueFull,
    RateLimited,
    ServerShuttingDown,
    TurnoutError,
    checked_model_name,
)
from gateway.limits import RateLimits
from gateway.models import LoadedModel, ModelTable
from gateway.repository import parse_version
from gateway.routing import ROUTING_KEY_HEADER, VERSION_HEADER, routing_key
from gateway.routing.policy import Decision, Fault
from gateway.routing.shadow import ShadowMirror
from gateway.types import InferOutput, InferRequest, InferResponse
from turnout_contract.records import SERVER, BatchTiming, RequestRecord, Tensors

__all__ = ["UNKNOWN_MODEL", "DataPlane", "HighestVersion", "Observer", "VersionSelector"]

UNKNOWN_MODEL = "(unknown)"
"""The ``model`` of records of requests naming a model that is not served: metrics keep one
series for them, not one per name a client typed."""

Observer = Callable[[RequestRecord], None]
"""Gets every request's record once its outcome is known; must not raise or block."""


class VersionSelector(Protocol):
    """Chooses the version that serves a request (and its shadow); traffic policies plug in."""

    def select(self, model: str, request: InferRequest, ready: list[int]) -> Decision: ...


class HighestVersion:
    """Without an explicit version, the highest ready version serves; nothing is mirrored."""

    def select(self, model: str, request: InferRequest, ready: list[int]) -> Decision:
        if request.model_version:
            return Decision(parse_version(model, request.model_version), "explicit", 0)
        return Decision(ready[-1], "primary", 0)


class DataPlane:
    def __init__(
        self,
        models: ModelTable,
        selector: VersionSelector | None = None,
        *,
        observers: Sequence[Observer] = (),
        mirror: ShadowMirror | None = None,
        auth: TokenAuth | None = None,
        token_limits: RateLimits | None = None,
    ) -> None:
        self.models = models
        self.selector: VersionSelector = selector or HighestVersion()
        self.observers = tuple(observers)
        self.mirror = mirror or ShadowMirror()
        self.auth = auth
        """Checks the inference token when set (``require_infer_token``)."""
        self.token_limits = token_limits
        """Per bearer token (``rate_limit_rps``); every client shares one key without tokens."""
        self.model_limits: dict[str, RateLimits] = {}
        """Per served model with a ``rate_limit_rps`` in its config."""
        self._unlimited: dict[str, object] = {}
        """Model -> the versions table found without a rate limit (a load replaces the
        table, so a new config is read again)."""
        self.in_flight: dict[str, int] = {}
        """Requests per served model taken up and not yet answered."""
        self.arriving: dict[str, int] = {}
        """Per model: requests let in on their heads, not at a queue yet (:meth:`reserve`)."""
        self._full_messages: dict[str, tuple[tuple[LoadedModel, ...], str]] = {}
        """Model -> its loaded versions and the queue-full message naming them: formatting
        it was a fifth of a refusal's cost, and a crowd is refused thousands of times."""

    def model_label(self, name: str) -> str:
        """``name`` if it is served, else one placeholder: metric labels stay bounded."""
        return name if name in self.models.versions else UNKNOWN_MODEL

    async def infer(self, context: RequestContext, decode: Decode) -> InferResponse:
        """Admit, decode, route and run one request; its record goes to every observer.

        Kept flat (no wrapper coroutine, one record object) because this is the hot path.
        """
        name = context.model
        version = -1  # -1: no version chosen; 0: the chosen version is not loaded
        decision: Decision | None = None
        timing = BatchTiming()
        rows = 0
        counted = False
        entered = context.received
        request_id = ""
        try:
            request = await self._admit(context, decode)
            entered = time.perf_counter()
            request_id = request.id
            name = request.model_name
            if self.models.stopping:
                raise ServerShuttingDown("server is shutting down")
            versions = self.models.versions.get(name)
            if not versions:
                raise ModelNotFound(f"model '{name}' is not served (known: {self.models.known()})")
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            counted = True
            decision = self.selector.select(name, request, list(versions))
            model = versions.get(decision.version)
            if model is None:
                version = 0
                raise ModelNotFound(
                    f"model '{name}' has no version {decision.version} (loaded: "
                    f"{', '.join(str(v) for v in versions)})"
                )
            version = decision.version
            tensors, rows = _validate_inputs(model, request)
            wanted = _requested_outputs(model, request)
            if decision.fault is not None:
                await _inject(decision.fault, name, version)
            primary = model.batcher.submit(tensors, rows, request.timeout_s, timing)
            shadow = decision.shadow
            if shadow is not None and shadow != version and self._under_pressure(model):
                self.mirror.shed(name, shadow)
                shadow = None
            if shadow is not None and shadow != version:
                primary_task = asyncio.ensure_future(primary)
                mirrored = versions.get(shadow)
                self.mirror.mirror(
                    name, shadow, mirrored.batcher if mirrored else None, tensors, rows,
                    primary_task, context.trace,
                )  # fmt: skip
                results = await primary_task
            else:
                results = await primary
            response = _response(model, request, decision, results, wanted)
        except Exception as exc:
            failure: Exception | None = exc
            status = exc.http_status if isinstance(exc, TurnoutError) else 500
            error = exc.message if isinstance(exc, TurnoutError) else str(exc)
        else:
            failure, status, error = None, 200, ""
        finally:  # cancelled requests too
            if counted:
                self.in_flight[name] -= 1
        total_s = time.perf_counter() - context.received
        record = RequestRecord(
            name if counted or name in self.models.versions else UNKNOWN_MODEL,
            version,
            decision.revision if decision is not None else 0,
            decision.arm if decision is not None else "",
            status,
            time.time_ns() - int(total_s * 1e9),
            context.received,
            entered,
            total_s,
            timing,
            context.trace,
            SERVER,
            context.protocol,
            context.path,
            error,
            request_id,
            rows if failure is None else 0,  # its rows, in its batch's tensors (timing)
        )
        for observe in self.observers:
            observe(record)
        if failure is not None:
            raise failure
        return response

    def saturated(self, model: str, arriving: int = 0) -> bool:
        """The queues of ``model``'s loaded versions have no room left once ``arriving``
        requests already let in take theirs: whichever version a request is routed to, it
        would be refused, so it is refused before its body is read."""
        versions = self.models.versions.get(model)
        if not versions:
            return False
        room = 0
        for loaded in versions.values():
            room += loaded.batcher.room()
            if room > arriving:
                return False
        return True

    def refusable_from_head(self, model: str) -> bool:
        """A request to ``model`` may be refused on its head alone, by a transport that
        answers without reading it (HTTP's connection): the queues are full, counting the
        places of requests let in on their heads that have not reached a queue yet
        (:meth:`reserve`), and nothing is checked before them (no inference token, no rate
        limit)."""
        return (
            self.auth is None
            and self.token_limits is None
            and not self.models.stopping
            and self.saturated(model, self.arriving.get(model, 0))
            and self.limits_for(model) is None
        )

    # A transport that reads heads before it runs requests (HTTP's connection parses every
    # ready connection's head in one loop turn, and runs the requests in later turns) must
    # count the requests it let in: without it, a crowd's heads all see the same free place
    # and all but one are then refused the expensive way, after a task, a scope and a body.
    def reserve(self, model: str) -> None:
        """A request to ``model`` was let in on its head: keep a place for it until
        :meth:`release`, which comes just before :meth:`infer` (or instead of it)."""
        self.arriving[model] = self.arriving.get(model, 0) + 1

    def release(self, model: str) -> None:
        left = self.arriving.get(model, 0) - 1
        if left > 0:
            self.arriving[model] = left
        else:
            self.arriving.pop(model, None)

    def refuse_from_head(self, context: RequestContext) -> QueueFull:
        """The refusal ``refusable_from_head`` allowed, recorded for the observers as
        ``infer`` records it; the transport sends it."""
        error = self._queue_full(context.model)
        total_s = time.perf_counter() - context.received
        record = RequestRecord(
            context.model, -1, 0, "", error.http_status,
            time.time_ns() - int(total_s * 1e9), context.received, context.received,
            total_s, BatchTiming(), context.trace, SERVER, context.protocol, context.path,
            error.message, "",
        )  # fmt: skip
        for observe in self.observers:
            observe(record)
        return error

    def _queue_full(self, name: str) -> QueueFull:
        loaded = tuple(self.models.versions.get(name, {}).values())
        cached = self._full_messages.get(name)
        if cached is not None and cached[0] == loaded:
            return QueueFull(cached[1])
        full = ", ".join(f"'{m.spec.key}' {m.batcher.max_queue_size}" for m in loaded)
        message = (
            f"model '{name}' queue is full: every version's queue holds its "
            f"max_queue_size of waiting requests ({full})"
        )
        if name in self.models.versions:  # bounded by the models served
            self._full_messages[name] = (loaded, message)
        return QueueFull(message)

    def check_token(self, headers: Mapping[str, str]) -> str:
        """With ``require_infer_token``: 401/403 unless the headers carry an inference token
        (inference and label feedback alike); the token's name ("" without tokens)."""
        if self.auth is not None:
            return self.auth.authenticate(headers.get("authorization"), "infer")
        return ""

    def limits_for(self, model: str) -> RateLimits | None:
        """The model's rate limits, built when first asked (from its config)."""
        limits = self.model_limits.get(model)
        if limits is None:
            versions = self.models.versions.get(model)
            if not versions or self._unlimited.get(model) is versions:
                return None  # the hot path of a model without a limit: two lookups
            config = next(reversed(versions.values())).spec.config
            if config.rate_limit_rps is None:
                self._unlimited[model] = versions
                return None
            limits = RateLimits(config.rate_limit_rps, config.rate_limit_burst)
            self.model_limits[model] = limits
        return limits

    def _under_pressure(self, model: LoadedModel) -> bool:
        """Shadow copies are shed first: while the primary's queue is half full, or its
        model's rate-limit bucket is less than half full."""
        batcher = model.batcher
        if batcher.queue_depth * 2 >= batcher.max_queue_size:
            return True
        limits = self.model_limits.get(model.spec.name)
        return limits is not None and limits.bucket(model.spec.name).fill() < 0.5

    async def _admit(self, context: RequestContext, decode: Decode) -> InferRequest:
        """The inference token, the decoded request, and what its headers add to it."""
        headers = context.headers
        token = self.check_token(headers)
        if context.model not in self.models.versions:
            checked_model_name(context.model)  # served names passed when they were loaded
        # Rate limits before the body is read: a refusal costs no decoding.
        if self.token_limits is not None:
            retry = self.token_limits.admit(token)
            if retry is not None:
                raise RateLimited(
                    f"token '{token or 'anonymous'}' is above its rate limit "
                    f"({self.token_limits.rate:g} requests/s)",
                    int(retry),
                )
        limits = self.limits_for(context.model)
        if limits is not None:
            retry = limits.admit(context.model)
            if retry is not None:
                raise RateLimited(
                    f"model '{context.model}' is above its rate limit ({limits.rate:g} requests/s)",
                    int(retry),
                )
        if self.saturated(context.model):
            # Whichever version it is routed to, it would be refused: before the body is read.
            raise self._queue_full(context.model)
        request = await decode()
        if not request.model_version:
            request.model_version = headers.get(VERSION_HEADER, "")
        request.routing_key = routing_key(headers.get(ROUTING_KEY_HEADER), request.parameters)
        return request


async def _inject(fault: Fault, name: str, version: int) -> None:
    """The faults the policy injects into this version: a delay, then maybe an error."""
    if fault.delay_ms and random.random() * 100 < fault.delay_percent:
        await asyncio.sleep(fault.delay_ms / 1e3)
    if fault.abort_percent and random.random() * 100 < fault.abort_percent:
        error = InjectedUnavailable if fault.abort_status == 503 else InjectedFault
        raise error(f"fault injected into model '{name}' version {version} (traffic fault)")


def _response(
    model: LoadedModel,
    request: InferRequest,
    decision: Decision,
    results: Tensors,
    wanted: list[str],
) -> InferResponse:
    outputs = [
        InferOutput(
            name=output,
            datatype=model.outputs[output].datatype,
            shape=results[output].shape,
            data=results[output],
        )
        for output in wanted
    ]
    return InferResponse(
        model_name=model.spec.name,
        model_version=str(model.spec.version),
        id=request.id,
        outputs=outputs,
        revision=decision.revision,
        arm=decision.arm,
    )


def _validate_inputs(model: LoadedModel, request: InferRequest) -> tuple[Tensors, int]:
    expected = model.inputs
    tensors: Tensors = {}
    for item in request.inputs:
        spec = expected.get(item.name)
        if spec is None:
            raise InvalidInput(
                f"unexpected input '{item.name}' for model '{model.spec.name}' "
                f"(expected: {', '.join(expected)})"
            )
        if item.name in tensors:
            raise InvalidInput(f"input '{item.name}' is given more than once")
        if item.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{item.name}': datatype {item.datatype} does not match the "
                f"model's {spec.datatype}"
            )
        _check_shape(item.name, item.shape, spec.shape)
        tensors[item.name] = item.data
    if len(tensors) != len(expected):
        missing = [name for name in expected if name not in tensors]
        raise InvalidInput(
            f"missing input{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} for model '{model.spec.name}'"
        )
    rows = 1
    if model.spec.batchable:
        batch_dims = {t.shape[0] for t in tensors.values()}
        if len(batch_dims) > 1:
            raise InvalidInput(f"inputs disagree on the batch dimension: {sorted(batch_dims)}")
        rows = batch_dims.pop()
    return tensors, rows


def _requested_outputs(model: LoadedModel, request: InferRequest) -> list[str]:
    if not request.outputs:
        return list(model.outputs)
    names: list[str] = []
    for output in request.outputs:
        if output.name in names:
            raise InvalidInput(f"output '{output.name}' is requested more than once")
        if output.name not in model.outputs:
            raise InvalidInput(
                f"unknown output '{output.name}' for model '{model.spec.name}' "
                f"(outputs: {', '.join(model.outputs)})"
            )
        names.append(output.name)
    return names


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if len(got) != len(want):
        raise InvalidInput(
            f"input '{name}': shape {list(got)} has rank {len(got)}, the model expects "
            f"rank {len(want)} {list(want)}"
        )
    for axis, (g, w) in enumerate(zip(got, want, strict=True)):
        if w != -1 and g != w:
            raise InvalidInput(
                f"input '{name}': dimension {axis} is {g}, the model expects {w} "
                f"(shape {list(want)})"
            )
