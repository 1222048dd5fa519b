"""The sidecar's Prometheus metrics: one collector reading ``MonitorState`` at scrape time.

Families (all prefixed ``turnout_``, seconds as the unit of time):

- ``turnout_monitor_request_duration_seconds`` histogram {model, version, arm}: end-to-end
  request duration from the records, with an exemplar per bucket (``trace_id`` of the
  latest request in it) in the OpenMetrics exposition.
- ``turnout_request_latency_quantile_seconds`` gauge {model, version, arm, stage, quantile,
  window}: p50/p90/p99/p99.9 (label ``percentile``: ``p50`` ... ``p99.9``; promtool
  reserves ``quantile`` for summaries) of ``total``, ``queue`` and ``batch`` time, over the last
  closed window (``window="last"``) and since start (``window="cumulative"``).
- ``turnout_monitor_requests_total`` counter {model, version, arm, code}: records by status.
- ``turnout_request_success_ratio`` gauge {model, version, arm}: share of status < 400.
- ``turnout_drift_{psi,js,hellinger,chi2_cramers_v,linf}`` gauges {model, version, feature,
  window}: binned drift of the last window (``last``) and since start (``cumulative``);
  ``turnout_drift_{ks,wasserstein}`` {model, version, feature, window="recent"}: the
  sort-based statistics over the most recent values. Outputs are features ``output:<name>``.
- ``turnout_drift_threshold`` gauge {model, version, feature, statistic}.
- ``turnout_alert_firing`` / ``turnout_alert_pending`` gauges {alert, model, version, feature}.
- ``turnout_monitor_reference_rows`` gauge {model, version}.
- ``turnout_monitor_profile_unmatched`` gauge {model, version}: 1 while a version's profile
  matches none of its sampled features (drift can never be computed), else 0.
- ``turnout_accuracy_ratio`` gauge {model, version}: accuracy from ``POST /feedback``;
  ``turnout_monitor_feedback_rows_total`` {model, version, outcome},
  ``turnout_monitor_feedback_unmatched_total``;
- ``turnout_feedback_mae``, ``turnout_feedback_rmse`` gauges {model, version}: errors of
  regression models from ``POST /feedback``.
- ``turnout_monitor_frames_received_total``, ``..._dropped_total`` (queue full),
  ``..._invalid_total`` (undecodable), ``turnout_monitor_records_total`` counters.
- ``turnout_monitor_traces_kept_total`` {reason}, ``turnout_monitor_trace_records_total``,
  ``turnout_monitor_spans_total``: tail sampling and span export (only with tracing on).

No global registry: ``build_registry`` returns a fresh ``CollectorRegistry``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from monitor.state import HISTOGRAM_BUCKETS, QUANTILES, STAGES, MonitorState, percentile_name

if TYPE_CHECKING:
    from monitor.alerts import AlertManager
    from monitor.tracing import Tracer

__all__ = ["MonitorCollector", "build_registry"]

DRIFT_HELP = {
    "psi": "Population stability index against the reference",
    "js": "Jensen-Shannon distance (base 2) against the reference",
    "hellinger": "Hellinger distance against the reference",
    "chi2_cramers_v": "Cramer's V of the chi-squared test against the reference (categorical)",
    "linf": "Largest difference of category shares against the reference (categorical)",
    "ks": "Kolmogorov-Smirnov statistic D of recent values against the reference",
    "wasserstein": "Wasserstein-1 distance of recent values in reference standard deviations",
}


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


class MonitorCollector(Collector):
    """Builds every family from the state on each scrape."""

    def __init__(
        self, state: MonitorState, alerts: AlertManager | None = None, tracer: Tracer | None = None
    ) -> None:
        self.tracer = tracer
        self.state = state
        self.alerts = alerts

    def collect(self) -> Iterable[Metric]:
        with self.state.lock:
            yield from self._latency()
            yield from self._drift()
            yield from self._own()
        if self.alerts is not None:
            yield from self._alerts(self.alerts)
        if self.tracer is not None:
            yield from self._traces(self.tracer)

    def _latency(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(
            "turnout_monitor_request_duration_seconds",
            "End-to-end request duration in the gateway's records (exemplars: trace ids)",
            labels=["model", "version", "arm"],
        )
        quantiles = GaugeMetricFamily(
            "turnout_request_latency_quantile_seconds",
            "Request time quantiles per stage (total, queue, batch) from a log-bucket sketch",
            labels=["model", "version", "arm", "stage", "percentile", "window"],
        )
        requests = CounterMetricFamily(
            "turnout_monitor_requests",
            "Request records received, by status code",
            labels=["model", "version", "arm", "code"],
        )
        success = GaugeMetricFamily(
            "turnout_request_success_ratio",
            "Share of requests answered with a status below 400, since start",
            labels=["model", "version", "arm"],
        )
        for (model, version), state in sorted(self.state.versions.items()):
            for arm, latency in sorted(state.arms.items()):
                labels = [model, str(version), arm]
                running = 0
                buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
                for i, bound in enumerate(HISTOGRAM_BUCKETS):
                    running += int(latency.buckets[i])
                    exemplar = latency.exemplars[i]
                    if exemplar is None:
                        buckets.append((_le(bound), float(running)))
                    else:
                        buckets.append(
                            (
                                _le(bound),
                                float(running),
                                Exemplar(
                                    {"trace_id": exemplar.trace_id},
                                    exemplar.value,
                                    exemplar.timestamp,
                                ),
                            )
                        )
                histogram.add_metric(labels, buckets, latency.total_sum)
                for stage in STAGES:
                    views = {
                        "last": latency.last_window.get(stage),
                        "cumulative": latency.cumulative_quantiles(stage),
                    }
                    for window, values in views.items():
                        if values is None:
                            continue
                        for q, value in zip(QUANTILES, values, strict=True):
                            quantiles.add_metric(
                                [*labels, stage, percentile_name(q), window], value
                            )
                total = sum(latency.statuses.values())
                for code, count in sorted(latency.statuses.items()):
                    requests.add_metric([*labels, str(code)], float(count))
                if total:
                    errors = sum(c for code, c in latency.statuses.items() if code >= 400)
                    success.add_metric(labels, (total - errors) / total)
        yield from (histogram, quantiles, requests, success)

    def _drift(self) -> Iterator[Metric]:
        families = {
            statistic: GaugeMetricFamily(
                f"turnout_drift_{statistic}",
                help_text,
                labels=["model", "version", "feature", "window"],
            )
            for statistic, help_text in DRIFT_HELP.items()
        }
        thresholds = GaugeMetricFamily(
            "turnout_drift_threshold",
            "Threshold of a drift statistic (from the reference, or configured)",
            labels=["model", "version", "feature", "statistic"],
        )
        reference = GaugeMetricFamily(
            "turnout_monitor_reference_rows",
            "Rows in the version's reference profile",
            labels=["model", "version"],
        )
        unmatched = GaugeMetricFamily(
            "turnout_monitor_profile_unmatched",
            "1 while the version's reference profile matches none of its sampled features",
            labels=["model", "version"],
        )
        for (model, version), state in sorted(self.state.versions.items()):
            if state.profile is not None:
                reference.add_metric([model, str(version)], float(state.profile.rows))
                unmatched.add_metric([model, str(version)], float(state.profile_matches_nothing))
            for name, feature in sorted(state.features.items()):
                labels = [model, str(version), name]
                views = (
                    ("last", feature.last_window),
                    ("cumulative", feature.cumulative_stats),
                    ("recent", feature.slow),
                )
                for window, values in views:
                    for statistic, value in values.items():
                        if statistic in families:
                            families[statistic].add_metric([*labels, window], value)
                for statistic in sorted(
                    {*feature.profile.thresholds, *self._overridden(model, version, name)}
                ):
                    threshold = self.state.threshold(state, name, statistic)
                    if threshold is not None:
                        thresholds.add_metric([*labels, statistic], threshold)
        yield from families.values()
        yield thresholds
        yield reference
        yield unmatched
        yield from self._accuracy()

    def _accuracy(self) -> Iterator[Metric]:
        ratio = GaugeMetricFamily(
            "turnout_accuracy_ratio",
            "Share of labelled rows (POST /feedback) the version predicted right, since start",
            labels=["model", "version"],
        )
        labelled = CounterMetricFamily(
            "turnout_monitor_feedback_rows",
            "Rows labelled through POST /feedback, by outcome",
            labels=["model", "version", "outcome"],
        )
        log = self.state.predictions
        for (model, version), accuracy in sorted(log.accuracy.items()):
            if accuracy.ratio is not None:
                ratio.add_metric([model, str(version)], accuracy.ratio)
            wrong = accuracy.labelled - accuracy.correct
            labelled.add_metric([model, str(version), "correct"], float(accuracy.correct))
            labelled.add_metric([model, str(version), "incorrect"], float(wrong))
        mae = GaugeMetricFamily(
            "turnout_feedback_mae",
            "Mean absolute error of labelled rows (POST /feedback) of a regression, since start",
            labels=["model", "version"],
        )
        rmse = GaugeMetricFamily(
            "turnout_feedback_rmse",
            "Root mean squared error of labelled rows (POST /feedback) of a regression",
            labels=["model", "version"],
        )
        for (model, version), errors in sorted(log.errors.items()):
            if errors.mae is not None and errors.rmse is not None:
                mae.add_metric([model, str(version)], errors.mae)
                rmse.add_metric([model, str(version)], errors.rmse)
        yield from (ratio, labelled, mae, rmse)
        yield CounterMetricFamily(
            "turnout_monitor_feedback_unmatched",
            "Feedback for requests whose predictions were not (or no longer) kept",
            value=log.unmatched,
        )

    def _overridden(self, model: str, version: int, feature: str) -> set[str]:
        return set(self.state.settings.threshold_overrides(model, version).get(feature, {}))

    def _own(self) -> Iterator[Metric]:
        state = self.state
        yield CounterMetricFamily(
            "turnout_monitor_frames_received",
            "Record frames read from the socket",
            value=state.frames_received,
        )
        yield CounterMetricFamily(
            "turnout_monitor_frames_dropped",
            "Record frames dropped because the sidecar's queue was full",
            value=state.frames_dropped,
        )
        yield CounterMetricFamily(
            "turnout_monitor_frames_invalid",
            "Record frames that could not be decoded or applied",
            value=state.frames_invalid,
        )
        yield CounterMetricFamily(
            "turnout_monitor_records", "Request records applied", value=state.records
        )
        yield CounterMetricFamily(
            "turnout_gateway_records_dropped",
            "Records the gateways dropped because their bounded queue was full",
            value=state.gateway_total("records_dropped"),
        )
        yield CounterMetricFamily(
            "turnout_gateway_frames_dropped",
            "Record frames the gateways could not send (sidecar down, socket full)",
            value=state.gateway_total("frames_dropped"),
        )
        yield CounterMetricFamily(
            "turnout_monitor_windows", "Tumbling windows closed", value=state.windows_closed
        )

    def _traces(self, tracer: Tracer) -> Iterator[Metric]:
        kept = CounterMetricFamily(
            "turnout_monitor_traces_kept",
            "Requests whose spans were exported, by the tail-sampling rule that kept them",
            labels=["reason"],
        )
        for reason, count in list(tracer.kept.items()):
            kept.add_metric([reason], count)
        yield kept
        yield CounterMetricFamily(
            "turnout_monitor_trace_records",
            "Request records the tail sampler decided on",
            value=tracer.records_seen,
        )
        yield CounterMetricFamily(
            "turnout_monitor_spans", "Spans handed to the OTLP exporter", value=tracer.spans
        )
        yield CounterMetricFamily(
            "turnout_monitor_traces_dropped",
            "Kept requests whose spans were dropped because the exporter was too far behind",
            value=tracer.traces_dropped,
        )
        yield CounterMetricFamily(
            "turnout_monitor_frames_untraced",
            "Record frames applied whose spans could not be built",
            value=self.state.frames_untraced,
        )

    def _alerts(self, alerts: AlertManager) -> Iterator[Metric]:
        labels = ["alert", "model", "version", "feature"]
        firing = GaugeMetricFamily("turnout_alert_firing", "1 while an alert fires", labels=labels)
        pending = GaugeMetricFamily(
            "turnout_alert_pending",
            "1 while an alert's condition holds but not yet for its for_s",
            labels=labels,
        )
        sent = CounterMetricFamily(
            "turnout_alert_notifications",
            "Webhook notifications, by outcome",
            labels=["outcome"],
        )
        for alert in alerts.active():
            row = [alert.rule_name, alert.model, str(alert.version), alert.feature]
            firing.add_metric(row, 1.0 if alert.firing else 0.0)
            pending.add_metric(row, 0.0 if alert.firing else 1.0)
        for outcome, count in sorted(alerts.notifications.items()):
            sent.add_metric([outcome], float(count))
        yield from (firing, pending, sent)


def build_registry(
    state: MonitorState, alerts: AlertManager | None = None, tracer: Tracer | None = None
) -> CollectorRegistry:
    """A fresh registry holding the monitor's collector and its process's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(state, alerts, tracer))
    ProcessCollector(registry=registry)
    return registry
