"""What a gRPC call costs the server before turnout's code runs: ModelInfer answered with
fixed bytes by grpc.aio (1 or N servers on one port), by turnout's own transport
(gateway/grpc/transport.py, the default), or by the pure-Python ``h2`` library on an asyncio
Protocol (an earlier prototype, when ``h2`` is importable), on uvloop; h2load drives it as
bench.serving does. Prints req/s and server CPU per call.

  python -m bench.grpc_floor [--duration 6] [--concurrency 16 64] [--servers 1 8]
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import argument_parser, console, free_port, new_table
from bench.models import INPUT_DIM
from bench.serving import GRPC_PATH, LOAD_THREADS, grpc_body, parse_h2load

ANSWER = b"\x0a\x03mlp"  # ModelInferResponse(model_name="mlp")
FRAME = struct.pack(">BI", 0, len(ANSWER)) + ANSWER


async def _infer(request: bytes, context: Any) -> bytes:
    return ANSWER


async def serve_grpc_aio(port: int, servers: int) -> None:
    import grpc

    started = []
    for _ in range(servers):
        server = grpc.aio.server(options=[("grpc.so_reuseport", int(servers > 1))])
        handler = grpc.unary_unary_rpc_method_handler(_infer)  # bytes in, bytes out
        service = "inference.GRPCInferenceService"
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, {"ModelInfer": handler})]
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        started.append(server)
    await asyncio.Event().wait()


async def serve_h2(port: int) -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ConnectionTerminated, DataReceived, StreamEnded
    from h2.exceptions import ProtocolError

    head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [(b"grpc-status", b"0")]

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            config = H2Configuration(client_side=False, header_encoding=None)
            self.h2 = H2Connection(config)
            self.h2.initiate_connection()
            transport.write(self.h2.data_to_send())

        def data_received(self, data: bytes) -> None:
            try:
                self.handle(data)
            except ProtocolError:  # a stream answered after the client's GOAWAY
                self.transport.close()

        def handle(self, data: bytes) -> None:
            connection = self.h2
            for event in connection.receive_data(data):
                if isinstance(event, DataReceived):
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, StreamEnded):
                    connection.send_headers(event.stream_id, head)
                    connection.send_data(event.stream_id, FRAME)
                    connection.send_headers(event.stream_id, trailers, end_stream=True)
                elif isinstance(event, ConnectionTerminated):
                    self.transport.close()
                    return
            self.transport.write(connection.data_to_send())

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Protocol, "127.0.0.1", port)
    await server.serve_forever()


async def serve_turnout(port: int) -> None:
    import grpc

    from gateway.grpc.transport import GrpcServer
    from gateway.overload import Overload

    handler = grpc.unary_unary_rpc_method_handler(_infer)  # bytes in, bytes out
    service = "inference.GRPCInferenceService"
    generic = grpc.method_handlers_generic_handler(service, {"ModelInfer": handler})
    server = GrpcServer([generic], max_message_bytes=64 << 20, overload=Overload(0.5))
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    kind: str, servers: int, duration: float, concurrency: int, work: Path
) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "bench.grpc_floor", "--serve", kind, str(port), str(servers)]
    server = subprocess.Popen(command)
    try:
        time.sleep(1.5)
        body = work / "body.grpc"
        url = f"http://127.0.0.1:{port}{GRPC_PATH}"
        h2load = ["h2load", "-m", "1", "-t", str(LOAD_THREADS), "-d", str(body), url]
        h2load += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        subprocess.run([*h2load, "-D", "2", "-c", "16"], capture_output=True, timeout=60)
        before = _cpu_s(server.pid)
        log = work / "h2load.log"
        log.unlink(missing_ok=True)
        done = subprocess.run(
            [*h2load, "-D", f"{duration:g}", "-c", str(concurrency), "--log-file", str(log)],
            capture_output=True, text=True, timeout=duration + 60,
        )  # fmt: skip
        cpu = _cpu_s(server.pid) - before
        result = parse_h2load(done.stdout, log)
        return {
            "server": kind if kind in ("h2", "turnout") else f"grpc.aio x{servers}",
            "concurrency": concurrency,
            "rps": result.rps,
            "cpu_us": cpu * 1e6 / max(result.requests, 1),
        }
    finally:
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--serve"]:
        import uvloop

        kind, port, servers = args_in[1], int(args_in[2]), int(args_in[3])
        if kind == "h2":
            uvloop.run(serve_h2(port))
        elif kind == "turnout":
            uvloop.run(serve_turnout(port))
        else:
            uvloop.run(serve_grpc_aio(port, servers))
        return 0
    parser = argument_parser(__doc__)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(args_in)
    kinds = [("grpc.aio", n) for n in args.servers] + [("turnout", 1)]
    if importlib.util.find_spec("h2") is not None:
        kinds.append(("h2", 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="turnout-grpc-floor-") as tmp:
        work = Path(tmp)
        # bench.serving's request (the server does not read it)
        (work / "body.grpc").write_bytes(grpc_body(np.zeros((1, INPUT_DIM), np.float32)))
        for concurrency in args.concurrency:
            for kind, servers in kinds:
                rows.append(measure(kind, servers, args.duration, concurrency, work))
    columns = ["server", "conc", "req/s", "CPU us/call"]
    table = new_table("gRPC floor (fixed answer)", columns, left=("server",))
    for row in rows:
        table.add_row(
            row["server"], str(row["concurrency"]), f"{row['rps']:.0f}", f"{row['cpu_us']:.0f}"
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
