"""Property-based fuzzing of the decoders: random and mutated valid HTTP JSON bodies,
binary-extension bodies and gRPC ModelInfer messages. Every outcome is a decoded request or
a TurnoutError with a 4xx status, never another exception; a request that claims a huge
shape without its data is refused without allocating it. Seeded and short here;
``python -m bench.fuzz`` runs the same properties for longer."""

from __future__ import annotations

import json
import os
import tracemalloc
from typing import Any

from fuzzing import infer_documents, model_infer_messages, outcome_is_clean
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gateway.grpc.converters import infer_request_from_proto
from gateway.grpc.messages import message
from gateway.http.codec import decode_infer_request

# ``python -m bench.fuzz`` raises the count (TURNOUT_FUZZ_EXAMPLES) for a long run.
EXAMPLES = int(os.environ.get("TURNOUT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@seed(20261201)
@FUZZ
@given(infer_documents())
def test_json_bodies_decode_or_are_refused_with_a_4xx(document: dict[str, Any]) -> None:
    body = json.dumps(document, allow_nan=True).encode()
    outcome_is_clean(lambda: decode_infer_request("m", "", body, None))


@seed(20261202)
@FUZZ
@given(st.binary(max_size=256), st.one_of(st.none(), st.text(max_size=6)))
def test_random_bytes_are_refused_with_a_4xx(body: bytes, header: str | None) -> None:
    outcome_is_clean(lambda: decode_infer_request("m", "", body, header))


@seed(20261203)
@FUZZ
@given(infer_documents(), st.binary(max_size=128), st.integers(-2, 300))
def test_binary_extension_bodies_are_decoded_or_refused(
    document: dict[str, Any], tail: bytes, cut: int
) -> None:
    head = json.dumps(document).encode()
    outcome_is_clean(lambda: decode_infer_request("m", "", head + tail, str(cut)))


@seed(20261204)
@FUZZ
@given(model_infer_messages())
def test_model_infer_messages_convert_or_are_refused(request: Any) -> None:
    outcome_is_clean(lambda: infer_request_from_proto(request, None))


@seed(20261205)
@FUZZ
@given(model_infer_messages(), st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_mutated_wire_messages_parse_and_convert_or_are_refused(
    request: Any, at: int, junk: bytes
) -> None:
    wire = request.SerializeToString()
    at = min(at, len(wire))
    mutated = wire[:at] + junk + wire[at + len(junk) :]
    try:
        parsed = message("ModelInferRequest").FromString(mutated)
    except Exception:
        return  # grpc answers a message that does not parse with INTERNAL before turnout
    outcome_is_clean(lambda: infer_request_from_proto(parsed, None))


def test_a_huge_shape_without_data_is_refused_without_allocating_it() -> None:
    huge = {"inputs": [{"name": "a", "shape": [2**31, 2**31], "datatype": "FP32", "data": []}]}
    claimed = {"inputs": [{"name": "a", "shape": [2**20, 2**20], "datatype": "FP32",
                           "parameters": {"binary_data_size": 16}}]}  # fmt: skip
    request = message("ModelInferRequest")(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[2**31, 2**31])
    request.raw_input_contents.append(b"\0" * 16)
    tracemalloc.start()
    try:
        for decode in (
            lambda: decode_infer_request("m", "", json.dumps(huge).encode(), None),
            lambda: decode_infer_request(
                "m", "", json.dumps(claimed).encode() + b"\0" * 16, str(len(json.dumps(claimed)))
            ),
            lambda: infer_request_from_proto(request, None),
        ):
            outcome_is_clean(decode)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak
