"""Several grpc.aio servers share the gRPC port (``grpc_transport: grpcio`` with
``grpc_servers``): each serves every RPC, and the port is still refused when another process
holds it; the gateway's own transport refuses a taken port too."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
import uvloop
from gateways import add_sub_request, local_settings, model_infer_stub, running

from gateway.server import Gateway


def listeners(port: int) -> int:
    """Sockets listening on ``port`` in this network namespace (grpc listens on IPv4 or
    IPv6-mapped sockets, whichever it picks)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in (line.split() for line in rows.readlines()[1:]):
                if row[1].endswith(f":{port:04X}") and row[3] == "0A":  # 0A: LISTEN
                    count += 1
    return count


@pytest.mark.parametrize("servers", [1, 4])
def test_every_server_on_the_port_answers(repository: Path, servers: int) -> None:
    settings = local_settings(
        repository, host="127.0.0.1", grpc_transport="grpcio", grpc_servers=servers
    )
    with running(settings) as gateway:
        assert listeners(gateway.gateway.grpc_port) == servers
        # A connection each (no shared subchannel): the kernel spreads them over the servers.
        for _ in range(3 * servers):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(gateway.grpc_url, options=options) as channel:
                answer = model_infer_stub(channel)(
                    add_sub_request("add_sub", [1.0] * 4, [2.0] * 4), timeout=30
                )
            total = np.frombuffer(answer.raw_output_contents[0], np.float32)
            np.testing.assert_array_equal(total, np.full(4, 3.0, np.float32))


@pytest.mark.parametrize("transport", ["grpcio", "turnout"])
def test_a_taken_port_is_refused_with_several_servers(repository: Path, transport: str) -> None:
    with socket.socket() as taken:
        # Another gateway's listener: with SO_REUSEPORT, as the servers' own, the kernel
        # would let them join it and share its connections.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = local_settings(
            repository, host="127.0.0.1", grpc_port=port, grpc_servers=4,
            grpc_transport=transport,
        )  # fmt: skip
        gateway = Gateway(settings)
        loop = uvloop.new_event_loop()
        try:
            with pytest.raises(OSError):
                loop.run_until_complete(gateway.start())
            assert listeners(port) == 1  # ours alone: no gRPC server joined it
        finally:
            loop.run_until_complete(gateway.stop())
            loop.close()
