"""Triton Inference Server through PyTriton: the model as a Python inference callable behind
Triton's dynamic batcher, OIP v2 over HTTP and gRPC.

PyTriton starts the tritonserver binary bundled in its wheel, and that binary's Python proxy
backend loads the running interpreter's libpython: LD_LIBRARY_PATH must name its directory.
"""

from __future__ import annotations

import os
import signal
import sysconfig
import threading
from types import FrameType

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

from bench.peers.servers._common import Model, parse_args

# PyTriton guards these endpoints with a generated token by default; the benchmark reads the
# statistics endpoint (batch sizes) on loopback, so that one stays open.
RESTRICTED = ["shared-memory", "model-repository", "trace", "logging"]


def main() -> None:
    args = parse_args(__doc__)
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p
    )
    model = Model(args.model, args.input_name)
    input_shape, output_shape = model.row_shapes()

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {args.output_name: model(inputs[args.input_name])}

    config = TritonConfig(
        http_address=args.host,
        http_port=args.http_port,
        grpc_address=args.host,
        grpc_port=args.grpc_port,
        allow_metrics=False,
        log_verbose=0,
    )
    triton = Triton(
        config=config, security_config=TritonSecurityConfig(restricted_endpoints=RESTRICTED)
    )
    triton.bind(
        model_name=args.name,
        infer_func=infer,
        inputs=[Tensor(name=args.input_name, dtype=np.float32, shape=input_shape)],
        outputs=[Tensor(name=args.output_name, dtype=np.float32, shape=output_shape)],
        config=ModelConfig(
            max_batch_size=args.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us),
        ),
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    triton.run()
    print("triton ready", flush=True)
    stop.wait()
    # Through its API: a bare exit leaves the proxy's /dev/shm segment behind.
    triton.stop()


if __name__ == "__main__":
    main()
