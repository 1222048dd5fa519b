"""Hypothesis strategies for fuzzing the gateway's decoders: valid-looking inference
documents and ModelInfer messages with any field possibly junk."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from gateway.errors import TurnoutError
from gateway.grpc.messages import message

__all__ = ["infer_documents", "model_infer_messages", "outcome_is_clean"]

DATATYPES = [
    "BOOL",
    "UINT8",
    "INT8",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
    "X",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8),
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


@st.composite
def infer_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Valid-looking inference documents, with any field possibly replaced by junk."""
    shape = draw(st.lists(st.integers(-3, 2**40), min_size=0, max_size=4))
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["a", "b", "", "x"])),
        "datatype": draw(st.sampled_from(DATATYPES)),
        "shape": shape,
        "data": draw(st.lists(scalars, max_size=12) | json_values),
    }
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(tensor)))
        tensor[key] = draw(json_values)
    if draw(st.booleans()):
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-5, 64) | json_values)}
        tensor.pop("data", None)
    document: dict[str, Any] = {"inputs": [tensor] * draw(st.integers(0, 2))}
    if draw(st.booleans()):
        document["parameters"] = draw(json_values)
    if draw(st.booleans()):
        document["outputs"] = draw(json_values)
    if draw(st.booleans()):
        document["id"] = draw(json_values)
    return document


def outcome_is_clean(decode: Any) -> None:
    try:
        decode()
    except TurnoutError as exc:
        assert 400 <= exc.http_status < 500, (type(exc).__name__, exc.message)


@st.composite
def model_infer_messages(draw: st.DrawFn) -> Any:
    request = message("ModelInferRequest")(model_name="m", id=draw(st.text(max_size=4)))
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["a", "", "b"])),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.integers(-3, 2**40), max_size=4)),
        )
        kind = draw(st.sampled_from(["fp32", "int", "bytes", "bool", "none"]))
        if kind == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        elif kind == "int":
            tensor.contents.int_contents.extend(
                draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8))
            )
        elif kind == "bytes":
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=4)))
        elif kind == "bool":
            tensor.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=8)))
    for _ in range(draw(st.integers(0, 2))):
        request.raw_input_contents.append(draw(st.binary(max_size=40)))
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = draw(st.integers(-5, 2**40))
    if draw(st.booleans()):
        request.parameters["binary_data_output"].string_param = draw(st.text(max_size=3))
    return request
