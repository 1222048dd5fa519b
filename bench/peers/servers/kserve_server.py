"""KServe's Python ModelServer (OIP v2 over HTTP and gRPC) with the MLP as a ``kserve.Model``.

KServe's Python server has no batcher of its own (its Go batcher sidecar speaks only the v1
``instances`` protocol), so the model batches its own requests: :class:`MicroBatcher`
gathers up to max-batch-size rows, waiting at most max-delay-us after the first.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Callable

import numpy as np

from bench.peers.servers._common import Model, parse_args

ARGS = parse_args(__doc__)
# kserve parses the command line when imported (abbreviations allowed: `--model` would be
# taken for one of its options), so it sees none of ours.
sys.argv = sys.argv[:1]

from kserve import InferOutput, InferRequest, InferResponse, ModelServer  # noqa: E402
from kserve import Model as KServeModel  # noqa: E402


class MicroBatcher:
    """Stacks concurrent single requests into one model call; created on the serving loop."""

    def __init__(
        self, run: Callable[[np.ndarray], np.ndarray], max_rows: int, max_delay_s: float
    ) -> None:
        self.run, self.max_rows, self.max_delay_s = run, max_rows, max_delay_s
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] | None = None

    async def infer(self, x: np.ndarray) -> np.ndarray:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._serve(self.queue))
        answer: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self.queue.put((x, answer))
        return await answer

    async def _serve(
        self, queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await queue.get()]
            rows = len(waiting[0][0])
            deadline = loop.time() + self.max_delay_s
            while rows < self.max_rows:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                waiting.append(item)
                rows += len(item[0])
            try:
                output = self.run(np.concatenate([x for x, _ in waiting]))
            except Exception as exc:
                for _, answer in waiting:
                    answer.set_exception(exc)
                continue
            start = 0
            for x, answer in waiting:
                if not answer.done():
                    answer.set_result(output[start : start + len(x)])
                start += len(x)


class MLP(KServeModel):
    def __init__(self, name: str, model: Model, output_name: str) -> None:
        super().__init__(name)
        self.batcher = MicroBatcher(model, ARGS.max_batch_size, ARGS.max_delay_us / 1e6)
        self.output_name = output_name
        self.ready = True

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        output = await self.batcher.infer(payload.inputs[0].as_numpy())
        tensor = InferOutput(self.output_name, list(output.shape), "FP32")
        # gRPC: raw_output_contents, what Triton sends (tritonclient reads nothing else).
        tensor.set_data_from_numpy(output, binary_data=bool(payload.from_grpc))
        # KServe rejects an empty response id.
        response_id = payload.id or str(uuid.uuid4())
        return InferResponse(response_id, self.name, [tensor], from_grpc=payload.from_grpc)


def main() -> None:
    model = MLP(ARGS.name, Model(ARGS.model, ARGS.input_name), ARGS.output_name)
    # KServe binds 0.0.0.0 whatever is asked; --host is not used.
    server = ModelServer(
        http_port=ARGS.http_port,
        grpc_port=ARGS.grpc_port,
        workers=1,
        enable_latency_logging=False,
    )
    # No line per request: uvicorn's access log, KServe's request timings and gRPC interceptor.
    for name in ("uvicorn.access", "kserve", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
