"""Fuzzed requests against a real gateway on loopback, over HTTP and gRPC: every answer is a
2xx or a 4xx (gRPC: OK or a client-error code), never a 5xx, a crash or a hang, and the
server still answers a valid request afterwards."""

from __future__ import annotations

import http.client
import json
import os
from typing import Any

import grpc
from fuzzing import infer_documents, model_infer_messages
from gateways import GatewayThread, add_sub_request, model_infer_stub
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("TURNOUT_FUZZ_EXAMPLES", "60"))
SERVER_FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck)
)
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def post(gateway: GatewayThread, path: str, body: bytes, headers: dict[str, str]) -> int:
    host, port = gateway.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", path, body, headers)
    reply = connection.getresponse()
    reply.read()
    connection.close()
    return reply.status


@seed(20261206)
@SERVER_FUZZ
@given(
    infer_documents(),
    st.sampled_from(["add_sub", "identity", "strings", "mlp", "nope"]),
    # What an HTTP client can send as a header value (printable ASCII).
    st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4)),
)
def test_http_answers_are_never_5xx(
    local_gateway: GatewayThread, document: dict[str, Any], model: str, header: str | None
) -> None:
    headers = {} if header is None else {"inference-header-content-length": header}
    status = post(
        local_gateway, f"/v2/models/{model}/infer", json.dumps(document).encode(), headers
    )
    assert status < 500, (status, document)


@seed(20261207)
@SERVER_FUZZ
@given(model_infer_messages(), st.sampled_from(["add_sub", "identity", "mlp", "nope"]))
def test_grpc_answers_are_ok_or_client_errors(
    local_gateway: GatewayThread, request: Any, model: str
) -> None:
    request.model_name = model
    with grpc.insecure_channel(local_gateway.grpc_url) as channel:
        try:
            model_infer_stub(channel)(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())


def test_the_server_still_serves_after_the_fuzzing(local_gateway: GatewayThread) -> None:
    with grpc.insecure_channel(local_gateway.grpc_url) as channel:
        answer = model_infer_stub(channel)(
            add_sub_request("add_sub", [1.0] * 4, [2.0] * 4), timeout=30
        )
    assert answer.model_name == "add_sub"
