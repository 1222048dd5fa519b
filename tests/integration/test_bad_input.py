"""The bad-input suite: every malformed or refused request gets the right status and a clear
message, over HTTP (raw bytes, so the body and headers are exactly ours) and over gRPC (raw
protobuf messages, so requests tritonclient would refuse to build still go out).

Each row names one problem. The HTTP answer must be ``{"error": "..."}`` JSON, and the
message must name the field and the problem. The last test proves none of it crashed or
poisoned the server: every model, including those whose batchers just saw errors, still
answers a good request.
"""

from __future__ import annotations

import http.client
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import orjson
import pytest
from gateways import GatewayThread

from gateway.codecs import DATATYPES, decode_raw, encode_raw
from gateway.grpc.messages import message

T = TypeVar("T")

LIMIT = 256 * 1024  # the local_gateway fixture's max_request_bytes
CALL_TIMEOUT_S = 10.0  # every client call; far below pytest's timeout, so a hang fails fast

_Request = message("ModelInferRequest")
_Response = message("ModelInferResponse")
_InputTensor = _Request.InferInputTensor
_Contents = message("InferTensorContents")

GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND}


# -- clients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def error(self) -> str:
        """The message of an OIP error body, checking the body is exactly ``{"error": str}``."""
        assert self.headers.get("content-type") == "application/json", self.headers
        document = orjson.loads(self.body)
        assert isinstance(document, dict) and list(document) == ["error"], document
        assert isinstance(document["error"], str) and document["error"], document
        return document["error"]

    def json(self) -> Any:
        return orjson.loads(self.body)


def http_call(
    server: GatewayThread,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> HttpReply:
    host, port = server.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return HttpReply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


def infer_path(model: str, version: str = "") -> str:
    return f"/v2/models/{model}{f'/versions/{version}' if version else ''}/infer"


def assert_names(text: str | None, words: tuple[str, ...]) -> None:
    assert text, "the error has no message"
    missing = [w for w in words if w not in text]
    assert not missing, f"message {text!r} lacks {missing}"


@pytest.fixture(scope="module")
def grpc_infer(local_gateway: GatewayThread) -> Iterator[Any]:
    channel = grpc.insecure_channel(local_gateway.grpc_url)
    grpc.channel_ready_future(channel).result(CALL_TIMEOUT_S)
    yield channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=_Request.SerializeToString,
        response_deserializer=_Response.FromString,
    )
    channel.close()


def grpc_error(infer: Any, request: Any, timeout: float = CALL_TIMEOUT_S) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        infer(request, timeout=timeout)
    return info.value


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One input, rendered as JSON ``data`` over HTTP and as typed contents over gRPC."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: tuple[Any, ...]

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": list(self.shape),
            "data": list(self.data),
        }

    def proto(self) -> Any:
        dt = DATATYPES.get(self.datatype)
        field = dt.contents_field if dt and dt.contents_field else "fp32_contents"
        return _InputTensor(
            name=self.name,
            datatype=self.datatype,
            shape=self.shape,
            contents=_Contents(**{field: list(self.data)}),
        )


def fp32(name: str, shape: tuple[int, ...], count: int | None = None) -> Tensor:
    n = int(np.prod(shape)) if count is None else count
    return Tensor(name, "FP32", shape, tuple(float(i) for i in range(n)))


def add_sub_inputs(rows: int = 1) -> tuple[Tensor, ...]:
    return fp32("a", (rows, 4)), fp32("b", (rows, 4))


def json_body(inputs: tuple[Tensor, ...], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [t.json() for t in inputs], **extra})


def grpc_request(model: str, inputs: tuple[Tensor, ...], version: str = "") -> Any:
    return _Request(model_name=model, model_version=version, inputs=[t.proto() for t in inputs])


def raw_request(model: str, arrays: dict[str, tuple[str, np.ndarray[Any, Any]]]) -> Any:
    """A gRPC request carrying every input in ``raw_input_contents`` (the good path)."""
    request = _Request(model_name=model)
    for name, (datatype, array) in arrays.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(encode_raw(array, datatype))
    return request


# -- cases shared by both transports ------------------------------------------------------


@dataclass(frozen=True)
class Case:
    model: str
    inputs: tuple[Tensor, ...]
    status: int
    words: tuple[str, ...]
    version: str = ""
    over_grpc: bool = True  # False: typed protobuf contents cannot express the problem


def case(
    case_id: str,
    model: str,
    inputs: tuple[Tensor, ...],
    status: int,
    *words: str,
    version: str = "",
    over_grpc: bool = True,
) -> Any:
    return pytest.param(Case(model, inputs, status, words, version, over_grpc), id=case_id)


GOOD = add_sub_inputs()
A, B = GOOD

SHARED_CASES = [
    # model and version
    case("unknown-model", "nope", GOOD, 404, "'nope'", "not served"),
    case("unknown-version", "add_sub", GOOD, 404, "'add_sub'", "version 3", version="3"),
    case("non-integer-version", "add_sub", GOOD, 404, "'add_sub'", "'latest'", version="latest"),
    case("version-zero", "add_sub", GOOD, 404, "'add_sub'", "'0'", version="0"),
    # which inputs
    case("missing-input", "add_sub", (A,), 400, "missing input", "'b'", "'add_sub'"),
    case(
        "unexpected-input", "add_sub", (A, B, fp32("c", (1, 4))), 400,
        "unexpected input", "'c'", "'add_sub'",
    ),
    case("same-input-twice", "add_sub", (A, A, B), 400, "'a'", "more than once"),
    case(
        "batch-dims-disagree", "add_sub", (A, fp32("b", (2, 4))), 400,
        "batch dimension", "[1, 2]",
    ),
    # datatypes
    case(
        "wrong-datatype", "add_sub", (Tensor("a", "INT32", (1, 4), (1, 2, 3, 4)), B), 400,
        "'a'", "INT32", "FP32",
    ),
    case(
        "unknown-datatype", "add_sub", (Tensor("a", "FLOAT32", (1, 4), A.data), B), 400,
        "'a'", "unknown datatype", "'FLOAT32'",
    ),
    case(
        "lowercase-datatype", "add_sub", (Tensor("a", "fp32", (1, 4), A.data), B), 400,
        "'a'", "unknown datatype", "'fp32'",
    ),
    # shapes
    case("wrong-rank", "add_sub", (fp32("a", (4,)), B), 400, "'a'", "rank 1", "rank 2"),
    case(
        "wrong-inner-dim", "add_sub", (fp32("a", (1, 5)), fp32("b", (1, 5))), 400,
        "'a'", "dimension 1 is 5", "[-1, 4]",
    ),
    case(
        "fixed-wrong-shape", "fixed", (fp32("x", (3, 2)),), 400,
        "'x'", "dimension 0 is 3", "[2, 3]",
    ),
    case("fixed-wrong-rank", "fixed", (fp32("x", (1, 2, 3)),), 400, "'x'", "rank 3", "rank 2"),
    case("rank-beyond-numpy", "add_sub", (fp32("a", (1,) * 70), B), 400, "'a'", "rank 70"),
    # data length against the shape
    case(
        "too-few-elements", "add_sub", (fp32("a", (1, 4), count=3), B), 400,
        "'a'", "needs 4 elements", "has 3",
    ),
    case(
        "too-many-elements", "add_sub", (fp32("a", (1, 4), count=5), B), 400,
        "'a'", "needs 4 elements", "has 5",
    ),
    # values the datatype cannot hold
    case(
        "strings-for-fp32", "add_sub", (Tensor("a", "FP32", (1, 4), ("1", "2", "3", "4")), B),
        400, "'a'", "FP32", "numbers", over_grpc=False,
    ),
    case(
        "null-for-fp32", "add_sub", (Tensor("a", "FP32", (1, 4), (1.0, None, 2.0, 3.0)), B),
        400, "'a'", "FP32", "numbers", over_grpc=False,
    ),
    case(
        "booleans-mixed-into-fp32", "add_sub",
        (Tensor("a", "FP32", (1, 4), (1.0, True, 2.0, 3.0)), B),
        400, "'a'", "FP32", "numbers", over_grpc=False,
    ),
    case(
        "booleans-for-int32", "identity", (Tensor("in_INT32", "INT32", (1, 3), (True,) * 3),),
        400, "'in_INT32'", "INT32", "integers", over_grpc=False,
    ),
    case(
        "booleans-mixed-into-int32", "identity",
        (Tensor("in_INT32", "INT32", (1, 3), (1, True, 3)),),
        400, "'in_INT32'", "INT32", "integers", over_grpc=False,
    ),
    case(
        "floats-for-int32", "identity", (Tensor("in_INT32", "INT32", (1, 3), (1.5, 2, 3)),),
        400, "'in_INT32'", "INT32", "integers", over_grpc=False,
    ),
    case(
        "numbers-for-bool", "identity", (Tensor("in_BOOL", "BOOL", (1, 3), (1, 0, 1)),),
        400, "'in_BOOL'", "BOOL", "booleans", over_grpc=False,
    ),
    case(
        "numbers-for-bytes", "strings", (Tensor("text", "BYTES", (1, 2), (1, 2)),),
        400, "'text'", "BYTES", "strings", over_grpc=False,
    ),
    case(
        "ragged-nested-lists", "add_sub",
        (Tensor("a", "FP32", (2, 4), ([1, 2, 3, 4], [5, 6])), fp32("b", (2, 4))),
        400, "'a'", "ragged", over_grpc=False,
    ),
    case(
        "int8-out-of-range", "identity", (Tensor("in_INT8", "INT8", (1, 3), (1, 200, 3)),),
        400, "'in_INT8'", "out of range", "INT8",
    ),
    case(
        "uint8-out-of-range", "identity", (Tensor("in_UINT8", "UINT8", (1, 3), (0, 256, 5)),),
        400, "'in_UINT8'", "out of range", "UINT8",
    ),
    case(
        "uint8-negative", "identity", (Tensor("in_UINT8", "UINT8", (1, 3), (0, -1, 5)),),
        400, "'in_UINT8'", "out of range", "UINT8", over_grpc=False,
    ),
    case(
        "int64-out-of-range", "identity",
        (Tensor("in_INT64", "INT64", (1, 3), (2**63, 0, 0)),),
        400, "'in_INT64'", "out of range", "INT64", over_grpc=False,
    ),
    case(
        "fp32-overflow", "add_sub", (Tensor("a", "FP32", (1, 4), (1e39, 0.0, 0.0, 0.0)), B),
        400, "'a'", "out of range", "FP32", over_grpc=False,
    ),
    case(
        "fp16-overflow", "identity", (Tensor("in_FP16", "FP16", (1, 3), (1e5, 0.0, 0.0)),),
        400, "'in_FP16'", "out of range", "FP16", over_grpc=False,
    ),
    case(
        "fp16-integer-overflow", "identity", (Tensor("in_FP16", "FP16", (1, 3), (70000, 0, 0)),),
        400, "'in_FP16'", "out of range", "FP16", over_grpc=False,
    ),
    case(
        "bf16-overflow", "identity", (Tensor("in_BF16", "BF16", (1, 3), (1e39, 0.0, 0.0)),),
        400, "'in_BF16'", "out of range", "BF16", over_grpc=False,
    ),
    # batch larger than the model takes
    case(
        "batch-over-max", "add_sub", add_sub_inputs(rows=9), 400,
        "9 rows", "max_batch_size 8", "add_sub",
    ),
]  # fmt: skip


@pytest.mark.parametrize("bad", SHARED_CASES)
def test_http_bad_input(local_gateway: GatewayThread, bad: Case) -> None:
    reply = http_call(
        local_gateway, "POST", infer_path(bad.model, bad.version), json_body(bad.inputs)
    )
    assert reply.status == bad.status, reply.body
    assert_names(reply.error(), bad.words)


@pytest.mark.parametrize("bad", [c for c in SHARED_CASES if c.values[0].over_grpc])
def test_grpc_bad_input(grpc_infer: Any, bad: Case) -> None:
    error = grpc_error(grpc_infer, grpc_request(bad.model, bad.inputs, bad.version))
    assert error.code() == GRPC_CODES[bad.status], error.details()
    assert_names(error.details(), bad.words)


# -- gRPC only: how tensors travel in the protobuf ----------------------------------------


def _raw_add_sub(a: bytes, b: bytes | None = None) -> Any:
    request = _Request(model_name="add_sub", inputs=[A.proto(), B.proto()])
    for tensor in request.inputs:
        tensor.ClearField("contents")
    request.raw_input_contents.append(a)
    if b is not None:
        request.raw_input_contents.append(b)
    return request


_ROW = np.zeros((1, 4), np.float32).tobytes()


def _mixed() -> Any:
    request = _raw_add_sub(_ROW, _ROW)
    request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    return request


def _one(tensor: Any, model: str = "add_sub") -> Any:
    return _Request(model_name=model, inputs=[tensor])


GRPC_CASES = [
    pytest.param(
        _raw_add_sub(_ROW), ("raw_input_contents", "1 entries", "2 inputs"), id="raw-count"
    ),
    pytest.param(_mixed(), ("'a'", "contents and raw_input_contents"), id="raw-mixed-contents"),
    pytest.param(_raw_add_sub(_ROW[:12], _ROW), ("'a'", "16 bytes", "got 12"), id="raw-short"),
    pytest.param(
        _raw_add_sub(_ROW, _ROW + b"\0\0\0\0"), ("'b'", "16 bytes", "got 20"), id="raw-long"
    ),
    pytest.param(
        _one(_InputTensor(name="a", datatype="FP32", shape=[1, 4],
                          contents=_Contents(int_contents=[1, 2, 3, 4]))),
        ("'a'", "contents.fp32_contents", "contents.int_contents"),
        id="contents-wrong-field",
    ),
    pytest.param(
        _one(_InputTensor(name="in_FP16", datatype="FP16", shape=[1, 3],
                          contents=_Contents(fp32_contents=[1, 2, 3])), "identity"),
        ("'in_FP16'", "FP16", "raw_input_contents"),
        id="fp16-in-contents",
    ),
    pytest.param(
        _one(_InputTensor(name="in_BF16", datatype="BF16", shape=[1, 3],
                          contents=_Contents(fp32_contents=[1, 2, 3])), "identity"),
        ("'in_BF16'", "BF16", "raw_input_contents"),
        id="bf16-in-contents",
    ),
    pytest.param(
        _one(_InputTensor(name="a", datatype="FP32", shape=[-1, 4],
                          contents=_Contents(fp32_contents=[1, 2, 3, 4]))),
        ("'a'", "[-1, 4]", "negative"),
        id="negative-dim",
    ),
    pytest.param(
        _one(_InputTensor(datatype="FP32", shape=[1, 4],
                          contents=_Contents(fp32_contents=[1, 2, 3, 4]))),
        ("inputs[0].name",),
        id="unnamed-input",
    ),
    pytest.param(_Request(model_name="add_sub"), ("'inputs'", "empty"), id="no-inputs"),
    pytest.param(
        _Request(
            model_name="strings",
            inputs=[_InputTensor(name="text", datatype="BYTES", shape=[1, 2])],
            raw_input_contents=[struct.pack("<I", 5) + b"ab"],
        ),
        ("'text'", "BYTES element of 5 bytes", "runs past"),
        id="bytes-element-truncated",
    ),
    pytest.param(
        _Request(
            model_name="add_sub",
            inputs=[A.proto(), B.proto()],
            outputs=[_Request.InferRequestedOutputTensor(name="total")],
        ),
        ("unknown output", "'total'", "'add_sub'"),
        id="unknown-output",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "words"), GRPC_CASES)
def test_grpc_malformed_tensors(grpc_infer: Any, request_: Any, words: tuple[str, ...]) -> None:
    error = grpc_error(grpc_infer, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert_names(error.details(), words)


# -- HTTP only: the JSON document -----------------------------------------------------------


def _doc(**input_fields: Any) -> bytes:
    """One add_sub input 'a' with some fields replaced (None removes the field)."""
    item = {**A.json(), **input_fields}
    return orjson.dumps({"inputs": [{k: v for k, v in item.items() if v is not None}, B.json()]})


JSON_CASES = [
    pytest.param(b'{"inputs": [', ("malformed JSON",), id="truncated-json"),
    pytest.param(b"", ("malformed JSON",), id="empty-body"),
    pytest.param(b"\xff\xfe{}", ("malformed JSON",), id="not-utf8"),
    pytest.param(b"[1, 2]", ("JSON object",), id="body-is-a-list"),
    pytest.param(b'"inputs"', ("JSON object",), id="body-is-a-string"),
    pytest.param(b"{}", ("'inputs'", "list"), id="inputs-missing"),
    pytest.param(b'{"inputs": {"name": "a"}}', ("'inputs'", "list"), id="inputs-not-a-list"),
    pytest.param(b'{"inputs": []}', ("'inputs'", "non-empty"), id="inputs-empty"),
    pytest.param(b'{"inputs": [1]}', ("inputs[0]", "object"), id="input-not-an-object"),
    pytest.param(_doc(name=None), ("inputs[0].name",), id="name-missing"),
    pytest.param(_doc(name=7), ("inputs[0].name",), id="name-not-a-string"),
    pytest.param(_doc(datatype=None), ("'a'", "'datatype'"), id="datatype-missing"),
    pytest.param(_doc(shape=None), ("'a'", "'shape'"), id="shape-missing"),
    pytest.param(_doc(shape="1,4"), ("'a'", "shape", "list of integers"), id="shape-string"),
    pytest.param(_doc(shape=[1.0, 4]), ("'a'", "list of integers"), id="shape-floats"),
    pytest.param(_doc(shape=["1", "4"]), ("'a'", "list of integers"), id="shape-strings"),
    pytest.param(_doc(shape=[True, 4]), ("'a'", "list of integers"), id="shape-booleans"),
    pytest.param(_doc(shape=[-1, 4]), ("'a'", "[-1, 4]", "negative"), id="shape-negative"),
    pytest.param(_doc(data=None), ("'a'", "'data'"), id="data-missing"),
    pytest.param(_doc(parameters=[1]), ("input 'a'.parameters", "object"), id="input-params"),
    pytest.param(
        json_body(GOOD, id=5), ("'id'", "string"), id="id-not-a-string"
    ),
    pytest.param(
        json_body(GOOD, parameters="fast"), ("request.parameters", "object"), id="params-string"
    ),
    pytest.param(
        json_body(GOOD, parameters={"x": [1]}), ("request.parameters.x",), id="param-list"
    ),
    pytest.param(json_body(GOOD, outputs={"name": "sum"}), ("'outputs'", "list"), id="outputs"),
    pytest.param(json_body(GOOD, outputs=[{}]), ("outputs[0]", "'name'"), id="output-no-name"),
    pytest.param(
        json_body(GOOD, outputs=[{"name": "total"}]),
        ("unknown output", "'total'", "'add_sub'"),
        id="unknown-output",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "words"), JSON_CASES)
def test_http_malformed_document(
    local_gateway: GatewayThread, body: bytes, words: tuple[str, ...]
) -> None:
    reply = http_call(local_gateway, "POST", infer_path("add_sub"), body)
    assert reply.status == 400, reply.body
    assert_names(reply.error(), words)


# -- HTTP only: the binary tensor data extension ------------------------------------------


def _binary(sizes: dict[str, Any], tail: bytes, header: str | int | None = None) -> Any:
    """add_sub with inputs sent in binary: ``sizes`` gives each input's binary_data_size
    (a value of ``"data"`` keeps JSON data too); ``header`` overrides the JSON length."""
    inputs = []
    for tensor in GOOD:
        item = {k: v for k, v in tensor.json().items() if k != "data"}
        size = sizes.get(tensor.name, 16)
        if size == "data":
            item["data"] = list(tensor.data)
            size = 16
        item["parameters"] = {"binary_data_size": size}
        inputs.append(item)
    head = orjson.dumps({"inputs": inputs})
    length = len(head) if header is None else header
    headers = {} if length == "omit" else {"Inference-Header-Content-Length": str(length)}
    return head + tail, headers


_TWO_ROWS = _ROW * 2
_JSON_LENGTH = len(_binary({}, b"")[0])

BINARY_CASES = [
    pytest.param(
        *_binary({}, _TWO_ROWS, header=_JSON_LENGTH + 33),
        ("Inference-Header-Content-Length", str(_JSON_LENGTH + 33), "beyond"),
        id="header-beyond-body",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS, header="abc"),
        ("Inference-Header-Content-Length", "integer", "'abc'"),
        id="header-not-integer",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS, header="12.5"),
        ("Inference-Header-Content-Length", "integer", "'12.5'"),
        id="header-float",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS, header="-1"),
        ("Inference-Header-Content-Length", "non-negative integer", "'-1'"),
        id="header-negative",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS, header=f"+{_JSON_LENGTH}"),
        ("Inference-Header-Content-Length", "non-negative integer", f"'+{_JSON_LENGTH}'"),
        id="header-signed",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS, header="9" * 5000),
        ("Inference-Header-Content-Length", "beyond"),
        id="header-thousands-of-digits",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS, header=_JSON_LENGTH - 5), ("malformed JSON",),
        id="header-cuts-json",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS, header="omit"), ("malformed JSON",), id="header-missing"
    ),
    pytest.param(
        *_binary({"b": 32}, _TWO_ROWS),
        ("'b'", "binary_data_size 32", "runs past", "16 bytes left"),
        id="size-past-data",
    ),
    pytest.param(
        *_binary({}, _TWO_ROWS + b"\0" * 8), ("8 bytes", "not claimed"), id="leftover-bytes"
    ),
    pytest.param(
        *_binary({"a": 12}, _ROW[:12] + _ROW), ("'a'", "16 bytes", "got 12"),
        id="size-does-not-match-shape",
    ),
    pytest.param(
        *_binary({"a": "data"}, _TWO_ROWS), ("'a'", "'data'", "binary_data_size"),
        id="data-and-binary",
    ),
    pytest.param(
        *_binary({"a": "16"}, _TWO_ROWS), ("'a'", "binary_data_size", "integer"),
        id="size-string",
    ),
    pytest.param(
        *_binary({"a": -4}, _TWO_ROWS), ("'a'", "binary_data_size", "integer"),
        id="size-negative",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "headers", "words"), BINARY_CASES)
def test_http_binary_extension(
    local_gateway: GatewayThread, body: bytes, headers: dict[str, str], words: tuple[str, ...]
) -> None:
    reply = http_call(local_gateway, "POST", infer_path("add_sub"), body, headers)
    assert reply.status == 400, reply.body
    assert_names(reply.error(), words)


# -- size limits --------------------------------------------------------------------------


def _oversized() -> bytes:
    big = fp32("a", (1, 4))
    filler = "x" * (LIMIT + 1024)
    return orjson.dumps({"id": filler, "inputs": [big.json(), B.json()]})


def test_http_body_over_limit(local_gateway: GatewayThread) -> None:
    reply = http_call(local_gateway, "POST", infer_path("add_sub"), _oversized())
    assert reply.status == 413
    assert_names(reply.error(), ("exceeds the limit", str(LIMIT)))


def test_http_chunked_body_over_limit(local_gateway: GatewayThread) -> None:
    body = _oversized()
    chunks = iter([body[i : i + 16384] for i in range(0, len(body), 16384)])
    reply = http_call(local_gateway, "POST", infer_path("add_sub"), chunks)
    assert reply.status == 413
    assert_names(reply.error(), ("exceeds the limit", str(LIMIT)))


def test_grpc_message_over_limit(grpc_infer: Any) -> None:
    request = _raw_add_sub(b"\0" * (LIMIT + 1024), _ROW)
    error = grpc_error(grpc_infer, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert_names(error.details(), (str(LIMIT),))


# -- routing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v2/models/add_sub/infer", "POST"),
        ("PUT", "/v2/models/add_sub/versions/1/infer", "POST"),
        ("POST", "/v2/health/ready", "GET"),
        ("DELETE", "/v2/models/add_sub", "GET"),
        ("POST", "/v2", "GET"),
    ],
)
def test_http_wrong_method(
    local_gateway: GatewayThread, method: str, path: str, allowed: str
) -> None:
    reply = http_call(local_gateway, method, path, b"{}" if method != "GET" else None)
    assert reply.status == 405
    assert reply.headers.get("allow") == allowed
    assert_names(reply.error(), (method, allowed))


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("GET", "/v1/models", ("/v1/models",)),
        ("GET", "/v2/nothing", ("/v2/nothing",)),
        ("GET", "/v2/models/add_sub/bogus", ("/v2/models/add_sub/bogus",)),
        ("POST", "/v2/models/add_sub/infer/more", ("/v2/models/add_sub/infer/more",)),
        ("POST", "/v2/models/add_sub/versions//infer", ("/v2/models/add_sub/versions//infer",)),
        ("GET", "/v2/models/nope", ("'nope'", "not served")),
        ("GET", "/v2/models/add_sub/versions/9/ready", ("'add_sub'", "version 9")),
    ],
)
def test_http_unknown_path(
    local_gateway: GatewayThread, method: str, path: str, words: tuple[str, ...]
) -> None:
    reply = http_call(local_gateway, method, path, b"{}" if method == "POST" else None)
    assert reply.status == 404
    assert_names(reply.error(), words)


# -- queue full and timeouts on the slow model --------------------------------------------

# ``slow`` takes one row per batch, one batch at a time, and queues at most 2 requests: a burst
# of 12 overflows it. The client threads share the GIL with the in-process gateway, so how
# tightly a burst lands is up to the scheduler; a burst that happened to trickle in is fired
# again, up to MAX_BURSTS times, before the test concludes the queue never refused anything.
BURST = 12
MAX_BURSTS = 3
_SLOW_ROW = np.linspace(-1, 1, 512, dtype=np.float32).reshape(1, 512)
SLOW_BODY = json_body((Tensor("x", "FP32", (1, 512), tuple(_SLOW_ROW.ravel().tolist())),))


def fire_burst(prepare: Callable[[], Callable[[], T]]) -> list[T]:
    """Run ``prepare`` in BURST threads, then all the calls it returned at once."""
    barrier = threading.Barrier(BURST)

    def one(_: int) -> T:
        call = prepare()
        barrier.wait(CALL_TIMEOUT_S)
        return call()

    started = time.monotonic()
    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(one, range(BURST)))
    assert time.monotonic() - started < CALL_TIMEOUT_S, "a burst hung"
    return results


def test_http_queue_full(local_gateway: GatewayThread) -> None:
    host, port = local_gateway.http_url.rsplit(":", 1)

    def prepare() -> Callable[[], HttpReply | Exception]:
        connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
        connection.connect()

        def call() -> HttpReply | Exception:
            try:
                connection.request("POST", infer_path("slow"), body=SLOW_BODY)
                response = connection.getresponse()
                headers = {k.lower(): v for k, v in response.getheaders()}
                return HttpReply(response.status, headers, response.read())
            except Exception as exc:
                return exc
            finally:
                connection.close()

        return call

    statuses: list[int] = []
    for _ in range(MAX_BURSTS):
        replies = fire_burst(prepare)
        for reply in replies:
            assert isinstance(reply, HttpReply), replies
            statuses.append(reply.status)
            if reply.status == 429:
                assert int(reply.headers["retry-after"]) >= 1
                assert_names(reply.error(), ("'slow/1'", "queue is full"))
            else:
                assert reply.status == 200, reply.body
                assert reply.json()["outputs"][0]["shape"] == [1, 512]
        if 429 in statuses:
            break
    assert set(statuses) == {200, 429}, statuses


def test_grpc_queue_full(grpc_infer: Any) -> None:
    request = raw_request("slow", {"x": ("FP32", _SLOW_ROW)})

    def prepare() -> Callable[[], tuple[grpc.StatusCode, Any]]:
        def call() -> tuple[grpc.StatusCode, Any]:
            try:
                return grpc.StatusCode.OK, grpc_infer(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                return error.code(), error.details()

        return call

    codes: list[grpc.StatusCode] = []
    for _ in range(MAX_BURSTS):
        for code, answer in fire_burst(prepare):
            codes.append(code)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert_names(answer, ("'slow/1'", "queue is full"))
            else:
                assert code == grpc.StatusCode.OK, answer
                assert list(answer.outputs[0].shape) == [1, 512]
        if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
            break
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_http_timeout_parameter(local_gateway: GatewayThread) -> None:
    document = orjson.loads(SLOW_BODY)
    document["parameters"] = {"timeout": 1}  # microseconds
    reply = http_call(local_gateway, "POST", infer_path("slow"), orjson.dumps(document))
    assert reply.status == 504, reply.body
    assert_names(reply.error(), ("'slow/1'", "timed out"))


@pytest.mark.parametrize(
    "timeout", [-5, 0, "100", 1.5, True, None], ids=["negative", "zero", "string", "float",
                                                     "boolean", "null"]
)  # fmt: skip
def test_http_invalid_timeout(local_gateway: GatewayThread, timeout: Any) -> None:
    document = orjson.loads(SLOW_BODY)
    document["parameters"] = {"timeout": timeout}
    reply = http_call(local_gateway, "POST", infer_path("slow"), orjson.dumps(document))
    assert reply.status == 400, reply.body
    assert_names(reply.error(), ("parameters.timeout",))


def _arrived(gateway: GatewayThread, model: str) -> Callable[[], int]:
    """Rows that have reached ``model``'s (one version's) queue so far."""
    (loaded,) = gateway.gateway.dataplane.models.versions[model].values()
    return lambda: loaded.batcher.stats.arrived_rows


@pytest.mark.parametrize("deadline_s", [1e-6, 1e-5, 1e-4])
def test_grpc_tiny_deadline(
    grpc_infer: Any, local_gateway: GatewayThread, deadline_s: float
) -> None:
    # gRPC sends deadlines rounded up to about a millisecond, and an idle model can answer
    # in less, before the client's own timer fires. Two requests ahead of it (one running,
    # one queued, 5-6 ms each) make sure it cannot: sent as futures, they are waited for at
    # the model (with ``slow`` at 0.6 ms a row, the tiny call still got its answer once), or
    # all three could arrive in one read, and the queue (2) refuse the third. Whether the
    # client's deadline or the server's fires first, the code is the same; the requests
    # around it must still succeed.
    request = raw_request("slow", {"x": ("FP32", _SLOW_ROW)})
    arrived = _arrived(local_gateway, "slow")
    (loaded,) = local_gateway.gateway.dataplane.models.versions["slow"].values()
    before = arrived()
    ahead = [grpc_infer.future(request, timeout=CALL_TIMEOUT_S) for _ in range(2)]
    deadline = time.monotonic() + CALL_TIMEOUT_S
    # Both reached the model, one runs and at most one waits: the queue (2) has room for
    # the tiny call. Counting arrivals alone, the call was once refused by a full queue (in
    # CI, under the whole suite): seen from this thread, both may have arrived before the
    # loop started either.
    while (
        arrived() < before + 2
        or loaded.batcher.inflight_batches < 1
        or loaded.batcher.queue_depth > 1
    ):
        assert time.monotonic() < deadline, "the requests ahead never reached the model"
        time.sleep(0.0002)
    error = grpc_error(grpc_infer, request, timeout=deadline_s)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    for call in ahead:
        assert list(call.result().outputs[0].shape) == [1, 512]
    reply = grpc_infer(request, timeout=CALL_TIMEOUT_S)
    assert list(reply.outputs[0].shape) == [1, 512]


# -- after all of the above, the server is unharmed -----------------------------------


def _good_arrays(model: str) -> dict[str, tuple[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(11)
    if model == "add_sub":
        return {n: ("FP32", rng.standard_normal((2, 4)).astype(np.float32)) for n in "ab"}
    if model == "identity":
        return {
            f"in_{dt}": (dt, rng.integers(0, 2, (2, 3)).astype(DATATYPES[dt].dtype))
            for dt in DATATYPES
            if dt != "BYTES"
        }
    if model == "strings":
        return {"text": ("BYTES", np.array([[b"ok", b"fine"]], dtype=np.object_))}
    if model == "fixed":
        return {"x": ("FP32", rng.standard_normal((2, 3)).astype(np.float32))}
    if model == "mlp":
        return {"input": ("FP32", rng.standard_normal((3, 16)).astype(np.float32))}
    assert model == "slow"
    return {"x": ("FP32", _SLOW_ROW)}


def _json_data(datatype: str, array: np.ndarray[Any, Any]) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode() for v in array.ravel()]
    if datatype in ("FP16", "BF16"):
        array = array.astype(np.float32)
    values: list[Any] = array.ravel().tolist()
    return values


MODELS = [("add_sub", "1"), ("add_sub", "2"), ("identity", ""), ("strings", ""),
          ("fixed", ""), ("mlp", ""), ("slow", "")]  # fmt: skip


def test_server_still_healthy(local_gateway: GatewayThread, grpc_infer: Any) -> None:
    assert http_call(local_gateway, "GET", "/v2/health/ready").status == 200
    assert http_call(local_gateway, "GET", "/v2/health/live").status == 200
    for model, version in MODELS:
        arrays = _good_arrays(model)
        # HTTP, JSON data
        inputs = [
            {"name": n, "datatype": dt, "shape": list(a.shape), "data": _json_data(dt, a)}
            for n, (dt, a) in arrays.items()
        ]
        reply = http_call(
            local_gateway, "POST", infer_path(model, version), orjson.dumps({"inputs": inputs})
        )
        assert reply.status == 200, (model, reply.body)
        document = reply.json()
        assert document["model_name"] == model
        assert not version or document["model_version"] == version
        # gRPC, raw contents
        request = raw_request(model, arrays)
        request.model_version = version
        response = grpc_infer(request, timeout=CALL_TIMEOUT_S)
        outputs = {
            o.name: decode_raw(o.name, o.datatype, tuple(o.shape), raw)
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        if model == "add_sub":
            a, b = arrays["a"][1], arrays["b"][1]
            np.testing.assert_array_equal(outputs["sum"], a + b)
            np.testing.assert_array_equal(outputs["diff"], a - b)
            by_json = {o["name"]: np.float32(o["data"]) for o in document["outputs"]}
            np.testing.assert_array_equal(by_json["sum"].reshape(a.shape), a + b)
            np.testing.assert_array_equal(by_json["diff"].reshape(a.shape), a - b)
        elif model == "identity":
            for name, (_, array) in arrays.items():
                np.testing.assert_array_equal(outputs[name.replace("in_", "out_")], array)
        elif model == "strings":
            assert outputs["echo"].tolist() == arrays["text"][1].tolist()
    assert http_call(local_gateway, "GET", "/v2/health/ready").status == 200
