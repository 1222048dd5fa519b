"""The model table: which versions are loaded, each with its batcher, and their lifecycle.

Loading a version loads it on the backend and starts its batcher; unloading drains the
batcher first. Reads are safe from the metrics thread (they copy), because a scrape may run
while the event loop loads a version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.backends.base import ReplicaBackend
from gateway.batching import Batcher
from gateway.errors import ModelNotFound, checked_model_name
from gateway.repository import ModelSpec, Repository, TensorSpec, parse_version
from turnout_contract.records import Placement, Tensors

__all__ = ["LoadedModel", "ModelTable"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    spec: ModelSpec
    batcher: Batcher
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    replicas: int = 1
    """Replicas running now (the autoscaler changes it; 0: scaled to zero)."""
    cold_starts: int = 0
    cold_start_s: float = 0.0
    """How long the last start from zero replicas took."""
    waking: asyncio.Future[None] | None = None
    """The start from zero in progress, which every batch waits for."""


class ModelTable:
    """Loaded versions per model (ascending), the backend they run on, live and ready."""

    def __init__(
        self, repository: Repository, backend: ReplicaBackend, drain_timeout_s: float = 30.0
    ) -> None:
        self.repository = repository
        self.backend = backend
        self.drain_timeout_s = drain_timeout_s
        self.versions: dict[str, dict[int, LoadedModel]] = {}
        """Model name -> version -> loaded model; the hot path reads it directly."""
        self.stopping = False
        self._ready = False

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
        backend = self.backend
        loaded: LoadedModel | None = None

        async def run_batch(inputs: Tensors) -> tuple[Tensors, Placement]:
            if loaded is not None and loaded.replicas == 0:
                await self._wake(loaded)
            return await backend.infer(spec, inputs)

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
            replicas=spec.config.num_replicas,
        )
        versions = self.versions.setdefault(spec.name, {})
        versions[spec.version] = loaded
        self.versions[spec.name] = dict(sorted(versions.items()))
        log.info("loaded %s (%s, batch %s)", spec.key, backend.name, batcher.max_batch_size)
        return loaded

    async def scale(self, loaded: LoadedModel, replicas: int) -> None:
        """Run ``loaded`` on ``replicas`` replicas; its batcher follows once they serve."""
        if replicas == loaded.replicas:
            return
        if replicas < loaded.replicas:
            loaded.batcher.set_replicas(replicas)  # fewer batches in flight first
        try:
            await self.backend.scale(loaded.spec, replicas)
        except BaseException:
            loaded.batcher.set_replicas(loaded.replicas)
            raise
        loaded.replicas = replicas
        loaded.batcher.set_replicas(replicas)
        log.info("%s now runs %d replica(s)", loaded.spec.key, replicas)

    async def _wake(self, loaded: LoadedModel) -> None:
        """A batch for a version scaled to zero: start one replica (or ``min_replicas``),
        once, while the batch and those after it wait at the gateway."""
        if loaded.waking is not None:
            await asyncio.shield(loaded.waking)
            return
        waking = loaded.waking = asyncio.get_running_loop().create_future()
        scaling = loaded.spec.config.autoscaling
        started = time.perf_counter()
        try:
            await self.scale(loaded, max(1, scaling.min_replicas if scaling else 1))
        except asyncio.CancelledError:
            waking.cancel()
            raise
        except BaseException as exc:
            waking.set_exception(exc)
            waking.exception()  # retrieved here: the batches waiting on it raise it too
            raise
        else:
            loaded.cold_starts += 1
            loaded.cold_start_s = time.perf_counter() - started
            log.info("%s started from zero in %.2f s", loaded.spec.key, loaded.cold_start_s)
            waking.set_result(None)
        finally:
            loaded.waking = None

    async def unload(self, model: str, version: int) -> None:
        loaded = self.versions.get(model, {}).pop(version, None)
        if loaded is None:
            raise ModelNotFound(f"model '{model}' version {version} is not loaded")
        if not self.versions[model]:
            del self.versions[model]
        await loaded.batcher.close(self.drain_timeout_s)
        await self.backend.unload(loaded.spec)

    async def stop(self) -> None:
        """Refuse new requests, drain what is queued or running, release the backend."""
        self.stopping = True
        self._ready = False
        await asyncio.gather(*(m.batcher.close(self.drain_timeout_s) for m in self.loaded()))
        await self.backend.close()

    def live(self) -> bool:
        return not self.stopping

    def ready(self) -> bool:
        return self._ready and not self.stopping

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether the named version (or the model) serves; NOT_FOUND if it is not loaded."""
        self.get(name, version)
        return self.ready()

    def loaded(self) -> list[LoadedModel]:
        # Copies: a scrape on the metrics thread may run while the loop loads a version.
        return [m for versions in list(self.versions.values()) for m in list(versions.values())]

    def versions_by_model(self) -> dict[str, list[int]]:
        """Loaded version numbers of every served model, ascending."""
        return {name: list(versions) for name, versions in list(self.versions.items())}

    def known(self) -> str:
        """The served model names, for error messages."""
        return ", ".join(sorted(self.versions)) or "none"

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The loaded version named, or the highest one; NOT_FOUND names what is missing."""
        versions = self.versions.get(name) or self.versions.get(checked_model_name(name))
        if not versions:
            raise ModelNotFound(f"model '{name}' is not served (known: {self.known()})")
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
