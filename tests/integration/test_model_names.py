"""Model names cannot leave the repository: every entry point refuses a bad name with 400 /
INVALID_ARGUMENT naming the rule, before it touches a path, the policy store or a backend;
the CLI refuses it before calling; directories with bad names on disk are ignored."""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import model_zoo
import pytest
from gateways import GatewayThread, add_sub_request, local_settings, model_infer_stub, running

from gateway.admin.grpc import message as admin_message
from gateway.grpc.messages import message

TOKEN = "n" * 24
BAD = ["..", "../outside", ".hidden", "a b"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    root = tmp_path_factory.mktemp("names")
    repo = model_zoo.write_repository(root / "models", {"add_sub": (model_zoo.add_sub, {}, [1])})
    # A model outside the repository, and a directory on disk whose name breaks the rule.
    model_zoo.add_sub(root / "outside" / "1" / "model.onnx")
    model_zoo.add_sub(repo / ".hidden" / "1" / "model.onnx")
    settings = local_settings(repo, admin_tokens=[{"name": "ops", "token": TOKEN, "role": "admin"}])
    with running(settings) as server:
        yield server


def request(gateway: GatewayThread, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    host, port = gateway.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request(method, path, body or None, {"authorization": f"Bearer {TOKEN}"})
    reply = connection.getresponse()
    text = reply.read().decode()
    connection.close()
    return reply.status, text


def test_only_valid_names_on_disk_are_served(gateway: GatewayThread) -> None:
    assert gateway.gateway.models.versions_by_model() == {"add_sub": [1]}


@pytest.mark.parametrize("name", ["..", "%2E%2E", ".hidden", "a%20b"])
@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("GET", "/v2/models/{}"),
        ("GET", "/v2/models/{}/ready"),
        ("POST", "/v2/models/{}/infer"),
        ("POST", "/v2/models/{}/feedback"),
        ("POST", "/admin/v1/models/{}/versions/1/load"),
        ("GET", "/admin/v1/models/{}/traffic"),
        ("POST", "/admin/v1/models/{}/traffic"),
        ("POST", "/admin/v1/models/{}/rollout"),
    ],
)
def test_http_entry_points_refuse_bad_names(
    gateway: GatewayThread, method: str, template: str, name: str
) -> None:
    import urllib.parse

    path = template.format(urllib.parse.unquote(name))
    body = b'{"op": "set", "weights": {"1": 100}, "canary": 1, "labels": []}'
    status, text = request(gateway, method, path.replace(" ", "%20"), body)
    assert status == 400 and "model name" in text, text


def test_the_repository_escape_is_refused_over_http_and_grpc(gateway: GatewayThread) -> None:
    status, text = request(gateway, "POST", "/admin/v1/models/../versions/1/load")
    assert status == 400 and "outside" not in gateway.gateway.models.versions, text
    channel = grpc.insecure_channel(gateway.grpc_url)
    load = channel.unary_unary(
        "/turnout.admin.v1.TrafficService/LoadModel",
        request_serializer=admin_message("LoadModelRequest").SerializeToString,
        response_deserializer=admin_message("PolicyStatus").FromString,
    )
    for name in BAD:
        with pytest.raises(grpc.RpcError) as refused:
            load(
                admin_message("LoadModelRequest")(model=name, version=1),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
                timeout=30,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "model name" in (refused.value.details() or "")
    infer = model_infer_stub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        infer(add_sub_request("../outside", [1.0] * 4, [1.0] * 4), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ready = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelReady",
        request_serializer=message("ModelReadyRequest").SerializeToString,
        response_deserializer=message("ModelReadyResponse").FromString,
    )
    with pytest.raises(grpc.RpcError) as refused:
        ready(message("ModelReadyRequest")(name=".hidden"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    assert gateway.gateway.models.versions_by_model() == {"add_sub": [1]}
    state = gateway.gateway.settings.state_dir
    assert not any(p.name.startswith("..") for p in (state / "traffic").iterdir())


def test_the_cli_refuses_a_bad_name_before_calling(tmp_path: Path) -> None:
    for command in (["traffic", "status", "../x"], ["rollout", "status", ".hidden"]):
        result = subprocess.run(
            [sys.executable, "-m", "turnout.cli", *command, "--url", "http://127.0.0.1:9"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and "model name" in result.stderr, result.stderr
