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
    """Chooses the version per request: explicit version, sticky key, or weighted draw."""

    def __init__(self, store: BasePolicyStore, seed: int | None = None) -> None:
        self.store = store
        self._rng = random.Random(seed)

    def policy_for(self, model: str, ready: list[int]) -> TrafficPolicy:
        return self.store.get(model) or default_policy(model, ready)

    def select(self, model: str, request: InferRequest, ready: list[int]) -> Decision:
        policy = self.policy_for(model, ready)
        if request.model_version:
            if not policy.allow_explicit_version:
                raise PermissionDenied(
                    f"model '{model}' does not allow requests to name a version "
                    f"(policy revision {policy.revision})"
                )
            return Decision(
                parse_version(model, request.model_version), "explicit", policy.revision
            )
        if request.routing_key:
            point = key_point(model, request.routing_key)
        else:
            point = self._rng.random() * 100
        return route(policy, point)

    def shadow_draw(self, model: str, ready: list[int]) -> int | None:
        """The shadow version for this request, or None when it is not mirrored."""
        policy = self.policy_for(model, ready)
        shadow = policy.shadow
        if shadow is None or self._rng.random() * 100 >= shadow.percent:
            return None
        return shadow.version
