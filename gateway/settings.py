"""Settings: the server's (one YAML file + ``TURNOUT_`` environment variables) and each model's.

Precedence, lowest first: defaults, the YAML file given with ``--config``, ``TURNOUT_*``
environment variables, command-line flags. A model's knobs come from the server file's
``model_defaults``, then ``DIR/<model>/config.yaml``, then the server file's ``models.<name>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from turnout_contract.address import default_state_dir
from turnout_contract.settings import SettingsError, error_key, load_layered, read_yaml

__all__ = [
    "AutoscalingConfig",
    "ModelConfig",
    "ServerSettings",
    "SettingsError",
    "TokenConfig",
    "load_model_config",
    "load_settings",
]


class AutoscalingConfig(BaseModel):
    """Replicas of each version between ``min_replicas`` and ``max_replicas``, from the
    gateway's own queue (docs/autoscaling.md has the estimate and its assumptions)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas; 0 lets an idle version scale to zero (the first request after
    waits at the gateway while a replica starts)."""

    max_replicas: int = Field(default=4, ge=1)
    """Most replicas."""

    target_queue_delay_ms: float = Field(default=20.0, gt=0)
    """The mean time a request may wait for a replica: the fewest replicas whose predicted
    queue delay stays under it are asked for."""

    window_s: float = Field(default=5.0, gt=0)
    """Arrivals and service times are measured over this many seconds."""

    scale_up_cooldown_s: float = Field(default=10.0, ge=0)
    """After a change, no scale-up for this long (the new replicas take load first)."""

    scale_down_delay_s: float = Field(default=30.0, ge=0)
    """A scale-down happens only after fewer replicas would have sufficed, with half the
    target to spare, for this long without a break."""

    scale_to_zero_after_s: float = Field(default=300.0, gt=0)
    """With ``min_replicas: 0``, a version without requests for this long scales to zero."""

    @field_validator("max_replicas")
    @classmethod
    def _check_range(cls, most: int, info: ValidationInfo) -> int:
        least = info.data.get("min_replicas")
        if least is not None and most < least:
            raise ValueError(f"{most} is below min_replicas ({least})")
        return most


class ModelConfig(BaseModel):
    """Per-model knobs, read from ``DIR/<model>/config.yaml``."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=64, ge=0)
    """Most rows one backend call carries. 0 turns batching off (one request per call)."""

    max_queue_delay_us: int = Field(default=500, ge=0)
    """How long the first queued request may wait for others to join its batch."""

    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """Batch sizes dispatched as soon as they are reached, without waiting out the delay."""

    max_queue_size: int = Field(default=1024, ge=1)
    """Requests allowed to wait in the queue; beyond it requests get 429/RESOURCE_EXHAUSTED."""

    rate_limit_rps: float | None = Field(default=None, gt=0)
    """Requests a second this model admits (token bucket; unset: no limit); beyond it 429 +
    ``Retry-After`` / RESOURCE_EXHAUSTED, decided before the body is read."""

    rate_limit_burst: int | None = Field(default=None, ge=1)
    """Requests the model's bucket holds (default: one second's worth)."""

    default_timeout_us: int = Field(default=30_000_000, ge=1)
    """Request timeout when the client sets none (gRPC deadline or HTTP ``timeout``)."""

    max_inflight_batches: int | None = Field(default=None, ge=1)
    """Batches in flight at once per replica; unset: the backend's default (``local`` 2, so
    the next batch is ready when one ends; ``ray`` 1, because every Ray call costs
    milliseconds of CPU and fewer, fuller calls serve more: see docs/configuration.md)."""

    num_replicas: int = Field(default=1, ge=1)
    """Replicas of each version (Ray backend: Serve replicas; local: concurrent sessions);
    with ``autoscaling``, the count it starts from."""

    autoscaling: AutoscalingConfig | None = None
    """Scale replicas from the gateway's queue; unset: ``num_replicas``, fixed."""

    num_cpus: float | None = Field(default=None, ge=0)
    """CPUs Ray reserves for each replica. Unset: a quarter CPU per ONNX Runtime thread
    (``intra_op_threads``; 0, ONNX Runtime's own choice, counts as one whole CPU), since a
    replica's threads are busy only while a batch runs: a 2-CPU machine holds 8 replicas of
    one thread. Set it to reserve whole CPUs for a busy model."""

    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs Ray reserves for each replica (set it with ``device: cuda`` on a GPU cluster)."""

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Execution provider: ``cuda`` fails at load when CUDA is missing; ``auto`` falls back."""

    intra_op_threads: int = Field(default=1, ge=0)
    """ONNX Runtime threads inside one operator (0: ONNX Runtime's default)."""

    inter_op_threads: int = Field(default=1, ge=0)
    """ONNX Runtime threads across operators (0: ONNX Runtime's default)."""

    inline_max_us: int = Field(default=1000, ge=0)
    """Local backend: a batch measured to compute in less than this (by batch size, CPU
    time) runs on the event loop's thread instead of a worker, whose GIL handoffs cost a
    small model many times its computation under load. 0: always a worker. Only with one
    ONNX Runtime thread on the CPU."""

    @field_validator("autoscaling")
    @classmethod
    def _check_start(
        cls, scaling: AutoscalingConfig | None, info: ValidationInfo
    ) -> AutoscalingConfig | None:
        start = info.data.get("num_replicas")
        if scaling is None or start is None:
            return scaling
        if not max(1, scaling.min_replicas) <= start <= scaling.max_replicas:
            raise ValueError(
                f"num_replicas ({start}) must lie between min_replicas (or 1) and "
                f"max_replicas ({scaling.min_replicas}..{scaling.max_replicas})"
            )
        return scaling

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _check_preferred(cls, sizes: list[int], info: ValidationInfo) -> list[int]:
        # A field validator, not a model one, so the error's location names this key.
        max_batch_size = info.data.get("max_batch_size")  # absent when itself invalid
        for size in sizes:
            if size < 1 or (max_batch_size and size > max_batch_size):
                raise ValueError(f"{size} must be between 1 and max_batch_size ({max_batch_size})")
        return sizes


class TokenConfig(BaseModel):
    """One bearer token of the admin API (and of inference, when it requires one)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    token: str = Field(min_length=16)
    role: Literal["admin", "infer"] = "admin"


class ServerSettings(BaseSettings):
    """The gateway process."""

    model_config = SettingsConfigDict(env_prefix="TURNOUT_", extra="forbid")

    model_repository: Path = Path("models")
    """Directory laid out as ``<model>/<version>/model.onnx``."""

    host: str = "127.0.0.1"
    """Address both servers bind."""

    http_port: int = Field(default=8000, ge=0, le=65535)
    """HTTP (REST) port; 0 picks a free one."""

    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""

    backend: Literal["ray", "local"] = "ray"
    """Where replicas run: Ray Serve deployments, or ONNX Runtime inside the gateway."""

    ray_address: str | None = None
    """Ray cluster to join (also read from ``RAY_ADDRESS``); unset starts a local Ray."""

    ray_namespace: str = "turnout"
    """Ray namespace holding turnout's Serve applications."""

    ray_load_timeout_s: float = Field(default=120.0, gt=0)
    """How long a model version's Ray replicas may take to start. Past it the load fails,
    naming the resources asked and free, instead of waiting for placement forever."""

    ray_same_node_channel: bool = True
    """Send batches to replicas on the gateway's own node over their Unix sockets instead
    of Serve handles (a Serve call costs milliseconds of CPU); off: handles only."""

    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest request body (HTTP) or message (gRPC); beyond it: 413/RESOURCE_EXHAUSTED."""

    grpc_max_concurrent_streams: int | None = None
    """Cap on concurrent gRPC streams per connection (None: 1024 on the own transport, gRPC's
    default with grpcio)."""

    grpc_transport: Literal["turnout", "grpcio"] = "turnout"
    """The gRPC port's server: ``turnout``, the gateway's own HTTP/2 for unary calls in
    the event loop (gateway/grpc/transport.py), or ``grpcio``, grpc.aio servers. Both
    serve the same services with the same servicers; the own one costs a fraction of
    grpc.aio's per-call CPU and refuses overload before any task (docs/architecture.md)."""

    grpc_servers: int = Field(default=8, ge=1, le=64)
    """With ``grpc_transport: grpcio``: grpc.aio servers sharing the gRPC port
    (SO_REUSEPORT; the kernel spreads connections over them). One grpc.aio server takes up
    one new call per event-loop turn, so with one server calls reach the batcher one at a
    time; 8 took gRPC from about 0.5x to 0.7-0.8x of HTTP's req/s (docs/architecture.md).
    The calls of one connection all go to one server."""

    overload_hold_ms: int = Field(default=1000, ge=0, le=1000)
    """While the event loop is overrun by refusals, an HTTP connection refused for overload
    (429), or a gRPC connection that sends one call at a time (RESOURCE_EXHAUSTED), is not
    read again for this long, so closed-loop clients retrying at once cannot starve
    admitted requests; a gRPC connection that multiplexes has its stream limit
    (SETTINGS_MAX_CONCURRENT_STREAMS) lowered to the calls it has open for this long, then
    doubled back every eighth of it. At most 1000: the Retry-After
    (``grpc-retry-pushback-ms``) a refusal carries. 0: never."""

    http_head_timeout_s: float = Field(default=10.0, gt=0)
    """An HTTP connection that sends no request head, or only part of one, for this long
    is closed (408 for a partial head), and so is a gRPC connection that has not sent
    HTTP/2's preface: idle and slow clients cannot hold sockets."""

    overload_lag_ms: float = Field(default=3.0, gt=0)
    """The event-loop lag that counts as overrun: the median of a 100 ms window of 5 ms
    ticks. A crowd of 256 refused clients measured 4-10 ms, an open loop at twice capacity
    0-1 ms (uvloop's timers have 1 ms resolution)."""

    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGINT/SIGTERM, how long in-flight requests may take to finish."""

    state_dir: Path = Field(default_factory=default_state_dir)
    """Traffic policies, audit log, tokens and the address file the CLI reads. Every gateway
    of one deployment on a machine shares it."""

    admin_tokens: list[TokenConfig] = Field(default_factory=list)
    """Bearer tokens; when empty, the first start writes an admin token to the state dir."""

    require_infer_token: bool = False
    """Inference also needs a bearer token (role ``infer`` or ``admin``)."""

    tls_cert_file: Path | None = None
    """Serve HTTPS and gRPC over TLS with this certificate chain (PEM); with
    ``tls_key_file``. Reloaded when the file changes, without a restart."""

    tls_key_file: Path | None = None
    """The certificate's private key (PEM)."""

    tls_client_ca_file: Path | None = None
    """Require client certificates signed by this CA (mTLS) on both ports."""

    @field_validator("tls_key_file")
    @classmethod
    def _check_tls(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        if (key is None) != (info.data.get("tls_cert_file") is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return key

    rate_limit_rps: float | None = Field(default=None, gt=0)
    """Inference requests a second each bearer token may send (token bucket; unset: no
    limit). Without ``require_infer_token`` every client shares one bucket. Beyond it 429 +
    ``Retry-After`` / RESOURCE_EXHAUSTED. Per model: ``rate_limit_rps`` in its config."""

    rate_limit_burst: int | None = Field(default=None, ge=1)
    """Requests a token's bucket holds (default: one second's worth)."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Also serve ``/metrics`` on this port (its own thread), for scrapers kept off the
    serving port; ``/metrics`` on the HTTP port stays. 0 picks a free port."""

    policy_poll_interval_s: float = Field(default=0.2, gt=0, le=1.0)
    """How often a gateway looks for policy changes made by other gateways."""

    policy_store: Literal["auto", "file", "ray"] = "auto"
    """Where traffic policies are shared: ``file`` (the state directory, every gateway on one
    machine), ``ray`` (a detached Ray actor persisting to the state directory of the head
    node, every gateway on the Ray cluster; needs ``backend: ray``), or ``auto`` (``ray``
    with the Ray backend, ``file`` otherwise)."""

    @field_validator("policy_store")
    @classmethod
    def _check_policy_store(cls, store: str, info: ValidationInfo) -> str:
        if store == "ray" and info.data.get("backend") == "local":
            raise ValueError("'ray' needs backend 'ray' (the local backend does not join Ray)")
        return store

    monitor: bool = True
    """Send request records to the monitor sidecar. Without ``monitor_address`` the gateway
    starts ``turnout monitor`` as a supervised child on ``<state_dir>/monitor.sock``."""

    monitor_address: str | None = None
    """A sidecar running elsewhere on this machine (``unix:///path``); no child is started."""

    monitor_http: str | None = None
    """The sidecar's HTTP address (its metrics/status port), where label feedback received
    on ``POST /v2/models/{model}/feedback`` and gRPC ``SendFeedback`` is forwarded, and
    where rollouts read accuracy. Unset: the supervised sidecar gets port 9100 while it is
    free, else a free loopback port of its own (``TURNOUT_MONITOR_METRICS_PORT`` picks one),
    so two gateways on one machine never collide; the port is written to
    ``STATE_DIR/gateway.json`` for ``turnout monitor status``. A sidecar at
    ``monitor_address`` is expected at http://127.0.0.1:9100."""

    monitor_sample_rows_per_s: float = Field(default=10000.0, ge=0)
    """Input and output rows a second sent with the records (every request's while within
    it); 0 sends records without tensors."""

    monitor_queue_size: int = Field(default=65536, ge=1)
    """Records waiting for the next flush; beyond it records are dropped and counted, never
    waited for."""

    @field_validator("monitor_address")
    @classmethod
    def _check_monitor_address(cls, address: str | None) -> str | None:
        if address is not None and (not address.startswith("unix:///") or address == "unix:///"):
            raise ValueError(f"{address!r} is not a unix:///path address")
        return address

    model_defaults: dict[str, Any] = Field(default_factory=dict)
    """Knobs applied to every model before its own config.yaml."""

    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-model overrides applied after the model's config.yaml."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServerSettings:
    """Build server settings from a YAML file, the environment and explicit overrides."""
    return load_layered(ServerSettings, config_file, "TURNOUT_*", overrides)


def load_model_config(model_dir: Path, settings: ServerSettings) -> ModelConfig:
    """Merge defaults, ``<model_dir>/config.yaml`` and the server file's override.

    An error names the key where its value was set: ``model_defaults.<key>``,
    ``<model_dir>/config.yaml: <key>`` or ``models.<model>.<key>``.
    """
    path = model_dir / "config.yaml"
    layers = [("model_defaults.", settings.model_defaults)]
    if path.exists():
        layers.append((f"{path}: ", read_yaml(path)))
    layers.append((f"models.{model_dir.name}.", settings.models.get(model_dir.name, {})))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for prefix, values in layers:
        merged.update(values)
        origin.update(dict.fromkeys(values, prefix))
    try:
        return ModelConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{origin.get(str(err['loc'][0]), '') if err['loc'] else ''}"
            f"{error_key(err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"model '{model_dir.name}': {problems}") from exc
