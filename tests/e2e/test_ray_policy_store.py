"""Traffic policies shared through the detached Ray actor, on one local Ray.

Two ``RayPolicyStore`` clients stand for two gateway processes of one cluster: a change
made through one reaches the other within a second, a stale compare-and-set is refused,
and the actor keeps the state directory's layout on disk, so a fresh actor (after
``ray.kill``) serves the same revision. Last, a real gateway with the Ray backend applies
a change through its REST admin API and a second client reads it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateways import GatewayThread, local_settings
from model_zoo import add_sub, write_repository

from gateway.backends.local import LocalBackend
from gateway.errors import InvalidInput, RevisionConflict
from gateway.routing.operations import apply_operation
from gateway.routing.policy import TrafficPolicy
from gateway.routing.ray_store import ACTOR_NAME, RayPolicyStore
from gateway.routing.store import PolicyStore
from gateway.server import build_policy_store
from gateway.settings import SettingsError, load_settings

pytestmark = pytest.mark.slow

NAMESPACE = "turnout-policy-test"
MODEL = "m"
TOKEN = "policy-store-test-token"


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture
def actor_name(ray_local: None) -> Iterator[str]:
    """A private actor per test, killed afterwards."""
    import ray

    name = f"policies-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(ValueError):  # never created, or already killed
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))


def client(state_dir: Path, name: str, poll_interval_s: float = 0.1) -> RayPolicyStore:
    store = RayPolicyStore(state_dir, poll_interval_s, namespace=NAMESPACE, name=name)
    store.connect()
    return store


def _change(op: str, body: dict[str, Any]) -> Any:
    def change(current: TrafficPolicy | None, history: list[dict[str, Any]]) -> dict[str, Any]:
        base = current or TrafficPolicy(model=MODEL, weights={1: 100})
        return apply_operation(op, body, base, history)

    return change


async def _until(condition: Any, within_s: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, f"not seen within {within_s} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# -- the settings that pick a store ------------------------------------------------------


def test_policy_store_setting_picks_the_store(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, backend="local")
    assert isinstance(build_policy_store(settings, LocalBackend()), PolicyStore)
    with pytest.raises(SettingsError, match="policy_store: Value error, 'ray' needs backend"):
        load_settings(state_dir=tmp_path, backend="local", policy_store="ray")
    ray_settings = load_settings(state_dir=tmp_path, backend="ray", policy_store="file")
    assert isinstance(build_policy_store(ray_settings, LocalBackend()), PolicyStore)


# -- two gateways, one actor -------------------------------------------------------------


async def test_two_gateways_see_each_others_changes_within_a_second(
    actor_name: str, tmp_path: Path
) -> None:
    first, second = [await asyncio.to_thread(client, tmp_path, actor_name) for _ in range(2)]
    heard: list[int] = []
    second.subscribe(lambda policy: heard.append(policy.revision))
    watchers = [asyncio.create_task(store.watch()) for store in (first, second)]
    try:
        canary = await asyncio.to_thread(
            first.update, MODEL, "set", _change("set", {"weights": {"1": 90, "2": 10}}), actor="a"
        )
        assert canary.revision == 1
        assert first.get(MODEL) == canary, "the writer serves its own change at once"
        await _until(lambda: second.get(MODEL) == canary, within_s=1.0)

        promoted = await asyncio.to_thread(
            second.update, MODEL, "promote", _change("promote", {"version": 2}), actor="b"
        )
        assert promoted.revision == 2
        await _until(lambda: first.get(MODEL) == promoted, within_s=1.0)
        assert heard == [1, 2]
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


def test_a_stale_commit_raises_revision_conflict(actor_name: str, tmp_path: Path) -> None:
    first, second = client(tmp_path, actor_name), client(tmp_path, actor_name)
    fields = {"weights": {1: 100}}
    first.commit(MODEL, fields, expected_revision=0, operation="set", actor="a")
    with pytest.raises(RevisionConflict) as conflict:
        second.commit(MODEL, fields, expected_revision=0, operation="set", actor="b")
    assert conflict.value.message == "model 'm' is at revision 1, not 0"
    with pytest.raises(RevisionConflict, match="is at revision 1, not 0"):
        second.update(
            MODEL, "set", _change("set", {"weights": {"1": 100}}), actor="b", if_revision=0
        )
    with pytest.raises(InvalidInput, match="weights must sum to 100"):
        second.commit(MODEL, {"weights": {1: 50}}, expected_revision=1, operation="set", actor="b")
    stored, history = second.read(MODEL)
    assert stored is not None and stored.revision == 1
    assert history == []


def test_the_actor_persists_to_the_state_dir(actor_name: str, tmp_path: Path) -> None:
    import ray

    store = client(tmp_path, actor_name)
    store.update(MODEL, "set", _change("set", {"weights": {"1": 80, "2": 20}}), actor="a")
    policy = store.update(MODEL, "shadow", _change("shadow", {"version": 3}), actor="a")
    # The state directory's layout, as the file store writes it.
    document = json.loads((tmp_path / "traffic" / f"{MODEL}.json").read_text())
    assert document["policy"]["revision"] == policy.revision == 2
    assert [entry["revision"] for entry in PolicyStore(tmp_path).history(MODEL)] == [1, 2]

    killed = ray.get_actor(actor_name, namespace=NAMESPACE)
    ray.kill(killed)
    fresh = client(tmp_path, actor_name)  # creates a new actor, which reads the files
    assert fresh.get(MODEL) == policy
    assert [entry["revision"] for entry in fresh.history(MODEL)] == [1, 2]
    # The old client's handle died with the actor: it attaches to the new one.
    assert store.read(MODEL)[0] == policy
    replacement = ray.get_actor(actor_name, namespace=NAMESPACE)
    assert replacement._actor_id != killed._actor_id
    rolled_back = store.update(MODEL, "rollback", _change("rollback", {}), actor="a")
    assert rolled_back.revision == 3
    assert rolled_back.shadow is None


# -- a real gateway on the Ray backend ---------------------------------------------------


def test_the_gateway_on_ray_shares_policies_through_the_actor(
    ray_local: None, tmp_path: Path
) -> None:
    import ray

    repository = write_repository(
        tmp_path / "models", {"add_sub": (add_sub, {"num_cpus": 0}, [1, 2])}
    )
    settings = local_settings(
        repository,
        backend="ray",
        ray_namespace=NAMESPACE,
        policy_poll_interval_s=0.1,
        admin_tokens=[{"name": "ops", "token": TOKEN}],
    )
    server = GatewayThread(settings)
    try:
        assert isinstance(server.gateway.store, RayPolicyStore)
        status = _admin(server, "POST", {"op": "set", "weights": {"1": 70, "2": 30}})
        assert status["revision"] == 1

        other = client(tmp_path / "elsewhere", ACTOR_NAME)  # a second gateway
        seen = other.get("add_sub")
        assert seen is not None and (seen.revision, seen.weights) == (1, {1: 70, 2: 30})
        assert (settings.state_dir / "traffic" / "add_sub.json").exists(), "kept by the actor"

        other.update("add_sub", "promote", _change("promote", {"version": 2}), actor="other")
        started = time.monotonic()
        while _admin(server, "GET")["revision"] != 2:
            assert time.monotonic() - started < 1.0, "the gateway did not see the change"
            time.sleep(0.02)
        assert _admin(server, "GET")["weights"] == {"2": 100}
    finally:
        server.stop()
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE))


def _admin(server: GatewayThread, method: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"http://{server.http_url}/admin/v1/models/add_sub/traffic",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_one_lease_holder_across_gateways(actor_name: str, tmp_path: Path) -> None:
    """The rollout controller's lease through the actor: one holder at a time across every
    gateway of the cluster; it renews its own; another takes it only once it lapsed."""
    first, second = client(tmp_path, actor_name), client(tmp_path, actor_name)
    assert first.acquire_lease("rollouts", "gateway-a", ttl_s=0.5) == "gateway-a"
    assert second.acquire_lease("rollouts", "gateway-b", ttl_s=0.5) == "gateway-a"
    assert first.acquire_lease("rollouts", "gateway-a", ttl_s=0.5) == "gateway-a"  # renewed
    assert second.acquire_lease("other", "gateway-b", ttl_s=0.5) == "gateway-b"  # by name
    time.sleep(0.6)  # gateway-a stopped renewing
    assert second.acquire_lease("rollouts", "gateway-b", ttl_s=5) == "gateway-b"
    assert first.acquire_lease("rollouts", "gateway-a", ttl_s=5) == "gateway-b"
