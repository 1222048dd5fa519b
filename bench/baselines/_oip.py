"""What both baselines share: their command line, and the few lines of OIP JSON they need
(one FP32 input in, one FP32 output out)."""

from __future__ import annotations

import argparse

import numpy as np
import orjson

from bench.models import INPUT_NAME, MODEL_NAME, OUTPUT_NAME

INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"


def parse_request(body: bytes) -> np.ndarray:
    """Return the `input` tensor of an OIP JSON infer request as a float32 array."""
    request = orjson.loads(body)
    for tensor in request["inputs"]:
        if tensor["name"] == INPUT_NAME:
            return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    raise KeyError(f"request has no input named {INPUT_NAME!r}")


def render_response(output: np.ndarray) -> bytes:
    """Serialise `output` as an OIP JSON infer response (flat, row-major data)."""
    return orjson.dumps(
        {
            "model_name": MODEL_NAME,
            "outputs": [
                {
                    "name": OUTPUT_NAME,
                    "shape": list(output.shape),
                    "datatype": "FP32",
                    "data": output.ravel(),
                }
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def parse_args(doc: str | None) -> argparse.Namespace:
    """``--model PATH [--port 8000] [--host 127.0.0.1]``, the baselines' command line."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--model", required=True, help="path to model.onnx")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    return parser.parse_args()
