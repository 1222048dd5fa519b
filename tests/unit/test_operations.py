"""Traffic operations as pure functions, and the compare-and-set loop that applies them.

``apply_operation`` maps (operation, body, current policy, older policies) to the new
policy's fields; ``build_policy`` validates those fields as a whole. The last tests drive
the file store's ``commit``/``update``: a stale expected revision is refused, and a change
that loses a race is recomputed from the winner's policy.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import InvalidInput, RevisionConflict
from gateway.routing.operations import OPERATIONS, apply_operation, build_policy, parse_int
from gateway.routing.policy import ShadowPolicy, TrafficPolicy
from gateway.routing.store import PolicyStore

MODEL = "m"
SINGLE = TrafficPolicy(model=MODEL, revision=3, weights={1: 100})
CANARY = TrafficPolicy(model=MODEL, revision=4, weights={1: 90, 2: 10})
BLUE_GREEN = TrafficPolicy(model=MODEL, revision=5, weights={1: 100}, standby=2)
SHADOWED = TrafficPolicy(
    model=MODEL, revision=6, weights={1: 100}, shadow=ShadowPolicy(version=2, percent=25)
)


def applied(
    operation: str,
    body: dict[str, Any],
    current: TrafficPolicy,
    history: list[dict[str, Any]] | None = None,
) -> TrafficPolicy:
    fields = apply_operation(operation, body, current, history or [])
    assert "model" not in fields and "revision" not in fields, "the store assigns those"
    return build_policy(MODEL, fields, current.revision + 1)


# -- each operation --------------------------------------------------------------------


def test_set_replaces_the_weights_and_keeps_the_rest() -> None:
    policy = applied("set", {"weights": {"1": 80, "2": "20"}}, SHADOWED)
    assert policy.weights == {1: 80, 2: 20}
    assert policy.shadow == SHADOWED.shadow
    assert policy.revision == SHADOWED.revision + 1
    assert policy.kind == "canary"


def test_set_with_a_standby_makes_a_blue_green_pair() -> None:
    policy = applied("set", {"weights": {"1": 100}, "standby": 2}, SINGLE)
    assert (policy.kind, policy.standby) == ("blue-green", 2)


def test_set_without_a_standby_ends_a_blue_green_pair() -> None:
    policy = applied("set", {"weights": {"1": 50, "2": 50}}, BLUE_GREEN)
    assert policy.standby is None
    assert policy.kind == "canary"


def test_set_with_a_null_standby_clears_it() -> None:
    policy = applied("set", {"weights": {"1": 100}, "standby": None}, BLUE_GREEN)
    assert policy.standby is None


def test_set_can_forbid_explicit_versions() -> None:
    policy = applied("set", {"weights": {"1": 100}, "allow_explicit_version": False}, SINGLE)
    assert policy.allow_explicit_version is False
    kept = applied("set", {"weights": {"1": 100}}, policy)
    assert kept.allow_explicit_version is False, "set keeps what the body does not name"


def test_switch_swaps_active_and_standby() -> None:
    policy = applied("switch", {}, BLUE_GREEN)
    assert (policy.weights, policy.standby) == ({2: 100}, 1)
    back = applied("switch", {}, policy)
    assert (back.weights, back.standby) == ({1: 100}, 2)


def test_promote_sends_everything_to_one_version_and_ends_blue_green() -> None:
    assert applied("promote", {"version": 2}, CANARY).weights == {2: 100}
    policy = applied("promote", {"version": "2"}, BLUE_GREEN)
    assert (policy.weights, policy.standby) == ({2: 100}, None)


def test_rollback_returns_to_the_last_older_policy() -> None:
    history = [SINGLE.model_dump(mode="json"), CANARY.model_dump(mode="json")]
    policy = applied("rollback", {}, BLUE_GREEN, history)
    assert policy.weights == CANARY.weights
    assert policy.standby is None
    assert policy.revision == BLUE_GREEN.revision + 1, "a rollback is a new revision"


def test_shadow_mirrors_a_share_of_requests() -> None:
    policy = applied("shadow", {"version": 2, "percent": 10}, SINGLE)
    assert policy.shadow == ShadowPolicy(version=2, percent=10)
    assert policy.weights == SINGLE.weights


def test_shadow_mirrors_every_request_by_default() -> None:
    assert applied("shadow", {"version": 2}, SINGLE).shadow == ShadowPolicy(version=2, percent=100)


def test_clear_shadow_stops_mirroring() -> None:
    policy = applied("clear_shadow", {}, SHADOWED)
    assert policy.shadow is None
    assert policy.weights == SHADOWED.weights


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operations_do_not_touch_their_inputs(operation: str) -> None:
    body = {"weights": {"1": 100}, "standby": 2, "version": 2, "percent": 50}
    if operation == "fault":
        body = {"version": 2, "abort_percent": 5}
    history = [CANARY.model_dump(mode="json")]
    current = BLUE_GREEN if operation != "clear_shadow" else SHADOWED
    before = (copy.deepcopy(body), copy.deepcopy(history), current.model_dump())
    first = apply_operation(operation, body, current, history)
    assert (body, history, current.model_dump()) == before
    assert apply_operation(operation, body, current, history) == first, "a pure function"


# -- refused changes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "body", "current", "message"),
    [
        ("set", {}, SINGLE, "weights must be an object"),
        ("set", {"weights": {}}, SINGLE, "weights must be an object"),
        ("set", {"weights": [100]}, SINGLE, "weights must be an object"),
        ("set", {"weights": {"one": 100}}, SINGLE, "weights version must be an integer"),
        ("set", {"weights": {"1": 99.5}}, SINGLE, "weights[1] must be an integer"),
        ("set", {"weights": {"1": True}}, SINGLE, "weights[1] must be an integer"),
        ("set", {"weights": {"1": 100}, "standby": "x"}, SINGLE, "standby must be an integer"),
        (
            "set",
            {"weights": {"1": 100}, "allow_explicit_version": "no"},
            SINGLE,
            "allow_explicit_version must be true or false",
        ),
        ("switch", {}, CANARY, "model 'm' has no standby version to switch to"),
        ("promote", {}, SINGLE, "version must be an integer, got None"),
        ("promote", {"version": "v2"}, SINGLE, "version must be an integer, got 'v2'"),
        ("rollback", {}, SINGLE, "model 'm' has no earlier revision to roll back to"),
        ("shadow", {"percent": 5}, SINGLE, "version must be an integer"),
        ("pause", {}, SINGLE, "unknown operation 'pause' (expected one of set, switch"),
    ],
)
def test_malformed_changes_are_refused_with_a_clear_message(
    operation: str, body: dict[str, Any], current: TrafficPolicy, message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        apply_operation(operation, body, current, [])
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("operation", "body", "current", "message"),
    [
        ("set", {"weights": {"1": 90}}, SINGLE, "weights: Value error, weights must sum to 100"),
        ("set", {"weights": {"1": 110, "2": -10}}, SINGLE, "weight of version 2 is negative"),
        ("set", {"weights": {"0": 100}}, SINGLE, "version 0 is not a positive integer"),
        (
            "set",
            {"weights": {"1": 50, "2": 50}, "standby": 3},
            SINGLE,
            "blue-green needs exactly one active version",
        ),
        ("set", {"weights": {"1": 100}, "standby": 1}, SINGLE, "standby version 1 is also"),
        ("shadow", {"version": 2, "percent": 0}, SINGLE, "shadow.percent"),
        ("shadow", {"version": 2, "percent": 101}, SINGLE, "shadow.percent"),
        ("shadow", {"version": 0}, SINGLE, "shadow.version"),
    ],
)
def test_invalid_policies_are_refused_as_a_whole(
    operation: str, body: dict[str, Any], current: TrafficPolicy, message: str
) -> None:
    fields = apply_operation(operation, body, current, [])
    with pytest.raises(InvalidInput) as caught:
        build_policy(MODEL, fields, current.revision + 1)
    assert caught.value.message.startswith("invalid traffic policy for model 'm': ")
    assert message in caught.value.message


def test_parse_int_accepts_numbers_and_numeric_strings_only() -> None:
    assert parse_int("x", 3) == 3
    assert parse_int("x", "3") == 3
    for bad in (True, 1.5, None, "3.0", [3]):
        with pytest.raises(InvalidInput, match="x must be an integer"):
            parse_int("x", bad)


# -- compare-and-set (the file store) --------------------------------------------------


def test_commit_refuses_a_stale_expected_revision(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    fields = {"weights": {1: 100}}
    first = store.commit(MODEL, fields, expected_revision=0, operation="set", actor="t")
    assert first.revision == 1
    with pytest.raises(RevisionConflict, match="model 'm' is at revision 1, not 0"):
        store.commit(MODEL, fields, expected_revision=0, operation="set", actor="t")
    stored, history = store.read(MODEL)
    assert stored == first
    assert history == []


def test_commit_records_the_default_policy_as_the_old_one(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    default = TrafficPolicy(model=MODEL, weights={2: 100})
    store.commit(
        MODEL, {"weights": {1: 100}}, expected_revision=0, operation="set", actor="t", base=default
    )
    _, history = store.read(MODEL)
    assert history == [default.model_dump(mode="json")], "rollback can return to it"
    (entry,) = store.history(MODEL)
    assert entry["old"]["weights"] == {"2": 100}
    assert entry["new"]["revision"] == 1


def test_update_recomputes_a_change_that_lost_a_race(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    other = PolicyStore(tmp_path)  # a second gateway process on the same machine
    store.commit(MODEL, {"weights": {1: 100}}, expected_revision=0, operation="set", actor="t")
    seen: list[int] = []

    def shadow_after_a_rival(current: TrafficPolicy | None, history: list[Any]) -> Any:
        assert current is not None
        seen.append(current.revision)
        if len(seen) == 1:  # the rival commits between this read and this commit
            other.commit(
                MODEL,
                {"weights": {1: 50, 2: 50}},
                expected_revision=current.revision,
                operation="set",
                actor="rival",
            )
        return apply_operation("shadow", {"version": 3}, current, history)

    policy = store.update(MODEL, "shadow", shadow_after_a_rival, actor="t")
    assert seen == [1, 2], "the change was computed again from the rival's revision"
    assert policy.revision == 3
    assert policy.weights == {1: 50, 2: 50}, "the rival's change is kept"
    assert policy.shadow == ShadowPolicy(version=3, percent=100)
    assert store.get(MODEL) == policy


def test_update_with_a_stale_if_revision_is_refused(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    store.commit(MODEL, {"weights": {1: 100}}, expected_revision=0, operation="set", actor="t")

    def change(current: TrafficPolicy | None, history: list[Any]) -> dict[str, Any]:
        raise AssertionError("a stale if_revision is refused before the change is computed")

    with pytest.raises(RevisionConflict, match="model 'm' is at revision 1, not 0"):
        store.update(MODEL, "set", change, actor="t", if_revision=0)


def test_fault_sets_and_clears_one_version_and_refuses_unknown_fields() -> None:
    faulty = applied("fault", {"version": 2, "abort_percent": 5, "delay_ms": 30}, CANARY)
    assert faulty.faults[2].abort_percent == 5 and faulty.faults[2].delay_ms == 30
    assert faulty.weights == CANARY.weights
    assert applied("fault", {"version": 2, "clear": True}, faulty).faults == {}
    with pytest.raises(InvalidInput, match="unknown fault field"):
        apply_operation("fault", {"version": 2, "abort": 5}, CANARY, [])


def test_a_manual_move_ends_an_automated_rollout() -> None:
    rolling = CANARY.model_copy(update={"rollout": {"phase": "progressing", "canary": 2}})
    moved = apply_operation("set", {"weights": {"1": 100}}, rolling, [])
    assert moved["rollout"]["phase"] == "aborted"
    assert "manual 'set'" in moved["rollout"]["reason"]
    faulted = apply_operation("fault", {"version": 2, "abort_percent": 1}, rolling, [])
    assert faulted["rollout"]["phase"] == "progressing"  # faults do not move traffic
