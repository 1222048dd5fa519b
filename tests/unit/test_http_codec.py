"""REST bodies <-> data plane types: JSON, and the binary tensor data extension."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import orjson
import pytest

from gateway.codecs import DATATYPES, decode_raw, encode_raw
from gateway.errors import InvalidInput
from gateway.http.codec import decode_infer_request, encode_infer_response
from gateway.types import InferOutput, InferRequest, InferResponse, RequestedOutput

BF16 = np.dtype(ml_dtypes.bfloat16)

# One tensor per datatype; every value survives JSON exactly.
TENSORS: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False], [False, True]]),
    "UINT8": np.array([[0, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[2**64 - 1, 2**63]], dtype=np.uint64),
    "INT8": np.array([[-128, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -65504.0]], dtype=np.float16),
    "FP32": np.array([[0.1, -3.4e38]], dtype=np.float32),
    "FP64": np.array([[0.1, np.pi]], dtype=np.float64),
    "BF16": np.array([[0.5, -(2.0**100)]], dtype=BF16),
    "BYTES": np.array([[b"hello", "w\u00f6rld".encode()]], dtype=np.object_),
}


def same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype == BF16:
        return bool(np.array_equal(got.view(np.uint16), want.view(np.uint16)))
    return got.tolist() == want.tolist()


def binary_body(document: dict[str, Any], *chunks: bytes) -> tuple[bytes, str]:
    header = orjson.dumps(document)
    return header + b"".join(chunks), str(len(header))


# -- requests ---------------------------------------------------------------------------------


def test_json_request() -> None:
    document = {
        "id": "req-1",
        "parameters": {"timeout": 250_000, "priority": 2, "tag": "x", "flag": True},
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3.5, 4]]},
            {
                "name": "b",
                "datatype": "BYTES",
                "shape": [1],
                "data": ["hi"],
                "parameters": {"k": 1},
            },
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
    }
    request = decode_infer_request("m", "2", orjson.dumps(document), None)
    assert (request.model_name, request.model_version, request.id) == ("m", "2", "req-1")
    assert request.parameters == {"timeout": 250_000, "priority": 2, "tag": "x", "flag": True}
    assert request.timeout_s == 0.25
    a, b = request.inputs
    assert (a.name, a.datatype, a.shape, a.parameters) == ("a", "FP32", (2, 2), {})
    assert same(a.data, np.array([[1, 2], [3.5, 4]], dtype=np.float32))
    assert (b.name, b.datatype, b.shape, b.parameters) == ("b", "BYTES", (1,), {"k": 1})
    assert b.data.tolist() == [b"hi"]
    assert request.outputs == [
        RequestedOutput("y", {"binary_data": True}),
        RequestedOutput("z", {}),
    ]


def test_json_request_minimal() -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [], "data": 7}]})
    request = decode_infer_request("m", "", body, None)
    assert (request.id, request.parameters, request.outputs, request.timeout_s) == (
        "",
        {},
        [],
        None,
    )
    assert request.inputs[0].data.shape == ()
    assert request.inputs[0].data.tolist() == 7


@pytest.mark.parametrize("datatype", list(TENSORS))
def test_binary_request_every_datatype(datatype: str) -> None:
    values = TENSORS[datatype]
    raw = encode_raw(values, datatype)
    document = {
        "inputs": [
            {"name": "json_in", "datatype": "INT32", "shape": [2], "data": [5, 6]},
            {
                "name": "bin_in",
                "datatype": datatype,
                "shape": list(values.shape),
                "parameters": {"binary_data_size": len(raw)},
            },
            {
                "name": "bin_after",
                "datatype": "FP64",
                "shape": [1],
                "parameters": {"binary_data_size": 8},
            },
        ]
    }
    body, header = binary_body(document, raw, np.array([2.5]).tobytes())
    request = decode_infer_request("m", "", body, header)
    json_in, bin_in, bin_after = request.inputs
    assert json_in.data.tolist() == [5, 6]
    assert same(bin_in.data, values)
    assert bin_after.data.tolist() == [2.5]


def test_binary_request_with_empty_tensor() -> None:
    document = {
        "inputs": [
            {
                "name": "e",
                "datatype": "FP32",
                "shape": [0, 3],
                "parameters": {"binary_data_size": 0},
            },
            {"name": "x", "datatype": "INT8", "shape": [2], "parameters": {"binary_data_size": 2}},
        ]
    }
    body, header = binary_body(document, b"\x01\xff")
    empty, x = decode_infer_request("m", "", body, header).inputs
    assert empty.data.shape == (0, 3)
    assert x.data.tolist() == [1, -1]


def _binary_input(size: Any, **extra: Any) -> dict[str, Any]:
    return {
        "name": "x",
        "datatype": "FP32",
        "shape": [2],
        "parameters": {"binary_data_size": size},
        **extra,
    }


@pytest.mark.parametrize(
    ("document", "tail", "header", "message"),
    [
        ({"inputs": [_binary_input(8)]}, b"\0" * 8, "abc", "Inference-Header-Content-Length"),
        ({"inputs": [_binary_input(8)]}, b"\0" * 8, "-1", "Inference-Header-Content-Length"),
        ({"inputs": [_binary_input(8)]}, b"\0" * 8, "99999", "is beyond the body's"),
        ({"inputs": [_binary_input(8)]}, b"\0" * 4, None, "binary_data_size 8 runs past"),
        ({"inputs": [_binary_input(4)]}, b"\0" * 8, None, "needs 8 bytes, got 4"),
        (
            {"inputs": [_binary_input(8)]},
            b"\0" * 12,
            None,
            "4 bytes of binary data are not claimed",
        ),
        ({"inputs": [_binary_input(-8)]}, b"", None, "binary_data_size must be an integer >= 0"),
        ({"inputs": [_binary_input(True)]}, b"", None, "binary_data_size must be an integer"),
        ({"inputs": [_binary_input(8, data=[1, 2])]}, b"\0" * 8, None, "both 'data' and"),
    ],
)
def test_binary_request_errors(
    document: dict[str, Any], tail: bytes, header: str | None, message: str
) -> None:
    json_part = orjson.dumps(document)
    body = json_part + tail
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request("m", "", body, header if header else str(len(json_part)))


def test_unclaimed_bytes_without_binary_inputs() -> None:
    document = {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}
    body, header = binary_body(document, b"extra")
    with pytest.raises(InvalidInput, match="5 bytes of binary data are not claimed by any input"):
        decode_infer_request("m", "", body, header)


def _input(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON in request body"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b"{}", "'inputs' must be a non-empty list"),
        (orjson.dumps({"inputs": []}), "'inputs' must be a non-empty list"),
        (orjson.dumps({"inputs": [1]}), r"inputs\[0\] must be an object"),
        (orjson.dumps({"inputs": [_input(name="")]}), r"inputs\[0\]\.name must be a non-empty"),
        (orjson.dumps({"inputs": [_input(datatype=None)]}), "input 'x': 'datatype' is required"),
        (orjson.dumps({"inputs": [_input(shape=None)]}), "input 'x': 'shape' is required"),
        (orjson.dumps({"inputs": [_input(data=None)]}), "input 'x': 'data' is required"),
        (orjson.dumps({"inputs": [_input(shape=[-1])]}), "input 'x': shape .* negative"),
        (orjson.dumps({"inputs": [_input(data=[1, 2])]}), "input 'x': shape .* data has 2"),
        (orjson.dumps({"inputs": [_input(datatype="FP128")]}), "unknown datatype 'FP128'"),
        (orjson.dumps({"id": 5, "inputs": [_input()]}), "'id' must be a string"),
        (orjson.dumps({"parameters": [], "inputs": [_input()]}), "request.parameters must be"),
        (
            orjson.dumps({"parameters": {"a": [1]}, "inputs": [_input()]}),
            r"request\.parameters\.a must be a boolean, number or string",
        ),
        (
            orjson.dumps({"inputs": [_input(parameters={"p": {"q": 1}})]}),
            r"input 'x'\.parameters\.p must be",
        ),
        (orjson.dumps({"outputs": {}, "inputs": [_input()]}), "'outputs' must be a list"),
        (orjson.dumps({"outputs": [{}], "inputs": [_input()]}), r"outputs\[0\] must be an object"),
        (
            orjson.dumps({"parameters": {"timeout": 0}, "inputs": [_input()]}),
            "parameters.timeout must be a positive integer",
        ),
        (
            orjson.dumps({"parameters": {"timeout": 1.5}, "inputs": [_input()]}),
            "parameters.timeout must be a positive integer",
        ),
    ],
)
def test_request_errors(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request("m", "", body, None)


# -- responses --------------------------------------------------------------------------------


def _response(**extra: Any) -> InferResponse:
    outputs = [
        InferOutput(f"out_{datatype}", datatype, values.shape, values)
        for datatype, values in TENSORS.items()
    ]
    return InferResponse("m", "3", outputs, **extra)


def _request(parameters: dict[str, Any] | None = None, outputs: Any = ()) -> InferRequest:
    return InferRequest(
        model_name="m", inputs=[], parameters=parameters or {}, outputs=list(outputs)
    )


def _split(
    body: bytes, header: int | None
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Parse a response as a client would; binary outputs decoded from the tail."""
    document = orjson.loads(body if header is None else body[:header])
    tail = memoryview(body)[len(body) if header is None else header :]
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for output in document["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw = tail[offset : offset + size]
            arrays[output["name"]] = decode_raw(
                output["name"], output["datatype"], tuple(output["shape"]), raw
            )
            offset += size
    assert offset == len(tail)
    return document, arrays


def test_json_response_round_trips_through_a_request() -> None:
    body, header = encode_infer_response(_response(id="abc"), _request())
    assert header is None
    document = orjson.loads(body)
    assert (document["model_name"], document["model_version"], document["id"]) == ("m", "3", "abc")
    assert "parameters" not in document
    for output in document["outputs"]:
        values = TENSORS[output["datatype"]]
        assert output["shape"] == list(values.shape)
        assert len(output["data"]) == values.size  # flat, row-major
        assert "parameters" not in output
    # The outputs read back as request inputs give the very same arrays.
    as_request = {"inputs": document["outputs"]}
    decoded = decode_infer_request("m", "", orjson.dumps(as_request), None)
    for item in decoded.inputs:
        assert same(item.data, TENSORS[item.datatype]), item.datatype


def test_json_response_values() -> None:
    body, _ = encode_infer_response(_response(), _request())
    data = {o["name"]: o["data"] for o in orjson.loads(body)["outputs"]}
    assert data["out_UINT64"] == [2**64 - 1, 2**63]
    assert data["out_BOOL"] == [True, False, False, True]
    assert data["out_BF16"] == [0.5, -(2.0**100)]
    assert data["out_FP16"] == [0.5, -65504.0]
    assert data["out_BYTES"] == ["hello", "w\u00f6rld"]
    assert data["out_FP64"] == [0.1, np.pi]


def test_response_id_and_parameters() -> None:
    body, _ = encode_infer_response(
        _response(parameters={"sequence_end": True, "n": 2}), _request()
    )
    document = orjson.loads(body)
    assert "id" not in document
    assert document["parameters"] == {"sequence_end": True, "n": 2}


def test_binary_data_output_sends_every_output_in_binary() -> None:
    body, header = encode_infer_response(_response(), _request({"binary_data_output": True}))
    assert header is not None
    document, arrays = _split(body, header)
    assert set(arrays) == {f"out_{d}" for d in TENSORS}
    for output in document["outputs"]:
        values = TENSORS[output["datatype"]]
        assert "data" not in output
        assert output["parameters"]["binary_data_size"] == len(
            encode_raw(values, output["datatype"])
        )
        assert same(arrays[output["name"]], values), output["datatype"]


def test_per_output_binary_data_overrides_the_default() -> None:
    outputs = [
        RequestedOutput("out_FP32", {"binary_data": True}),
        RequestedOutput("out_BYTES", {"binary_data": True}),
        RequestedOutput("out_INT8", {"binary_data": False}),
    ]
    body, header = encode_infer_response(_response(), _request(outputs=outputs))
    document, arrays = _split(body, header)
    assert set(arrays) == {"out_FP32", "out_BYTES"}
    assert same(arrays["out_FP32"], TENSORS["FP32"])
    assert same(arrays["out_BYTES"], TENSORS["BYTES"])
    by_name = {o["name"]: o for o in document["outputs"]}
    assert by_name["out_INT8"]["data"] == [-128, 127]
    assert by_name["out_UINT64"]["data"] == [2**64 - 1, 2**63]

    # With binary_data_output, one output can still ask for JSON.
    body, header = encode_infer_response(
        _response(),
        _request(
            {"binary_data_output": True}, [RequestedOutput("out_FP64", {"binary_data": False})]
        ),
    )
    document, arrays = _split(body, header)
    assert set(arrays) == {f"out_{d}" for d in TENSORS} - {"out_FP64"}
    assert {o["name"]: o for o in document["outputs"]}["out_FP64"]["data"] == [0.1, np.pi]


def test_binary_response_is_little_endian_row_major() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = InferResponse("m", "1", [InferOutput("y", "FP32", (3, 2), values.T)])
    body, header = encode_infer_response(response, _request({"binary_data_output": True}))
    assert header is not None
    assert body[header:] == np.ascontiguousarray(values.T).astype("<f4").tobytes()
    document = orjson.loads(body[:header])
    assert document["outputs"][0]["shape"] == [3, 2]
    assert (
        DATATYPES["FP32"].itemsize * 6 == document["outputs"][0]["parameters"]["binary_data_size"]
    )


def test_json_response_of_a_transposed_array_is_row_major() -> None:
    values = np.arange(6, dtype=np.int32).reshape(2, 3).T
    response = InferResponse("m", "1", [InferOutput("y", "INT32", values.shape, values)])
    body, _ = encode_infer_response(response, _request())
    assert orjson.loads(body)["outputs"][0]["data"] == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize(
    ("extra", "data"),
    [
        ({}, [1.0, 2.0, True]),  # a boolean among numbers
        ({"parameters": {"note": "true"}}, [1.0, 2.0, 3.0]),  # the word, not a boolean
        ({"parameters": {"flag": False}}, [1.0, 2.0, 3.0]),  # a boolean, not in the data
    ],
    ids=["boolean-in-data", "word-in-a-string", "boolean-elsewhere"],
)
def test_booleans_are_found_among_numbers_whatever_else_the_body_holds(
    extra: dict[str, Any], data: list[Any]
) -> None:
    """The decoder skips the search for booleans in a body whose text has no true/false;
    wherever the words are, a boolean in numeric data is still refused."""
    item = {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": data}
    body = orjson.dumps({"inputs": [item], **extra})
    if any(v is True for v in data):
        with pytest.raises(InvalidInput, match="must be numbers"):
            decode_infer_request("m", "", body, None)
    else:
        request = decode_infer_request("m", "", body, None)
        np.testing.assert_array_equal(request.inputs[0].data, [[1.0, 2.0, 3.0]])
