"""OIP REST bodies <-> data plane types, including Triton's binary tensor data extension.

A binary request is the JSON object followed by tensor bytes; the header
``Inference-Header-Content-Length`` says where the JSON ends. Inputs sent in binary carry
``parameters.binary_data_size`` instead of ``data``, and claim the bytes in input order.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.codecs import (
    decode_json_data,
    decode_raw,
    encode_json_data,
    encode_raw,
    validate_shape,
)
from gateway.errors import InvalidInput
from gateway.types import InferInput, InferRequest, InferResponse, Parameters, RequestedOutput

__all__ = ["HEADER_LENGTH", "decode_infer_request", "encode_infer_response"]

HEADER_LENGTH = "inference-header-content-length"
_SCALARS = (bool, int, float, str)


def _parameters(where: str, value: Any) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}.parameters must be an object")
    for key, item in value.items():
        if not isinstance(item, _SCALARS):
            raise InvalidInput(f"{where}.parameters.{key} must be a boolean, number or string")
    return value


def decode_infer_request(
    model_name: str, model_version: str, body: bytes, header_length: str | None
) -> InferRequest:
    """Parse a REST inference body (JSON, or JSON + binary tensors)."""
    if header_length is not None:
        # Digits only, as for Content-Length: int() would also take "-1", "+8" and "1_0".
        if not (header_length.isascii() and header_length.isdigit()):
            raise InvalidInput(
                "Inference-Header-Content-Length must be a non-negative integer, "
                f"got {header_length!r}"
            )
        digits = header_length.lstrip("0") or "0"
        # 18 digits exceed any body; int() of thousands of digits would raise ValueError.
        if len(digits) > 18 or int(digits) > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {digits} is beyond the body's {len(body)} bytes"
            )
        json_length = int(digits)
        json_part, binary = memoryview(body)[:json_length], memoryview(body)[json_length:]
    else:
        json_part, binary = memoryview(body), memoryview(b"")
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in request body: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput("request body must be a JSON object")
    # A JSON boolean is the bare word true or false: a body without either has none, and
    # the numeric inputs need not be searched for one (a search of every value per input).
    text = body if len(json_part) == len(body) else bytes(json_part)
    booleans = b"true" in text or b"false" in text

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = _parameters("request", document.get("parameters"))

    offset = 0
    inputs: list[InferInput] = []
    for index, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{index}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inputs[{index}].name must be a non-empty string")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input '{name}': 'datatype' is required")
        if "shape" not in item:
            raise InvalidInput(f"input '{name}': 'shape' is required")
        shape = validate_shape(name, item["shape"])
        input_params = _parameters(f"input '{name}'", item.get("parameters"))
        size = input_params.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise InvalidInput(f"input '{name}': has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be an integer >= 0")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{name}': binary_data_size {size} runs past the binary data "
                    f"({len(binary) - offset} bytes left)"
                )
            data = decode_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in item:
            data = decode_json_data(name, datatype, shape, item["data"], booleans=booleans)
        else:
            raise InvalidInput(f"input '{name}': 'data' is required")
        inputs.append(InferInput(name, datatype, shape, data, input_params))
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input"
        )

    outputs: list[RequestedOutput] = []
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        for index, item in enumerate(raw_outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInput(f"outputs[{index}] must be an object with a string 'name'")
            outputs.append(
                RequestedOutput(
                    item["name"], _parameters(f"output '{item['name']}'", item.get("parameters"))
                )
            )

    timeout_s = None
    timeout_us = parameters.get("timeout")
    if timeout_us is not None:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us <= 0:
            raise InvalidInput("parameters.timeout must be a positive integer (microseconds)")
        timeout_s = timeout_us / 1e6

    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        parameters=parameters,
        inputs=inputs,
        outputs=outputs,
        timeout_s=timeout_s,
    )


def encode_infer_response(
    response: InferResponse, request: InferRequest
) -> tuple[bytes, int | None]:
    """Return the body and, when tensors went in binary, the JSON part's length."""
    binary_default = request.parameters.get("binary_data_output") is True
    per_output = {o.name: o.parameters.get("binary_data") for o in request.outputs}
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in response.outputs:
        wanted = per_output.get(output.name)
        binary = binary_default if wanted is None else wanted is True
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if binary:
            raw = encode_raw(output.data, output.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(output.data, output.datatype)
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _json_data(values: Any, datatype: str) -> Any:
    if datatype in ("BYTES", "BF16", "FP16"):
        return encode_json_data(values, datatype)
    # orjson writes contiguous numpy arrays natively, far faster than tolist().
    return values.reshape(-1) if values.flags.c_contiguous else values.ravel()
