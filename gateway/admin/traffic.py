"""Traffic and model administration, transport-agnostic: the REST and gRPC admin adapters
and the CLI all end here. A change is read -> ``apply_operation`` (pure) -> validate (as a
whole, then against the versions loaded here) -> compare-and-set in the policy store, which
assigns the next revision and writes the audit log."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.errors import Conflict, InvalidInput, ModelNotFound
from gateway.models import ModelTable
from gateway.routing.operations import OPERATIONS, apply_operation, parse_int
from gateway.routing.policy import TrafficPolicy
from gateway.routing.router import PolicyRouter
from gateway.routing.shadow import ShadowMirror
from gateway.routing.store import BasePolicyStore

__all__ = ["OPERATIONS", "TrafficAdmin"]


class TrafficAdmin:
    def __init__(
        self,
        models: ModelTable,
        store: BasePolicyStore,
        router: PolicyRouter,
        shadow: ShadowMirror,
    ) -> None:
        self.table = models
        self.store = store
        self.router = router
        self.shadow = shadow

    # -- reading -------------------------------------------------------------------------

    def _ready(self, model: str) -> list[int]:
        versions = [m.spec.version for m in self.table.loaded() if m.spec.name == model]
        if not versions:
            raise ModelNotFound(f"model '{model}' is not served")
        return sorted(versions)

    def policy(self, model: str) -> TrafficPolicy:
        return self.router.policy_for(model, self._ready(model))

    def status(self, model: str) -> dict[str, Any]:
        policy = self.policy(model)
        shadow = {
            str(version): stats.public()
            for (name, version), stats in self.shadow.stats.items()
            if name == model
        }
        return {**policy.public(), "loaded_versions": self._ready(model), "shadow_stats": shadow}

    def models(self) -> list[dict[str, Any]]:
        names = sorted({m.spec.name for m in self.table.loaded()})
        return [self.status(name) for name in names]

    def history(self, model: str) -> list[dict[str, Any]]:
        self._ready(model)
        return self.store.history(model)

    # -- changes -------------------------------------------------------------------------

    async def apply(
        self, model: str, operation: str, body: dict[str, Any], actor: str
    ) -> dict[str, Any]:
        """``change`` off the event loop: the store's lock, file writes or actor calls must
        not hold up requests in flight."""
        return await asyncio.to_thread(self.change, model, operation, body, actor)

    def change(
        self, model: str, operation: str, body: dict[str, Any], actor: str
    ) -> dict[str, Any]:
        """Apply one operation (see OPERATIONS) and return the new status."""
        if operation not in OPERATIONS:
            raise InvalidInput(
                f"unknown operation '{operation}' (expected one of {', '.join(OPERATIONS)})"
            )
        ready = self._ready(model)
        if_revision = body.get("if_revision")
        if if_revision is not None:
            if_revision = parse_int("if_revision", if_revision)
        default = self.router.policy_for(model, ready)

        def build(current: TrafficPolicy | None, history: list[dict[str, Any]]) -> dict[str, Any]:
            return apply_operation(operation, body, current or default, history)

        policy = self.store.update(
            model,
            operation,
            build,
            actor=actor,
            if_revision=if_revision,
            default=default,
            validate=lambda p: self._check_loaded(p, ready),
        )
        return {**self.status(model), "revision": policy.revision}

    @staticmethod
    def _check_loaded(policy: TrafficPolicy, ready: list[int]) -> None:
        missing = sorted(policy.versions_in_use() - set(ready))
        if missing:
            raise InvalidInput(
                f"model '{policy.model}' version(s) {', '.join(map(str, missing))} not loaded "
                f"(loaded: {', '.join(map(str, ready))}); load them first"
            )

    async def load(self, model: str, version: int) -> dict[str, Any]:
        if any(m.spec.name == model and m.spec.version == version for m in self.table.loaded()):
            raise Conflict(f"model '{model}' version {version} is already loaded")
        spec = self.table.repository.read(model, version)
        if self.store.get(model) is None and model in self._served():
            # Revision 0 means "the highest loaded version": pin it first, so loading a
            # newer version never moves traffic by itself.
            pinned = self.policy(model)
            weights = {str(v): w for v, w in pinned.weights.items()}
            await self.apply(model, "set", {"weights": weights}, actor="turnout (pin before load)")
        await self.table.load(spec)
        return self.status(model)

    def _served(self) -> set[str]:
        return {m.spec.name for m in self.table.loaded()}

    async def unload(self, model: str, version: int) -> dict[str, Any]:
        ready = self._ready(model)
        if version not in ready:
            raise ModelNotFound(f"model '{model}' version {version} is not loaded")
        policy = self.router.policy_for(model, ready)
        if version in policy.versions_in_use():
            raise Conflict(
                f"model '{model}' version {version} has traffic under revision "
                f"{policy.revision}; move traffic away first (promote, set, clear_shadow)"
            )
        await self.table.unload(model, version)
        return {"model": model, "unloaded": version, "loaded_versions": self._ready(model)}
