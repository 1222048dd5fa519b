"""The transport-agnostic data plane: health, metadata, and inference.

REST and gRPC adapters convert wire messages into :mod:`gateway.types` and call this; every
decision (which version, is the request valid, how it is batched) is made here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gateway import __version__
from gateway.backends.base import Placement, ReplicaBackend
from gateway.batching import Batcher, BatchTiming, Tensors
from gateway.errors import InvalidInput, ModelNotFound, ServerShuttingDown, TurnoutError
from gateway.metrics import UNKNOWN_MODEL, RequestMetrics
from gateway.repository import ModelSpec, Repository, TensorSpec, parse_version
from gateway.routing.policy import Decision
from gateway.tracing import TraceContext
from gateway.types import InferOutput, InferRequest, InferResponse

if TYPE_CHECKING:
    from gateway.telemetry import RecordEmitter

__all__ = ["DataPlane", "HighestVersion", "LoadedModel", "VersionSelector"]

log = logging.getLogger(__name__)

SERVER_NAME = "turnout"
EXTENSIONS = ("binary_tensor_data", "statistics")
PLATFORM = "onnxruntime_onnx"


class VersionSelector(Protocol):
    """Chooses the version that serves a request; traffic policies plug in here."""

    def select(self, model: str, request: InferRequest, ready: list[int]) -> Decision: ...

    def shadow_draw(self, model: str, ready: list[int]) -> int | None: ...


class HighestVersion:
    """Without an explicit version, the highest ready version serves; nothing is mirrored."""

    def select(self, model: str, request: InferRequest, ready: list[int]) -> Decision:
        if request.model_version:
            return Decision(parse_version(model, request.model_version), "explicit", 0)
        return Decision(ready[-1], "primary", 0)

    def shadow_draw(self, model: str, ready: list[int]) -> int | None:
        return None


@dataclass(slots=True)
class ShadowStats:
    """Agreement between a model's primary answers and its shadow version's."""

    requests: int = 0
    errors: int = 0
    exact_matches: int = 0
    abs_diff_sum: float = 0.0
    compared_values: int = 0

    def public(self) -> dict[str, Any]:
        compared = self.requests - self.errors
        return {
            "requests": self.requests,
            "errors": self.errors,
            "exact_match_rate": self.exact_matches / compared if compared else None,
            "mean_abs_diff": self.abs_diff_sum / self.compared_values
            if self.compared_values
            else None,
        }


@dataclass(slots=True)
class LoadedModel:
    spec: ModelSpec
    batcher: Batcher
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


class DataPlane:
    def __init__(
        self,
        repository: Repository,
        backend: ReplicaBackend,
        selector: VersionSelector | None = None,
        drain_timeout_s: float = 30.0,
        emitter: RecordEmitter | None = None,
    ) -> None:
        self.repository = repository
        self.emitter = emitter
        """Where request records go for the monitor; None: not recorded."""
        self.backend = backend
        self.selector: VersionSelector = selector or HighestVersion()
        self._drain_timeout_s = drain_timeout_s
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._ready = False
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self.shadow_stats: dict[tuple[str, int], ShadowStats] = {}
        self.metrics = RequestMetrics()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, specs: Iterable[ModelSpec] | None = None) -> None:
        """Start the backend and load every version in the repository (or ``specs``)."""
        await self.backend.start()
        to_load = list(specs) if specs is not None else self.repository.read_all()
        await asyncio.gather(*(self.load(spec) for spec in to_load))
        self._ready = True

    async def load(self, spec: ModelSpec) -> LoadedModel:
        if spec.config.max_inflight_batches is None:
            inflight = self.backend.default_inflight_batches
            config = spec.config.model_copy(update={"max_inflight_batches": inflight})
            spec = dataclasses.replace(spec, config=config)
        await self.backend.load(spec)

        async def run_batch(inputs: Tensors) -> tuple[Tensors, Placement]:
            return await self.backend.infer(spec, inputs)

        batcher = Batcher(
            spec.key,
            run_batch,
            spec.config,
            batchable=spec.batchable,
            replicas=spec.config.num_replicas,
        )
        batcher.start()
        loaded = LoadedModel(
            spec=spec,
            batcher=batcher,
            inputs={t.name: t for t in spec.inputs},
            outputs={t.name: t for t in spec.outputs},
        )
        versions = self._models.setdefault(spec.name, {})
        versions[spec.version] = loaded
        self._models[spec.name] = dict(sorted(versions.items()))
        log.info("loaded %s (%s, batch %s)", spec.key, self.backend.name, batcher.max_batch_size)
        return loaded

    async def unload(self, model: str, version: int) -> None:
        loaded = self._models.get(model, {}).pop(version, None)
        if loaded is None:
            raise ModelNotFound(f"model '{model}' version {version} is not loaded")
        if not self._models[model]:
            del self._models[model]
        await loaded.batcher.close(self._drain_timeout_s)
        await self.backend.unload(loaded.spec)

    async def stop(self) -> None:
        """Refuse new requests, drain what is queued or running, release the backend."""
        self._stopping = True
        self._ready = False
        await asyncio.gather(
            *(m.batcher.close(self._drain_timeout_s) for m in self.loaded_models())
        )
        await self.backend.close()

    # -- health and metadata -------------------------------------------------------------

    def live(self) -> bool:
        return not self._stopping

    def ready(self) -> bool:
        return self._ready and not self._stopping

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def versions_by_model(self) -> dict[str, list[int]]:
        """Loaded version numbers of every served model, ascending."""
        return {name: list(versions) for name, versions in list(self._models.items())}

    def loaded_models(self) -> list[LoadedModel]:
        # Copies: a scrape on the metrics thread may run while the loop loads a version.
        return [m for versions in list(self._models.values()) for m in list(versions.values())]

    def get_model(self, name: str, version: str = "") -> LoadedModel:
        """The loaded version named, or the highest one; NOT_FOUND names what is missing."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not served (known: {self._known()})")
        if not version:
            return versions[next(reversed(versions))]
        number = parse_version(name, version)
        try:
            return versions[number]
        except KeyError:
            raise ModelNotFound(
                f"model '{name}' has no version {version} (loaded: "
                f"{', '.join(str(v) for v in versions)})"
            ) from None

    def model_label(self, name: str) -> str:
        """``name`` if it is served, else one placeholder: metric labels stay bounded."""
        return name if name in self._models else UNKNOWN_MODEL

    def _known(self) -> str:
        return ", ".join(sorted(self._models)) or "none"

    def model_ready(self, name: str, version: str = "") -> bool:
        self.get_model(name, version)
        return self.ready()

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        model = self.get_model(name, version)
        versions = self._models[name]
        spec = model.spec

        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

        return {
            "name": name,
            "versions": [str(v) for v in versions] if not version else [str(spec.version)],
            "platform": PLATFORM,
            "inputs": tensors(spec.inputs),
            "outputs": tensors(spec.outputs),
            "properties": {
                **self.backend.describe(spec),
                "max_batch_size": str(model.batcher.max_batch_size),
            },
        }

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Triton's statistics extension: counts and cumulative durations per version."""
        models = (
            [self.get_model(name, version)]
            if name and version
            else [m for m in self.loaded_models() if not name or m.spec.name == name]
        )
        if name and not models:
            raise ModelNotFound(f"model '{name}' is not served (known: {self._known()})")
        result = []
        for model in models:
            s = model.batcher.stats
            result.append(
                {
                    "name": model.spec.name,
                    "version": str(model.spec.version),
                    "inference_count": s.inference_count,
                    "execution_count": s.execution_count,
                    "inference_stats": {
                        "success": {"count": s.success_count},
                        "fail": {"count": s.fail_count},
                        "queue": {"count": s.success_count + s.fail_count, "ns": s.queue_ns},
                        "compute_infer": {"count": s.execution_count, "ns": s.compute_ns},
                    },
                    "batch_stats": [
                        {"batch_size": size, "compute_infer": {"count": count}}
                        for size, count in sorted(s.batch_sizes.items())
                    ],
                }
            )
        return result

    # -- inference -----------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        # Metrics always; with a monitor, one record per request goes to the emitter,
        # failures included. Kept inline (no wrapper coroutine, no per-request object beyond
        # the timing) because this is the hot path.
        emitter = self.emitter
        metrics = self.metrics
        entered = time.perf_counter()
        received = request.received or entered
        trace = request.trace
        if trace is None:
            trace = request.trace = TraceContext.start()
        name = request.model_name
        version = -1  # -1: an unknown model name, not worth a record (or a key) of its own
        decision: Decision | None = None
        tensors: Tensors | None = None
        results: Tensors | None = None
        rows = 0
        timing = BatchTiming() if emitter is not None else None
        batchable = True
        counted = False
        versions: dict[int, LoadedModel] | None = None
        try:
            if self._stopping:
                raise ServerShuttingDown("server is shutting down")
            versions = self._models.get(name)
            if not versions:
                raise ModelNotFound(f"model '{name}' is not served (known: {self._known()})")
            metrics.in_flight[name] = metrics.in_flight.get(name, 0) + 1
            counted = True
            ready = list(versions)
            decision = self.selector.select(name, request, ready)
            model = versions.get(decision.version)
            if model is None:
                version = 0  # not loaded: one key per model, whatever version was asked for
                raise ModelNotFound(
                    f"model '{name}' has no version {decision.version} (loaded: "
                    f"{', '.join(str(v) for v in versions)})"
                )
            version = decision.version
            batchable = model.spec.batchable
            tensors, rows = self._validate_inputs(model, request)
            wanted = self._requested_outputs(model, request)
            shadow_version = self.selector.shadow_draw(name, ready)
            primary = model.batcher.submit(tensors, rows, request.timeout_s, timing)
            if shadow_version is not None and shadow_version != decision.version:
                primary_task = asyncio.ensure_future(primary)
                self._mirror(name, shadow_version, tensors, rows, primary_task, trace)
                results = await primary_task
            else:
                results = await primary
            outputs = [
                InferOutput(
                    name=output,
                    datatype=model.outputs[output].datatype,
                    shape=results[output].shape,
                    data=results[output],
                )
                for output in wanted
            ]
            response = InferResponse(
                model_name=name,
                model_version=str(model.spec.version),
                id=request.id,
                outputs=outputs,
                revision=decision.revision,
                arm=decision.arm,
            )
        except Exception as exc:
            failure: Exception | None = exc
            status = exc.http_status if isinstance(exc, TurnoutError) else 500
            error = exc.message if isinstance(exc, TurnoutError) else str(exc)
        else:
            failure, status, error = None, 200, ""
        finally:  # cancelled requests too
            if counted:
                metrics.in_flight[name] -= 1
        total_s = time.perf_counter() - received
        routed = decision is not None and version > 0
        metrics.observe(
            name if counted or name in self._models else UNKNOWN_MODEL,
            str(version) if routed else "",
            decision.arm if routed and decision is not None else "",
            request.protocol,
            status,
            total_s,
        )
        if emitter is not None and version >= 0 and decision is not None:
            if failure is None and not batchable and tensors is not None and results is not None:
                # A model without a batch axis: the whole tensor is the request's one row.
                tensors = {k: v[None] for k, v in tensors.items()}
                results = {k: v[None] for k, v in results.items()}
            emitter.record(
                name,
                version,
                decision.revision,
                decision.arm,
                status,
                time.time_ns() - int(total_s * 1e9),
                received,
                entered,
                total_s,
                timing,
                trace,
                request.protocol,
                request.path,
                error,
                request.id,
                rows,
                tensors if failure is None else None,
                results if failure is None else None,
            )
        if failure is not None:
            raise failure
        return response

    def _mirror(
        self,
        name: str,
        version: int,
        tensors: Tensors,
        rows: int,
        primary: asyncio.Future[Tensors],
        trace: TraceContext,
    ) -> None:
        """Send a copy to the shadow version; compare when both answered; never wait on it."""
        shadow = self._models.get(name, {}).get(version)
        stats = self.shadow_stats.setdefault((name, version), ShadowStats())
        stats.requests += 1
        if shadow is None:
            stats.errors += 1
            return
        emitter = self.emitter

        async def compare() -> None:
            started = time.perf_counter()
            timing = BatchTiming() if emitter is not None else None
            mirrored: Tensors | None = None
            try:
                mirrored = await shadow.batcher.submit(tensors, rows, None, timing)
            except Exception as exc:
                stats.errors += 1
                status = exc.http_status if isinstance(exc, TurnoutError) else 500
                error = exc.message if isinstance(exc, TurnoutError) else str(exc)
            else:
                status, error = 200, ""
            if emitter is not None:
                took = time.perf_counter() - started
                emitter.record_shadow(
                    name, version, status, started, time.time_ns() - int(took * 1e9),
                    took, timing, trace.child(), error,
                )  # fmt: skip
            if mirrored is None:
                return
            try:
                answered = await primary
            except Exception:
                stats.errors += 1
                return
            exact = True
            for key, value in answered.items():
                other = mirrored.get(key)
                if other is None or other.shape != value.shape:
                    exact = False
                    continue
                if not np.array_equal(value, other):
                    exact = False
                if value.dtype.kind in "biuf" and value.size:
                    diff = np.abs(value.astype(np.float64) - other.astype(np.float64))
                    stats.abs_diff_sum += float(diff.sum())
                    stats.compared_values += value.size
            stats.exact_matches += exact

        task = asyncio.get_running_loop().create_task(compare())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _validate_inputs(self, model: LoadedModel, request: InferRequest) -> tuple[Tensors, int]:
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

    @staticmethod
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
