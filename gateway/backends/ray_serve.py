"""The Ray backend: one Ray Serve application per model version.

The gateway keeps protocol handling and batching, and sends each batch whole: to a replica
on its own node over that replica's Unix socket (gateway/backends/channel.py), otherwise
through a Serve handle, whose per-call cost (milliseconds of CPU) is then paid per batch,
not per request. Ray's own HTTP/gRPC proxies are disabled: they are not on the data path.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import threading
import time
from typing import Any

from gateway.backends import _wire
from gateway.backends._onnx import select_providers
from gateway.backends.base import Placement, ReplicaBackend, Tensors
from gateway.backends.channel import ChannelBroken, Channels, channel_dir
from gateway.errors import BackendError, ModelNotReady
from gateway.repository import ModelSpec

__all__ = ["RayBackend"]

log = logging.getLogger(__name__)


def app_name(spec: ModelSpec) -> str:
    return f"turnout-{spec.name}-v{spec.version}"


# Serve's defaults hop between event loops on every call: the router runs on a loop of its
# own in the caller, and user code on a thread of its own in the replica. turnout calls
# handles only from its running event loop and its replica's ``__call__`` is async (ONNX
# Runtime runs on a worker thread), so neither hop buys anything, and on a small machine
# each costs about a millisecond of CPU per call. Measured with bench/serving.py (d, 2
# cores): c1 p50 5.2 -> 3.8 ms, c16 1514 -> 1669 req/s. Set either variable to override.
ROUTER_ENV = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


_DEPLOYING = threading.Lock()
"""Serve's deployment API is not thread-safe (building a deployment config, which reading
``serve.status()`` does too, registers and unregisters a module with cloudpickle): one call
at a time per process (tests and embedders run several gateways in one)."""


def _delete_application(name: str) -> None:
    from ray import serve

    with _DEPLOYING:
        serve.delete(name)


def replica_env() -> dict[str, str]:
    """The replica's Serve settings: ours, unless this process's environment sets them."""
    return {name: os.environ.get(name, value) for name, value in REPLICA_ENV.items()}


REPLICA_RETRY_S = 10.0
"""How long a batch whose replica died is retried on others: Serve notices a dead replica
at its next health check and starts a new one."""

CPU_PER_THREAD = 0.25
"""What an unset ``num_cpus`` reserves per ONNX Runtime thread of a replica."""


def replica_resources(spec: ModelSpec, replicas: int | None = None) -> dict[str, float]:
    """What ``replicas`` (default: ``num_replicas``) replicas of ``spec`` ask Ray for."""
    cfg = spec.config
    count = cfg.num_replicas if replicas is None else replicas
    per_replica = cfg.num_cpus
    if per_replica is None:
        threads = cfg.intra_op_threads
        per_replica = 1.0 if threads == 0 else CPU_PER_THREAD * threads
    asked = {"CPU": per_replica * count}
    if cfg.num_gpus:
        asked["GPU"] = cfg.num_gpus * count
    return asked


def code_version(spec: ModelSpec) -> str:
    """What Serve compares to tell a change of replica count (kept replicas) from a change
    of code (replaced replicas): the model file and the session's settings."""
    stat = spec.path.stat()
    cfg = spec.config
    facts = (
        *(spec.path.resolve(), stat.st_size, stat.st_mtime_ns, cfg.device),
        *(cfg.intra_op_threads, cfg.inter_op_threads, cfg.num_cpus, cfg.num_gpus),
    )
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:16]


def _resources(amounts: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {name}" for name, value in sorted(amounts.items())) or "nothing"


class RayBackend(ReplicaBackend):
    name = "ray"
    # One batch per replica at a time fills batches twice as full: through handles (each
    # call costs milliseconds of CPU) 1.3-1.4x the req/s at c16-c64 on 2 cores, over the
    # same-node socket 1.9-2x (docs/configuration.md, max_inflight_batches).
    default_inflight_batches = 1

    def __init__(
        self,
        address: str | None = None,
        namespace: str = "turnout",
        load_timeout_s: float = 120.0,
        same_node_channel: bool = True,
    ) -> None:
        self._address = address or os.environ.get("RAY_ADDRESS") or None
        self._namespace = namespace
        self.load_timeout_s = load_timeout_s
        self._same_node_channel = same_node_channel
        self._channels: dict[str, Channels] = {}
        self.channel_batches = 0
        """Batches sent over a same-node socket rather than a Serve handle."""
        self._reserved: dict[str, dict[str, float]] = {}
        """Model key -> what its replicas asked Ray for, from the moment they are asked:
        Ray's view of free resources lags behind a deployment that is still placing."""
        self._handles: dict[str, Any] = {}
        self._started_ray = False
        self.batches_by_replica: collections.Counter[str] = collections.Counter()
        self.replica_retries = 0
        """Batches sent again because their replica died."""
        self._placements: dict[str, Placement] = {}  # one object per replica, not per batch

    async def start(self) -> None:
        # On the loop's thread on purpose: nothing is served yet, and Ray installs its
        # signal handlers only from the main thread.
        self._connect()

    def _connect(self) -> None:
        for name, value in ROUTER_ENV.items():  # read once, when ray.serve is first imported
            os.environ.setdefault(name, value)
        import ray
        from ray import serve

        if not ray.is_initialized():
            self._started_ray = self._address is None
            ray.init(
                # "local" starts a private instance rather than joining one found on disk.
                address=self._address or "local",
                namespace=self._namespace,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        serve.start(
            proxy_location="Disabled",
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )

    async def load(self, spec: ModelSpec) -> None:
        cfg = spec.config
        if cfg.device == "cuda" and cfg.num_gpus == 0:
            # No GPU reserved for the replica: it runs where the gateway's ORT would, so a
            # missing CUDA provider is known now rather than after a replica crash loop.
            select_providers("cuda")
        asked = replica_resources(spec)
        if not await asyncio.to_thread(self._running_elsewhere, spec):
            self._check_capacity(spec, asked, cfg.num_replicas)
        self._reserved[spec.key] = asked
        try:
            handle = await asyncio.to_thread(self._deploy, spec, cfg.num_replicas)
        except BackendError:
            self._reserved.pop(spec.key, None)
            raise
        except Exception as exc:
            self._reserved.pop(spec.key, None)
            raise BackendError(f"model '{spec.key}' failed to deploy on Ray: {exc}") from exc
        self._handles[spec.key] = handle
        self._open_channels(spec)

    def _open_channels(self, spec: ModelSpec) -> None:
        if self._same_node_channel:
            per_replica = spec.config.max_inflight_batches or self.default_inflight_batches
            channels = Channels(channel_dir(self._namespace, app_name(spec)), per_replica)
            channels.prune()
            channels.scan()
            self._channels[spec.key] = channels

    async def scale(self, spec: ModelSpec, replicas: int) -> None:
        """A new replica count for the version's Serve deployment. Its code version is
        stable (``code_version``), so Serve keeps the running replicas and starts or stops
        only the difference; 0 deletes the application (a cold start brings it back)."""
        key = spec.key
        if replicas == 0:
            self._reserved.pop(key, None)
            await self._withdraw(spec)
            return
        asked = replica_resources(spec, replicas)
        before = self._reserved.get(key, {})
        self._check_capacity(spec, asked, replicas, held=before)
        self._reserved[key] = asked
        try:
            handle = await asyncio.to_thread(self._deploy, spec, replicas, not before)
        except Exception:
            if before:
                self._reserved[key] = before
            else:
                self._reserved.pop(key, None)
            raise
        old = self._handles.get(key)
        self._handles[key] = handle
        if old is not None and old is not handle:
            await old.shutdown_async()
        if key not in self._channels:
            self._open_channels(spec)

    def _free(self, excluding: str = "") -> tuple[dict[str, float], dict[str, float]]:
        """(free, total) per resource: the least of Ray's free view and its total less what
        turnout has asked for (but ``excluding``'s), since a deployment still being placed
        is not in Ray's view."""
        import ray

        total: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        available: dict[str, float] = ray.available_resources()  # type: ignore[no-untyped-call]
        free, known = {}, {}
        for resource in ("CPU", "GPU"):
            if resource == "GPU" and not total.get(resource):
                continue  # a CPU cluster: no GPU figures in messages
            known[resource] = total.get(resource, 0.0)
            ours = sum(
                asked.get(resource, 0.0)
                for key, asked in list(self._reserved.items())  # read from a deploy thread too
                if key != excluding
            )
            free[resource] = max(0.0, min(available.get(resource, 0.0), known[resource] - ours))
        return free, known

    def _running_elsewhere(self, spec: ModelSpec) -> bool:
        """Whether another gateway of this cluster already runs ``spec``'s application:
        deploying it again reuses its replicas, so it needs no free resources."""
        from ray import serve

        if self._started_ray:
            return False
        with _DEPLOYING:
            status = serve.status().applications.get(app_name(spec))
        return status is not None and str(status.status).endswith("RUNNING")

    def _check_capacity(
        self,
        spec: ModelSpec,
        asked: dict[str, float],
        replicas: int,
        held: dict[str, float] | None = None,
    ) -> None:
        """Serve waits forever for replicas it cannot place: refuse them up front instead.
        ``held``: what the version's running replicas hold already (a scale)."""
        free, total = self._free()  # what this version holds is not in it
        held = held or {}
        for resource, needed in asked.items():
            if needed - held.get(resource, 0.0) <= free.get(resource, 0.0) + 1e-9:
                continue
            if held:
                raise BackendError(
                    f"model '{spec.key}' cannot scale to {replicas} replica(s): they need "
                    f"{_resources(asked)}, it holds {_resources(held)} and the Ray cluster "
                    f"has {_resources(free)} free of {_resources(total)}"
                )
            raise BackendError(
                f"model '{spec.key}' needs {_resources(asked)} for "
                f"{replicas} replica(s), but the Ray cluster has "
                f"{_resources(free)} free of {_resources(total)}; lower num_cpus/num_gpus "
                "or num_replicas in its config.yaml, or add nodes"
            )

    def _deploy(self, spec: ModelSpec, replicas: int, fresh: bool = True) -> Any:
        with _DEPLOYING:
            return self._deploy_alone(spec, replicas, fresh)

    def _deploy_alone(self, spec: ModelSpec, replicas: int, fresh: bool) -> Any:
        """Deploy ``replicas`` replicas and wait until they run. On failure a ``fresh``
        application is deleted; a running one (a scale) stays as it was."""
        from ray import serve
        from ray.serve import api as serve_api

        from gateway.backends._ray_replica import OnnxReplica

        cfg = spec.config
        deployment: Any = serve.deployment(
            OnnxReplica,
            name=f"{spec.name}-v{spec.version}",
            num_replicas=replicas,
            # The gateway already caps in-flight batches; headroom here keeps Serve's router
            # from probing replica queue lengths before calls it would have to hold anyway.
            max_ongoing_requests=(cfg.max_inflight_batches or self.default_inflight_batches) * 4,
            ray_actor_options={
                "num_cpus": replica_resources(spec, 1).get("CPU", 0.0),
                "num_gpus": cfg.num_gpus,
                "runtime_env": {"env_vars": replica_env()},
            },
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        # Private: Serve offers no public way to name a code version any more, and without
        # one every deploy (a scale included) replaces all replicas.
        deployment._version = code_version(spec)
        name = app_name(spec)
        sockets = channel_dir(self._namespace, name) if self._same_node_channel else None
        app_args = (
            str(spec.path.resolve()),
            cfg.device,
            cfg.intra_op_threads,
            cfg.inter_op_threads,
            str(sockets) if sockets is not None else None,
        )
        app = deployment.bind(*app_args)
        handle = serve_api._run(app, _blocking=False, name=name, route_prefix=None)
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            status = serve.status().applications.get(name)
            state = str(status.status) if status is not None else "NOT_STARTED"
            if state.endswith("RUNNING"):
                return handle
            if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
                messages = (
                    [d.message for d in status.deployments.values() if d.message]
                    if status is not None
                    else []
                )
                free, total = self._free(excluding=spec.key)  # its ask is not placed
                if fresh:
                    serve.delete(name, _blocking=False)
                else:  # back to the replicas that served, which Serve kept running
                    handle.shutdown()  # type: ignore[no-untyped-call]
                    deployment = deployment.options(num_replicas=self._running_count(name))
                    serve_api._run(deployment.bind(*app_args), name=name, route_prefix=None)
                why = (
                    "failed"
                    if state.endswith("DEPLOY_FAILED")
                    else (f"did not start within {self.load_timeout_s:g} s (ray_load_timeout_s)")
                )
                raise BackendError(
                    f"model '{spec.key}': its {replicas} Ray replica(s) {why}; they "
                    f"ask {_resources(replica_resources(spec, replicas))}, the cluster has "
                    f"{_resources(free)} free of {_resources(total)}"
                    + (f"; Ray Serve says: {' '.join(messages)[:600]}" if messages else "")
                )
            time.sleep(0.2)

    @staticmethod
    def _running_count(name: str) -> int:
        from ray import serve

        status = serve.status().applications.get(name)
        if status is None:
            return 1
        running = 0
        for deployment in status.deployments.values():
            for state, count in deployment.replica_states.items():
                if str(state).endswith("RUNNING"):
                    running += int(count)
        return max(1, running)

    async def _withdraw(self, spec: ModelSpec) -> None:
        """Delete the version's application, keeping the version known (scaled to zero)."""

        handle = self._handles.pop(spec.key, None)
        channels = self._channels.pop(spec.key, None)
        if channels is not None:
            channels.close()
        if handle is not None:
            await handle.shutdown_async()
            await asyncio.to_thread(_delete_application, app_name(spec))

    async def unload(self, spec: ModelSpec) -> None:

        handle = self._handles.pop(spec.key, None)
        self._reserved.pop(spec.key, None)
        channels = self._channels.pop(spec.key, None)
        if channels is not None:
            channels.close()
        if handle is not None:
            await handle.shutdown_async()  # on this loop, where its router runs
            await asyncio.to_thread(_delete_application, app_name(spec))

    async def infer(self, spec: ModelSpec, inputs: Tensors) -> tuple[Tensors, Placement]:
        handle = self._handles.get(spec.key)
        if handle is None:
            raise ModelNotReady(f"model '{spec.name}' version {spec.version} is not loaded")
        try:
            outputs, replica, device = await self._send(spec.key, handle, inputs)
        except BackendError:
            raise
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, BackendError):
                raise cause from None
            raise BackendError(f"model '{spec.key}' replica failed: {cause}") from exc
        self.batches_by_replica[replica] += 1
        placement = self._placements.get(replica)
        if placement is None:
            placement = self._placements[replica] = Placement(replica, device)
        result: Tensors = outputs
        return result, placement

    async def _send(self, key: str, handle: Any, inputs: Tensors) -> Any:
        """One batch: to a replica on this node with room for it, else through Serve."""
        channels = self._channels.get(key)
        if channels is not None and _wire.carries(inputs):
            while (channel := channels.pick()) is not None:
                try:
                    reply = await channel.call(inputs)
                except ChannelBroken as exc:
                    channels.drop(channel)
                    self.replica_retries += 1
                    log.warning("a replica's socket failed under a batch, resending: %s", exc)
                    continue
                self.channel_batches += 1
                return reply
        return await self._call(handle, inputs)

    async def _call(self, handle: Any, inputs: Tensors) -> Any:
        """One batch; again on another replica when the one it went to died (inference is
        idempotent), until Serve's router has learnt of the death (``REPLICA_RETRY_S``)."""
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + REPLICA_RETRY_S
        pause = 0.02
        while True:
            try:
                return await handle.remote(inputs)
            except RayActorError as exc:
                if time.monotonic() + pause > deadline:
                    raise
                self.replica_retries += 1
                log.warning("a replica died under a batch, retrying on another: %s", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    def describe(self, spec: ModelSpec) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": spec.config.device,
            "replicas": str(spec.config.num_replicas),
        }

    async def close(self) -> None:
        import ray
        from ray import serve

        for channels in self._channels.values():
            channels.close()
        self._channels.clear()
        if not ray.is_initialized():
            return
        # On this loop: with the router running on it (ROUTER_ENV), handles must be shut
        # down here, while it runs, not from a thread or after it has closed.
        if self._started_ray:
            await serve.shutdown_async()  # type: ignore[no-untyped-call]
            await asyncio.to_thread(ray.shutdown)
            return
        # A cluster this gateway joined: its applications stay, since every gateway of the
        # cluster serves the same ones (a rolling update must not take the replicas away
        # from the others); an unload through the admin API deletes one.
        handles, self._handles = self._handles, {}
        self._reserved.clear()
        for handle in handles.values():
            await handle.shutdown_async()
