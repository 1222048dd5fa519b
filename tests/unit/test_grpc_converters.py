"""OIP protobuf messages <-> data plane types: raw and typed contents, parameters."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from gateway.codecs import DATATYPES, decode_raw, encode_raw
from gateway.errors import InvalidInput
from gateway.grpc.converters import (
    decode_parameters,
    encode_parameters,
    infer_request_from_proto,
    infer_response_to_proto,
    model_metadata_to_proto,
)
from gateway.grpc.messages import message
from gateway.types import InferOutput, InferResponse

ModelInferRequest = message("ModelInferRequest")
InferParameter = message("InferParameter")
BF16 = np.dtype(ml_dtypes.bfloat16)

TENSORS: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 1, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 2**63, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -2.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[0.1, -2.5, 3.4e38]], dtype=np.float32),
    "FP64": np.array([[0.1, np.pi, -1e300]], dtype=np.float64),
    "BF16": np.array([[0.5, -2.0, 2.0**100]], dtype=BF16),
    "BYTES": np.array([[b"", b"\x00\xff", "\u00e9".encode()]], dtype=np.object_),
}
TYPED = [d for d in TENSORS if DATATYPES[d].contents_field is not None]


def same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype == BF16:
        return bool(np.array_equal(got.view(np.uint16), want.view(np.uint16)))
    return got.tolist() == want.tolist()


def add_input(request: Any, name: str, datatype: str, shape: Any, **contents: Any) -> Any:
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return tensor


# -- requests ---------------------------------------------------------------------------------


def test_raw_inputs_every_datatype() -> None:
    request = ModelInferRequest(model_name="m", model_version="2", id="r1")
    for datatype, values in TENSORS.items():
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=list(values.shape))
        request.raw_input_contents.append(encode_raw(values, datatype))
    decoded = infer_request_from_proto(request, timeout_s=1.5)
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("m", "2", "r1")
    assert decoded.timeout_s == 1.5
    assert [i.name for i in decoded.inputs] == [f"in_{d}" for d in TENSORS]
    for item in decoded.inputs:
        assert item.shape == TENSORS[item.datatype].shape
        assert same(item.data, TENSORS[item.datatype]), item.datatype


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_contents(datatype: str) -> None:
    values = TENSORS[datatype]
    request = ModelInferRequest(model_name="m")
    field = DATATYPES[datatype].contents_field
    assert field is not None
    add_input(request, "x", datatype, values.shape, **{field: values.ravel().tolist()})
    (item,) = infer_request_from_proto(request, None).inputs
    assert same(item.data, values)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("INT8", "int_contents", [127, 128]),
        ("INT8", "int_contents", [-129]),
        ("INT16", "int_contents", [40000]),
        ("UINT8", "uint_contents", [256]),
        ("UINT16", "uint_contents", [70000]),
    ],
)
def test_narrow_integers_are_range_checked(datatype: str, field: str, values: list[int]) -> None:
    request = ModelInferRequest(model_name="m")
    add_input(request, "small", datatype, [len(values)], **{field: values})
    with pytest.raises(InvalidInput, match=f"input 'small': values out of range for {datatype}"):
        infer_request_from_proto(request, None)


@pytest.mark.parametrize(
    "datatype",
    [
        "INT8",
        "UINT16",
        "BOOL",
        "FP32",
        "BYTES",
    ],
)
def test_empty_typed_tensor(datatype: str) -> None:
    request = ModelInferRequest(model_name="m")
    add_input(request, "x", datatype, [0, 3])
    (item,) = infer_request_from_proto(request, None).inputs
    assert item.data.shape == (0, 3)
    assert item.data.dtype == DATATYPES[datatype].dtype


@pytest.mark.parametrize(
    ("build", "message_"),
    [
        (
            lambda r: add_input(r, "h", "FP16", [1], fp32_contents=[1.0]),
            "input 'h': FP16 travels only in raw_input_contents",
        ),
        (
            lambda r: add_input(r, "b", "BF16", [1]),
            "input 'b': BF16 travels only in raw_input_contents",
        ),
        (
            lambda r: add_input(r, "w", "INT32", [2], int64_contents=[1, 2]),
            "input 'w': INT32 data belongs in contents.int_contents, got contents.int64_contents",
        ),
        (
            lambda r: add_input(r, "n", "FP32", [2, 2], fp32_contents=[1, 2, 3]),
            r"input 'n': shape \[2, 2\] needs 4 elements, contents.fp32_contents has 3",
        ),
        (
            lambda r: add_input(r, "d", "FP12", [1], fp32_contents=[1]),
            "input 'd': unknown datatype 'FP12'",
        ),
        (
            lambda r: add_input(r, "s", "FP32", [1, -1], fp32_contents=[1]),
            r"input 's': shape \[1, -1\] has a negative dimension",
        ),
        (lambda r: add_input(r, "", "FP32", [1], fp32_contents=[1]), r"inputs\[0\].name"),
        (lambda r: None, "'inputs' must not be empty"),
    ],
)
def test_typed_contents_errors(build: Any, message_: str) -> None:
    request = ModelInferRequest(model_name="m")
    build(request)
    with pytest.raises(InvalidInput, match=message_):
        infer_request_from_proto(request, None)


def test_raw_contents_errors() -> None:
    request = ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[2])
    request.inputs.add(name="b", datatype="FP32", shape=[2])
    request.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs"):
        infer_request_from_proto(request, None)

    request.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    request.inputs[1].contents.fp32_contents.extend([1, 2])
    with pytest.raises(InvalidInput, match="input 'b': contents and raw_input_contents cannot be"):
        infer_request_from_proto(request, None)

    request.inputs[1].ClearField("contents")
    request.raw_input_contents[1] = b"\0" * 4
    with pytest.raises(InvalidInput, match=r"input 'b': shape \[2\] of FP32 needs 8 bytes, got 4"):
        infer_request_from_proto(request, None)


def test_requested_outputs_and_parameters() -> None:
    request = ModelInferRequest(model_name="m")
    add_input(request, "x", "INT32", [1], int_contents=[3])
    request.parameters["sequence_id"].uint64_param = 2**64 - 1
    request.parameters["priority"].int64_param = -7
    request.parameters["tag"].string_param = "canary"
    request.parameters["flag"].bool_param = True
    request.parameters["ratio"].double_param = 0.25
    request.parameters["unset"].CopyFrom(InferParameter())
    request.inputs[0].parameters["p"].int64_param = 1
    out = request.outputs.add(name="y")
    out.parameters["classification"].int64_param = 3
    request.outputs.add(name="z")
    decoded = infer_request_from_proto(request, None)
    assert decoded.parameters == {
        "sequence_id": 2**64 - 1,
        "priority": -7,
        "tag": "canary",
        "flag": True,
        "ratio": 0.25,
    }
    assert decoded.inputs[0].parameters == {"p": 1}
    assert [(o.name, o.parameters) for o in decoded.outputs] == [
        ("y", {"classification": 3}),
        ("z", {}),
    ]


def test_parameters_round_trip() -> None:
    params = {"flag": False, "n": -(2**63), "ratio": 1e-300, "tag": "\u00e9", "big": 2**63 - 1}
    target = ModelInferRequest().parameters
    encode_parameters(target, params)
    assert target["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert target["n"].WhichOneof("parameter_choice") == "int64_param"
    assert target["ratio"].WhichOneof("parameter_choice") == "double_param"
    assert target["tag"].WhichOneof("parameter_choice") == "string_param"
    decoded = decode_parameters(target)
    assert decoded == params
    assert type(decoded["flag"]) is bool


def test_parameters_above_int64_use_uint64() -> None:
    target = ModelInferRequest().parameters
    encode_parameters(target, {"sequence_id": 2**64 - 1})
    assert target["sequence_id"].uint64_param == 2**64 - 1


# -- responses --------------------------------------------------------------------------------


def test_response_carries_every_output_raw() -> None:
    outputs = [
        InferOutput(f"out_{d}", d, v.shape, v, {"p": i}) for i, (d, v) in enumerate(TENSORS.items())
    ]
    response = InferResponse("m", "3", outputs, id="r9", parameters={"done": True})
    reply = infer_response_to_proto(response)
    assert (reply.model_name, reply.model_version, reply.id) == ("m", "3", "r9")
    assert decode_parameters(reply.parameters) == {"done": True}
    assert len(reply.raw_output_contents) == len(TENSORS)
    for i, (tensor, raw) in enumerate(zip(reply.outputs, reply.raw_output_contents, strict=True)):
        values = TENSORS[tensor.datatype]
        assert tensor.name == f"out_{tensor.datatype}"
        assert list(tensor.shape) == list(values.shape)
        assert decode_parameters(tensor.parameters) == {"p": i}
        assert not tensor.HasField("contents")
        assert raw == encode_raw(values, tensor.datatype)
        assert same(decode_raw("t", tensor.datatype, tuple(tensor.shape), raw), values)


def test_response_survives_the_wire() -> None:
    values = np.arange(6, dtype=np.int64).reshape(2, 3)
    reply = infer_response_to_proto(
        InferResponse("m", "1", [InferOutput("y", "INT64", (2, 3), values)])
    )
    parsed = message("ModelInferResponse").FromString(reply.SerializeToString())
    (raw,) = parsed.raw_output_contents
    assert decode_raw("y", "INT64", tuple(parsed.outputs[0].shape), raw).tolist() == values.tolist()


def test_model_metadata() -> None:
    meta = {
        "name": "m",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "BYTES", "shape": [-1]}],
        "properties": {"max_batch_size": "8"},
    }
    reply = model_metadata_to_proto(meta)
    assert (reply.name, list(reply.versions), reply.platform) == (
        "m",
        ["1", "2"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs] == [("y", "BYTES", [-1])]
    assert dict(reply.properties) == {"max_batch_size": "8"}
