"""The gateway's Prometheus collector over a small fake of the ServingState seam, and the
request counters it exports, on a fresh registry per test."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.batching import Batcher
from gateway.metrics import GatewayCollector, RequestMetrics
from gateway.overload import Overload
from gateway.routing.shadow import ShadowStats
from turnout_contract.records import SERVER, RequestRecord
from turnout_contract.trace import TraceContext


class FakeState:
    backend_name = "local"

    def __init__(self) -> None:
        self.flight: dict[str, int] = {"m": 2}
        self.shadows = {("m", 2): ShadowStats(requests=10, errors=1, exact_matches=7, compared=9)}
        self.overload = Overload(0.5)
        self.overload.lag_s, self.overload.held, self.overload.storms = 0.025, 40, 2

    def in_flight(self) -> dict[str, int]:
        return self.flight

    def batchers(self) -> list[tuple[str, int, Batcher]]:
        return []

    def shadow_stats(self) -> dict[tuple[str, int], ShadowStats]:
        return self.shadows

    def revisions(self) -> dict[str, int]:
        return {"m": 4}

    def rate_limited(self) -> dict[tuple[str, str], int]:
        return {("model", "m"): 3}

    def replicas(self) -> list[tuple[str, int, int, int, float]]:
        return [("m", 1, 2, 0, 0.0), ("m", 2, 1, 3, 2.5)]

    def desired_replicas(self) -> dict[tuple[str, int], int]:
        return {("m", 1): 3}

    def scaling_decisions(self) -> dict[tuple[str, int, str], int]:
        return {("m", 1, "up"): 2, ("m", 1, "down"): 1}


def record(version: int, status: int, total_s: float, arm: str = "primary") -> RequestRecord:
    return RequestRecord(
        "m", version, 4, arm, status, 0, 0.0, 0.0, total_s, None, TraceContext.start(),
        SERVER, "grpc", "", "", "",
    )  # fmt: skip


def registry() -> tuple[CollectorRegistry, RequestMetrics]:
    metrics = RequestMetrics()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GatewayCollector(FakeState(), metrics))
    return reg, metrics


def test_routed_requests_are_counted_and_timed_refusals_only_counted() -> None:
    reg, metrics = registry()
    metrics.observe(record(1, 200, 0.003))
    metrics.observe(record(1, 200, 0.03))
    metrics.observe(record(1, 400, 0.001))
    metrics.observe(record(-1, 401, 0.0001))
    metrics.observe(record(0, 404, 0.0001))
    value = reg.get_sample_value
    labels = {"model": "m", "version": "1", "arm": "primary", "protocol": "grpc"}
    assert value("turnout_requests_total", {**labels, "status": "200"}) == 2
    assert value("turnout_requests_total", {**labels, "status": "400"}) == 1
    refused = {"model": "m", "version": "", "arm": "", "protocol": "grpc"}
    assert value("turnout_requests_total", {**refused, "status": "401"}) == 1
    assert value("turnout_requests_total", {**refused, "status": "404"}) == 1
    timed = {"model": "m", "version": "1", "arm": "primary"}
    assert value("turnout_request_duration_seconds_count", timed) == 3
    assert value("turnout_request_duration_seconds_bucket", {**timed, "le": "0.005"}) == 2
    assert abs(value("turnout_request_duration_seconds_sum", timed) - 0.034) < 1e-12
    assert value("turnout_request_duration_seconds_count", {**timed, "version": ""}) is None


def test_scrape_time_families_come_from_the_serving_state() -> None:
    reg, _ = registry()
    value = reg.get_sample_value
    assert value("turnout_requests_in_flight", {"model": "m"}) == 2
    assert value("turnout_policy_revision", {"model": "m"}) == 4
    shadow = {"model": "m", "version": "2"}
    assert value("turnout_shadow_requests_total", {**shadow, "outcome": "match"}) == 7
    assert value("turnout_shadow_requests_total", {**shadow, "outcome": "mismatch"}) == 2
    assert value("turnout_shadow_requests_total", {**shadow, "outcome": "error"}) == 1
    assert value("turnout_gateway_info", {"version": "0.1.0", "backend": "local"}) == 1
    assert value("turnout_records_sent_total") is None  # no emitter: no record families
    assert value("turnout_rate_limited_total", {"scope": "model", "name": "m"}) == 3
    assert value("turnout_event_loop_lag_seconds") == 0.025
    assert value("turnout_overload_held_connections") == 40
    assert value("turnout_overload_storms_total") == 2


def test_replicas_scaling_decisions_and_cold_starts_are_exported() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(FakeState(), RequestMetrics()))
    value = registry.get_sample_value
    assert value("turnout_replicas", {"model": "m", "version": "1"}) == 2
    assert value("turnout_replicas", {"model": "m", "version": "2"}) == 1
    assert value("turnout_replicas_desired", {"model": "m", "version": "1"}) == 3
    assert value("turnout_replicas_desired", {"model": "m", "version": "2"}) is None
    up = {"model": "m", "version": "1", "direction": "up"}
    assert value("turnout_scaling_decisions_total", up) == 2
    assert value("turnout_cold_starts_total", {"model": "m", "version": "2"}) == 3
    assert value("turnout_cold_start_seconds", {"model": "m", "version": "2"}) == 2.5
    assert value("turnout_cold_start_seconds", {"model": "m", "version": "1"}) is None
