"""LitServe with its batching: a ``LitAPI`` that takes and answers OIP v2 JSON at the OIP
infer path, so the same request as turnout's reaches it.

LitServe batches decoded requests (``batch``/``unbatch``), not rows: every request here is
one row, the shape the benchmark sends.
"""

from __future__ import annotations

from typing import Any

import litserve as ls
import numpy as np

from bench.peers.servers._common import Model, parse_args


class MLPAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, path: str, input_name: str, output_name: str, **options: Any) -> None:
        super().__init__(**options)
        self.path, self.input_name, self.output_name = path, input_name, output_name

    def setup(self, device: str) -> None:
        self.model = Model(self.path, self.input_name)

    # LitServe hands FastAPI the annotations of `request` and of encode_response's return as
    # the endpoint's types: unannotated, the body is parsed JSON and the answer JSON.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        tensor = next(t for t in request["inputs"] if t["name"] == self.input_name)
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        if len(x) != 1:
            raise ValueError("one row per request")
        return x

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, output: np.ndarray):  # type: ignore[no-untyped-def]
        tensor = {
            "name": self.output_name,
            "shape": list(output.shape),
            "datatype": "FP32",
            "data": output.ravel().tolist(),
        }
        return {"model_name": "mlp", "outputs": [tensor]}


def main() -> None:
    args = parse_args(__doc__)
    api = MLPAPI(
        args.model,
        args.input_name,
        args.output_name,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.max_delay_us / 1e6,
        api_path=f"/v2/models/{args.name}/infer",
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    # log_level warning: uvicorn writes no line per request.
    server.run(host=args.host, port=args.http_port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
