"""Serving benchmark: turnout (local and Ray backends) against two hand-written baselines.

Systems, started one at a time so they never share the machine's cores:
  a  floor      uvicorn + Starlette calling ONNX Runtime inline (bench.baselines.floor)
  b  ray_naive  Ray Serve proxy + one deployment with @serve.batch (bench.baselines.ray_naive)
  c  turnout    `turnout serve --backend local`
  d  turnout    `turnout serve --backend ray`

HTTP load comes from `hey`, gRPC load (turnout only) from `h2load`. Usage:
  python -m bench.serving [--duration 10] [--concurrency 1 16 64] [--systems a b c d]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import yaml
from rich.console import Console
from rich.table import Table

from bench._results import write_results
from bench.models import INPUT_DIM, MODEL_NAME, build_repository

REPO_ROOT = Path(__file__).resolve().parent.parent
INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
WARMUP_S = 2

# Piped output (make, CI logs) would otherwise be squeezed to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 130)


@dataclass(frozen=True)
class System:
    key: str
    name: str
    grpc: bool
    # Where delta(inference_count)/delta(execution_count) comes from; None: batch is always 1.
    stats_path: str | None

    def command(self, repo: Path, http_port: int, grpc_port: int) -> list[str]:
        if self.key in ("a", "b"):
            module = "bench.baselines." + self.name  # the baselines' names are their modules
            model = str(repo / MODEL_NAME / "1" / "model.onnx")
            return [sys.executable, "-m", module, "--model", model, "--port", str(http_port)]
        backend = "local" if self.key == "c" else "ray"
        ports = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
        options = ["--model-repository", str(repo), "--backend", backend, "--host", "127.0.0.1"]
        # The serving path alone; the monitor's cost is measured by bench/monitor_cost.py.
        return [turnout_executable(), "serve", *options, *ports, "--no-monitor"]


SYSTEMS = {
    "a": System("a", "floor", grpc=False, stats_path=None),
    "b": System("b", "ray_naive", grpc=False, stats_path="/stats"),
    "c": System("c", "turnout local", grpc=True, stats_path=f"/v2/models/{MODEL_NAME}/stats"),
    "d": System("d", "turnout ray", grpc=True, stats_path=f"/v2/models/{MODEL_NAME}/stats"),
}


@dataclass
class Row:
    system: str
    name: str
    protocol: str
    concurrency: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    avg_batch: float | None = None
    requests: int = 0
    errors: int = 0
    error: str | None = None
    ratio_a: float | None = None
    ratio_b: float | None = None


@dataclass
class LoadResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    errors: int
    notes: list[str] = field(default_factory=list)


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- server lifecycle


class Server:
    """One system under test as a subprocess with its output in a log file.

    A log file rather than a pipe: nobody drains a pipe during the load, and a full pipe would
    stall the server mid-benchmark.
    """

    def __init__(
        self, command: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.command = command
        self.log_path = log_path
        self.env = env  # added to this process's environment
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
        ready = re.compile(r"^(turnout|floor|ray_naive) ready\b")
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise StartError(f"exited with code {self.proc.returncode}:\n{self.log_tail()}")
            text = self.log_path.read_text(errors="replace")
            if any(ready.search(line) for line in text.splitlines()):
                return time.monotonic() - started
            time.sleep(0.2)
        raise StartError(f"no 'ready' line after {timeout:.0f} s:\n{self.log_tail()}")

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


# ------------------------------------------------------------------------- requests and checks


def http_body(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def grpc_body(x: np.ndarray) -> bytes:
    """A gRPC message frame: 0 (uncompressed), 4-byte big-endian length, ModelInferRequest."""
    # tritonclient's generated module is wire-identical to OIP's ModelInferRequest.
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    tensor = request.inputs.add()
    tensor.name = "input"
    tensor.datatype = "FP32"
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    message: bytes = request.SerializeToString()
    return struct.pack(">BI", 0, len(message)) + message


def check_output(got: np.ndarray, expected: np.ndarray) -> None:
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise StartError(f"wrong output: got {got.ravel()[:4]}..., expected {expected.ravel()[:4]}")


def retry(action: Callable[[], None], what: str, timeout: float = 30.0) -> None:
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


def check_http(port: int, x: np.ndarray, expected: np.ndarray) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{INFER_PATH}",
        data=http_body(x),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = orjson.loads(response.read())
    out = next(o for o in answer["outputs"] if o["name"] == "output")
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    check_output(got, expected)


def check_grpc(port: int, x: np.ndarray, expected: np.ndarray) -> None:
    # gRPC errors ride on HTTP 200 with a grpc-status trailer that h2load never reads, so this
    # real client call is the only proof that the load run's "200"s were answers.
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL_NAME, [tensor])
        got = result.as_numpy("output")
        if got is None:
            raise StartError("gRPC response has no output named 'output'")
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


# ------------------------------------------------------------------------------ load generators


def goodput(rate: float, ok: int, total: int) -> float:
    # Load tools count failed requests in their rate; a server that sheds load answers errors
    # fast, so only successful answers count.
    return rate * ok / total if total else 0.0


def run_hey(url: str, body: Path, duration: float, concurrency: int) -> LoadResult:
    command = ["hey", "-z", f"{duration:g}s", "-c", str(concurrency), "-m", "POST"]
    command += ["-T", "application/json", "-D", str(body), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 90)
    if done.returncode != 0:
        raise RuntimeError(f"hey exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_hey(done.stdout)


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


def run_h2load(url: str, body: Path, duration: float, concurrency: int, log: Path) -> LoadResult:
    # C connections with one stream each: the same shape as hey's C workers, so HTTP and gRPC
    # rows compare; against a grpc.aio ModelInfer server on 2 cores this also loaded the server
    # 10-40% more than one connection carrying C streams (-c 1 -m C).
    log.unlink(missing_ok=True)  # h2load appends to its log file
    command = ["h2load", "-D", f"{duration:g}", "-c", str(concurrency), "-m", "1", "-t", "1"]
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    command += ["-d", str(body), *headers, "--log-file", str(log), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 90)
    if done.returncode != 0:
        raise RuntimeError(f"h2load exited {done.returncode}: {done.stdout[-500:]}{done.stderr}")
    return parse_h2load(done.stdout, log)


def parse_h2load(text: str, log: Path) -> LoadResult:
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    counts = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    if rps is None or counts is None:
        raise RuntimeError(f"unexpected h2load output:\n{text[-800:]}")
    done, succeeded, failed, errored, timeouts = (int(g) for g in counts.groups())
    # h2load prints no percentiles; its log has one row per request:
    # start time (us since epoch), HTTP status, microseconds until the end of the response.
    latencies_us = []
    with log.open() as rows:
        for row in rows:
            cols = row.split("\t")
            if len(cols) >= 3 and cols[1] == "200":
                latencies_us.append(float(cols[2]))
    p50 = p99 = None
    if latencies_us:
        p50, p99 = (float(v) / 1e3 for v in np.percentile(latencies_us, [50, 99]))
    return LoadResult(
        rps=goodput(float(rps.group(1)), succeeded, done),
        p50_ms=p50,
        p99_ms=p99,
        requests=done,
        errors=failed + errored + timeouts,
    )


# ---------------------------------------------------------------------------------- one system


def bench_system(
    system: System,
    repo: Path,
    work: Path,
    duration: float,
    concurrencies: list[int],
    x: np.ndarray,
    expected: np.ndarray,
) -> list[Row]:
    http_port, grpc_port = free_port(), free_port()
    rows: list[Row] = []
    try:
        command = system.command(repo, http_port, grpc_port)
    except StartError as exc:
        return [Row(system.key, system.name, "-", 0, error=str(exc))]
    server = Server(command, work / f"server-{system.key}.log")
    console.rule(f"({system.key}) {system.name}")
    console.print(" ".join(command), style="dim")
    with running(server):
        try:
            took = server.wait_ready()
            console.print(f"ready after {took:.1f} s")
            retry(lambda: check_http(http_port, x, expected), "HTTP correctness check")
            if system.grpc:
                retry(lambda: check_grpc(grpc_port, x, expected), "gRPC correctness check")
        except StartError as exc:
            console.print(f"[red]({system.key}) {system.name} did not start: {exc}")
            return [Row(system.key, system.name, "-", 0, error=f"start failed: {exc}")]

        http_file, grpc_file = work / "body.json", work / "body.grpc"
        http_url = f"http://127.0.0.1:{http_port}{INFER_PATH}"
        grpc_url = f"http://127.0.0.1:{grpc_port}{GRPC_PATH}"
        loads: list[tuple[str, Callable[[float, int], LoadResult]]] = [
            ("http", lambda d, c: run_hey(http_url, http_file, d, c))
        ]
        if system.grpc:
            h2log = work / f"h2load-{system.key}.log"
            loads.append(("grpc", lambda d, c: run_h2load(grpc_url, grpc_file, d, c, h2log)))

        for protocol, load in loads:
            # Warm-up: ORT's first runs, Ray's routing tables and connection pools settle.
            with contextlib.suppress(Exception):
                load(WARMUP_S, 16)
            for concurrency in concurrencies:
                row = Row(system.key, system.name, protocol, concurrency)
                before = read_counts(http_port, system.stats_path) if system.stats_path else None
                try:
                    result = load(duration, concurrency)
                except Exception as exc:
                    row.error = str(exc)[:500]
                    console.print(f"[red]{protocol} c{concurrency}: {row.error}")
                    rows.append(row)
                    continue
                after = read_counts(http_port, system.stats_path) if system.stats_path else None
                row.rps, row.p50_ms, row.p99_ms = result.rps, result.p50_ms, result.p99_ms
                row.requests, row.errors = result.requests, result.errors
                if system.stats_path is None:
                    row.avg_batch = 1.0  # the floor runs every request on its own
                elif before is not None and after is not None and after[1] > before[1]:
                    row.avg_batch = (after[0] - before[0]) / (after[1] - before[1])
                if result.notes:
                    row.error = "; ".join(result.notes)[:500]
                console.print(
                    f"{protocol} c{concurrency}: {row.rps:.0f} req/s, p50 {fmt(row.p50_ms)} ms, "
                    f"p99 {fmt(row.p99_ms)} ms, batch {fmt(row.avg_batch, 1)}, "
                    f"errors {row.errors}"
                )
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------ report, targets


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def find(rows: list[Row], system: str, protocol: str, concurrency: int) -> Row | None:
    for row in rows:
        if (row.system, row.protocol, row.concurrency) == (system, protocol, concurrency):
            return row
    return None


def add_ratios(rows: list[Row]) -> None:
    # Ratios compare with the baselines' HTTP numbers at the same concurrency, whatever the
    # protocol of the row: the baselines speak HTTP only.
    for row in rows:
        for base, attr in (("a", "ratio_a"), ("b", "ratio_b")):
            ref = find(rows, base, "http", row.concurrency)
            if row.rps is not None and ref is not None and ref.rps:
                setattr(row, attr, row.rps / ref.rps)


def print_table(rows: list[Row]) -> None:
    table = Table(title="Serving benchmark (MLP 256-1024-1024-10, one row per request)")
    for header in (
        "system",
        "protocol",
        "conc",
        "req/s",
        "p50 ms",
        "p99 ms",
        "avg batch",
        "errors",
        "x (a)",
        "x (b)",
        "note",
    ):
        table.add_column(header, justify="left" if header in ("system", "note") else "right")
    for row in rows:
        table.add_row(
            f"({row.system}) {row.name}",
            row.protocol,
            str(row.concurrency) if row.concurrency else "-",
            fmt(row.rps, 0),
            fmt(row.p50_ms),
            fmt(row.p99_ms),
            fmt(row.avg_batch, 1),
            str(row.errors),
            fmt(row.ratio_a),
            fmt(row.ratio_b),
            (row.error or "").split("\n", 1)[0][:50],
        )
    console.print(table)
    for row in rows:
        if row.error:
            where = f"{row.protocol} c{row.concurrency}" if row.concurrency else "start"
            console.print(f"[yellow]({row.system}) {row.name} {where}:[/yellow] {row.error}")


@dataclass
class Target:
    name: str
    needs: list[tuple[str, int]]  # (system, concurrency), HTTP rows the check reads
    check: Callable[[dict[tuple[str, int], Row]], tuple[bool, str]]


def _ratio(num: float | None, den: float | None) -> float:
    return float("nan") if num is None or not den else num / den


def _d16_vs_b(r: dict[tuple[str, int], Row]) -> tuple[bool, str]:
    d, b = r[("d", 16)], r[("b", 16)]
    ratio = _ratio(d.rps, b.rps)
    ok = ratio >= 5 and d.p99_ms is not None and b.p99_ms is not None and d.p99_ms < b.p99_ms
    return ok, f"{ratio:.2f}x req/s, p99 {fmt(d.p99_ms)} vs {fmt(b.p99_ms)} ms"


def _d64_vs_a(r: dict[tuple[str, int], Row]) -> tuple[bool, str]:
    d, a = r[("d", 64)], r[("a", 64)]
    ratio = _ratio(d.rps, a.rps)
    ok = ratio >= 0.5 and d.avg_batch is not None and d.avg_batch >= 16
    return ok, f"{ratio:.2f}x req/s of (a), average batch {fmt(d.avg_batch, 1)}"


def _c16_vs_a(r: dict[tuple[str, int], Row]) -> tuple[bool, str]:
    ratio = _ratio(r[("c", 16)].rps, r[("a", 16)].rps)
    return ratio >= 0.8, f"{ratio:.2f}x req/s of (a)"


def _d1_latency(r: dict[tuple[str, int], Row]) -> tuple[bool, str]:
    d, b = r[("d", 1)].p50_ms, r[("b", 1)].p50_ms
    ok = d is not None and b is not None and d <= b / 2
    return ok, f"p50 {fmt(d)} ms vs (b) {fmt(b)} ms"


TARGETS = [
    Target("(d) HTTP c16: >= 5x req/s of (b), lower p99", [("d", 16), ("b", 16)], _d16_vs_b),
    Target(
        "(d) HTTP c64: >= 0.5x req/s of (a), avg batch >= 16", [("d", 64), ("a", 64)], _d64_vs_a
    ),
    Target("(c) HTTP c16: >= 0.8x req/s of (a)", [("c", 16), ("a", 16)], _c16_vs_a),
    Target("(d) HTTP c1: p50 <= half of (b)'s", [("d", 1), ("b", 1)], _d1_latency),
]


def evaluate_targets(
    rows: list[Row], systems: list[str], concurrencies: list[int]
) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    for target in TARGETS:
        planned = all(s in systems and c in concurrencies for s, c in target.needs)
        found = {need: find(rows, need[0], "http", need[1]) for need in target.needs}
        if not planned:
            verdict, detail = "SKIP", "not measured in this run"
        elif any(row is None or row.rps is None for row in found.values()):
            missing = [f"({s}) c{c}" for (s, c), row in found.items() if row is None or not row.rps]
            verdict, detail = "FAIL", "no result for " + ", ".join(missing)
        else:
            ok, detail = target.check({k: v for k, v in found.items() if v is not None})
            verdict = "PASS" if ok else "FAIL"
        verdicts.append({"target": target.name, "verdict": verdict, "detail": detail})
    return verdicts


def print_targets(verdicts: list[dict[str, Any]]) -> None:
    colour = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}
    for v in verdicts:
        style = colour[v["verdict"]]
        console.print(f"[{style}]{v['verdict']}[/{style}] {v['target']}: {v['detail']}")


def machine_info() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_gib = round(int(meminfo.split()[1]) / 2**20, 1)
    h2load = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ray": version("ray"),
        "onnxruntime": version("onnxruntime"),
        "numpy": version("numpy"),
        "turnout": version("turnout"),
        "h2load": h2load.strip(),
    }


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)

    for tool in ("hey", "h2load"):
        if shutil.which(tool) is None:
            console.print(f"[red]{tool} not found: run `make bench-tools`")
            return 2

    # Servers run in sessions of their own, out of reach of the terminal's signals; turning
    # SIGTERM into SystemExit lets `running` stop the current one when the runner is killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="turnout-bench-") as tmp:
        work = Path(tmp)
        repo = build_repository(work / "models")
        model_path = repo / MODEL_NAME / "1" / "model.onnx"
        x = np.random.default_rng(1).standard_normal((1, INPUT_DIM)).astype(np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        expected = ort.InferenceSession(str(model_path), options).run(None, {"input": x})[0]
        (work / "body.json").write_bytes(http_body(x))
        (work / "body.grpc").write_bytes(grpc_body(x))
        turnout_config = yaml.safe_load((repo / MODEL_NAME / "config.yaml").read_text())

        for key in args.systems:
            rows += bench_system(
                SYSTEMS[key], repo, work, args.duration, args.concurrency, x, expected
            )

    add_ratios(rows)
    print_table(rows)
    verdicts = evaluate_targets(rows, args.systems, args.concurrency)
    print_targets(verdicts)
    path = write_results(
        "serving",
        args.out,
        {
            "machine": machine_info(),
            "settings": {
                "duration_s": args.duration,
                "concurrency": args.concurrency,
                "systems": {k: SYSTEMS[k].name for k in args.systems},
                "model": "MLP 256-1024-1024-10, FP32, one row per request",
                "turnout_config": turnout_config,
                "http_load": "hey -z D -c C (one connection per worker)",
                "grpc_load": "h2load -D D -c C -m 1 (C connections, one stream each)",
            },
            "results": [asdict(row) for row in rows],
            "targets": verdicts,
        },
    )
    console.print(f"results: {path}")
    failed = any(v["verdict"] == "FAIL" for v in verdicts)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
