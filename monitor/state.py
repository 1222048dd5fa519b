"""What the sidecar knows: per model version, feature counts, latency sketches and the
drift statistics computed from them.

Time is cut into tumbling windows of ``window_s`` seconds aligned to the epoch. A record
batch adds its sampled rows to the current window's and the cumulative counts of each
feature in the version's profile, and its timings to per-arm latency sketches. When a
window closes (``tick``), each feature's binned statistics (PSI, JS, Hellinger; categorical:
PSI, JS, Cramer's V, L-infinity) are computed for the window (if it holds at least
``min_window_rows`` sampled rows) and for the cumulative counts, and the window's latency
quantiles are kept. Every ``slow_cadence_s`` the sort-based statistics (KS, Wasserstein)
compare each feature's most recent ``slow_sample_size`` values with the sorted reference.

Everything is guarded by one lock: the ingest worker applies and ticks, the exporters read.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from monitor.feedback import PredictionLog
from monitor.profiles import (
    FeatureProfile,
    Profile,
    build_profile,
    features_of,
    load_profile,
    save_profile,
)
from monitor.settings import MonitorSettings
from monitor.sketch import LatencySketch
from turnout_contract.records import RecordBatch

__all__ = ["HISTOGRAM_BUCKETS", "QUANTILES", "MonitorState", "VersionState"]

log = logging.getLogger("turnout.monitor")

#: Upper bounds (seconds) of the exported request duration histogram, +Inf last.
HISTOGRAM_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf,
)  # fmt: skip
#: Quantiles reported for latency, per model, version and arm.
QUANTILES = (0.5, 0.9, 0.99, 0.999)
STAGES = ("total", "queue", "batch")

IntArray = npt.NDArray[np.int64]


@dataclass(eq=False)
class Exemplar:
    trace_id: str
    value: float
    timestamp: float


@dataclass(eq=False)
class ArmLatency:
    """One arm's timings: sketches (window and cumulative) per stage, a histogram."""

    window: dict[str, LatencySketch] = field(
        default_factory=lambda: {s: LatencySketch() for s in STAGES}
    )
    cumulative: dict[str, LatencySketch] = field(
        default_factory=lambda: {s: LatencySketch() for s in STAGES}
    )
    last_window: dict[str, list[float]] = field(default_factory=dict)
    """Per stage, the quantiles of the last closed window (absent when it was empty)."""
    buckets: IntArray = field(default_factory=lambda: np.zeros(len(HISTOGRAM_BUCKETS), np.int64))
    exemplars: list[Exemplar | None] = field(
        default_factory=lambda: [None] * len(HISTOGRAM_BUCKETS)
    )
    total_sum: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def add(self, batch: RecordBatch, rows: npt.NDArray[np.bool_], now: float) -> None:
        timings = {
            "total": batch.columns["total_s"][rows],
            "queue": batch.columns["queue_s"][rows],
            "batch": batch.columns["batch_s"][rows],
        }
        for stage, values in timings.items():
            values = np.asarray(values, dtype=np.float64)
            values = values[values >= 0]
            self.window[stage].add(values)
            self.cumulative[stage].add(values)
        total = np.asarray(timings["total"], dtype=np.float64)
        keep = total >= 0
        total = total[keep]
        index = np.searchsorted(np.asarray(HISTOGRAM_BUCKETS), total, side="left")
        self.buckets += np.bincount(index, minlength=len(HISTOGRAM_BUCKETS))
        self.total_sum += float(total.sum())
        traces = [t for t, r in zip(batch.columns["trace_id"], rows, strict=True) if r]
        traces = [t for t, k in zip(traces, keep, strict=True) if k]
        for bucket in np.unique(index):
            last = int(np.flatnonzero(index == bucket)[-1])
            trace = traces[last]
            if trace and trace.strip("0"):
                self.exemplars[int(bucket)] = Exemplar(trace, float(total[last]), now)
        codes, counts = np.unique(batch.columns["status"][rows], return_counts=True)
        for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
            self.statuses[code] = self.statuses.get(code, 0) + count

    def close_window(self) -> None:
        for stage in STAGES:
            sketch = self.window[stage]
            if sketch.count:
                self.last_window[stage] = sketch.quantiles(np.array(QUANTILES)).tolist()
            else:
                self.last_window.pop(stage, None)
            self.window[stage] = LatencySketch()

    def cumulative_quantiles(self, stage: str) -> list[float] | None:
        sketch = self.cumulative[stage]
        return sketch.quantiles(np.array(QUANTILES)).tolist() if sketch.count else None


@dataclass(eq=False)
class FeatureState:
    profile: FeatureProfile
    window: IntArray
    cumulative: IntArray
    recent: npt.NDArray[np.float64]
    window_rows: int = 0
    recent_fill: int = 0
    recent_pos: int = 0
    last_window: dict[str, float] = field(default_factory=dict)
    cumulative_stats: dict[str, float] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, profile: FeatureProfile, recent_size: int) -> FeatureState:
        return cls(
            profile,
            np.zeros_like(profile.ref_counts),
            np.zeros_like(profile.ref_counts),
            np.zeros(recent_size if profile.kind == "numerical" else 0),
        )

    def add(self, values: npt.NDArray[Any]) -> None:
        self.window_rows += self.profile.count(values, self.window)
        self.profile.count(values, self.cumulative)
        if self.recent.size:
            numbers = np.asarray(values, dtype=np.float64).ravel()
            numbers = numbers[np.isfinite(numbers)][-self.recent.size :]
            size = self.recent.size
            positions = (self.recent_pos + np.arange(numbers.size)) % size
            self.recent[positions] = numbers
            self.recent_pos = int((self.recent_pos + numbers.size) % size)
            self.recent_fill = min(size, self.recent_fill + numbers.size)

    def close_window(self, min_rows: int) -> None:
        enough = self.window_rows >= min_rows
        self.last_window = self.profile.statistics(self.window) if enough else {}
        self.cumulative_stats = self.profile.statistics(self.cumulative)
        self.window[:] = 0
        self.window_rows = 0

    def run_slow(self, min_rows: int) -> None:
        if self.recent_fill >= min_rows:
            self.slow = self.profile.slow_statistics(self.recent[: self.recent_fill].copy())


@dataclass(eq=False)
class VersionState:
    model: str
    version: int
    profile: Profile | None = None
    features: dict[str, FeatureState] = field(default_factory=dict)
    arms: dict[str, ArmLatency] = field(default_factory=dict)
    requests: int = 0
    sampled: int = 0
    reference_buffer: list[dict[str, npt.NDArray[Any]]] = field(default_factory=list)
    reference_buffered: int = 0
    profile_matched: int = 0
    """Sampled features seen that the profile knows."""
    profile_unmatched: list[str] = field(default_factory=list)
    """Live features the profile does not know (the first few), for the status."""
    profile_warned: bool = False

    @property
    def profile_matches_nothing(self) -> bool:
        """A profile is loaded, rows were sampled, and not one of their features is in it:
        drift can never be computed (a profile built with other feature names)."""
        return self.profile is not None and self.sampled > 0 and self.profile_matched == 0

    def use_profile(self, profile: Profile, recent_size: int) -> None:
        self.profile = profile
        self.features = {
            name: FeatureState.of(feature, recent_size)
            for name, feature in profile.features.items()
        }

    def drift(self, feature: str, statistic: str) -> float | None:
        state = self.features.get(feature)
        if state is None:
            return None
        for found in (state.last_window, state.slow):
            if statistic in found:
                return found[statistic]
        return None


class MonitorState:
    """All versions' state, the window clock and the sidecar's own counters."""

    def __init__(self, settings: MonitorSettings, *, now: float | None = None) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        self.versions: dict[tuple[str, int], VersionState] = {}
        start = time.time() if now is None else now
        self.window_end = self._next_boundary(start)
        self.next_slow = start + settings.slow_cadence_s
        self.windows_closed = 0
        self.predictions = PredictionLog(
            settings.feedback_capacity, settings.prediction_outputs, settings.tasks
        )
        self.frames_received = 0
        self.frames_dropped = 0
        self.frames_invalid = 0
        self.frames_untraced = 0  # applied, but building their spans failed
        # Latest cumulative counters per sending gateway ("host:pid"), from frame headers.
        self.gateway_counters: dict[str, dict[str, int]] = {}
        self.records = 0

    def _next_boundary(self, now: float) -> float:
        width = self.settings.window_s
        return (math.floor(now / width) + 1) * width

    def version(self, model: str, version: int) -> VersionState:
        key = (model, version)
        state = self.versions.get(key)
        if state is None:
            state = VersionState(model, version)
            self._try_profile(state)
            self.versions[key] = state
        return state

    def _try_profile(self, state: VersionState) -> None:
        try:
            profile = load_profile(self.settings.profiles_path(), state.model, state.version)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("profile of %s/%s unreadable: %s", state.model, state.version, exc)
            return
        if profile is not None:
            state.use_profile(profile, self.settings.slow_sample_size)

    def _note_emitter(self, emitter: dict[str, Any]) -> None:
        source = emitter.get("source")
        if not isinstance(source, str):
            return
        counters = self.gateway_counters.setdefault(source, {})
        for name, value in emitter.items():
            if name != "source" and isinstance(value, int):
                # Cumulative per gateway; frames can arrive out of order, so keep the largest.
                counters[name] = max(value, counters.get(name, 0))

    def gateway_total(self, counter: str) -> int:
        """A gateway drop counter summed over every gateway that has sent frames."""
        return sum(c.get(counter, 0) for c in self.gateway_counters.values())

    def apply(self, batch: RecordBatch, now: float) -> None:
        """Add one decoded record batch (raises ValueError if its columns are inconsistent)."""
        with self.lock:
            self._note_emitter(batch.emitter)
            state = self.version(batch.model, batch.version)
            state.requests += batch.rows
            self.records += batch.rows
            arms = np.asarray(batch.columns["arm"], dtype=object)
            for arm in dict.fromkeys(arms.tolist()):
                latency = state.arms.setdefault(str(arm), ArmLatency())
                latency.add(batch, arms == arm, now)
            if batch.sampled.size == 0:
                return
            try:
                self.predictions.remember(batch)
            except (ValueError, TypeError) as exc:  # outputs it cannot read: drift still counts
                log.debug("no predictions kept from %s/%s: %s", batch.model, batch.version, exc)
            columns = features_of(batch.inputs, batch.outputs)
            state.sampled += int(batch.sampled.size)
            if state.profile is None:
                self._collect_reference(state, columns)
                return
            for name, values in columns.items():
                feature = state.features.get(name)
                if feature is not None:
                    feature.add(values)
                    state.profile_matched += 1
                elif len(state.profile_unmatched) < 8 and name not in state.profile_unmatched:
                    state.profile_unmatched.append(name)
            if state.profile_matches_nothing and not state.profile_warned:
                state.profile_warned = True
                log.warning(
                    "the reference profile of %s/%s matches none of its features (%s ...): "
                    "drift is never computed; rebuild it with the model's input names",
                    state.model, state.version, ", ".join(state.profile_unmatched[:3]),
                )  # fmt: skip

    def _collect_reference(self, state: VersionState, columns: dict[str, Any]) -> None:
        wanted = self.settings.reference_first_n
        if not wanted or not columns:
            return
        state.reference_buffer.append(columns)
        state.reference_buffered += len(next(iter(columns.values())))
        if state.reference_buffered < wanted:
            return
        names = set.intersection(*(set(c) for c in state.reference_buffer))
        merged = {n: np.concatenate([c[n] for c in state.reference_buffer]) for n in names}
        state.reference_buffer = []
        settings = self.settings
        profile = build_profile(
            state.model,
            state.version,
            merged,
            n_bins=settings.n_bins,
            categorical_max=settings.categorical_max,
            chunks=settings.reference_chunks,
            source=f"first {state.reference_buffered} sampled requests",
        )
        state.use_profile(profile, settings.slow_sample_size)
        try:
            save_profile(profile, settings.profiles_path())
        except OSError as exc:
            log.warning("could not store the profile of %s/%s: %s", state.model, state.version, exc)
        log.info("%s/%s: reference taken from its first requests", state.model, state.version)

    def tick(self, now: float) -> bool:
        """Close the window (and run the slow statistics) when due; True if a window closed."""
        with self.lock:
            closed = False
            if now >= self.window_end:
                self.close_window()
                self.window_end = self._next_boundary(now)
                closed = True
            if now >= self.next_slow:
                self.run_slow()
                self.next_slow = now + self.settings.slow_cadence_s
            return closed

    def close_window(self) -> None:
        with self.lock:
            self.windows_closed += 1
            for state in self.versions.values():
                if state.profile is None and not state.reference_buffered:
                    self._try_profile(state)  # profiled while running
                for feature in state.features.values():
                    feature.close_window(self.settings.min_window_rows)
                for latency in state.arms.values():
                    latency.close_window()

    def run_slow(self) -> None:
        with self.lock:
            for state in self.versions.values():
                for feature in state.features.values():
                    feature.run_slow(self.settings.min_window_rows)

    def threshold(self, state: VersionState, feature: str, statistic: str) -> float | None:
        overrides = self.settings.threshold_overrides(state.model, state.version)
        if statistic in overrides.get(feature, {}):
            return overrides[feature][statistic]
        found = state.features.get(feature)
        return found.profile.thresholds.get(statistic) if found else None

    def drift_values(self) -> Iterator[tuple[VersionState, str, str, float]]:
        """(version, feature, statistic, value) of the last window and the slow statistics."""
        for state in self.versions.values():
            for name, feature in state.features.items():
                for values in (feature.last_window, feature.slow):
                    for statistic, value in values.items():
                        yield state, name, statistic, value

    def snapshot(self, model: str | None = None) -> dict[str, Any]:
        """The status document served at ``/status`` (JSON-ready)."""
        with self.lock:
            models: dict[str, Any] = {}
            for (name, version), state in sorted(self.versions.items()):
                if model is not None and name != model:
                    continue
                models.setdefault(name, {})[str(version)] = self._describe(state)
            return {
                "window_s": self.settings.window_s,
                "windows_closed": self.windows_closed,
                "frames": {
                    "received": self.frames_received,
                    "dropped": self.frames_dropped,
                    "invalid": self.frames_invalid,
                },
                "feedback_unmatched": self.predictions.unmatched,
                "records": self.records,
                "models": models,
            }

    def _describe(self, state: VersionState) -> dict[str, Any]:
        features: dict[str, Any] = {}
        for name, feature in state.features.items():
            current = {**feature.last_window, **feature.slow}
            thresholds = {
                statistic: self.threshold(state, name, statistic)
                for statistic in {**feature.profile.thresholds, **current}
            }
            drifted = []
            for statistic, value in current.items():
                threshold = thresholds.get(statistic)
                if threshold is not None and value > threshold:
                    drifted.append(statistic)
            features[name] = {
                "kind": feature.profile.kind,
                "window": feature.last_window,
                "recent": feature.slow,
                "cumulative": feature.cumulative_stats,
                "thresholds": thresholds,
                "drifted": sorted(drifted),
            }
        latency: dict[str, Any] = {}
        for arm, arm_latency in state.arms.items():
            errors = sum(c for code, c in arm_latency.statuses.items() if code >= 400)
            requests = sum(arm_latency.statuses.values())
            latency[arm] = {
                "requests": requests,
                "errors": errors,
                "success_ratio": (requests - errors) / requests if requests else None,
                "window": _quantile_map(arm_latency.last_window.get("total")),
                "cumulative": _quantile_map(arm_latency.cumulative_quantiles("total")),
            }
        reference: dict[str, Any] | None = None
        if state.profile is not None:
            reference = {
                "rows": state.profile.rows,
                "source": state.profile.source,
                "matches_nothing": state.profile_matches_nothing,
                "unmatched_features": list(state.profile_unmatched),
                "profile_features": sorted(state.profile.features)[:8],
            }
        accuracy = self.predictions.accuracy.get((state.model, state.version))
        scored = self.predictions.errors.get((state.model, state.version))
        reward = self.predictions.rewards.get((state.model, state.version))
        return {
            "requests": state.requests,
            "sampled": state.sampled,
            "accuracy": None
            if accuracy is None
            else {
                "labelled": accuracy.labelled,
                "correct": accuracy.correct,
                "ratio": accuracy.ratio,
            },
            "regression": None
            if scored is None
            else {"labelled": scored.labelled, "mae": scored.mae, "rmse": scored.rmse},
            "reward": None if reward is None else reward.public(),
            "reference": reference,
            "features": features,
            "latency": latency,
        }


def _quantile_map(values: list[float] | None) -> dict[str, float] | None:
    if values is None:
        return None
    return {_quantile_name(q): v for q, v in zip(QUANTILES, values, strict=True)}


def percentile_name(q: float) -> str:
    """``p50``, ``p99``, ``p99.9``."""
    return f"p{q * 100:g}"


def _quantile_name(q: float) -> str:
    return percentile_name(q).replace(".", "")
