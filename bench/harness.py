"""What every benchmark shares: processes, clients, load, console output and machine info.

- processes: ``turnout serve`` (or a baseline) as a subprocess with its log in a file, started
  and stopped around a block (:func:`running`), ready once it prints its own ``<name> ready``
  line; :func:`retry` for the first requests after that line;
- clients: OIP request bodies (JSON and protobuf), a correctness check over HTTP and gRPC, a
  model's stats counters, a bare keep-alive HTTP/1.1 connection and the admin API client;
- load: ``hey`` and its output; the MLP workload; two gateways compared round by round
  (bench.monitor_cost, bench.tracing_cost);
- report: the console, number formatting, tables, the ``machine`` record and the results file.

Model builders live in bench.models, where results go in bench._results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
import numpy as np
import onnxruntime as ort
import orjson
import yaml
from rich.console import Console
from rich.table import Table

from bench._results import write_results
from bench.models import INPUT_DIM, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, build_repository
from gateway.grpc.messages import SERVICE, message

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"
STATS_PATH = f"/v2/models/{MODEL_NAME}/stats"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

P = ParamSpec("P")
T = TypeVar("T")

# ------------------------------------------------------------------------------------- report

# Piped output (make, CI logs) would otherwise be squeezed to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 130)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def new_table(title: str, columns: Iterable[str], left: Collection[str]) -> Table:
    """A table with ``columns``: those in ``left`` left-aligned, numbers right-aligned."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its module docstring as the description, line breaks kept."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `running` and ``finally`` blocks stop the servers.

    Servers run in sessions of their own, out of reach of the terminal's signals.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def save_results(name: str, out: Path, payload: dict[str, Any]) -> Path:
    """:func:`bench._results.write_results`, and say where the file went."""
    path = write_results(name, out, payload)
    console.print(f"results: {path}")
    return path


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_version(tool: str) -> str | None:
    """``tool --version``'s output; None when the tool is not installed."""
    if shutil.which(tool) is None:
        return None
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
        return round(int(meminfo.split()[1]) / 2**20, 1)
    return None


SERVING_PACKAGES = ("ray", "onnxruntime", "numpy", "turnout")


def machine_info(
    packages: Iterable[str] = SERVING_PACKAGES,
    *,
    hardware: bool = True,
    load_average: bool = False,
    tools: Iterable[str] = ("h2load",),
) -> dict[str, Any]:
    """The results file's ``machine`` record: date, cores, platform, package and tool versions."""
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
    }
    if load_average:
        info["load_average_1_5_15"] = list(os.getloadavg())
    if hardware:
        info |= {"cpu": _cpu_model(), "memory_gib": _memory_gib()}
    info |= {"platform": platform.platform(), "python": platform.python_version()}
    info |= {package: package_version(package) for package in packages}
    info |= {tool: tool_version(tool) for tool in tools}
    return info


# ---------------------------------------------------------------------------------- processes


class StartError(RuntimeError):
    pass


def turnout_executable() -> str:
    # The venv's console script sits next to the interpreter running this module.
    candidate = Path(sys.executable).parent / "turnout"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("turnout")
    if found is None:
        raise StartError("turnout executable not found (is the package installed?)")
    return found


def serve_command(repo: Path, backend: str, *options: str) -> list[str]:
    """``turnout serve --backend BACKEND --model-repository REPO OPTIONS...``."""
    command = [turnout_executable(), "serve", "--backend", backend]
    return [*command, "--model-repository", str(repo), *options]


def gateway_config(work: Path, label: str, **settings: Any) -> tuple[Path, Path]:
    """Write ``work/turnout-LABEL.yaml`` with a state dir ``work/state-LABEL`` of its own
    and ``settings``; return the config file and the state dir."""
    state = work / f"state-{label}"
    state.mkdir(parents=True, exist_ok=True)
    config = work / f"turnout-{label}.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state), **settings}))
    return config, state


def gateway_address(state_dir: Path) -> dict[str, str]:
    """The address file (``http``, ``grpc``, ``pid``) a started gateway wrote to its state dir."""
    return dict(json.loads((state_dir / "gateway.json").read_text()))


def admin_token(state_dir: Path) -> str:
    """The admin token a gateway wrote to its state dir on first start."""
    tokens = json.loads((state_dir / "tokens.json").read_text())["tokens"]
    return str(next(t["token"] for t in tokens if t["role"] == "admin"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_READY_LINE = re.compile(r"^(turnout|floor|ray_naive) ready\b")


class Server:
    """One system under test as a subprocess with its output in a log file.

    A log file rather than a pipe: nobody drains a pipe during the load, and a full pipe would
    stall the server mid-benchmark.
    """

    def __init__(
        self,
        command: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        ready_url: str | None = None,
    ) -> None:
        self.command = command
        self.log_path = log_path
        self.env = env  # added to this process's environment
        # A server that prints no `<name> ready` line (another project's) is ready once this
        # URL answers 200.
        self.ready_url = ready_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            # A session of its own, so stragglers (e.g. Ray's gcs_server) can be killed as a group.
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until the server's own `<name> ready` line; return the seconds it took.

        Anchored at the line start: Ray Serve logs "Application ... is ready." before the
        gateway (or the baseline) accepts requests.
        """
        assert self.proc is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise StartError(f"exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if self._is_ready():
                return time.monotonic() - started
            time.sleep(0.2)
        waited_for = f"{self.ready_url} answering 200" if self.ready_url else "'ready' line"
        raise StartError(f"no {waited_for} after {timeout:.0f} s:\n{self.log_tail()}")

    def _is_ready(self) -> bool:
        if self.ready_url is not None:
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                    return bool(response.status == 200)
            except (OSError, ValueError):
                return False
        text = self.log_path.read_text(errors="replace")
        return any(_READY_LINE.search(line) for line in text.splitlines())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]no exit {STOP_TIMEOUT_S:.0f} s after SIGTERM: SIGKILL")
        # Sweep the whole group: after a SIGKILL (or a sloppy exit) children may be left over.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def retry(action: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Run `action` until it succeeds: a `ready` line may come before routes are live."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            action()
            return
        except StartError:
            raise
        except Exception as exc:
            if time.monotonic() > deadline:
                raise StartError(f"{what} failed: {exc!r}") from exc
            time.sleep(0.5)


def synchronously(coroutine: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """The blocking form of an ``async def``: each call runs it on a fresh event loop."""

    @functools.wraps(coroutine)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(coroutine(*args, **kwargs))

    run.__doc__ = f"The blocking form of :func:`{coroutine.__name__}`, on a fresh event loop."
    return run


# ------------------------------------------------------------------------------------ clients


def infer_json(x: np.ndarray, input_name: str = INPUT_NAME) -> bytes:
    """An OIP JSON infer request with one FP32 input."""
    tensor = {"name": input_name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def infer_request(x: np.ndarray, model: str = MODEL_NAME, input_name: str = INPUT_NAME) -> Any:
    """An OIP ``ModelInferRequest`` with one FP32 input in ``raw_input_contents``."""
    request = message("ModelInferRequest")(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = input_name, "FP32"
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def infer_stub(channel: grpc.aio.Channel) -> Any:
    """``ModelInfer`` on an aio channel, with the gateway's own message classes."""
    return channel.unary_unary(
        f"/{SERVICE}/ModelInfer",
        request_serializer=message("ModelInferRequest").SerializeToString,
        response_deserializer=message("ModelInferResponse").FromString,
    )


def infer_http(
    address: str,
    x: np.ndarray,
    model: str = MODEL_NAME,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> np.ndarray:
    """POST one OIP JSON infer request to ``host:port``; return the output named."""
    request = urllib.request.Request(
        f"http://{address}/v2/models/{model}/infer",
        data=infer_json(x, input_name),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return oip_output(response.read(), output_name)


def oip_output(answer: bytes, output_name: str = OUTPUT_NAME) -> np.ndarray:
    """The output named in an OIP JSON infer response, as a float32 array."""
    out = next(o for o in orjson.loads(answer)["outputs"] if o["name"] == output_name)
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def check_output(got: np.ndarray, expected: np.ndarray) -> None:
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise StartError(f"wrong output: got {got.ravel()[:4]}..., expected {expected.ravel()[:4]}")


def check_http(port: int, x: np.ndarray, expected: np.ndarray) -> None:
    check_output(infer_http(f"127.0.0.1:{port}", x), expected)


def check_grpc(port: int, x: np.ndarray, expected: np.ndarray) -> None:
    # gRPC errors ride on HTTP 200 with a grpc-status trailer that h2load never reads, so this
    # real client call is the only proof that the load run's "200"s were answers.
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = grpcclient.InferInput(INPUT_NAME, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL_NAME, [tensor])
        got = result.as_numpy(OUTPUT_NAME)
        if got is None:
            raise StartError(f"gRPC response has no output named {OUTPUT_NAME!r}")
        check_output(got, expected)
    finally:
        client.close()


def read_counts(port: int, path: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) from a stats endpoint; None when unavailable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            stats = orjson.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if "model_stats" in stats:  # Triton's statistics extension
        stats = next((m for m in stats["model_stats"] if m.get("name") == MODEL_NAME), None)
        if stats is None:
            return None
    try:
        return int(stats["inference_count"]), int(stats["execution_count"])
    except (KeyError, TypeError, ValueError):
        return None


def sidecar_metrics(port: int) -> str | None:
    """A ``turnout monitor`` sidecar's Prometheus text from its /metrics; None if it is silent."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except (OSError, ValueError):
        return None


class HttpConnection:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams.

    The load generator shares the CPUs with the gateway it measures; a bare client costs a
    fraction of a full-featured one per request, so more of the CPU goes to the gateway.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    def to(cls, address: str) -> HttpConnection:
        """A connection to ``host:port``."""
        host, _, port = address.rpartition(":")
        return cls(host, int(port))

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append(f"content-length: {len(body)}")
        try:
            self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            head = await self._reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            reply = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    reply[name.strip().lower()] = value.strip()
            data = await self._reader.readexactly(int(reply.get("content-length", "0")))
        except BaseException:
            await self.close()  # the connection's state is unknown: start a fresh one
            raise
        if reply.get("connection", "").lower() == "close":
            await self.close()
        return status, reply, data

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class AdminClient:
    """The admin REST API (``/admin/v1``) for one model, over its own connection."""

    def __init__(self, http_address: str, token: str, model: str) -> None:
        self.connection = HttpConnection.to(http_address)
        self.headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        self.model = model

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        data = orjson.dumps(body) if body is not None else b""
        url = f"/admin/v1/models/{self.model}/{path}"
        status, _, reply = await self.connection.request(method, url, data, self.headers)
        return status, orjson.loads(reply) if reply else None

    async def change(self, body: dict[str, Any]) -> tuple[int, Any]:
        return await self.call("POST", "traffic", body)

    async def status(self) -> dict[str, Any]:
        status, document = await self.call("GET", "traffic")
        if status != 200:
            raise RuntimeError(f"GET traffic: {status} {document}")
        return dict(document)

    async def history(self) -> list[dict[str, Any]]:
        status, document = await self.call("GET", "traffic/history")
        if status != 200:
            raise RuntimeError(f"GET traffic/history: {status} {document}")
        return list(document["history"])

    async def close(self) -> None:
        await self.connection.close()


# --------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    errors: int
    notes: list[str] = field(default_factory=list)


def goodput(rate: float, ok: int, total: int) -> float:
    # Load tools count failed requests in their rate; a server that sheds load answers errors
    # fast, so only successful answers count.
    return rate * ok / total if total else 0.0


def hey_command(
    url: str, body: Path, duration: float, concurrency: int, keepalive: bool = True
) -> list[str]:
    """``hey`` POSTing the JSON ``body`` to ``url`` from ``concurrency`` closed-loop clients
    (without ``keepalive``: a new connection for every request)."""
    command = ["hey", "-z", f"{duration:g}s", "-c", str(concurrency), "-m", "POST"]
    if not keepalive:
        command.append("-disable-keepalive")
    return [*command, "-T", "application/json", "-D", str(body), url]


def run_hey(
    url: str,
    body: Path,
    duration: float,
    concurrency: int,
    threads: int | None = None,
    keepalive: bool = True,
) -> LoadResult:
    """``hey`` against ``url``; ``threads``: the OS threads it may run Go code on at once
    (GOMAXPROCS; None: one per core)."""
    process = hey_start(url, body, duration, concurrency, threads, keepalive)
    return hey_result(process, duration)


def hey_start(
    url: str,
    body: Path,
    duration: float,
    concurrency: int,
    threads: int | None = None,
    keepalive: bool = True,
) -> subprocess.Popen[str]:
    """``hey`` started in the background; :func:`hey_result` waits for its result."""
    env = None if threads is None else {**os.environ, "GOMAXPROCS": str(threads)}
    command = hey_command(url, body, duration, concurrency, keepalive)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def hey_result(process: subprocess.Popen[str], duration: float) -> LoadResult:
    out, err = process.communicate(timeout=duration + 90)
    if process.returncode != 0:
        raise RuntimeError(f"hey exited {process.returncode}: {err.strip()[-500:]}")
    return parse_hey(out)


def parse_hey(text: str) -> LoadResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps is None:
        raise RuntimeError(f"no Requests/sec in hey output:\n{text[-500:]}")
    # hey prints latencies in seconds to 4 decimals (0.1 ms resolution), and omits the
    # latency block when no request succeeded.
    p50 = re.search(r"^\s*50%+ in ([\d.]+) secs", text, re.MULTILINE)
    p99 = re.search(r"^\s*99%+ in ([\d.]+) secs", text, re.MULTILINE)
    statuses = {
        int(code): int(count)
        for code, count in re.findall(r"^\s*\[(\d+)\]\s+(\d+) responses", text, re.MULTILINE)
    }
    # The error distribution lists transport failures (refused, timeout) with no status code.
    errors_block = text.split("Error distribution:", 1)[1] if "Error distribution:" in text else ""
    transport = re.findall(r"^\s*\[(\d+)\]\s+(.*)$", errors_block, re.MULTILINE)
    non_200 = sum(n for code, n in statuses.items() if code != 200)
    requests = sum(statuses.values()) + sum(int(n) for n, _ in transport)
    result = LoadResult(
        rps=goodput(float(rps.group(1)), statuses.get(200, 0), requests),
        p50_ms=float(p50.group(1)) * 1e3 if p50 else None,
        p99_ms=float(p99.group(1)) * 1e3 if p99 else None,
        requests=requests,
        errors=non_200 + sum(int(n) for n, _ in transport),
    )
    result.notes += [f"{n} x {msg.strip()[:200]}" for n, msg in transport]
    result.notes += [f"{n} x HTTP {code}" for code, n in statuses.items() if code != 200]
    return result


@dataclass
class Workload:
    """The MLP repository, one request's input and body, and ONNX Runtime's answer to it."""

    repo: Path
    x: np.ndarray[Any, Any]
    expected: np.ndarray[Any, Any]
    body: Path


def prepare_workload(work: Path) -> Workload:
    """Build the MLP repository under ``work`` and write one request's JSON body there."""
    repo = build_repository(work / "models")
    x = np.random.default_rng(1).standard_normal((1, INPUT_DIM)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = str(repo / MODEL_NAME / "1" / "model.onnx")
    expected = ort.InferenceSession(model, options).run(None, {INPUT_NAME: x})[0]
    body = work / "body.json"
    body.write_bytes(infer_json(x))
    return Workload(repo, x, expected, body)


# ---------------------------------------------------------- two gateways, round by round


@dataclass
class Run:
    mode: str  # "off" or "on"
    round: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    avg_batch: float | None = None
    gateway_cpu_us: float | None = None  # CPU time of the gateway process per request
    sidecar_cpu_us: float | None = None  # of its children (the sidecar), per request
    requests: int = 0
    errors: int = 0
    error: str | None = None


@dataclass
class Summary:
    mode: str
    rps_mean: float | None
    rps_runs: list[float] = field(default_factory=list)
    p50_ms_mean: float | None = None
    p99_ms_mean: float | None = None
    gateway_cpu_us_mean: float | None = None
    sidecar_cpu_us_mean: float | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def cpu_snapshot(pid: int) -> tuple[float, dict[int, float]]:
    return cpu_seconds(pid), {child: cpu_seconds(child) for child in children(pid)}


def start_gateway(
    work: Path, workload: Workload, mode: str, extra: list[str], env: dict[str, str] | None = None
) -> tuple[Server, int]:
    """`turnout serve --backend local` with a state dir of its own; returns it and its port."""
    config, _ = gateway_config(work, mode)
    port = free_port()
    ports = ["--http-port", str(port), "--grpc-port", str(free_port())]
    options = ["--host", "127.0.0.1", "--config", str(config), *ports, *extra]
    server = Server(serve_command(workload.repo, "local", *options), work / f"{mode}.log", env)
    console.print(" ".join(server.command), style="dim")
    server.start()
    return server, port


def wait_and_warm(
    servers: dict[str, tuple[Server, int]],
    workload: Workload,
    label: str,
    warm_s: float = 2,
    concurrency: int = 16,
) -> None:
    """Each gateway ready, answering right, and warmed up with ``warm_s`` of load."""
    for mode, (server, port) in servers.items():
        took = server.wait_ready()
        retry(
            lambda port=port: check_http(port, workload.x, workload.expected), f"{mode} HTTP check"
        )
        console.print(f"{label} {mode}: ready after {took:.1f} s")
        with contextlib.suppress(Exception):  # warm-up
            run_hey(f"http://127.0.0.1:{port}{INFER_PATH}", workload.body, warm_s, concurrency)


def measure_rounds(
    servers: dict[str, tuple[Server, int]],
    body: Path,
    duration: float,
    concurrency: int,
    rounds: int,
    label: str = "monitor",
    keepalive: bool = True,
) -> list[Run]:
    """``rounds`` load runs per server, alternating which goes first, with CPU per request
    (without ``keepalive``, each request on a new connection)."""
    runs: list[Run] = []
    modes = list(servers)
    for index in range(rounds):
        # Alternate which goes first, so neither always follows the other's load.
        order = modes if index % 2 == 0 else modes[::-1]
        for mode in order:
            server, port = servers[mode]
            run = Run(mode, index)
            before = read_counts(port, STATS_PATH)
            assert server.proc is not None
            cpu_before = cpu_snapshot(server.proc.pid)
            try:
                url = f"http://127.0.0.1:{port}{INFER_PATH}"
                result = run_hey(url, body, duration, concurrency, keepalive=keepalive)
            except Exception as exc:
                run.error = str(exc)[:500]
                console.print(f"[red]{label} {mode} round {index}: {run.error}")
                runs.append(run)
                continue
            after = read_counts(port, STATS_PATH)
            cpu_after = cpu_snapshot(server.proc.pid)
            if before and after and after[0] > before[0]:
                served = after[0] - before[0]  # one row per request
                run.gateway_cpu_us = (cpu_after[0] - cpu_before[0]) / served * 1e6
                sidecar = sum(
                    spent - cpu_before[1].get(child, 0.0) for child, spent in cpu_after[1].items()
                )
                run.sidecar_cpu_us = sidecar / served * 1e6
            run.rps, run.p50_ms, run.p99_ms = result.rps, result.p50_ms, result.p99_ms
            run.requests, run.errors = result.requests, result.errors
            if before and after and after[1] > before[1]:
                run.avg_batch = (after[0] - before[0]) / (after[1] - before[1])
            console.print(
                f"round {index} {label} {mode:3}: {fmt(run.rps, 0)} req/s, "
                f"p50 {fmt(run.p50_ms)} ms, p99 {fmt(run.p99_ms)} ms, "
                f"batch {fmt(run.avg_batch, 1)}, errors {run.errors}, CPU/request: "
                f"gateway {fmt(run.gateway_cpu_us, 0)} us, "
                f"sidecar {fmt(run.sidecar_cpu_us, 0)} us"
            )
            runs.append(run)
            time.sleep(1)
    return runs


def summarize(runs: list[Run], mode: str) -> Summary:
    ok = [r for r in runs if r.mode == mode and r.rps is not None]

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.fmean(present) if present else None

    return Summary(
        mode=mode,
        rps_mean=mean([r.rps for r in ok]),
        rps_runs=[r.rps for r in ok if r.rps is not None],
        p50_ms_mean=mean([r.p50_ms for r in ok]),
        p99_ms_mean=mean([r.p99_ms for r in ok]),
        gateway_cpu_us_mean=mean([r.gateway_cpu_us for r in ok]),
        sidecar_cpu_us_mean=mean([r.sidecar_cpu_us for r in ok]),
    )


def paired_ratios(runs: list[Run], rounds: int) -> list[float]:
    """on/off req/s of each round (the two ran back to back)."""
    return [
        on_run.rps / off_run.rps
        for index in range(rounds)
        for off_run in runs
        for on_run in runs
        if off_run.round == on_run.round == index
        and (off_run.mode, on_run.mode) == ("off", "on")
        and off_run.rps
        and on_run.rps
    ]


@dataclass
class Comparison:
    """The off and on gateways' rounds, summarized: means, their ratio and paired ratios."""

    runs: list[Run]
    off: Summary
    on: Summary
    ratio: float | None  # of the means
    pairs: list[float]
    paired_median: float | None

    @classmethod
    def of(cls, runs: list[Run], rounds: int) -> Comparison:
        off, on = summarize(runs, "off"), summarize(runs, "on")
        ratio = on.rps_mean / off.rps_mean if on.rps_mean and off.rps_mean else None
        pairs = paired_ratios(runs, rounds)
        median = statistics.median(pairs) if pairs else None
        return cls(runs, off, on, ratio, pairs, median)

    def means_line(self, what: str, concurrency: int) -> str:
        return (
            f"HTTP c{concurrency}: {what} off {fmt(self.off.rps_mean, 0)} req/s "
            f"(p99 {fmt(self.off.p99_ms_mean)} ms), on {fmt(self.on.rps_mean, 0)} req/s "
            f"(p99 {fmt(self.on.p99_ms_mean)} ms)"
        )

    def rounds_line(self) -> str:
        """The per-round ratios and the gateway's CPU per request; the caller adds the sidecar's."""
        return (
            f"per-round on/off: {', '.join(f'{p:.3f}' for p in self.pairs)} "
            f"(median {fmt(self.paired_median, 3)}); CPU per request: gateway "
            f"{fmt(self.off.gateway_cpu_us_mean, 0)} us off, "
            f"{fmt(self.on.gateway_cpu_us_mean, 0)} us on"
        )

    def payload(self) -> dict[str, Any]:
        """The results file's ``runs`` … ``paired_ratio_median`` keys."""
        return {
            "runs": [asdict(r) for r in self.runs],
            "summary": {"off": asdict(self.off), "on": asdict(self.on)},
            "ratio": self.ratio,
            "paired_ratios": self.pairs,
            "paired_ratio_median": self.paired_median,
        }


def rounds_parser(doc: str | None, rounds: int) -> argparse.ArgumentParser:
    """:func:`argument_parser` with the off/on comparisons' ``--duration``, ``--concurrency``
    and ``--rounds``."""
    parser = argument_parser(doc)
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=rounds, help="off/on pairs, alternating")
    return parser


def rounds_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The results file's ``settings`` keys every off/on comparison shares."""
    return {
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "model": "MLP 256-1024-1024-10, FP32, one row per request",
    }


def exit_status(verdicts: list[dict[str, Any]], strict: bool) -> int:
    """1 when ``--strict`` and a target failed, else 0."""
    return 1 if strict and any(v["verdict"] == "FAIL" for v in verdicts) else 0


def print_verdict(verdict: str, text: str) -> None:
    colour = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}[verdict]
    console.print(f"[{colour}]{verdict}[/{colour}] {text}")
