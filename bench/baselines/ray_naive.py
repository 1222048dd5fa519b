"""System (b): what a Ray Serve user writes by hand.

One deployment behind Ray Serve's own HTTP proxy, with @serve.batch stacking requests into one
ONNX Runtime call. Same route and JSON as the floor, plus GET /stats with batch counters.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from types import FrameType

import numpy as np
import onnxruntime as ort
import orjson
import ray
from ray import serve
from ray.serve.schema import LoggingConfig
from starlette.requests import Request
from starlette.responses import Response

from bench.baselines._oip import (
    INFER_PATH,
    INPUT_NAME,
    error_body,
    parse_args,
    parse_request,
    render_response,
)

# Ray Serve logs every request at INFO otherwise, which costs CPU this 2-core benchmark lacks.
LOGGING = LoggingConfig(enable_access_log=False, log_level="WARNING")


class MLP:
    def __init__(self, model: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.rows = 0
        self.batches = 0

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        output = self.session.run(None, {INPUT_NAME: np.concatenate(inputs)})[0]
        self.batches += 1
        self.rows += len(output)
        # Hand each caller back its own rows.
        offsets = np.cumsum([len(x) for x in inputs])[:-1]
        return list(np.split(output, offsets))

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path == "/stats":
            stats = {"inference_count": self.rows, "execution_count": self.batches}
            return Response(orjson.dumps(stats), media_type="application/json")
        if request.method != "POST" or path != INFER_PATH:
            return Response(error_body(f"no route {path}"), 404, media_type="application/json")
        try:
            batch = parse_request(await request.body())
        except (ValueError, KeyError, TypeError) as exc:
            return Response(error_body(str(exc)), 400, media_type="application/json")
        output = await self.infer(batch)
        return Response(render_response(output), media_type="application/json")


# max_ongoing_requests defaults to 5, which would cap every batch at 5 rows; the Ray Serve
# batching guide says to raise it above max_batch_size, so the baseline gets a fair chance.
MLPDeployment = serve.deployment(
    max_ongoing_requests=128, ray_actor_options={"num_cpus": 1}, logging_config=LOGGING
)(MLP)


def wait_http(url: str, timeout: float = 60.0) -> None:
    """serve.run returns before the proxy routes to the new app; poll until it does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def main() -> None:
    args = parse_args(__doc__)

    # address="local" always starts a private cluster, never attaching to one already running.
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config=LOGGING)
    serve.run(MLPDeployment.bind(args.model), name="mlp", route_prefix="/", logging_config=LOGGING)
    wait_http(f"http://{args.host}:{args.port}/stats")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed after ray.init, which sets its own SIGTERM handler in the driver.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"ray_naive ready on http://{args.host}:{args.port}", flush=True)
    while not stop.wait(0.5):
        pass
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


if __name__ == "__main__":
    main()
