"""What the peers' server scripts share: their command line and the ONNX Runtime session.

Only numpy and onnxruntime here (every peer's venv has both), nothing from turnout.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import onnxruntime as ort


def parse_args(doc: str | None) -> argparse.Namespace:
    """The command line bench/peers/systems.py gives every peer script."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--model", required=True, help="path to model.onnx")
    parser.add_argument("--name", default="mlp", help="the model's name on the wire")
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--output-name", default="output")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-us", type=int, default=1000)
    return parser.parse_args()


class Model:
    """The ONNX model in ONNX Runtime, one intra-op thread, as in every system measured."""

    def __init__(self, path: str, input_name: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = input_name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        output: np.ndarray = self.session.run(None, {self.input_name: batch.astype(np.float32)})[0]
        return output

    def row_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One row's input and output shapes (the batch dimension left out)."""

        def row(arg: Any) -> tuple[int, ...]:
            return tuple(int(d) for d in arg.shape[1:])

        return row(self.session.get_inputs()[0]), row(self.session.get_outputs()[0])
