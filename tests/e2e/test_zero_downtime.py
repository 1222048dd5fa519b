"""Zero downtime: traffic-policy changes of every kind while requests keep flowing.

The check is ``python -m bench.rollout``'s, imported from it so the benchmark and the test
share one implementation, run shorter (40 changes in 8 s at concurrency 8): every response
is 200/OK, and every version it reports is one the policy at its reported revision sends
traffic to. The local backend runs in-process; the Ray backend as ``turnout serve`` in a
process of its own, as the benchmark runs it: a Ray driver that loses its raylet ends its
process with status 1 and no word on stdout, which in-process ended the whole test run
after this test (seen about once in three full runs, never with the e2e tests alone).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from gateways import GatewayThread, local_settings

from bench.rollout import RolloutResult, admin_token, bench_backend, build_repository, run_rollout

pytestmark = pytest.mark.slow

CHANGES = 40
DURATION_S = 8.0
CONCURRENCY = 8


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_policy_changes_under_load_fail_nothing(backend: str, tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "models")
    if backend == "ray":
        result = _in_a_process(tmp_path)
    else:
        server = GatewayThread(local_settings(repository, backend=backend))
        try:
            result = run_rollout(
                backend,
                server.http_url,
                server.grpc_url,
                admin_token(server.gateway.settings.state_dir),
                duration=DURATION_S,
                changes=CHANGES,
                concurrency=CONCURRENCY,
            )
        finally:
            server.stop()
    assert not result.error, result.error
    problems = "\n".join(result.problems())
    assert result.failures == 0, problems
    assert result.violations == 0, problems
    assert result.stale == 0, problems
    assert result.changes_applied == CHANGES, problems
    assert result.passed, problems
    # The load saw the changes happen: many revisions, both versions, both transports.
    assert result.revisions_seen > CHANGES // 2
    assert set(result.versions_served) == {"1", "2"}
    assert result.http_requests > 0 and result.grpc_requests > 0


def _in_a_process(work: Path) -> RolloutResult:
    args = argparse.Namespace(duration=DURATION_S, changes=CHANGES, concurrency=CONCURRENCY, seed=0)
    return bench_backend("ray", work, args)
