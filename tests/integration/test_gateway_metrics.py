"""The gateway's own /metrics: counted per model, version, arm, protocol and status over real
HTTP and gRPC requests, on the HTTP port and on a separate port, and clean for promtool."""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from gateways import PROMTOOL, GatewayThread, add_sub_request, local_settings, model_infer_stub
from prometheus_client.parser import text_string_to_metric_families

from gateway.metadata import statistics

MODEL = "add_sub"
A = [1.0, 2.0, 3.0, 4.0]


@pytest.fixture(scope="module")
def gateway(repository: Path) -> Iterator[GatewayThread]:
    with tempfile.TemporaryDirectory(prefix="tgm-") as tmp:
        # Records go to a socket nobody reads: sends fail and are counted as unsent.
        server = GatewayThread(
            local_settings(
                repository,
                metrics_port=0,
                monitor=True,
                monitor_address=f"unix://{tmp}/absent.sock",
            )
        )
        server.call(server.gateway.admin.apply(MODEL, "set", {"weights": {"1": 0, "2": 100}}, "t"))
        yield server
        server.stop()


def post(gateway: GatewayThread, path: str, body: bytes) -> int:
    request = urllib.request.Request(f"http://{gateway.http_url}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def infer_body(inputs: tuple[str, ...] = ("a", "b")) -> bytes:
    tensors = [{"name": n, "datatype": "FP32", "shape": [1, 4], "data": A} for n in inputs]
    return json.dumps({"inputs": tensors}).encode()


def grpc_infer(gateway: GatewayThread) -> None:
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        model_infer_stub(channel)(add_sub_request(MODEL, A, A), timeout=10)


def scrape(url: str, accept: str = "") -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_are_counted_by_version_arm_protocol_and_status(gateway: GatewayThread) -> None:
    for _ in range(5):
        assert post(gateway, f"/v2/models/{MODEL}/infer", infer_body()) == 200
    for _ in range(3):
        grpc_infer(gateway)
    assert post(gateway, f"/v2/models/{MODEL}/versions/1/infer", infer_body()) == 200
    assert post(gateway, f"/v2/models/{MODEL}/infer", infer_body(("a",))) == 400  # routed
    assert post(gateway, f"/v2/models/{MODEL}/infer", b"{not json") == 400  # refused early
    assert post(gateway, "/v2/models/nope/infer", infer_body()) == 404
    assert post(gateway, "/v2/models/other-nope/infer", b"{") == 400
    found = samples(scrape(f"http://{gateway.http_url}/metrics")[0])
    requests = "turnout_requests_total"
    common = {"model": MODEL, "version": "2", "arm": "primary"}
    assert value(found, requests, **common, protocol="http", status="200") == 5
    assert value(found, requests, **common, protocol="grpc", status="200") == 3
    explicit = {"model": MODEL, "version": "1", "arm": "explicit", "protocol": "http"}
    assert value(found, requests, **explicit, status="200") == 1
    assert value(found, requests, **common, protocol="http", status="400") == 1
    early = {"model": MODEL, "version": "", "arm": "", "protocol": "http", "status": "400"}
    assert value(found, requests, **early) == 1
    # Names that are not served share one series: clients cannot grow the label set.
    unknown = {"model": "(unknown)", "version": "", "arm": "", "protocol": "http"}
    assert value(found, requests, **unknown, status="404") == 1
    assert value(found, requests, **unknown, status="400") == 1
    assert not [key for key in found if ("model", "nope") in key[1]]
    durations = "turnout_request_duration_seconds_count"
    assert value(found, durations, **common) == 5 + 3 + 1  # routed requests, failures too
    assert value(found, "turnout_requests_in_flight", model=MODEL) == 0
    assert value(found, "turnout_model_version_loaded", model=MODEL, version="1") == 1
    assert value(found, "turnout_policy_revision", model=MODEL) == 1
    stats = statistics(gateway.gateway.models, MODEL, "2")[0]
    batches = value(found, "turnout_batch_size_count", model=MODEL, version="2")
    assert batches == stats["execution_count"] > 0
    assert (
        value(found, "turnout_batch_size_sum", model=MODEL, version="2") == stats["inference_count"]
    )
    assert value(found, "turnout_queue_depth", model=MODEL, version="2") == 0
    assert value(found, "turnout_backend_errors_total", model=MODEL, version="2") == 0
    # Nobody listens on the monitor socket: every record was sent in vain, and counted. Routed
    # requests have records (5 + 3 + 1 + the routed 400); refused and unknown ones do not.
    emitter = gateway.gateway.emitter
    assert emitter is not None
    emitter.flush()
    found = samples(scrape(f"http://{gateway.http_url}/metrics")[0])
    unsent = value(found, "turnout_records_dropped_total", reason="send_failed")
    assert unsent == emitter.records_unsent == 5 + 3 + 1 + 1
    assert value(found, "process_cpu_seconds_total") > 0


def test_the_separate_port_serves_the_same_metrics(gateway: GatewayThread) -> None:
    port = gateway.gateway.metrics_port
    assert port and port != gateway.gateway.http_port
    text, _ = scrape(f"http://127.0.0.1:{port}/metrics")
    assert "turnout_requests_total" in text and "turnout_queue_depth" in text


def test_openmetrics_is_served_when_asked_for(gateway: GatewayThread) -> None:
    text, content_type = scrape(
        f"http://{gateway.http_url}/metrics", "application/openmetrics-text; version=1.0.0"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


@pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="promtool missing (apt-get install prometheus)"
)
def test_promtool_finds_nothing_to_complain_about(gateway: GatewayThread) -> None:
    assert post(gateway, f"/v2/models/{MODEL}/infer", infer_body()) == 200
    text, _ = scrape(f"http://{gateway.http_url}/metrics")
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", (
        result.stdout + result.stderr
    )
