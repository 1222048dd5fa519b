"""Traffic policies shared by every gateway of a Ray cluster, through one detached actor.

The actor (``turnout-policy-store`` in the gateway's Ray namespace) owns the policies. It
keeps them in a ``PolicyStore`` (the same files, lock and audit log as a single machine)
in the state directory of the Ray head node, so they survive gateway restarts and the
actor's own restarts, and it answers reads and compare-and-set commits one at a time.

Each gateway holds a ``RayPolicyStore``: a cache that the router reads without leaving the
process, refreshed every ``poll_interval_s`` by one cheap call (``{model: revision}``) and
one fetch of the policies whose revision moved. A gateway that commits a change sees it at
once; the others within one poll interval.

The first gateway to reach the cluster creates the actor with its own ``state_dir``; the
others attach to it. Nothing here calls ``ray.init``: the Ray backend connects first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from gateway.errors import PolicyStoreUnavailable, TurnoutError
from gateway.routing.policy import TrafficPolicy
from gateway.routing.store import BasePolicyStore, PolicyStore

__all__ = ["ACTOR_NAME", "PolicyStoreActor", "RayPolicyStore"]

log = logging.getLogger(__name__)

ACTOR_NAME = "turnout-policy-store"
HEAD_NODE_RESOURCE = "node:__internal_head__"
"""Pins the actor to the head node, whose disk outlives every other node of the cluster."""


class PolicyStoreActor:
    """The actor's body: a file-backed ``PolicyStore`` on the head node. Policies travel as
    JSON-shaped dicts; errors (RevisionConflict, InvalidInput) travel as themselves."""

    def __init__(self, state_dir: str) -> None:
        self._store = PolicyStore(Path(state_dir))

    def state_dir(self) -> str:
        return str(self._store.state_dir)

    def revisions(self) -> dict[str, int]:
        # Also picks up files written beside the actor (a file-store gateway on this node).
        self._store.reload()
        return {model: policy.revision for model, policy in self._store.all().items()}

    def policies(self, models: list[str]) -> dict[str, dict[str, Any]]:
        stored = self._store.all()
        return {m: stored[m].model_dump(mode="json") for m in models if m in stored}

    def read(self, model: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        policy, history = self._store.read(model)
        return (policy.model_dump(mode="json") if policy else None), history

    def commit(
        self,
        model: str,
        fields: dict[str, Any],
        expected_revision: int,
        operation: str,
        actor: str,
        base: dict[str, Any] | None,
    ) -> dict[str, Any]:
        policy = self._store.commit(
            model,
            fields,
            expected_revision=expected_revision,
            operation=operation,
            actor=actor,
            base=TrafficPolicy.model_validate(base) if base else None,
        )
        return policy.model_dump(mode="json")

    def history(self, model: str) -> list[dict[str, Any]]:
        return self._store.history(model)

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> str:
        return self._store.acquire_lease(name, holder, ttl_s)


class RayPolicyStore(BasePolicyStore):
    """The gateway's side: a cache of the actor's policies, and calls for changes."""

    def __init__(
        self,
        state_dir: Path,
        poll_interval_s: float = 0.2,
        *,
        namespace: str = "turnout",
        name: str = ACTOR_NAME,
        call_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(poll_interval_s)
        self.state_dir = state_dir.expanduser().absolute()
        self.namespace = namespace
        self.name = name
        self.call_timeout_s = call_timeout_s
        self._handle: Any = None

    # -- the actor -----------------------------------------------------------------------

    def _actor(self) -> Any:
        """The actor's handle, creating the actor when none runs (Ray must be connected)."""
        if self._handle is not None:
            return self._handle
        import ray

        if not ray.is_initialized():
            raise PolicyStoreUnavailable(
                "the Ray policy store needs a connection to Ray (start the Ray backend first)"
            )
        actor_class: Any = ray.remote(PolicyStoreActor)
        handle = actor_class.options(
            name=self.name,
            namespace=self.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={HEAD_NODE_RESOURCE: 0.001},
            max_restarts=-1,
        ).remote(str(self.state_dir))
        kept_in = ray.get(handle.state_dir.remote(), timeout=self.call_timeout_s)
        if kept_in != str(self.state_dir):
            log.info(
                "traffic policies are kept by the Ray actor '%s' in %s on the Ray head node; "
                "this gateway's state_dir (%s) does not hold them",
                self.name,
                kept_in,
                self.state_dir,
            )
        self._handle = handle
        return handle

    def _call(self, method: str, *args: Any, retry: bool = True) -> Any:
        """Call the actor and wait. A dead actor is replaced (it reloads from its state
        directory) and the call made again when ``retry``; commits are never repeated."""
        import ray

        try:
            ref = getattr(self._actor(), method).remote(*args)
            return ray.get(ref, timeout=self.call_timeout_s)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, TurnoutError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            self._handle = None
            if retry:
                return self._call(method, *args, retry=False)
            raise PolicyStoreUnavailable(
                f"the traffic policy store actor '{self.name}' is unavailable: {exc}"
            ) from exc
        except ray.exceptions.GetTimeoutError as exc:
            raise PolicyStoreUnavailable(
                f"the traffic policy store actor '{self.name}' did not answer within "
                f"{self.call_timeout_s:g} s"
            ) from exc

    # -- the cache -----------------------------------------------------------------------

    def _stale(self, revisions: dict[str, int]) -> dict[str, int | None]:
        """Models whose stored revision differs from the cached one -> the cached revision."""
        stale: dict[str, int | None] = {}
        for model, revision in revisions.items():
            cached = self._policies.get(model)
            if cached is None or cached.revision != revision:
                stale[model] = cached.revision if cached else None
        return stale

    def _apply(
        self, stale: dict[str, int | None], fetched: dict[str, dict[str, Any]]
    ) -> list[TrafficPolicy]:
        changed = []
        for model, document in fetched.items():
            cached = self._policies.get(model)
            if (cached.revision if cached else None) != stale.get(model):
                continue  # this gateway committed meanwhile; the next poll compares again
            policy = TrafficPolicy.model_validate(document)
            if cached is None or cached.revision != policy.revision:
                self._policies[model] = policy
                changed.append(policy)
        self._publish(changed)
        return changed

    def reload(self) -> list[TrafficPolicy]:
        stale = self._stale(self._call("revisions"))
        if not stale:
            return []
        return self._apply(stale, self._call("policies", list(stale)))

    async def _poll(self) -> None:
        handle = self._handle
        if handle is None:  # first call, or the actor died: (re)attach off the loop
            await asyncio.to_thread(self.reload)
            return
        import ray

        try:
            stale = self._stale(await self._wait(handle.revisions.remote()))
            if stale:
                self._apply(stale, await self._wait(handle.policies.remote(list(stale))))
        except ray.exceptions.RayActorError:
            self._handle = None  # replaced, and reloaded from disk, on the next poll
            raise

    async def _wait(self, ref: Any) -> Any:
        waiting: Awaitable[Any] = asyncio.wrap_future(ref.future())
        return await asyncio.wait_for(waiting, self.call_timeout_s)

    def history(self, model: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self._call("history", model)
        return entries

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> str:
        # One actor serialises every gateway's calls: the cluster-wide lease.
        current: str = self._call("acquire_lease", name, holder, ttl_s)
        return current

    # -- changes -------------------------------------------------------------------------

    def read(self, model: str) -> tuple[TrafficPolicy | None, list[dict[str, Any]]]:
        stored, history = self._call("read", model)
        return (TrafficPolicy.model_validate(stored) if stored else None), history

    def commit(
        self,
        model: str,
        fields: dict[str, Any],
        *,
        expected_revision: int,
        operation: str,
        actor: str,
        base: TrafficPolicy | None = None,
    ) -> TrafficPolicy:
        stored = self._call(
            "commit",
            model,
            fields,
            expected_revision,
            operation,
            actor,
            base.model_dump(mode="json") if base else None,
            retry=False,
        )
        policy = TrafficPolicy.model_validate(stored)
        # Read your own write: this gateway serves the new revision before its next poll.
        cached = self._policies.get(model)
        if cached is None or cached.revision < policy.revision:
            self._policies[model] = policy
            self._publish([policy])
        return policy
