"""A real Prometheus server (Debian's ``prometheus``) scrapes a real gateway and its real
sidecar on loopback during a 80/20 canary split; the request counts per version read back
through Prometheus's query API match what the clients were answered."""

from __future__ import annotations

import collections
import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from gateways import GatewayThread, add_sub_request, local_settings, model_infer_stub
from monitor_harness import PROMETHEUS, query, run_prometheus, run_sidecar

MODEL = "add_sub"
HTTP_REQUESTS = 400
GRPC_REQUESTS = 100
EVENTUALLY_S = 45.0
A = [1.0, 2.0, 3.0, 4.0]

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="prometheus missing (apt-get install prometheus)"
)


def send_traffic(gateway: GatewayThread) -> collections.Counter[tuple[str, str]]:
    """(protocol, version) of every answer."""
    served: collections.Counter[tuple[str, str]] = collections.Counter()
    tensors = [{"name": n, "datatype": "FP32", "shape": [1, 4], "data": A} for n in ("a", "b")]
    body = json.dumps({"inputs": tensors}).encode()
    for _ in range(HTTP_REQUESTS):
        request = urllib.request.Request(
            f"http://{gateway.http_url}/v2/models/{MODEL}/infer", data=body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            served[("http", json.loads(response.read())["model_version"])] += 1
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = model_infer_stub(channel)
        request = add_sub_request(MODEL, A, A)
        for _ in range(GRPC_REQUESTS):
            served[("grpc", stub(request, timeout=10).model_version)] += 1
    return served


def eventually_equal(base: str, promql: str, expected: float) -> None:
    deadline = time.monotonic() + EVENTUALLY_S
    got = None
    while time.monotonic() < deadline:
        got = query(base, promql)
        if got == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql} = {got}, expected {expected}")


def test_prometheus_reads_requests_per_version_after_a_canary_split(
    repository: Path, tmp_path: Path
) -> None:
    with run_sidecar(tmp_path, "window_s: 1\n") as (sidecar_url, socket_file):
        gateway = GatewayThread(
            local_settings(repository, monitor=True, monitor_address=f"unix://{socket_file}")
        )
        try:
            gateway.call(
                gateway.gateway.admin.apply(MODEL, "set", {"weights": {"1": 80, "2": 20}}, "t")
            )
            gateway_metrics = f"http://{gateway.http_url}/metrics"
            with run_prometheus(
                sidecar_url, tmp_path, {"turnout-gateway": gateway_metrics}
            ) as base:
                served = send_traffic(gateway)
                per_version = collections.Counter[str]()
                for (_, version), count in served.items():
                    per_version[version] += count
                assert sum(per_version.values()) == HTTP_REQUESTS + GRPC_REQUESTS
                # A weighted draw: 20% +- 8 points (the binomial sd is 1.8 points).
                assert abs(per_version["2"] / sum(per_version.values()) - 0.2) < 0.08
                for (protocol, version), count in served.items():
                    eventually_equal(
                        base,
                        f'sum(turnout_requests_total{{job="turnout-gateway",model="{MODEL}",'
                        f'version="{version}",protocol="{protocol}",status="200"}})',
                        count,
                    )
                for version, count in per_version.items():
                    arm = "primary" if version == "1" else "canary"
                    eventually_equal(
                        base,
                        f'sum(turnout_request_duration_seconds_count{{model="{MODEL}",'
                        f'version="{version}",arm="{arm}"}})',
                        count,
                    )
                    # The sidecar saw the same requests through their records.
                    eventually_equal(
                        base,
                        f'sum(turnout_monitor_requests_total{{job="turnout-monitor",'
                        f'model="{MODEL}",version="{version}"}})',
                        count,
                    )
                eventually_equal(base, f'turnout_policy_revision{{model="{MODEL}"}}', 1)
                eventually_equal(base, 'up{job="turnout-gateway"}', 1)
                eventually_equal(base, 'up{job="turnout-monitor"}', 1)
        finally:
            gateway.stop()
