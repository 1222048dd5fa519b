"""The sidecar's settings: one YAML file (``--config``) + ``TURNOUT_MONITOR_`` variables.

Precedence, lowest first: defaults, the YAML file, ``TURNOUT_MONITOR_*`` environment
variables, command-line flags. Alert rules and webhooks live in the same file::

    window_s: 60
    reference_first_n: 1000
    thresholds: {"iris/1": {"x[0]": {psi: 0.3}}}
    alerts:
      - {statistic: psi, model: iris, feature: "*", threshold: reference, for_s: 30}
      - {name: p99, statistic: latency_p99, model: "*", threshold: 0.25}
    webhooks: ["http://127.0.0.1:9000/hook"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from turnout_contract.address import gateway_state_dir, socket_address
from turnout_contract.address import socket_path as _socket_path
from turnout_contract.settings import SettingsError, load_layered

__all__ = [
    "DRIFT_STATISTICS",
    "LATENCY_STATISTICS",
    "AlertRule",
    "MonitorSettings",
    "SettingsError",
    "load_monitor_settings",
    "socket_path",
]

#: Drift statistics a feature can have (numerical: the first five; categorical: the last
#: three and ``js``), as named in metrics, status and alert rules.
DRIFT_STATISTICS = ("psi", "js", "hellinger", "ks", "wasserstein", "chi2_cramers_v", "linf")
#: Latency statistics alert rules may name (seconds, per model, version and arm).
LATENCY_STATISTICS = ("latency_p50", "latency_p90", "latency_p99", "latency_p999")


class AlertRule(BaseModel):
    """One alert: a statistic above its threshold for ``for_s`` seconds fires."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    """Alert name in metrics and webhooks; default ``<statistic>`` (unique per rule list)."""

    statistic: str
    """A drift statistic (psi, js, hellinger, ks, wasserstein, chi2_cramers_v, linf) of the
    last window, or a latency quantile of the last window (latency_p50 ... latency_p999)."""

    model: str = "*"
    """Model name, or ``*`` (shell-style patterns allowed)."""

    version: str = "*"
    """Version number, or ``*``."""

    feature: str = "*"
    """Feature name (``x[0]``, ``output:y[1]``: an exact name matches before any pattern
    reading of its brackets), or a pattern such as ``x*``; for latency rules: the arm."""

    threshold: float | Literal["reference"] = "reference"
    """A number, or ``reference``: the feature's threshold from its profile (drift only)."""

    for_s: float = Field(default=0.0, ge=0)
    """How long the condition must hold before the alert fires (pending until then)."""

    @field_validator("statistic")
    @classmethod
    def _check_statistic(cls, statistic: str) -> str:
        if statistic not in DRIFT_STATISTICS + LATENCY_STATISTICS:
            known = ", ".join(DRIFT_STATISTICS + LATENCY_STATISTICS)
            raise ValueError(f"unknown statistic {statistic!r} (known: {known})")
        return statistic


class MonitorSettings(BaseSettings):
    """The monitor sidecar process."""

    model_config = SettingsConfigDict(env_prefix="TURNOUT_MONITOR_", extra="forbid")

    state_dir: Path = Field(default_factory=gateway_state_dir)
    """The gateway's state directory: the default socket and profiles live there. Default:
    ``TURNOUT_STATE_DIR`` if set (the gateway's variable), else the gateway's default."""

    listen: str = ""
    """Where records arrive: ``unix:///path`` (a datagram socket). Default
    ``unix://STATE_DIR/monitor.sock``, where the gateway sends by default."""

    host: str = "127.0.0.1"
    """Address the metrics and status HTTP server binds."""

    metrics_port: int = Field(default=9100, ge=0, le=65535)
    """Port of ``/metrics`` and ``/status``; 0 picks a free one."""

    window_s: float = Field(default=60.0, gt=0)
    """Length of the tumbling window drift and latency are computed over."""

    slow_cadence_s: float = Field(default=300.0, gt=0)
    """How often KS and Wasserstein (sort-based, slower) are computed."""

    slow_sample_size: int = Field(default=10_000, ge=10)
    """Most recent values per feature KS and Wasserstein compare with the reference."""

    min_window_rows: int = Field(default=30, ge=1)
    """Sampled rows a window needs before its drift statistics are computed."""

    reference_first_n: int = Field(default=0, ge=0)
    """A version without a stored profile takes its first N sampled rows as its reference
    (0: off; such versions get latency only)."""

    profiles_dir: Path | None = None
    """Reference profiles, ``<model>/<version>/``; default ``STATE_DIR/profiles``."""

    n_bins: int = Field(default=10, ge=1)
    """Quantile bins fitted on the reference for PSI, JS and Hellinger."""

    categorical_max: int = Field(default=20, ge=1)
    """Integer features with at most this many distinct reference values are categorical."""

    reference_chunks: int = Field(default=10, ge=2)
    """Chunks the reference is split into for thresholds (mean + 3 sigma over chunks)."""

    thresholds: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    """Per-feature threshold overrides: ``{"<model>/<version>" or "<model>": {feature:
    {statistic: value}}}``; they replace the reference's thresholds."""

    alerts: list[AlertRule] = Field(default_factory=list)
    """Alert rules, evaluated on every window and tick."""

    webhooks: list[str] = Field(default_factory=list)
    """URLs each firing alert is POSTed to (JSON), once per firing transition."""

    debounce_s: float = Field(default=300.0, ge=0)
    """An alert that fired is not POSTed again before this many seconds, even if it
    resolves and fires again."""

    prediction_outputs: dict[str, str] = Field(default_factory=dict)
    """Per model, the output tensor holding its prediction for accuracy (default: the first
    output; several values per row are read as class scores and their argmax taken)."""

    tasks: dict[str, Literal["classification", "regression"]] = Field(default_factory=dict)
    """Per model, how ``POST /feedback`` scores it: accuracy (classification) or MAE/RMSE
    (regression); unnamed models are inferred (see ``monitor.feedback``)."""

    feedback_capacity: int = Field(default=100_000, ge=0)
    """Sampled requests whose predictions are kept for ``POST /feedback`` (0: no accuracy)."""

    queue_size: int = Field(default=4096, ge=1)
    """Frames waiting to be applied; beyond it frames are dropped and counted."""

    traces: Literal["auto", "otlp", "none"] = "auto"
    """Export spans of the gateway's requests with OTLP: ``otlp``, ``none``, or ``auto`` (when
    an endpoint is configured: ``trace_endpoint`` or ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``)."""

    trace_endpoint: str | None = None
    """OTLP endpoint; default from ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, else the exporter's own (localhost:4317 / :4318). For
    http/protobuf a base URL gets ``/v1/traces`` appended."""

    trace_protocol: Literal["grpc", "http/protobuf"] | None = None
    """Default from ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``,
    else ``http/protobuf``."""

    trace_sample_ratio: float = Field(default=0.01, ge=0, le=1)
    """Share of the traces kept that no other rule keeps (decided by trace id)."""

    trace_slow_ms: float = Field(default=500.0, ge=0)
    """Requests at least this slow are always kept."""

    trace_keep_above_p99: bool = True
    """Also keep every request slower than its version and arm's current p99."""

    trace_keep_sampled_parents: bool = True
    """Keep requests whose caller's ``traceparent`` has the sampled flag, so traces sampled
    upstream are complete."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: str) -> str:
        if listen and not listen.startswith("unix://"):
            raise ValueError(f"{listen!r}: only unix:///path addresses are supported")
        return listen

    def socket_file(self) -> Path:
        return socket_path(self.listen or socket_address(self.state_dir))

    def profiles_path(self) -> Path:
        return self.profiles_dir or self.state_dir / "profiles"

    def threshold_overrides(self, model: str, version: int) -> dict[str, dict[str, float]]:
        merged: dict[str, dict[str, float]] = {}
        for key in (model, f"{model}/{version}"):
            for feature, values in self.thresholds.get(key, {}).items():
                merged.setdefault(feature, {}).update(values)
        return merged


def socket_path(address: str) -> Path:
    """The socket file of a ``listen`` address; SettingsError names the key."""
    try:
        return _socket_path(address)
    except ValueError as exc:
        raise SettingsError(f"listen: {exc}") from None


def load_monitor_settings(config_file: Path | None = None, **overrides: Any) -> MonitorSettings:
    """Build settings from a YAML file, the environment and explicit (non-None) overrides."""
    return load_layered(MonitorSettings, config_file, "TURNOUT_MONITOR_*", overrides)
