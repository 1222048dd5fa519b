"""System (a), the floor: uvicorn + Starlette calling ONNX Runtime inline, no batching.

This is what a developer writes by hand in a few minutes; any gateway should be compared to it.
"""

from __future__ import annotations

import asyncio

import onnxruntime as ort
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.baselines._oip import (
    INFER_PATH,
    INPUT_NAME,
    error_body,
    parse_args,
    parse_request,
    render_response,
)


def make_app(model: str) -> Starlette:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    async def infer(request: Request) -> Response:
        try:
            batch = parse_request(await request.body())
        except (ValueError, KeyError, TypeError) as exc:
            return Response(error_body(str(exc)), 400, media_type="application/json")
        # A 1-row MLP run takes ~0.07 ms: cheaper inline than handing it to a thread pool.
        output = session.run(None, {INPUT_NAME: batch})[0]
        return Response(render_response(output), media_type="application/json")

    return Starlette(routes=[Route(INFER_PATH, infer, methods=["POST"])])


async def serve(model: str, host: str, port: int) -> None:
    config = uvicorn.Config(
        make_app(model),
        host=host,
        port=port,
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    # uvicorn sets `started` only once the socket listens; the runner waits for this line.
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.05)
    print(f"floor ready on http://{host}:{port}", flush=True)
    await task


def main() -> None:
    args = parse_args(__doc__)
    uvloop.run(serve(args.model, args.host, args.port))


if __name__ == "__main__":
    main()
