"""Traffic policies as pure functions: validation, the weighted draw, sticky keys, and the
promise that raising a canary's weight only ever moves keys *into* it.

Everything here is seeded or a pure function of a key, so the statistical checks are exact
and repeatable. The router is driven with real ``InferRequest`` objects; its store is a
stand-in holding one policy, because the router only ever reads the current policy.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.errors import PermissionDenied
from gateway.routing.policy import ShadowPolicy, TrafficPolicy, key_point, route
from gateway.routing.router import PolicyRouter, default_policy
from gateway.types import InferInput, InferRequest

MODEL = "add_sub"
KEYS = [f"user-{i}" for i in range(10_000)]


class OnePolicyStore:
    """Stands in for the policy store: holds one model's current policy."""

    def __init__(self, policy: TrafficPolicy | None) -> None:
        self.policy = policy

    def get(self, model: str) -> TrafficPolicy | None:
        return self.policy if self.policy is not None and model == self.policy.model else None


def router_for(policy: TrafficPolicy | None, seed: int = 0) -> PolicyRouter:
    return PolicyRouter(OnePolicyStore(policy), seed=seed)  # type: ignore[arg-type]


def request(routing_key: str | None = None, version: str = "") -> InferRequest:
    data = np.arange(4, dtype=np.float32).reshape(1, 4)
    return InferRequest(
        model_name=MODEL,
        inputs=[InferInput("a", "FP32", (1, 4), data), InferInput("b", "FP32", (1, 4), data)],
        model_version=version,
        routing_key=routing_key,
    )


def canary(weight: int, revision: int = 1) -> TrafficPolicy:
    """Version 1 stable, version 2 the canary at ``weight`` percent."""
    return TrafficPolicy(model=MODEL, revision=revision, weights={1: 100 - weight, 2: weight})


def sticky_versions(policy: TrafficPolicy, keys: list[str]) -> list[int]:
    return [route(policy, key_point(policy.model, key)).version for key in keys]


# -- validation ------------------------------------------------------------------------------


def bad(case_id: str, message: str, **fields: Any) -> Any:
    return pytest.param(fields, message, id=case_id)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        bad("sum-90", "weights must sum to 100, they sum to 90", weights={1: 60, 2: 30}),
        bad("sum-110", "weights must sum to 100, they sum to 110", weights={1: 60, 2: 50}),
        bad("negative", "weight of version 2 is negative (-10)", weights={1: 110, 2: -10}),
        bad("version-0", "version 0 is not a positive integer", weights={0: 100}),
        bad("version-negative", "version -3 is not a positive integer", weights={-3: 100}),
        bad("empty", "weights must name at least one version", weights={}),
        bad("standby-is-active", "standby version 2 is also the active one",
            weights={2: 100}, standby=2),
        bad("blue-green-two-active", "blue-green needs exactly one active version at weight 100",
            weights={1: 50, 2: 50}, standby=3),
        bad("standby-0", "standby\n  Input should be greater than or equal to 1",
            weights={1: 100}, standby=0),
        bad("negative-revision", "revision", weights={1: 100}, revision=-1),
        bad("shadow-v0", "shadow.version", weights={1: 100}, shadow={"version": 0, "percent": 10}),
        bad("shadow-0%", "shadow.percent", weights={1: 100}, shadow={"version": 2, "percent": 0}),
        bad("shadow-101%", "shadow.percent", weights={1: 100},
            shadow={"version": 2, "percent": 101}),
        bad("unknown-field", "colour", weights={1: 100}, colour="blue"),
    ],
)  # fmt: skip
def test_invalid_policies_are_refused_with_a_clear_message(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        TrafficPolicy(model=MODEL, **fields)
    assert message in str(info.value)


def test_policies_are_frozen() -> None:
    policy = canary(10)
    with pytest.raises(ValidationError):
        policy.revision = 5  # type: ignore[misc]


def test_zero_weights_are_dropped_and_weights_are_ordered_by_version() -> None:
    policy = TrafficPolicy(model=MODEL, weights={3: 20, 1: 0, 2: 80})
    assert list(policy.weights) == [2, 3]
    assert policy.active_versions == [2, 3]
    assert 1 not in policy.versions_in_use()  # so version 1 may be unloaded


@pytest.mark.parametrize(
    ("fields", "kind", "primary", "in_use"),
    [
        ({"weights": {2: 100}}, "single", 2, {2}),
        ({"weights": {1: 100, 2: 0}}, "single", 1, {1}),
        ({"weights": {1: 90, 2: 10}}, "canary", 1, {1, 2}),
        ({"weights": {1: 10, 2: 90}}, "canary", 2, {1, 2}),
        ({"weights": {1: 50, 2: 50}}, "canary", 1, {1, 2}),  # ties: the lower version
        ({"weights": {1: 30, 2: 40, 3: 30}}, "canary", 2, {1, 2, 3}),
        ({"weights": {2: 100}, "standby": 1}, "blue-green", 2, {1, 2}),
        ({"weights": {1: 100}, "shadow": {"version": 3, "percent": 5}}, "single", 1, {1, 3}),
        (
            {"weights": {1: 100}, "standby": 2, "shadow": {"version": 3, "percent": 50}},
            "blue-green",
            1,
            {1, 2, 3},
        ),
    ],
)
def test_kind_primary_and_versions_in_use(
    fields: dict[str, Any], kind: str, primary: int, in_use: set[int]
) -> None:
    policy = TrafficPolicy(model=MODEL, **fields)
    assert policy.kind == kind
    assert policy.primary == primary
    assert policy.versions_in_use() == in_use
    assert policy.public()["kind"] == kind


def test_public_form_is_json_ready() -> None:
    policy = TrafficPolicy(
        model=MODEL,
        revision=7,
        weights={2: 100},
        standby=1,
        allow_explicit_version=False,
        shadow=ShadowPolicy(version=1, percent=25),
    )
    assert policy.public() == {
        "model": MODEL,
        "revision": 7,
        "kind": "blue-green",
        "weights": {"2": 100},
        "standby": 1,
        "allow_explicit_version": False,
        "shadow": {"version": 1, "percent": 25.0},
        "faults": {},
        "rollout": None,
        "experiment": None,
    }
    assert TrafficPolicy.model_validate(policy.model_dump(mode="json")) == policy


# -- the weighted draw -----------------------------------------------------------------------


def test_route_gives_each_version_its_range() -> None:
    policy = TrafficPolicy(model=MODEL, revision=4, weights={1: 30, 2: 50, 3: 20})
    assert route(policy, 0.0).version == 1
    assert route(policy, 29.999).version == 1
    assert route(policy, 30.0).version == 2
    assert route(policy, 79.999).version == 2
    assert route(policy, 80.0).version == 3
    assert route(policy, 99.999).version == 3
    decision = route(policy, 50.0)
    assert (decision.arm, decision.revision) == ("primary", 4)
    assert route(policy, 10.0).arm == "canary"


def test_seeded_90_10_split_is_within_one_point_of_ten_percent() -> None:
    policy = canary(10)
    draws = random.Random(20240611)
    counts = Counter(route(policy, draws.random() * 100).version for _ in range(20_000))
    assert set(counts) == {1, 2}
    assert abs(counts[2] / 20_000 - 0.10) < 0.01, counts


def test_router_without_key_draws_the_weights() -> None:
    router = router_for(canary(10), seed=7)
    decisions = [router.select(MODEL, request(), [1, 2]) for _ in range(20_000)]
    share = sum(d.version == 2 for d in decisions) / len(decisions)
    assert abs(share - 0.10) < 0.01, share
    assert {d.arm for d in decisions if d.version == 2} == {"canary"}
    assert {d.arm for d in decisions if d.version == 1} == {"primary"}
    assert {d.revision for d in decisions} == {1}


def test_the_same_seed_gives_the_same_draws() -> None:
    first, second = router_for(canary(30), seed=3), router_for(canary(30), seed=3)
    assert [first.select(MODEL, request(), [1, 2]).version for _ in range(500)] == [
        second.select(MODEL, request(), [1, 2]).version for _ in range(500)
    ]


# -- sticky keys -----------------------------------------------------------------------------


def test_a_key_always_gets_the_same_version() -> None:
    """The route is a pure function of the key's point, so repeating a key cannot change it;
    through two routers (two gateways) with different seeds, interleaved with unkeyed requests
    that consume the random draws, each of 1,000 keys keeps one version."""
    policy = canary(50)
    keys = KEYS[:1_000]
    expected = sticky_versions(policy, keys)
    assert set(expected) == {1, 2}
    for _ in range(50):
        assert sticky_versions(policy, keys) == expected
    routers = [router_for(policy, seed=1), router_for(policy, seed=2)]
    for _ in range(5):
        for router in routers:
            for key, version in zip(keys, expected, strict=True):
                router.select(MODEL, request(), [1, 2])
                decision = router.select(MODEL, request(routing_key=key), [1, 2])
                assert decision.version == version, key


def test_key_points_are_spread_over_the_range_and_depend_on_the_model() -> None:
    points = [key_point(MODEL, key) for key in KEYS]
    assert all(0 <= p < 100 for p in points)
    deciles = Counter(int(p // 10) for p in points)
    assert all(900 < deciles[d] < 1_100 for d in range(10)), deciles
    assert key_point(MODEL, "user-1") == key_point(MODEL, "user-1")
    assert key_point(MODEL, "user-1") != key_point("mlp", "user-1")


def test_raising_the_canary_moves_keys_only_into_it() -> None:
    before = sticky_versions(canary(10), KEYS)
    after = sticky_versions(canary(25), KEYS)
    moved_out = [k for k, b, a in zip(KEYS, before, after, strict=True) if b == 2 and a == 1]
    moved_in = [k for k, b, a in zip(KEYS, before, after, strict=True) if b == 1 and a == 2]
    assert moved_out == []
    assert abs(len(moved_in) / len(KEYS) - 0.15) < 0.015, len(moved_in)
    assert abs(after.count(2) / len(KEYS) - 0.25) < 0.015


@settings(max_examples=300, deadline=None)
@given(
    weights=st.tuples(st.integers(0, 100), st.integers(0, 100)).map(sorted),
    model=st.text(min_size=1, max_size=20),
    keys=st.lists(st.text(max_size=30), min_size=1, max_size=50),
)
def test_growing_version_2_never_takes_a_key_away_from_it(
    weights: list[int], model: str, keys: list[str]
) -> None:
    low, high = weights
    before = TrafficPolicy(model=model, weights={1: 100 - low, 2: low})
    after = TrafficPolicy(model=model, weights={1: 100 - high, 2: high})
    for key in keys:
        point = key_point(model, key)
        if route(before, point).version == 2:
            assert route(after, point).version == 2, (key, low, high)


@settings(max_examples=300, deadline=None)
@given(low=st.integers(0, 100), high=st.integers(0, 100), point=st.floats(0, 100, exclude_max=True))
def test_growing_version_2_keeps_every_point_it_had(low: int, high: int, point: float) -> None:
    low, high = sorted((low, high))
    if route(canary(low), point).version == 2:
        assert route(canary(high), point).version == 2, (point, low, high)


# -- explicit versions, defaults and shadows -------------------------------------------------


def test_explicit_version_wins_over_the_weights_and_the_key() -> None:
    router = router_for(canary(10, revision=3))
    decision = router.select(MODEL, request(routing_key="user-1", version="2"), [1, 2])
    assert (decision.version, decision.arm, decision.revision) == (2, "explicit", 3)


def test_explicit_version_refused_when_the_policy_forbids_it() -> None:
    policy = TrafficPolicy(model=MODEL, revision=5, weights={1: 100}, allow_explicit_version=False)
    with pytest.raises(PermissionDenied) as info:
        router_for(policy).select(MODEL, request(version="2"), [1, 2])
    assert info.value.message == (
        "model 'add_sub' does not allow requests to name a version (policy revision 5)"
    )


def test_without_a_stored_policy_the_highest_loaded_version_serves_at_revision_0() -> None:
    assert default_policy(MODEL, [1, 2, 5]) == TrafficPolicy(model=MODEL, weights={5: 100})
    decision = router_for(None).select(MODEL, request(), [1, 2])
    assert (decision.version, decision.arm, decision.revision) == (2, "primary", 0)


def test_shadow_draws_follow_the_shadow_percent() -> None:
    def mirrored(policy: TrafficPolicy) -> list[int | None]:
        router = router_for(policy, seed=11)
        return [router.select(MODEL, request(), [1, 2]).shadow for _ in range(20_000)]

    assert set(mirrored(TrafficPolicy(model=MODEL, weights={2: 100}))) == {None}
    full = TrafficPolicy(model=MODEL, weights={2: 100}, shadow=ShadowPolicy(version=1, percent=100))
    assert set(mirrored(full)) == {1}
    tenth = TrafficPolicy(model=MODEL, weights={2: 100}, shadow=ShadowPolicy(version=1, percent=10))
    draws = mirrored(tenth)
    assert set(draws) == {1, None}
    assert abs(draws.count(1) / len(draws) - 0.10) < 0.01


def test_derived_fields_are_computed_once_per_policy_object() -> None:
    policy = canary(25, revision=7)
    assert policy.edges == [75.0, 100.0]
    assert policy.active_versions is policy.active_versions
    assert policy.edges is policy.edges
    assert route(policy, 74.9).version == 1 and route(policy, 75.0).version == 2


def test_without_a_stored_policy_one_default_is_kept_per_highest_version() -> None:
    router = router_for(None)
    first = router.policy_for(MODEL, [1, 2])
    assert router.policy_for(MODEL, [1, 2]) is first
    router.select(MODEL, request(), [1, 2])
    assert router.policy_for(MODEL, [1, 2]) is first
    assert router.policy_for(MODEL, [1, 2, 3]).weights == {3: 100}


def test_one_select_decides_the_version_and_the_shadow() -> None:
    shadowed = TrafficPolicy(
        model=MODEL, weights={2: 100}, shadow=ShadowPolicy(version=1, percent=100)
    )
    decision = router_for(shadowed).select(MODEL, request(), [1, 2])
    assert (decision.version, decision.shadow) == (2, 1)
    explicit = router_for(shadowed).select(MODEL, request(version="2"), [1, 2])
    assert (explicit.arm, explicit.shadow) == ("explicit", 1)
