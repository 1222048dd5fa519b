"""The gateway's own Prometheus metrics: plain counters on the hot path, families on scrape.

:class:`RequestMetrics` observes every request's record and bumps a few dict entries;
everything else (requests in flight, queue depth, batch sizes, backend errors, records
dropped, policy revisions) is read when Prometheus scrapes from the objects that already
keep it, through the small :class:`ServingState` protocol, so an unscraped gateway pays
nothing for it. The registry is the gateway's own, never prometheus_client's global one.

Names, units and labels: docs/metrics.md.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.batching import Batcher
from gateway.overload import Overload
from gateway.routing.shadow import ShadowStats
from gateway.telemetry import RecordEmitter
from turnout_contract.records import RequestRecord

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "DURATION_BUCKETS",
    "GatewayCollector",
    "RequestMetrics",
    "ServingState",
    "gateway_registry",
]

# Upper bounds in seconds; serving latencies sit between half a millisecond and seconds.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingState(Protocol):
    """What the collector reads at scrape time (the composition root passes the gateway's)."""

    @property
    def backend_name(self) -> str: ...

    def in_flight(self) -> dict[str, int]:
        """Requests taken up and not yet answered, per served model."""
        ...

    def batchers(self) -> list[tuple[str, int, Batcher]]:
        """(model, version, batcher) of every loaded version."""
        ...

    def shadow_stats(self) -> dict[tuple[str, int], ShadowStats]: ...

    def revisions(self) -> dict[str, int]:
        """The policy revision each served model is routed by (0: none set)."""
        ...

    def rate_limited(self) -> dict[tuple[str, str], int]:
        """(scope ``token`` or ``model``, its name) -> requests refused by its rate limit."""
        ...

    @property
    def overload(self) -> Overload: ...

    def replicas(self) -> list[tuple[str, int, int, int, float]]:
        """(model, version, replicas running, starts from zero, last start's seconds)."""
        ...

    def desired_replicas(self) -> dict[tuple[str, int], int]:
        """(model, version) -> replicas the autoscaler last estimated it needs."""
        ...

    def scaling_decisions(self) -> dict[tuple[str, int, str], int]:
        """(model, version, ``up``/``down``) -> replica count changes applied."""
        ...


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0


class RequestMetrics:
    """Per-request counters, bumped by :meth:`observe` for every request's record."""

    def __init__(self) -> None:
        # (model, version, arm, protocol, status) -> requests
        self.requests: dict[tuple[str, str, str, str, int], int] = {}
        # (model, version, arm) -> durations
        self.durations: dict[tuple[str, str, str], _Histogram] = {}

    def observe(self, record: RequestRecord) -> None:
        """One answered request: counted; its duration observed when it was routed (a
        request refused before routing counts with empty version and arm)."""
        if record.version <= 0:
            key = (record.model, "", "", record.protocol, record.status)
            self.requests[key] = self.requests.get(key, 0) + 1
            return
        version = str(record.version)
        key = (record.model, version, record.arm, record.protocol, record.status)
        self.requests[key] = self.requests.get(key, 0) + 1
        series = (record.model, version, record.arm)
        histogram = self.durations.get(series)
        if histogram is None:
            histogram = self.durations[series] = _Histogram(len(DURATION_BUCKETS) + 1)
        duration_s = record.total_s
        histogram.counts[bisect.bisect_left(DURATION_BUCKETS, duration_s)] += 1
        histogram.total += duration_s


class GatewayCollector(Collector):
    """Builds the gateway's metric families from live objects at scrape time."""

    def __init__(
        self,
        state: ServingState,
        requests: RequestMetrics,
        emitter: RecordEmitter | None = None,
    ) -> None:
        self.state = state
        self.requests = requests
        self.emitter = emitter

    def collect(self) -> Iterator[Metric]:
        yield from self._requests(self.requests)
        yield from self._batches()
        yield from self._records()
        yield from self._rate_limits()
        yield from self._overload()
        yield from self._replicas()
        yield from self._policy()
        info = InfoMetricFamily("turnout_gateway", "The gateway's build")
        info.add_metric([], {"version": __version__, "backend": self.state.backend_name})
        yield info

    def _requests(self, metrics: RequestMetrics) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "turnout_requests",
            "Inference requests answered, by model, version, arm, protocol and status code",
            labels=["model", "version", "arm", "protocol", "status"],
        )
        # list(): the scrape may run on another thread while the loop adds series.
        for (model, version, arm, protocol, status), count in sorted(
            list(metrics.requests.items())
        ):
            requests.add_metric([model, version, arm, protocol, str(status)], count)
        yield requests
        durations = HistogramMetricFamily(
            "turnout_request_duration_seconds",
            "Time from taking a routed inference request up to its answer",
            labels=["model", "version", "arm"],
            unit="seconds",
        )
        for labels, histogram in sorted(list(metrics.durations.items())):
            durations.add_metric(
                list(labels), _cumulative(DURATION_BUCKETS, histogram.counts), histogram.total
            )
        yield durations
        in_flight = GaugeMetricFamily(
            "turnout_requests_in_flight",
            "Inference requests taken up and not yet answered",
            labels=["model"],
        )
        for model, count in sorted(list(self.state.in_flight().items())):
            in_flight.add_metric([model], count)
        yield in_flight

    def _batches(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "turnout_queue_depth",
            "Requests waiting in a version's batcher",
            labels=["model", "version"],
        )
        inflight = GaugeMetricFamily(
            "turnout_batches_in_flight",
            "Backend calls running for a version",
            labels=["model", "version"],
        )
        sizes = HistogramMetricFamily(
            "turnout_batch_size",
            "Rows per successful backend call",
            labels=["model", "version"],
        )
        errors = CounterMetricFamily(
            "turnout_backend_errors",
            "Backend calls that failed (every request they carried failed with them)",
            labels=["model", "version"],
        )
        ready = GaugeMetricFamily(
            "turnout_model_version_loaded",
            "1 for every loaded model version",
            labels=["model", "version"],
        )
        for name, version, batcher in self.state.batchers():
            labels = [name, str(version)]
            stats = batcher.stats
            queue.add_metric(labels, batcher.queue_depth)
            inflight.add_metric(labels, batcher.inflight_batches)
            counts = dict(stats.batch_sizes)
            per_bucket = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
            total = 0
            for size, count in counts.items():
                per_bucket[bisect.bisect_left(BATCH_SIZE_BUCKETS, size)] += count
                total += size * count
            sizes.add_metric(labels, _cumulative(BATCH_SIZE_BUCKETS, per_bucket), total)
            errors.add_metric(labels, stats.failed_batches)
            ready.add_metric(labels, 1)
        yield from (queue, inflight, sizes, errors, ready)
        shadow = CounterMetricFamily(
            "turnout_shadow_requests",
            "Requests mirrored to a shadow version, by outcome (error, match, mismatch; shed: "
            "not mirrored, the primary was under pressure)",
            labels=["model", "version", "outcome"],
        )
        for (name, version), s in sorted(list(self.state.shadow_stats().items())):
            labels = [name, str(version)]
            shadow.add_metric([*labels, "error"], s.errors)
            shadow.add_metric([*labels, "match"], s.exact_matches)
            shadow.add_metric([*labels, "mismatch"], s.compared - s.exact_matches)
            shadow.add_metric([*labels, "shed"], s.shed)
        yield shadow

    def _records(self) -> Iterator[Metric]:
        emitter = self.emitter
        if emitter is None:
            return
        yield CounterMetricFamily(
            "turnout_records_sent",
            "Request records sent to the monitor sidecar",
            value=emitter.records_sent,
        )
        dropped = CounterMetricFamily(
            "turnout_records_dropped",
            "Request records that never reached the sidecar, by reason (queue_full: the "
            "bounded queue was full; send_failed: their frame could not be sent)",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], emitter.records_dropped)
        dropped.add_metric(["send_failed"], emitter.records_unsent)
        yield dropped

    def _rate_limits(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "turnout_rate_limited",
            "Requests refused by a rate limit (429 / RESOURCE_EXHAUSTED), by scope and name",
            labels=["scope", "name"],
        )
        for (scope, name), count in sorted(self.state.rate_limited().items()):
            refused.add_metric([scope, name], count)
        yield refused

    def _overload(self) -> Iterator[Metric]:
        overload = self.state.overload
        yield GaugeMetricFamily(
            "turnout_event_loop_lag_seconds",
            "How late the gateway's event loop ran its last 5 ms timer: the wait of any "
            "ready callback, admitted requests' answers included",
            value=overload.lag_s,
        )
        yield GaugeMetricFamily(
            "turnout_overload_held_connections",
            "Connections (HTTP, and gRPC sending one call at a time) refused for overload "
            "and not read until their hold ends",
            value=overload.held,
        )
        yield GaugeMetricFamily(
            "turnout_overload_throttled_connections",
            "Multiplexing gRPC connections refused for overload whose stream limit is "
            "lowered until their hold ends",
            value=overload.throttled,
        )
        yield CounterMetricFamily(
            "turnout_overload_storms",
            "Times the event loop was overrun by refusals and refused connections were held",
            value=overload.storms,
        )

    def _replicas(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "turnout_replicas", "Replicas running for a version", labels=["model", "version"]
        )
        desired = GaugeMetricFamily(
            "turnout_replicas_desired",
            "Replicas the autoscaler last estimated an autoscaled version needs",
            labels=["model", "version"],
        )
        decisions = CounterMetricFamily(
            "turnout_scaling_decisions",
            "Replica count changes the autoscaler applied, by direction",
            labels=["model", "version", "direction"],
        )
        cold = CounterMetricFamily(
            "turnout_cold_starts",
            "Starts of a version scaled to zero (requests waited at the gateway)",
            labels=["model", "version"],
        )
        cold_s = GaugeMetricFamily(
            "turnout_cold_start_seconds",
            "How long the last start from zero replicas took",
            labels=["model", "version"],
            unit="seconds",
        )
        for name, version, count, starts, took in self.state.replicas():
            labels = [name, str(version)]
            running.add_metric(labels, count)
            cold.add_metric(labels, starts)
            if starts:
                cold_s.add_metric(labels, took)
        for (name, version), count in sorted(self.state.desired_replicas().items()):
            desired.add_metric([name, str(version)], count)
        for (name, version, direction), count in sorted(self.state.scaling_decisions().items()):
            decisions.add_metric([name, str(version), direction], count)
        yield from (running, desired, decisions, cold, cold_s)

    def _policy(self) -> Iterator[Metric]:
        revision = GaugeMetricFamily(
            "turnout_policy_revision",
            "Revision of the traffic policy each served model is routed by (0: none set)",
            labels=["model"],
        )
        for model, number in sorted(self.state.revisions().items()):
            revision.add_metric([model], number)
        yield revision


def _cumulative(bounds: Iterable[float], per_bucket: list[int]) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip([*map(_bound, bounds), "+Inf"], per_bucket, strict=True):
        running += count
        buckets.append((bound, running))
    return buckets


def _bound(value: float) -> str:
    return repr(float(value))


def gateway_registry(collector: GatewayCollector) -> CollectorRegistry:
    """The gateway's metrics and its process's (CPU, memory, file descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
