"""The gateway process: the composition root that wires every part, and both servers.

HTTP (uvicorn, uvloop + httptools) and gRPC (the own HTTP/2 transport, or grpc.aio) share
one event loop and one data plane, so a request's batcher sees every request for its model
regardless of transport.
:class:`Gateway` builds the model table, the router and its store, the data plane with its
observers (the metrics, the record emitter), the admin and the servers, and owns their
lifetimes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import json
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import IO, Any
from wsgiref.simple_server import WSGIServer

import grpc
import uvicorn
from prometheus_client import start_http_server

from gateway.acceptor import Acceptor, listening_socket
from gateway.admin.experiment import ExperimentAdmin
from gateway.admin.grpc import TrafficServicer
from gateway.admin.http import AdminHttp
from gateway.admin.rollout import RolloutAdmin
from gateway.admin.rollout_grpc import RolloutServicer
from gateway.admin.traffic import TrafficAdmin
from gateway.auth import Token, TokenAuth, load_or_create_tokens
from gateway.autoscaler import Autoscaler
from gateway.backends.base import ReplicaBackend
from gateway.batching import Batcher
from gateway.dataplane import DataPlane, Observer
from gateway.errors import TurnoutError
from gateway.feedback import FeedbackForwarder, FeedbackServicer
from gateway.grpc.servicer import MODEL_INFER, InferenceServicer, build_grpc_server
from gateway.grpc.transport import GrpcServer
from gateway.http.app import HttpApp
from gateway.http.protocol import HoldingProtocol
from gateway.http.refusing import RefusingProtocol, RefusingScreen
from gateway.limits import RateLimits
from gateway.metrics import GatewayCollector, RequestMetrics, gateway_registry
from gateway.models import ModelTable
from gateway.overload import Overload
from gateway.repository import Repository
from gateway.rollout.controller import RolloutController
from gateway.rollout.evidence import Evidence
from gateway.rollout.labels import SidecarFeedback
from gateway.rollout.metrics import RolloutCollector
from gateway.routing.router import PolicyRouter
from gateway.routing.shadow import ShadowMirror, ShadowStats
from gateway.routing.store import BasePolicyStore, PolicyStore
from gateway.settings import ServerSettings, SettingsError
from gateway.supervisor import Supervisor, monitor_command
from gateway.telemetry import RecordEmitter
from gateway.tls import Certificates, TlsFiles
from turnout_contract.address import ADDRESS_FILE, MONITOR_STATE_DIR_ENV, socket_address

__all__ = [
    "Gateway",
    "build_backend",
    "build_emitter",
    "build_policy_store",
    "monitor_address",
    "reserve_descriptor_table",
    "run_gateway",
]

log = logging.getLogger(__name__)


def build_backend(settings: ServerSettings) -> ReplicaBackend:
    if settings.backend == "local":
        from gateway.backends.local import LocalBackend

        return LocalBackend()
    from gateway.backends.ray_serve import RayBackend

    return RayBackend(
        address=settings.ray_address,
        namespace=settings.ray_namespace,
        load_timeout_s=settings.ray_load_timeout_s,
        same_node_channel=settings.ray_same_node_channel,
    )


def build_policy_store(settings: ServerSettings, backend: ReplicaBackend) -> BasePolicyStore:
    """``policy_store: auto`` shares policies through Ray when the backend runs on Ray."""
    kind = settings.policy_store
    if kind == "auto":
        kind = "ray" if backend.name == "ray" else "file"
    if kind == "file":
        return PolicyStore(settings.state_dir, settings.policy_poll_interval_s)
    from gateway.routing.ray_store import RayPolicyStore

    # Attached in Gateway.start, once the backend has connected to Ray.
    return RayPolicyStore(
        settings.state_dir, settings.policy_poll_interval_s, namespace=settings.ray_namespace
    )


def monitor_address(settings: ServerSettings) -> str:
    """Where request records go: ``monitor_address``, else the state directory's socket."""
    return settings.monitor_address or socket_address(settings.state_dir)


def build_emitter(settings: ServerSettings) -> RecordEmitter | None:
    if not settings.monitor:
        return None
    return RecordEmitter(
        monitor_address(settings),
        queue_size=settings.monitor_queue_size,
        sample_rows_per_s=settings.monitor_sample_rows_per_s,
    )


DEFAULT_SIDECAR_PORT = 9100


def _sidecar_port(settings: ServerSettings) -> tuple[int, IO[str] | None]:
    """The supervised sidecar's metrics port, and the lock that reserves it.

    ``monitor_http``'s port, or ``TURNOUT_MONITOR_METRICS_PORT``'s, when set; else 9100 for
    the first gateway on the machine (it holds a machine-wide lock on it for its lifetime,
    so a second gateway started before the first's sidecar has bound it cannot pick it too),
    and a free loopback port for every other one (a warning names it).
    """
    if settings.monitor_http:
        port = urllib.parse.urlsplit(settings.monitor_http).port
        if port:
            return port, None
    configured = os.environ.get("TURNOUT_MONITOR_METRICS_PORT", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured), None
    if configured != "0":
        lock_path = Path(tempfile.gettempdir()) / f"turnout-sidecar-{DEFAULT_SIDECAR_PORT}.lock"
        lock = lock_path.open("a")  # held open as long as the gateway: the reservation
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", DEFAULT_SIDECAR_PORT))
            return DEFAULT_SIDECAR_PORT, lock
        except OSError:
            lock.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    if configured != "0":
        log.warning(
            "port %d is taken (another gateway's sidecar?): this gateway's sidecar serves "
            "/metrics and /status on port %d (also in %s)",
            DEFAULT_SIDECAR_PORT, port, ADDRESS_FILE,
        )  # fmt: skip
    return port, None


class ServingView:
    """What the metrics collector reads at scrape time, from the gateway's live parts."""

    def __init__(
        self,
        models: ModelTable,
        dataplane: DataPlane,
        router: PolicyRouter,
        overload: Overload,
        autoscaler: Autoscaler,
    ) -> None:
        self._models = models
        self._dataplane = dataplane
        self._router = router
        self.overload = overload
        self._autoscaler = autoscaler

    def desired_replicas(self) -> dict[tuple[str, int], int]:
        return self._autoscaler.desired()

    def scaling_decisions(self) -> dict[tuple[str, int, str], int]:
        return dict(self._autoscaler.decisions)

    def replicas(self) -> list[tuple[str, int, int, int, float]]:
        """(model, version, replicas running, starts from zero, last start's seconds)."""
        return [
            (m.spec.name, m.spec.version, m.replicas, m.cold_starts, m.cold_start_s)
            for m in self._models.loaded()
        ]

    @property
    def backend_name(self) -> str:
        return self._models.backend.name

    def in_flight(self) -> dict[str, int]:
        return dict(self._dataplane.in_flight)

    def batchers(self) -> list[tuple[str, int, Batcher]]:
        return [(m.spec.name, m.spec.version, m.batcher) for m in self._models.loaded()]

    def shadow_stats(self) -> dict[tuple[str, int], ShadowStats]:
        return dict(self._dataplane.mirror.stats)

    def rate_limited(self) -> dict[tuple[str, str], int]:
        refused: dict[tuple[str, str], int] = {}
        tokens = self._dataplane.token_limits
        if tokens is not None:
            for key, count in list(tokens.refused.items()):
                refused[("token", key or "anonymous")] = count
        for limits in list(self._dataplane.model_limits.values()):
            for key, count in list(limits.refused.items()):
                refused[("model", key)] = count
        return refused

    def revisions(self) -> dict[str, int]:
        return {
            name: self._router.policy_for(name, versions).revision
            for name, versions in self._models.versions_by_model().items()
            if versions
        }


class Gateway:
    """Owns the servers' lifetimes; ``start`` returns once both ports accept requests."""

    def __init__(self, settings: ServerSettings, backend: ReplicaBackend | None = None) -> None:
        self.settings = settings
        self.backend = backend or build_backend(settings)
        self.store = build_policy_store(settings, self.backend)
        self.router = PolicyRouter(self.store)
        self.emitter = build_emitter(settings)
        tokens = load_or_create_tokens(
            settings.state_dir,
            [Token(t.name, t.token, t.role) for t in settings.admin_tokens],
        )
        self.auth = TokenAuth(tokens)
        self.models = ModelTable(
            Repository(settings.model_repository, settings),
            self.backend,
            drain_timeout_s=settings.drain_timeout_s,
        )
        self.autoscaler = Autoscaler(self.models)
        self.request_metrics = RequestMetrics()
        self.evidence = Evidence()
        recorders: list[Observer] = [] if self.emitter is None else [self.emitter.observe]
        # The evidence observes before the emitter, which drops unsampled tensors.
        self.dataplane = DataPlane(
            self.models,
            selector=self.router,
            observers=[self.request_metrics.observe, self.evidence.observe, *recorders],
            mirror=ShadowMirror(recorders),
            auth=self.auth if settings.require_infer_token else None,
            token_limits=RateLimits(settings.rate_limit_rps, settings.rate_limit_burst)
            if settings.rate_limit_rps is not None
            else None,
        )
        self.monitor: Supervisor | None = None
        self._port_lock: IO[str] | None = None
        self.monitor_http = settings.monitor_http or f"http://127.0.0.1:{DEFAULT_SIDECAR_PORT}"
        if settings.monitor and not settings.monitor_address:
            # The sidecar keeps its reference profiles in the gateway's state directory too.
            env = {MONITOR_STATE_DIR_ENV: str(settings.state_dir), **os.environ}
            port, self._port_lock = _sidecar_port(settings)
            self.monitor_http = f"http://127.0.0.1:{port}"
            command = monitor_command(monitor_address(settings), metrics_port=port)
            self.monitor = Supervisor(command, env=env)
        self.feedback = FeedbackForwarder(self.dataplane, self.monitor_http)
        self.overload = Overload(
            settings.overload_hold_ms / 1e3, lag_threshold_s=settings.overload_lag_ms / 1e3
        )
        self.metrics = gateway_registry(
            GatewayCollector(
                ServingView(
                    self.models, self.dataplane, self.router, self.overload, self.autoscaler
                ),
                self.request_metrics,
                self.emitter,
            )
        )
        self.metrics_port: int | None = None
        self._metrics_server: WSGIServer | None = None
        self.admin = TrafficAdmin(self.models, self.store, self.router, self.dataplane.mirror)
        feedback = SidecarFeedback(self.monitor_http) if settings.monitor else None
        self.controller = RolloutController(self.store, self.evidence, accuracy=feedback)
        self.evidence.on_failure = self.controller.wake
        self.rollouts = RolloutAdmin(self.models, self.store, self.router, self.controller)
        self.experiments = ExperimentAdmin(
            self.models, self.store, self.router, self.controller, feedback
        )
        self.metrics.register(RolloutCollector(self.store, self.controller))
        self._controller_task: asyncio.Task[None] | None = None
        self._autoscaler_task: asyncio.Task[None] | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self.certificates = (
            Certificates(
                TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            )
            if settings.tls_cert_file is not None and settings.tls_key_file is not None
            else None
        )
        self._watch_task: asyncio.Task[None] | None = None
        self.http_port = settings.http_port
        self.grpc_port = settings.grpc_port
        self._grpc: list[grpc.aio.Server | GrpcServer] = []
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._http_acceptor: Acceptor | None = None

    async def start(self) -> None:
        s = self.settings
        if self.emitter is not None:
            self.emitter.start()
        await self.models.start()
        self.store.connect()  # after the backend: the Ray store needs its Ray connection

        await self._start_grpc()

        loop = asyncio.get_running_loop()
        self._watch_task = loop.create_task(self.store.watch())
        self._controller_task = loop.create_task(self.controller.run())
        self._autoscaler_task = loop.create_task(self.autoscaler.run())
        if self.certificates is not None:
            self._tls_task = loop.create_task(self.certificates.watch())
        self.overload.start()
        http_socket = listening_socket(s.host, s.http_port)
        self.http_port = http_socket.getsockname()[1]
        app = HttpApp(
            self.dataplane,
            s.max_request_bytes,
            admin=AdminHttp(self.admin, self.auth, self.rollouts, self.experiments),
            feedback=self.feedback,
            metrics=self.metrics,
        )
        if s.metrics_port is not None:
            self._metrics_server, _ = start_http_server(
                s.metrics_port, addr=s.host, registry=self.metrics
            )
            self.metrics_port = self._metrics_server.server_port
        protocol_class = HoldingProtocol.watching(
            self.overload, s.http_head_timeout_s, app.refusal_from_head
        )
        config = uvicorn.Config(
            app,
            loop="none",
            http=protocol_class,
            lifespan="off",
            access_log=False,
            # No X-Forwarded-* rewriting: nothing reads the client address, and the
            # middleware is a call per request.
            proxy_headers=False,
            log_level="warning",
            timeout_graceful_shutdown=int(s.drain_timeout_s) or None,
            backlog=4096,
        )
        if self.certificates is not None:
            # Our context, not one uvicorn builds from file names: a reload loads the new
            # chain into this very context, which every later handshake uses.
            config.load()
            config.ssl = self.certificates.context
        self._http = server = uvicorn.Server(config)
        # _serve, not serve: the gateway installs its own signal handlers. No sockets:
        # uvicorn serves the connections the gateway's acceptor takes in (which drains a
        # crowd waiting to be accepted in one loop turn, gateway/acceptor.py).
        self._http_task = asyncio.get_running_loop().create_task(server._serve(sockets=[]))
        while not server.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("HTTP server exited during start-up")
            await asyncio.sleep(0.01)
        protocol = functools.partial(
            protocol_class,
            config=config,
            server_state=server.server_state,
            app_state=server.lifespan.state,
        )
        # A drained crowd's first requests are refused before their transports (a whole
        # refused request), or let in with a queue place kept until their protocols read
        # them; plain text only (TLS bytes are the handshake's).
        screen = RefusingScreen(
            refuse=app.refusal_from_head,
            release=self.dataplane.release,
            overload=self.overload,
            server_state=server.server_state,
        )
        first = functools.partial(
            RefusingProtocol,
            screen=screen if config.ssl is None else None,
            refusal=app.refusal,
            protocol=protocol,
            overload=self.overload,
            server_state=server.server_state,
            head_timeout_s=s.http_head_timeout_s,
            keep_alive_s=config.timeout_keep_alive,
        )
        self._http_acceptor = Acceptor(
            http_socket,
            first,
            ssl_context=config.ssl,
            backlog=config.backlog,
            on_drained=self.overload.arrived,
            screen=screen,
        )
        await self._http_acceptor.start()
        if self.monitor is not None:
            self.monitor.start()
        self.write_address_file()

    async def _start_grpc(self) -> None:
        """The gRPC port: the gateway's own HTTP/2 transport, or ``grpc_servers`` grpc.aio
        servers; every service on each."""
        s = self.settings
        handlers = [
            TrafficServicer(self.admin, self.auth).handler(),
            RolloutServicer(self.rollouts, self.admin, self.auth, self.experiments).handler(),
            FeedbackServicer(self.feedback).handler(),
        ]
        if s.grpc_transport == "turnout":
            inference = InferenceServicer(self.dataplane)
            own = GrpcServer(
                [inference.handler(), *handlers],
                max_message_bytes=s.max_request_bytes,
                overload=self.overload,
                max_concurrent_streams=s.grpc_max_concurrent_streams,
                admissions={MODEL_INFER: inference.admission},
                ssl_context=self.certificates.grpc_context if self.certificates else None,
                preface_timeout_s=s.http_head_timeout_s,
            )
            self.grpc_port = await own.start(s.host, s.grpc_port)
            self._grpc.append(own)
            return
        shared = s.grpc_servers > 1
        port = s.grpc_port
        if shared and port:
            # SO_REUSEPORT would let the servers share the port with another process's
            # listener too: a port that a plain bind finds taken is refused, as it is with
            # one server.
            listening_socket(s.host, port).close()
        for _ in range(s.grpc_servers):
            server = build_grpc_server(
                self.dataplane, s.max_request_bytes, s.grpc_max_concurrent_streams,
                reuse_port=shared,
            )  # fmt: skip
            server.add_generic_rpc_handlers(handlers)
            address = f"{s.host}:{port}"  # port 0: the first server picks, the others follow
            if self.certificates is not None:
                port = server.add_secure_port(address, self.certificates.grpc_credentials())
            else:
                port = server.add_insecure_port(address)
            self._grpc.append(server)
            await server.start()
        self.grpc_port = port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then release the backend."""
        grace = self.settings.drain_timeout_s
        if self.monitor is not None:
            self.monitor.stop_restarting()
        stops: list[Any] = [server.stop(grace) for server in self._grpc]
        if self._http_acceptor is not None:
            self._http_acceptor.close()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            stops.append(self._http_task)
        await asyncio.gather(*stops, return_exceptions=True)
        self.overload.stop()
        tasks = (self._watch_task, self._controller_task, self._tls_task, self._autoscaler_task)
        for task in tasks:
            if task is not None:
                task.cancel()
        await self.autoscaler.stop()
        await self.models.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.emitter is not None:
            self.emitter.close()  # after the drain: the last requests' records go out too
        if self.monitor is not None:
            await self.monitor.stop()
        if self._port_lock is not None:
            self._port_lock.close()  # the next gateway may take the sidecar's port
        with contextlib.suppress(FileNotFoundError):
            if json.loads(self._address_file.read_text()).get("pid") == os.getpid():
                self._address_file.unlink()

    @property
    def scheme(self) -> str:
        return "https" if self.certificates is not None else "http"

    @property
    def _address_file(self) -> Path:
        return self.settings.state_dir / ADDRESS_FILE

    def write_address_file(self) -> None:
        """Tell the CLI on this machine where the gateway listens."""
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
        self._address_file.write_text(
            json.dumps(
                {
                    "http": f"{self.scheme}://{host}:{self.http_port}",
                    "grpc": f"{host}:{self.grpc_port}",
                    "monitor": self.monitor_http if self.settings.monitor else None,
                    "pid": os.getpid(),
                }
            )
        )

    def ready_line(self) -> str:
        s = self.settings
        models = ", ".join(m.spec.key for m in self.models.loaded()) or "none"
        return (
            f"turnout ready: {self.scheme}://{s.host}:{self.http_port} grpc "
            f"{s.host}:{self.grpc_port}{' (TLS)' if self.certificates else ''} "
            f"backend {self.backend.name} models {models}"
        )


async def _serve_until_signalled(settings: ServerSettings) -> int:
    try:
        gateway = Gateway(settings)  # certificates that do not load fail here
    except (TurnoutError, SettingsError, OSError, ssl.SSLError) as exc:
        print(f"turnout: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        await gateway.start()
    except (TurnoutError, SettingsError, OSError, ssl.SSLError) as exc:
        # A bad config.yaml, a model that fails to load, a port in use: say so plainly.
        print(f"turnout: cannot start: {exc}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            await gateway.stop()
        return 1
    except BaseException:
        with contextlib.suppress(Exception):
            await gateway.stop()
        raise
    # What start-up built (modules, models, servers) lives as long as the process: keep it
    # out of the collector's full passes, whose cost otherwise grows with every object that
    # outlives a young collection (request records waiting for their flush, for one).
    gc.freeze()
    # After start: ray.init installs its own SIGTERM handler, and ours must win.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(gateway.ready_line(), flush=True)
    await stop.wait()
    log.warning("turnout: draining and stopping")
    await gateway.stop()
    print("turnout stopped", flush=True)
    return 0


DESCRIPTOR_TABLE = 65_536
"""File descriptors the process's table is grown to hold at start (at most the soft
``RLIMIT_NOFILE``)."""


def reserve_descriptor_table(size: int = DESCRIPTOR_TABLE) -> int:
    """Grow the kernel's file descriptor table to ``size`` slots now, while the process
    has one thread; return the slots reserved (0 when it could not).

    Linux grows a process's table by doubling when an accepted socket needs a slot past
    its end, and a process with threads (ONNX Runtime's, the executor's) then waits for an
    RCU grace period: under a crowd that connects at once, the event loop's thread blocked
    in ``accept`` for 10-12 ms (``expand_files`` in a scheduler trace), every connection
    waiting with it. Taking a descriptor at the last slot once grows the table for good
    (it never shrinks); it costs 8 bytes a slot."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    last = min(size, soft if soft != resource.RLIM_INFINITY else size) - 1
    try:
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        high = fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, last)  # the lowest free slot >= last
    except OSError:
        return 0
    finally:
        os.close(probe)
    os.close(high)
    return last + 1


def run_gateway(settings: ServerSettings) -> int:
    import uvloop

    reserve_descriptor_table()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return uvloop.run(_serve_until_signalled(settings))
