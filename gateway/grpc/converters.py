"""Protobuf messages of the OIP gRPC service <-> data plane types; the only place they meet."""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.codecs import decode_raw, element_count, encode_raw, lookup, validate_shape
from gateway.errors import InvalidInput
from gateway.grpc.messages import message
from gateway.types import InferInput, InferRequest, InferResponse, Parameters, RequestedOutput

__all__ = [
    "decode_parameters",
    "encode_parameters",
    "infer_request_from_proto",
    "infer_response_to_proto",
    "model_metadata_to_proto",
]

_CONTENT_FIELDS = tuple(message("InferTensorContents").DESCRIPTOR.fields_by_name)
_InferResponse = message("ModelInferResponse")
_ModelMetadataResponse = message("ModelMetadataResponse")


def decode_parameters(params: Any) -> Parameters:
    out: Parameters = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def encode_parameters(target: Any, params: Parameters) -> None:
    for key, value in params.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if value >= 2**63:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = str(value)


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> Any:
    dtype = lookup(name, datatype)
    if dtype.contents_field is None:
        raise InvalidInput(f"input '{name}': {datatype} travels only in raw_input_contents")
    values = getattr(contents, dtype.contents_field)
    expected = element_count(shape)
    if len(values) != expected:
        others = [f for f in _CONTENT_FIELDS if f != dtype.contents_field and getattr(contents, f)]
        if others:
            raise InvalidInput(
                f"input '{name}': {datatype} data belongs in contents.{dtype.contents_field}, "
                f"got contents.{others[0]}"
            )
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} needs {expected} elements, "
            f"contents.{dtype.contents_field} has {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(expected, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    narrow_int = dtype.dtype.kind in "iu" and dtype.itemsize < 4
    if not narrow_int:
        return np.asarray(values, dtype=dtype.dtype).reshape(shape)
    # INT8/INT16/UINT8/UINT16 travel widened to 32 bits: check they fit before narrowing.
    array = np.asarray(values, dtype=np.int64)
    info = np.iinfo(dtype.dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise InvalidInput(f"input '{name}': values out of range for {datatype}")
    return array.astype(dtype.dtype).reshape(shape)


def infer_request_from_proto(request: Any, timeout_s: float | None) -> InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs: list[InferInput] = []
    for index, item in enumerate(request.inputs):
        name = item.name
        if not name:
            raise InvalidInput(f"inputs[{index}].name must be set")
        shape = validate_shape(name, tuple(item.shape))
        if raw:
            if item.HasField("contents"):
                raise InvalidInput(
                    f"input '{name}': contents and raw_input_contents cannot be mixed"
                )
            data = decode_raw(name, item.datatype, shape, raw[index])
        else:
            data = _from_contents(name, item.datatype, shape, item.contents)
        inputs.append(
            InferInput(name, item.datatype, shape, data, decode_parameters(item.parameters))
        )
    if not inputs:
        raise InvalidInput("'inputs' must not be empty")
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        parameters=decode_parameters(request.parameters),
        inputs=inputs,
        outputs=[RequestedOutput(o.name, decode_parameters(o.parameters)) for o in request.outputs],
        timeout_s=timeout_s,
    )


def infer_response_to_proto(response: InferResponse) -> Any:
    reply = _InferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
    )
    encode_parameters(reply.parameters, response.parameters)
    for output in response.outputs:
        tensor = reply.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        encode_parameters(tensor.parameters, output.parameters)
        reply.raw_output_contents.append(encode_raw(output.data, output.datatype))
    return reply


def model_metadata_to_proto(meta: dict[str, Any]) -> Any:
    tensor = _ModelMetadataResponse.TensorMetadata
    return _ModelMetadataResponse(
        name=meta["name"],
        versions=meta["versions"],
        platform=meta["platform"],
        inputs=[tensor(**t) for t in meta["inputs"]],
        outputs=[tensor(**t) for t in meta["outputs"]],
        properties=meta["properties"],
    )
