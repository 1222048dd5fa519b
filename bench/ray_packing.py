"""Ray layouts for a repository of small model versions, side by side on one local Ray:

  A  per-version  today's layout: one Serve application per version, one replica each, an
                  unset num_cpus reserving 0.25 CPU per ONNX Runtime thread (the real
                  RayBackend of gateway/backends/ray_serve.py)
  B  packed       one Serve deployment whose single replica process hosts every version:
                  an ONNX Runtime session and a Unix socket per version (bench/_packed_replica.py)

Both are driven the same way, from this process, over the replicas' same-node sockets
(gateway/backends/channel.py, the gateway's own client): ``--concurrency`` batches of
``--rows`` rows in flight, spread round-robin over all versions. Per layout and version
count: seconds until every version answers, PSS of the replica processes and of Ray's
other processes (gcs_server, raylet, Serve's controller, idle workers; from
/proc/<pid>/smaps_rollup), CPU reserved from Ray, versions that fit on the CPUs, batches/s,
and what a SIGKILL of one replica process costs: how long until its versions answer again
(Serve restarts it) and how many versions were down meanwhile.

A repository of more versions than 2 CPUs hold at 0.25 CPU each is loaded in layout A with
an explicit ``num_cpus`` (the CPUs divided among the versions), as its user would have to.
The pack in B reserves 0.25 CPU, as one single-threaded replica process. Reservations are
Ray's bookkeeping only: they change what fits, not how fast anything runs. The decision
drawn from a run is in docs/reliability.md ("One process per version").

Usage (PYTHONPATH so Ray's workers import this checkout):
  PYTHONPATH=. python -m bench.ray_packing [--versions 5 10] [--duration 10]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml

from bench.harness import (
    RESULTS_DIR,
    argument_parser,
    console,
    exit_on_sigterm,
    fmt,
    machine_info,
    new_table,
    save_results,
)
from bench.models import DEFAULT_CONFIG, INPUT_DIM, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, build_mlp

NAMESPACE = "turnout-packing"
"""Ray namespace and socket-directory prefix of the run: apart from other benchmarks' and
tests' sockets on the same machine."""
PACKED_APP = "turnout-packed"
CPUS = 2
RESTART_TIMEOUT_S = 120.0

Tensors = dict[str, np.ndarray[Any, Any]]

# ----------------------------------------------------------------------- measurements, pure


def pss_kib(smaps_rollup: str) -> int:
    """The ``Pss:`` figure (KiB) of a /proc/<pid>/smaps_rollup text; 0 when absent."""
    for line in smaps_rollup.splitlines():
        name, _, rest = line.partition(":")
        if name == "Pss":
            return int(rest.split()[0])
    return 0


def fit_on_cpus(total_cpus: float, cpu_per_version: float) -> int:
    """How many versions a cluster of ``total_cpus`` places at ``cpu_per_version`` each."""
    return math.floor(total_cpus / cpu_per_version + 1e-9)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Result:
    """One layout at one version count."""

    layout: str  # "per-version" or "packed"
    versions: int
    processes: int = 0
    """Replica processes."""
    ready_s: float | None = None
    """From asking Ray until every version answered."""
    replica_pss_mib: float | None = None
    """Summed over the replica processes, after the load run."""
    core_pss_mib: float | None = None
    """Ray's other processes (gcs_server, raylet, Serve controller, idle workers...)."""
    core_processes: int = 0
    cpu_reserved: float | None = None
    cpu_per_version: float | None = None
    """As reserved; the same figure decides how many versions fit on the CPUs."""
    fit_on_cpus: int | None = None
    """Versions the cluster's CPUs hold with this layout's reservation."""
    batches: int = 0
    batches_per_s: float | None = None
    rows_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    restart_s: float | None = None
    """From a SIGKILL of one replica process until all its versions answered again."""
    versions_down: int | None = None
    """Versions that could not answer while that process was restarting."""
    load_average: float | None = None
    """The machine's 1-minute load average as the load run began (others share it)."""
    notes: list[str] = field(default_factory=list)

    @property
    def pss_per_version_mib(self) -> float | None:
        if self.replica_pss_mib is None or not self.versions:
            return None
        return self.replica_pss_mib / self.versions


LAYOUT_NAMES = {"per-version": "A per-version", "packed": "B packed"}


def results_table(results: Iterable[Result], cpus: float = CPUS) -> Any:
    """The console table: one row per layout and version count, then Ray's own processes."""
    columns = [
        "layout",
        "N",
        "procs",
        "ready s",
        "PSS MiB",
        "MiB/ver",
        "CPU",
        f"fit on {cpus:g}",
        "batch/s",
        "p50 ms",
        "p99 ms",
        "restart s",
        "down",
    ]
    table = new_table("Ray layouts for N small model versions", columns, left={"layout"})
    results = list(results)
    for r in results:
        table.add_row(
            LAYOUT_NAMES.get(r.layout, r.layout),
            str(r.versions),
            str(r.processes),
            fmt(r.ready_s, 1),
            fmt(r.replica_pss_mib, 0),
            fmt(r.pss_per_version_mib, 0),
            fmt(r.cpu_reserved),
            "-" if r.fit_on_cpus is None else str(r.fit_on_cpus),
            fmt(r.batches_per_s, 0),
            fmt(r.p50_ms, 1),
            fmt(r.p99_ms, 1),
            fmt(r.restart_s, 1),
            "-" if r.versions_down is None else str(r.versions_down),
        )
    for r in results:
        table.add_row(
            f"Ray's own ({LAYOUT_NAMES.get(r.layout, r.layout)[0]})",
            str(r.versions),
            str(r.core_processes),
            "",
            fmt(r.core_pss_mib, 0),
            *[""] * (len(columns) - 5),
        )
    return table


def payload(
    results: Iterable[Result], settings: dict[str, Any], machine: dict[str, Any]
) -> dict[str, Any]:
    """The results file: settings, machine, one record per layout and version count."""
    return {
        "benchmark": "ray-packing",
        "settings": settings,
        "machine": machine,
        "results": [asdict(r) | {"pss_per_version_mib": r.pss_per_version_mib} for r in results],
    }


# ------------------------------------------------------------------------------- processes


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """Every live process below ``root``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                parents[int(entry.name)] = parent
    below: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        found = [child for child, parent in parents.items() if parent == pid]
        below += found
        frontier += found
    return sorted(below)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def process_pss_mib(pid: int) -> float:
    try:
        return pss_kib(Path(f"/proc/{pid}/smaps_rollup").read_text()) / 1024
    except OSError:
        return 0.0


def ray_processes(fragment: str) -> tuple[list[int], list[int]]:
    """(replica processes whose command line names ``fragment``, Ray's other processes),
    among this process's descendants."""
    replicas, others = [], []
    for pid in descendants(os.getpid()):
        line = cmdline(pid)
        if not line:
            continue
        (replicas if fragment in line else others).append(pid)
    return replicas, others


def memory(result: Result, fragment: str) -> None:
    replicas, others = ray_processes(fragment)
    result.processes = len(replicas)
    result.replica_pss_mib = sum(process_pss_mib(p) for p in replicas)
    result.core_processes = len(others)
    result.core_pss_mib = sum(process_pss_mib(p) for p in others)


# ------------------------------------------------------------------------------- the models


@dataclass
class Repository:
    root: Path
    versions: int
    expected: list[np.ndarray[Any, Any]]
    """Each version's answer to ``probe``, from ONNX Runtime in this process."""
    probe: np.ndarray[Any, Any]

    def model_file(self, version: int) -> Path:
        return self.root / MODEL_NAME / str(version) / "model.onnx"


def build(root: Path, versions: int, num_cpus: float | None) -> Repository:
    """``versions`` MLPs (weights seeded by version, so answers tell them apart)."""
    probe = np.random.default_rng(1).standard_normal((1, INPUT_DIM)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    expected = []
    for version in range(1, versions + 1):
        path = root / MODEL_NAME / str(version) / "model.onnx"
        build_mlp(path, seed=version)
        expected.append(ort.InferenceSession(str(path), options).run(None, {INPUT_NAME: probe})[0])
    config = dict(DEFAULT_CONFIG) | ({"num_cpus": num_cpus} if num_cpus is not None else {})
    (root / MODEL_NAME / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Repository(root, versions, expected, probe)


# ---------------------------------------------------------------------------------- driving


async def answers(channels: Any, inputs: Tensors, timeout: float) -> tuple[Tensors, str]:
    """The first answer from the version behind ``channels`` (rescanning, dropping dead
    sockets) and the replica that gave it."""
    from gateway.backends.channel import ChannelBroken

    deadline = time.monotonic() + timeout
    while True:
        channels.scan()
        channel = channels.pick()
        if channel is not None:
            try:
                outputs, replica, _ = await channel.call(inputs)
                return outputs, replica
            except ChannelBroken:
                channels.drop(channel)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from {channels.directory} in {timeout:g} s")
        await asyncio.sleep(0.05)


async def all_answer(channels: list[Any], repo: Repository, timeout: float) -> list[str]:
    """Every version answers its probe rightly; returns the replica behind each."""
    replicas = []
    for index, version_channels in enumerate(channels):
        outputs, replica = await answers(version_channels, {INPUT_NAME: repo.probe}, timeout)
        if not np.allclose(outputs[OUTPUT_NAME], repo.expected[index], rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"version {index + 1} answered wrongly")
        replicas.append(replica)
    return replicas


async def drive(
    channels: list[Any], rows: int, concurrency: int, duration: float, result: Result | None
) -> None:
    """``concurrency`` batches in flight, round-robin over the versions, for ``duration``."""
    batch = {
        INPUT_NAME: np.random.default_rng(2).standard_normal((rows, INPUT_DIM)).astype(np.float32)
    }
    turn = itertools.count()
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            version_channels = channels[next(turn) % len(channels)]
            channel = version_channels.pick()
            started = time.perf_counter()
            try:
                if channel is None:
                    raise RuntimeError("no replica socket")
                await channel.call(batch)
            except Exception:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - started)

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    took = time.monotonic() - began
    if result is not None:
        result.batches = len(latencies)
        result.batches_per_s = len(latencies) / took
        result.rows_per_s = result.batches_per_s * rows
        result.p50_ms = statistics.median(latencies) * 1e3 if latencies else None
        p99 = percentile(latencies, 99)
        result.p99_ms = p99 * 1e3 if p99 is not None else None
        result.errors = errors


async def restart(
    channels: list[Any], repo: Repository, victim: int, replicas: list[str], result: Result
) -> None:
    """SIGKILL the replica process behind version ``victim``; time until every version it
    hosted answers from a new process, counting the versions that could not answer."""
    pid = int(replicas[victim].rsplit("/", 1)[1])
    hosted = [i for i, replica in enumerate(replicas) if replica == replicas[victim]]
    others = [i for i in range(len(channels)) if i not in hosted]
    down: set[int] = set()
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    async def back(index: int) -> None:
        while True:
            _, replica = await answers(channels[index], {INPUT_NAME: repo.probe}, RESTART_TIMEOUT_S)
            if replica != replicas[index]:
                return
            await asyncio.sleep(0.05)  # the old process has not died yet

    async def probe_others(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for index in others:
                try:
                    await asyncio.wait_for(
                        answers(channels[index], {INPUT_NAME: repo.probe}, 0.5), 1.0
                    )
                except (TimeoutError, OSError):
                    down.add(index)
            await asyncio.sleep(0.1)

    stop = asyncio.Event()
    prober = asyncio.create_task(probe_others(stop))
    try:
        await asyncio.gather(*(back(i) for i in hosted))
    finally:
        stop.set()
        await prober
    result.restart_s = time.monotonic() - killed
    result.versions_down = len(hosted) + len(down)


# ---------------------------------------------------------------------------------- layouts


async def per_version(work: Path, versions: int, args: Any) -> Result:
    """Layout A: the product's RayBackend, one Serve application per version."""
    from gateway.backends.channel import Channels, channel_dir
    from gateway.backends.ray_serve import RayBackend, app_name, replica_resources
    from gateway.repository import Repository as ModelRepository
    from gateway.settings import ServerSettings

    result = Result("per-version", versions)
    default_cpu = replica_resources_default()
    num_cpus = None
    if versions * default_cpu > CPUS + 1e-9:
        num_cpus = CPUS / versions
        result.notes.append(
            f"{versions} x {default_cpu:g} CPU (the default) is more than {CPUS} CPUs: "
            f"loaded with num_cpus {num_cpus:g}"
        )
    repo = build(work / f"a{versions}", versions, num_cpus)
    settings = ServerSettings(model_repository=repo.root)  # type: ignore[call-arg]
    specs = ModelRepository(repo.root, settings).read_all()
    backend = RayBackend(namespace=NAMESPACE)
    await backend.start()
    started = time.monotonic()
    try:
        await asyncio.gather(*(backend.load(spec) for spec in specs))
        channels = []
        for spec in specs:
            version_channels = Channels(channel_dir(NAMESPACE, app_name(spec)), 10**6)
            version_channels.scan()
            channels.append(version_channels)
        replicas = await all_answer(channels, repo, args.ready_timeout)
        result.ready_s = time.monotonic() - started
        result.cpu_reserved = sum(replica_resources(spec)["CPU"] for spec in specs)
        result.cpu_per_version = result.cpu_reserved / versions
        result.fit_on_cpus = fit_on_cpus(CPUS, default_cpu)
        result.notes.append(f"fit on {CPUS} CPUs counted at the default {default_cpu:g} CPU")
        await measure(channels, repo, replicas, result, args, "ServeReplica:turnout-mlp-v")
    finally:
        for spec in specs:
            with contextlib.suppress(Exception):
                await backend.unload(spec)
        await backend.close()
    return result


def replica_resources_default() -> float:
    """What an unset num_cpus reserves for one replica of a default config."""
    from gateway.backends.ray_serve import CPU_PER_THREAD

    return CPU_PER_THREAD * int(DEFAULT_CONFIG["intra_op_threads"])


async def packed(work: Path, versions: int, args: Any) -> Result:
    """Layout B: one Serve deployment, one replica process, a session and socket per version."""
    from ray import serve

    from bench._packed_replica import PackedReplica
    from gateway.backends.channel import Channels, channel_dir
    from gateway.backends.ray_serve import replica_env

    result = Result("packed", versions)
    repo = build(work / f"b{versions}", versions, None)
    threads = int(DEFAULT_CONFIG["intra_op_threads"])
    cpu = replica_resources_default()  # the pack reserves as one replica process
    directories = [channel_dir(NAMESPACE, f"{PACKED_APP}-v{v}") for v in range(1, versions + 1)]
    for directory in directories:  # sockets a killed earlier run left
        for stale in directory.glob("*.sock"):
            stale.unlink(missing_ok=True)
    models = [(str(repo.model_file(v)), str(d)) for v, d in enumerate(directories, start=1)]
    deployment: Any = serve.deployment(
        PackedReplica,
        name="packed",
        num_replicas=1,
        ray_actor_options={"num_cpus": cpu, "runtime_env": {"env_vars": replica_env()}},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    started = time.monotonic()
    try:
        await asyncio.to_thread(
            serve.run, deployment.bind(models, threads), name=PACKED_APP, route_prefix=None
        )
        channels = []
        for directory in directories:
            version_channels = Channels(directory, 10**6)
            version_channels.scan()
            channels.append(version_channels)
        replicas = await all_answer(channels, repo, args.ready_timeout)
        result.ready_s = time.monotonic() - started
        result.cpu_reserved = cpu
        result.cpu_per_version = cpu / versions
        result.fit_on_cpus = fit_on_cpus(CPUS, cpu) * versions
        result.notes.append(
            f"the pack reserves {cpu:g} CPU, as one replica process: {fit_on_cpus(CPUS, cpu)} "
            f"packs of {versions} fit on {CPUS} CPUs"
        )
        await measure(channels, repo, replicas, result, args, f"ServeReplica:{PACKED_APP}")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(serve.delete, PACKED_APP)
    return result


async def measure(
    channels: list[Any],
    repo: Repository,
    replicas: list[str],
    result: Result,
    args: Any,
    fragment: str,
) -> None:
    label = f"{LAYOUT_NAMES[result.layout]} x{result.versions}"
    console.print(f"{label}: every version answered after {fmt(result.ready_s, 1)} s")
    await drive(channels, args.rows, args.concurrency, args.warmup, None)
    result.load_average = os.getloadavg()[0]
    await drive(channels, args.rows, args.concurrency, args.duration, result)
    memory(result, fragment)
    console.print(
        f"{label}: {fmt(result.batches_per_s, 0)} batches/s, p50 {fmt(result.p50_ms)} ms, "
        f"replicas {fmt(result.replica_pss_mib, 0)} MiB PSS in {result.processes} processes, "
        f"Ray's own {fmt(result.core_pss_mib, 0)} MiB in {result.core_processes}"
    )
    if args.restart:
        await restart(channels, repo, 0, replicas, result)
        console.print(
            f"{label}: after a SIGKILL, answering again in {fmt(result.restart_s, 1)} s, "
            f"{result.versions_down} version(s) down meanwhile"
        )


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> Any:
    parser = argument_parser(__doc__)
    parser.add_argument("--versions", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per layout")
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rows", type=int, default=16, help="rows per batch")
    parser.add_argument("--concurrency", type=int, default=16, help="batches in flight")
    parser.add_argument("--ready-timeout", type=float, default=120)
    parser.add_argument(
        "--no-restart", dest="restart", action="store_false", help="skip the SIGKILL step"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


async def run(args: Any, work: Path) -> list[Result]:
    results = []
    for versions in args.versions:
        results.append(await per_version(work, versions, args))
        await asyncio.sleep(2)  # the deleted applications' processes exit
        results.append(await packed(work, versions, args))
        await asyncio.sleep(2)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    import logging

    import ray

    ray.init(
        num_cpus=CPUS,
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="ray-packing-") as tmp:
            results = asyncio.run(run(args, Path(tmp)))
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
    console.print(results_table(results))
    for r in results:
        for note in r.notes:
            console.print(f"{LAYOUT_NAMES[r.layout]} x{r.versions}: {note}", style="dim")
    settings = {
        "versions": args.versions,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rows_per_batch": args.rows,
        "concurrency": args.concurrency,
        "cpus": CPUS,
        "model": "MLP 256-1024-1024-10, FP32, one intra-op thread per session",
        "driver": "this process, over the replicas' same-node Unix sockets",
    }
    machine = machine_info(load_average=True, tools=())
    save_results("ray-packing", args.out, payload(results, settings, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
