"""Rate limits per model and per token: requests above the rate get 429 + Retry-After over
HTTP and RESOURCE_EXHAUSTED over gRPC, before their body is read; they are counted in
metrics; the rest are served. Under pressure the shadow copies are shed first."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import model_zoo
import pytest
from gateways import GatewayThread, add_sub_request, local_settings, model_infer_stub, running

BODY = json.dumps(
    {
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
        ]
    }
)
TOKEN = "t" * 24
OTHER = "u" * 24


def post(
    gateway: GatewayThread, path: str, body: str = BODY, token: str | None = None
) -> tuple[int, dict[str, str], str]:
    host, port = gateway.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    connection.request("POST", path, body, headers)
    reply = connection.getresponse()
    text = reply.read().decode()
    answer = {k.lower(): v for k, v in reply.getheaders()}
    connection.close()
    return reply.status, answer, text


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[GatewayThread]:
    config = {"rate_limit_rps": 0.5, "rate_limit_burst": 5}
    repo = model_zoo.write_repository(
        tmp_path / "models", {"add_sub": (model_zoo.add_sub, config, [1, 2])}
    )
    with running(local_settings(repo)) as gateway:
        yield gateway


def test_a_model_above_its_rate_gets_429_with_retry_after(limited: GatewayThread) -> None:
    answers = [post(limited, "/v2/models/add_sub/infer") for _ in range(8)]
    statuses = [a[0] for a in answers]
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3
    refused = answers[-1]
    assert int(refused[1]["retry-after"]) >= 1 and "rate limit" in refused[2]
    # Refused before the body is read: even a broken body gets the 429, not a 400.
    assert post(limited, "/v2/models/add_sub/infer", body="{")[0] == 429
    request = add_sub_request("add_sub", [1.0] * 4, [1.0] * 4)
    with grpc.insecure_channel(limited.grpc_url) as channel, pytest.raises(grpc.RpcError) as caught:
        model_infer_stub(channel)(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    host, port = limited.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/metrics")
    metrics = connection.getresponse().read().decode()
    connection.close()
    assert 'turnout_rate_limited_total{name="add_sub",scope="model"} 5.0' in metrics
    assert 'status="429"' in metrics


def test_each_token_has_its_own_bucket(tmp_path: Path) -> None:
    repo = model_zoo.write_repository(
        tmp_path / "models", {"add_sub": (model_zoo.add_sub, {}, [1])}
    )
    tokens = [
        {"name": "app", "token": TOKEN, "role": "infer"},
        {"name": "batch", "token": OTHER, "role": "infer"},
    ]
    settings = local_settings(
        repo, admin_tokens=tokens, require_infer_token=True, rate_limit_rps=0.5, rate_limit_burst=3
    )
    with running(settings) as gateway:
        first = [post(gateway, "/v2/models/add_sub/infer", token=TOKEN)[0] for _ in range(4)]
        second = [post(gateway, "/v2/models/add_sub/infer", token=OTHER)[0] for _ in range(4)]
        assert first == second == [200, 200, 200, 429]
        status, _, text = post(gateway, "/v2/models/add_sub/infer", token=TOKEN)
        assert status == 429 and "token 'app'" in text


def test_shadow_copies_are_shed_first_under_pressure(limited: GatewayThread) -> None:
    limited.call(
        limited.gateway.admin.apply("add_sub", "shadow", {"version": 1, "percent": 100}, "test")
    )
    for _ in range(5):  # drains the model's bucket below half: shadows stop first
        post(limited, "/v2/models/add_sub/infer")
    stats = limited.gateway.dataplane.mirror.stats[("add_sub", 1)]
    assert stats.shed >= 2 and stats.requests + stats.shed == 5
