"""The data plane's version selector backed by the traffic policy store."""

from __future__ import annotations

import random

from gateway.errors import PermissionDenied
from gateway.repository import parse_version
from gateway.routing.policy import Decision, TrafficPolicy, key_point, route
from gateway.routing.store import BasePolicyStore
from gateway.types import InferRequest

__all__ = ["PolicyRouter", "default_policy"]


def default_policy(model: str, ready: list[int]) -> TrafficPolicy:
    """Before any change is made, the highest loaded version takes all traffic (revision 0)."""
    return TrafficPolicy(model=model, weights={ready[-1]: 100})


class PolicyRouter:
    """Chooses the version per request: explicit version, sticky key, or weighted draw; and
    whether the request is mirrored to the shadow version. One ``select`` per request."""

    def __init__(self, store: BasePolicyStore, seed: int | None = None) -> None:
        self.store = store
        self._rng = random.Random(seed)
        self._defaults: dict[str, TrafficPolicy] = {}
        """The default policy of each model without a stored one, for its highest version."""

    def policy_for(self, model: str, ready: list[int]) -> TrafficPolicy:
        policy = self.store.get(model)
        if policy is not None:
            return policy
        default = self._defaults.get(model)
        if default is None or default.active_versions[-1] != ready[-1]:
            default = self._defaults[model] = default_policy(model, ready)
        return default

    def select(self, model: str, request: InferRequest, ready: list[int]) -> Decision:
        policy = self.policy_for(model, ready)
        if request.model_version:
            if not policy.allow_explicit_version:
                raise PermissionDenied(
                    f"model '{model}' does not allow requests to name a version "
                    f"(policy revision {policy.revision})"
                )
            version = parse_version(model, request.model_version)
            fault = policy.faults.get(version) if policy.faults else None
            return Decision(version, "explicit", policy.revision, self._shadow(policy), fault)
        if request.routing_key:
            point = key_point(model, request.routing_key)
        else:
            point = self._rng.random() * 100
        return route(policy, point, self._shadow(policy))

    def _shadow(self, policy: TrafficPolicy) -> int | None:
        """The shadow version for this request, or None when it is not mirrored."""
        shadow = policy.shadow
        if shadow is None or self._rng.random() * 100 >= shadow.percent:
            return None
        return shadow.version
