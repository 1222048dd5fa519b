"""Smoke-test turnout's image: serve its demo models from inside it, ask from outside.

    python deploy/image/smoke_test.py --image localhost/turnout:0.1.0     (make image-test)

Runs the image's entrypoint with ``buildah run --isolation chroot`` (which shares the host's
network, so the ports are on the host's loopback), waits for the gateway to be ready, then
sends real requests with tritonclient over HTTP and gRPC and compares every answer with
ONNX Runtime run here on the same model file, read from the container's root filesystem.
It also checks the image's health check, the gateway's and the sidecar's metrics, the user
the server runs as, and that no compiler or installer is in the image; then stops the
server with SIGTERM, as a container runtime does, and expects a clean exit.

Needs root (buildah's storage), buildah, and the dev extra (tritonclient, onnxruntime,
scikit-learn for the demo rows). Slow (Ray starts inside), so not part of ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "breast_cancer"
REPOSITORY = "/opt/turnout/demo-models"
UID = 10001
BUILD_TOOLS = ("gcc", "cc", "c++", "g++", "make", "pip", "pip3", "python3-config")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def buildah(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = children(), [], [pid]
    while todo:
        below = tree.get(todo.pop(), [])
        found.extend(below)
        todo.extend(below)
    return found


def processes_in(root: str) -> list[int]:
    """Processes whose root directory is ``root``: one `buildah run`'s, no others."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == root:
                    found.append(int(entry.name))
    return found


class Server:
    """The image's entrypoint, run in a working container; its output is kept."""

    def __init__(self, container: str, command: list[str], env: dict[str, str]) -> None:
        env_flags = [flag for name, value in env.items() for flag in ("--env", f"{name}={value}")]
        self.process = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", *env_flags, container, "--", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.root: str | None = None
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if "turnout ready" in line:
                self.ready.set()

    def entrypoint(self) -> tuple[int, str]:
        """The container's first process (tini, below buildah's chroot helper) and its root
        directory: every process of this run has that root."""
        for pid in descendants(self.process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "tini":
                    return pid, os.readlink(f"/proc/{pid}/root")
        raise RuntimeError(f"no tini below buildah run ({self.process.pid})")

    def kill_leftovers(self) -> list[int]:
        """SIGKILL whatever of this run is still there (nothing, after a clean stop)."""
        if self.root is None:
            return []
        left = processes_in(self.root)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def output(self, last: int = 40) -> str:
        return "\n".join(self.lines[-last:])


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def run(self, name: str, check: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail = check()
            ok = True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        detail = f"{detail} ({time.monotonic() - started:.1f} s)"
        self.rows.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(ok for _, ok, _ in self.rows)


def reference(model_file: Path, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    probabilities: np.ndarray[Any, Any] = session.run(["probabilities"], {"features": rows})[0]
    return probabilities


def check_http(url: str, rootfs: Path, rows: np.ndarray[Any, Any]) -> str:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"][0]["name"] == "features", metadata
    answers = []
    for version in ("1", "2"):
        assert client.is_model_ready(MODEL, version)
        tensor = httpclient.InferInput("features", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows, binary_data=version == "2")
        result = client.infer(MODEL, [tensor], model_version=version)
        expected = reference(rootfs / REPOSITORY.lstrip("/") / MODEL / version / "model.onnx", rows)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5)
        answers.append(f"v{version} {result.as_numpy('probabilities').shape}")
    return f"{url}: metadata, v1 JSON and v2 binary tensors match ONNX Runtime: {answers}"


def check_grpc(url: str, rootfs: Path, rows: np.ndarray[Any, Any]) -> str:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    tensor = grpcclient.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = client.infer(MODEL, [tensor])  # no version: the highest serves
    expected = reference(rootfs / REPOSITORY.lstrip("/") / MODEL / "3" / "model.onnx", rows)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5)
    client.close()
    return f"{url}: {len(rows)} rows, highest version (3) matches ONNX Runtime"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def check_metrics(http_url: str, sidecar_url: str) -> str:
    gateway = fetch(f"http://{http_url}/metrics")
    assert "turnout_requests_total" in gateway, "no turnout_requests_total on the gateway"
    deadline = time.monotonic() + 30
    while True:  # the sidecar starts after the gateway: give it a moment
        try:
            sidecar = fetch(f"{sidecar_url}/metrics")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert "turnout_" in sidecar, "no turnout_ metrics on the sidecar"
    return f"gateway /metrics and sidecar {sidecar_url}/metrics answer"


def in_container(container: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", "run", "--isolation", "chroot", container, "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check_healthcheck(container: str, config: dict[str, Any]) -> str:
    test = config["Healthcheck"]["Test"]
    assert test[0] == "CMD", test
    result = in_container(container, *test[1:])
    assert result.returncode == 0, result.stdout + result.stderr
    return f"{' '.join(test[1:])}: {result.stdout.strip()}"


def check_user(container: str) -> str:
    result = in_container(container, "id", "-u")
    assert result.stdout.strip() == str(UID), result.stdout + result.stderr
    return f"uid {UID}, not root"


def check_no_build_tools(container: str) -> str:
    found = []
    for tool in BUILD_TOOLS:
        if in_container(container, "sh", "-c", f"command -v {tool}").returncode == 0:
            found.append(tool)
    assert not found, f"found in the image: {found}"
    return f"none of {', '.join(BUILD_TOOLS)}"


def stop(server: Server, timeout_s: float) -> str:
    """SIGTERM to the entrypoint (tini, the container's first process), as a runtime does."""
    tini, _ = server.entrypoint()
    os.kill(tini, signal.SIGTERM)
    code = server.process.wait(timeout=timeout_s)
    assert code == 0, f"exit code {code}:\n{server.output()}"
    left = server.kill_leftovers()
    assert not left, f"processes left after the exit: {left}"
    return f"exit code 0 after SIGTERM, no process left; last line: {server.lines[-1]}"


@contextlib.contextmanager
def working_container(image: str) -> Iterator[tuple[str, Path]]:
    container = buildah("from", "--pull-never", image)
    try:
        yield container, Path(buildah("mount", container))
    finally:
        buildah("umount", container, check=False)
        buildah("rm", container, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="localhost/turnout:0.1.0")
    parser.add_argument("--backend", choices=["ray", "local"], default="ray")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    from sklearn.datasets import load_breast_cancer

    rows = load_breast_cancer().data[:16].astype(np.float32)
    inspected = json.loads(buildah("inspect", "--type", "image", args.image))
    config = inspected["Docker"]["config"]
    entrypoint: list[str] = config["Entrypoint"]
    http_port, grpc_port, sidecar_port = free_port(), free_port(), free_port()
    ports = http_port, grpc_port, sidecar_port
    started = time.monotonic()
    with working_container(args.image) as (container, rootfs):
        command = [
            *entrypoint,
            "--model-repository", REPOSITORY,
            "--http-port", str(http_port),
            "--grpc-port", str(grpc_port),
            "--backend", args.backend,
        ]  # fmt: skip
        print(f"{args.image}: {' '.join(command)}", flush=True)
        server = Server(container, command, {"TURNOUT_MONITOR_METRICS_PORT": str(sidecar_port)})
        try:
            return run_checks(args, server, container, rootfs, config, rows, started, ports)
        finally:
            if server.process.poll() is None:
                with contextlib.suppress(RuntimeError, ProcessLookupError):
                    os.kill(server.entrypoint()[0], signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.process.wait(timeout=60)
            server.kill_leftovers()
            if server.process.poll() is None:
                server.process.kill()


def run_checks(
    args: argparse.Namespace,
    server: Server,
    container: str,
    rootfs: Path,
    config: dict[str, Any],
    rows: np.ndarray[Any, Any],
    started: float,
    ports: tuple[int, int, int],
) -> int:
    http_port, grpc_port, sidecar_port = ports
    while not server.ready.wait(0.5):
        if server.process.poll() is not None or time.monotonic() - started > args.ready_timeout:
            print(f"FAIL not ready within {args.ready_timeout:g} s:\n{server.output()}")
            return 1
        if server.root is None:
            with contextlib.suppress(RuntimeError):
                server.root = server.entrypoint()[1]
    if server.root is None:
        server.root = server.entrypoint()[1]
    checks = Checks()
    print(f"ready after {time.monotonic() - started:.1f} s: {server.lines[-1]}", flush=True)
    http_url, grpc_url = f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    checks.run("HTTP (tritonclient)", lambda: check_http(http_url, rootfs, rows))
    checks.run("gRPC (tritonclient)", lambda: check_grpc(grpc_url, rootfs, rows))
    checks.run("metrics", lambda: check_metrics(http_url, f"http://127.0.0.1:{sidecar_port}"))
    checks.run("health check", lambda: check_healthcheck(container, config))
    checks.run("non-root", lambda: check_user(container))
    checks.run("no build tools", lambda: check_no_build_tools(container))
    checks.run("stop", lambda: stop(server, timeout_s=60))
    print(f"{'PASSED' if checks.passed else 'FAILED'}: {sum(ok for _, ok, _ in checks.rows)} of "
          f"{len(checks.rows)} checks, {time.monotonic() - started:.1f} s")  # fmt: skip
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
