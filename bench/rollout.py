"""Zero-downtime policy changes under load.

For each backend: serve a model with two versions (version v answers ``x + v``, so every answer
proves which version computed it), keep HTTP and gRPC requests flowing at a fixed concurrency,
and meanwhile apply ``--changes`` traffic-policy changes of every kind through the admin REST
API, evenly spread over ``--duration`` seconds: weighted splits, blue-green standby + switch,
promote, rollback, shadow on and off, every other one guarded by ``if_revision`` (and now and
then a deliberately stale ``if_revision`` that must be refused with 409).

Every response is recorded (status, ``model_version``, ``x-turnout-revision``) and checked
against the audit history afterwards:
  failures    any response that is not 200 / OK, any transport error
  violations  a version the policy at the response's revision gives no traffic to (revision 0:
              the highest version), an unknown revision, an answer that is not ``x + version``,
              or one routing key answered by two versions under one revision
  stale       a request sent after a change was acknowledged, answered under an older revision

Usage:
  python -m bench.rollout [--backend local ray] [--duration 60] [--changes 100]
                          [--concurrency 16] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson

from bench.harness import (
    RESULTS_DIR,
    AdminClient,
    HttpConnection,
    Server,
    StartError,
    admin_token,
    argument_parser,
    console,
    exit_on_sigterm,
    fmt,
    gateway_address,
    gateway_config,
    infer_http,
    infer_json,
    infer_request,
    infer_stub,
    machine_info,
    new_table,
    retry,
    running,
    save_results,
    serve_command,
    synchronously,
)

# bench.rollout.build_repository and .admin_token: tests/e2e/test_zero_downtime.py uses them.
from bench.models import ROLLOUT_CONFIG as MODEL_CONFIG
from bench.models import ROLLOUT_MODEL_NAME as MODEL_NAME
from bench.models import ROLLOUT_VERSIONS as VERSIONS
from bench.models import ROLLOUT_WIDTH as WIDTH
from bench.models import build_rollout_repository as build_repository
from gateway.routing import REVISION_HEADER, ROUTING_KEY_HEADER

# One change kind after another; each is valid after the one before it (``switch`` follows
# a standby), and a ``set`` or ``rollback`` in between makes the cycle visit every shape.
CHANGE_CYCLE = (
    "set",
    "shadow",
    "standby",
    "switch",
    "promote",
    "rollback",
    "clear_shadow",
    "set",
    "standby",
    "switch",
    "rollback",
)
STALE_PROBE_EVERY = 10  # every 10th change is preceded by a stale if_revision (expect 409)
GRPC_SHARE = 0.25  # of the workers
KEYED_SHARE = 3  # every third request carries a routing key
REQUEST_TIMEOUT_S = 30.0
SAMPLES_KEPT = 20


# ----------------------------------------------------------------------------------- the load


@dataclass(slots=True)
class Response:
    protocol: str
    started: float  # time.monotonic() when the request was sent
    latency_s: float
    status: str  # "200" or "OK" on success
    version: int | None = None
    revision: int | None = None
    key: str | None = None
    answer_ok: bool = True
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("200", "OK")


def _row(worker: int) -> list[float]:
    return [worker + i / 4 for i in range(WIDTH)]  # exact in FP32, and so is row + version


def _input(worker: int) -> np.ndarray:
    """The model's input ``x``, [1, WIDTH]: the worker's row."""
    return np.asarray([_row(worker)], dtype=np.float32)


def _key(worker: int, n: int) -> str | None:
    return f"user-{(worker * 7919 + n) % 97}" if n % KEYED_SHARE == 0 else None


def _answer_ok(values: list[float], row: list[float], version: int) -> bool:
    return values == [v + version for v in row]


async def http_worker(worker: int, http_address: str, stop_at: float, out: list[Response]) -> None:
    connection = HttpConnection.to(http_address)
    row = _row(worker)
    body = infer_json(_input(worker), "x")
    path = f"/v2/models/{MODEL_NAME}/infer"
    n = 0
    try:
        while time.monotonic() < stop_at:
            n += 1
            key = _key(worker, n)
            headers = {"content-type": "application/json"}
            if key is not None:
                headers[ROUTING_KEY_HEADER] = key
            started = time.monotonic()
            try:
                status, reply, data = await asyncio.wait_for(
                    connection.request("POST", path, body, headers), REQUEST_TIMEOUT_S
                )
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                latency = time.monotonic() - started
                out.append(Response("http", started, latency, "transport", error=repr(exc)))
                continue
            record = Response("http", started, time.monotonic() - started, str(status), key=key)
            try:
                document = orjson.loads(data)
                if status != 200:
                    record.error = str(document.get("error"))
                else:
                    record.version = int(document["model_version"])
                    record.revision = int(reply[REVISION_HEADER])
                    values = document["outputs"][0]["data"]
                    record.answer_ok = _answer_ok(values, row, record.version)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                record.status, record.error = f"unreadable {status}", repr(exc)
            out.append(record)
    finally:
        await connection.close()


async def grpc_worker(
    worker: int, channel: grpc.aio.Channel, stop_at: float, out: list[Response]
) -> None:
    infer = infer_stub(channel)
    row = _row(worker)
    request = infer_request(_input(worker), MODEL_NAME, "x")
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        key = _key(worker, n)
        metadata = ((ROUTING_KEY_HEADER, key),) if key is not None else None
        started = time.monotonic()
        call = infer(request, metadata=metadata, timeout=REQUEST_TIMEOUT_S)
        try:
            response = await call
            trailing = dict(await call.trailing_metadata() or ())
        except grpc.aio.AioRpcError as exc:
            latency = time.monotonic() - started
            out.append(Response("grpc", started, latency, exc.code().name, error=exc.details()))
            continue
        record = Response("grpc", started, time.monotonic() - started, "OK", key=key)
        try:
            record.version = int(response.model_version)
            record.revision = int(trailing[REVISION_HEADER])
            values = list(struct.unpack(f"<{WIDTH}f", response.raw_output_contents[0]))
            record.answer_ok = _answer_ok(values, row, record.version)
        except (ValueError, KeyError, IndexError, struct.error) as exc:
            record.status, record.error = "unreadable OK", repr(exc)
        out.append(record)


# -------------------------------------------------------------------------------- the changes


@dataclass
class Change:
    kind: str
    at: float  # seconds after the load started
    if_revision: int | None
    status: int
    revision: int | None  # the revision the change created
    sent: float  # time.monotonic() when the request went out
    acked: float  # time.monotonic() when the reply arrived
    error: str | None = None


class ChangePlanner:
    """Picks the next change from CHANGE_CYCLE, adapted to the current policy."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.index = 0

    def next(self, policy: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        kind = CHANGE_CYCLE[self.index % len(CHANGE_CYCLE)]
        self.index += 1
        if kind == "switch" and policy.get("standby") is None:
            kind = "standby"  # a rollback may have restored a policy without one
        if kind == "rollback" and policy["revision"] == 0:
            kind = "set"
        rng = self.rng
        if kind == "set":
            first = rng.choice([0, 100, *(rng.randrange(1, 100) for _ in range(4))])
            return kind, {"op": "set", "weights": {"1": first, "2": 100 - first}}
        if kind == "standby":
            active = rng.choice(VERSIONS)
            standby = next(v for v in VERSIONS if v != active)
            return kind, {"op": "set", "weights": {str(active): 100}, "standby": standby}
        if kind == "promote":
            return kind, {"op": "promote", "version": rng.choice(VERSIONS)}
        if kind == "shadow":
            percent = rng.choice([5, 10, 50, 100])
            return kind, {"op": "shadow", "version": rng.choice(VERSIONS), "percent": percent}
        return kind, {"op": kind}  # switch, rollback, clear_shadow


async def apply_changes(
    admin: AdminClient, count: int, duration: float, started: float, seed: int
) -> tuple[list[Change], int]:
    """``count`` changes evenly spread over ``duration``; returns them and the 409s seen."""
    planner = ChangePlanner(seed)
    policy = await admin.status()
    changes: list[Change] = []
    refused = 0
    for i in range(count):
        at = (i + 0.5) * duration / count
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        kind, body = planner.next(policy)
        if i % STALE_PROBE_EVERY == STALE_PROBE_EVERY - 1:
            # Someone else moved first: the stale guard must be refused and change nothing.
            status, _ = await admin.change({**body, "if_revision": policy["revision"] + 1000})
            refused += status == 409
        if_revision = policy["revision"] if i % 2 else None
        if if_revision is not None:
            body["if_revision"] = if_revision
        sent = time.monotonic()
        status, reply = await admin.change(body)
        change = Change(kind, at, if_revision, status, None, sent, time.monotonic())
        if status == 200:
            policy = reply
            change.revision = int(reply["revision"])
        else:
            change.error = str(reply.get("error") if isinstance(reply, dict) else reply)
        changes.append(change)
    return changes, refused


# ----------------------------------------------------------------------------------- checking


@dataclass
class RolloutResult:
    backend: str
    duration_s: float
    concurrency: int
    requests: int = 0
    http_requests: int = 0
    grpc_requests: int = 0
    failures: int = 0
    changes_planned: int = 0
    changes_applied: int = 0
    change_errors: int = 0
    stale_guards_refused: int = 0
    stale_guards_sent: int = 0
    revisions_seen: int = 0
    violations: int = 0
    stale: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p99_during_change_ms: float | None = None
    """p99 of the requests in flight while an admin change was being applied."""
    change_p50_ms: float | None = None
    change_max_ms: float | None = None
    versions_served: dict[str, int] = field(default_factory=dict)
    change_kinds: dict[str, int] = field(default_factory=dict)
    violation_kinds: dict[str, int] = field(default_factory=dict)
    failure_samples: list[str] = field(default_factory=list)
    violation_samples: list[str] = field(default_factory=list)
    """Violations and stale answers, the first SAMPLES_KEPT of them, each kind first."""
    change_log: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.requests > 0
            and self.failures == 0
            and self.violations == 0
            and self.stale == 0
            and self.change_errors == 0
            and self.stale_guards_refused == self.stale_guards_sent
        )

    def problems(self) -> list[str]:
        """One line per broken property, for an assertion message or the console."""
        lines = [self.error] if self.error else []
        if self.requests == 0:
            lines.append("no requests were answered")
        lines += [f"failure: {s}" for s in self.failure_samples]
        lines += self.violation_samples  # each names its kind first
        if self.stale:
            lines.append(f"{self.stale} responses under a revision older than one acknowledged")
        lines += [
            f"change {c['kind']} at {c['at']:.2f} s: {c['status']} {c['error']}"
            for c in self.change_log
            if c["status"] != 200
        ]
        if self.stale_guards_refused != self.stale_guards_sent:
            lines.append(
                f"only {self.stale_guards_refused} of {self.stale_guards_sent} stale "
                "if_revision changes were refused with 409"
            )
        return lines


def allowed_versions(history: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Revision -> the versions its policy sends traffic to; revision 0 is the default."""
    allowed = {0: {max(VERSIONS)}}
    for entry in history:
        weights = entry["new"]["weights"]
        allowed[int(entry["revision"])] = {int(v) for v, w in weights.items() if w > 0}
    return allowed


def check(
    result: RolloutResult,
    responses: list[Response],
    history: list[dict[str, Any]],
    changes: list[Change],
    started: float,
    elapsed: float,
) -> RolloutResult:
    """Fill ``result`` from the recorded responses, the audit history and the change log."""
    allowed = allowed_versions(history)
    applied = sorted((c.acked, c.revision) for c in changes if c.revision is not None)
    ack_times = [t for t, _ in applied]
    windows = sorted((c.sent, c.acked) for c in changes)
    window_starts = [sent for sent, _ in windows]
    during_change = []
    kinds: Counter[str] = Counter()
    samples: list[str] = []
    sticky: dict[tuple[int, str], int] = {}

    def violation(kind: str, text: str) -> None:
        kinds[kind] += 1
        if len(samples) < SAMPLES_KEPT:
            samples.append(f"{kind}: {text}")

    latencies = []
    served: Counter[str] = Counter()
    revisions = set()
    for r in responses:
        if not r.ok:
            result.failures += 1
            if len(result.failure_samples) < SAMPLES_KEPT:
                result.failure_samples.append(f"{r.protocol} {r.status}: {r.error}")
            continue
        assert r.version is not None and r.revision is not None
        latencies.append(r.latency_s)
        # Changes run one after another, so only the last one sent before the end can overlap.
        window = bisect.bisect_right(window_starts, r.started + r.latency_s) - 1
        if window >= 0 and windows[window][1] > r.started:
            during_change.append(r.latency_s)
        served[str(r.version)] += 1
        revisions.add(r.revision)

        def where(r: Response = r) -> str:
            return (
                f"{r.protocol} request sent at {r.started - started:.3f} s: v{r.version} "
                f"under revision {r.revision}"
            )

        if r.revision not in allowed:
            violation("unknown revision", where())
        elif r.version not in allowed[r.revision]:
            violation("version not allowed", f"{where()} (allowed {sorted(allowed[r.revision])})")
        if not r.answer_ok:
            violation("wrong answer", f"{where()}: the output is not x + {r.version}")
        if r.key is not None:
            first = sticky.setdefault((r.revision, r.key), r.version)
            if first != r.version:
                violation("sticky key split", f"{where()}: key {r.key} also got v{first}")
        # The newest change acknowledged before the request was sent binds it.
        index = bisect.bisect_right(ack_times, r.started)
        if index and r.revision < applied[index - 1][1]:
            result.stale += 1
            if len(samples) < SAMPLES_KEPT:
                samples.append(
                    f"stale: {where()}, after revision {applied[index - 1][1]} was acked"
                )
    history_revisions = [int(e["revision"]) for e in history]
    applied_revisions = [rev for _, rev in applied]
    if history_revisions != applied_revisions:
        violation(
            "history mismatch",
            f"audit revisions {history_revisions} != acknowledged {applied_revisions}",
        )

    result.requests = len(responses)
    result.http_requests = sum(r.protocol == "http" for r in responses)
    result.grpc_requests = result.requests - result.http_requests
    result.changes_planned = len(changes)
    result.changes_applied = len(applied)
    result.change_errors = sum(c.revision is None for c in changes)
    result.revisions_seen = len(revisions)
    result.violations = sum(kinds.values())
    result.violation_kinds = dict(kinds)
    result.violation_samples = samples
    result.versions_served = dict(sorted(served.items()))
    result.change_kinds = dict(Counter(c.kind for c in changes))
    result.change_log = [
        {**asdict(c), "sent": round(c.sent - started, 3), "acked": round(c.acked - started, 3)}
        for c in changes
    ]
    if windows:
        change_ms = [(acked - sent) * 1e3 for sent, acked in windows]
        result.change_p50_ms, result.change_max_ms = float(np.median(change_ms)), max(change_ms)
    if during_change:
        result.p99_during_change_ms = float(np.percentile(during_change, 99) * 1e3)
    result.rps = (result.requests - result.failures) / elapsed if elapsed else 0.0
    if latencies:
        p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
        result.p50_ms, result.p99_ms = float(p50), float(p99)
    return result


# ------------------------------------------------------------------------------ one full run


async def rollout(
    backend: str,
    http_address: str,
    grpc_address: str,
    token: str,
    duration: float,
    changes: int,
    concurrency: int,
    seed: int = 0,
) -> RolloutResult:
    """Load a running gateway while changing its policy; check every response."""
    responses: list[Response] = []
    admin = AdminClient(http_address, token, MODEL_NAME)
    grpc_workers = round(concurrency * GRPC_SHARE) if concurrency > 1 else 0
    channel = grpc.aio.insecure_channel(grpc_address)
    result = RolloutResult(backend, duration, concurrency)
    try:
        started = time.monotonic()
        stop_at = started + duration
        workers = [
            grpc_worker(i, channel, stop_at, responses)
            if i < grpc_workers
            else http_worker(i, http_address, stop_at, responses)
            for i in range(concurrency)
        ]
        load = asyncio.gather(*workers)
        try:
            applied, refused = await apply_changes(admin, changes, duration, started, seed)
        finally:
            await load
        elapsed = time.monotonic() - started
        history = await admin.history()
    finally:
        await admin.close()
        await channel.close(None)
    result.stale_guards_sent = changes // STALE_PROBE_EVERY
    result.stale_guards_refused = refused
    responses.sort(key=lambda r: r.started)
    return check(result, responses, history, applied, started, elapsed)


run_rollout = synchronously(rollout)


def warm_up(http_address: str) -> None:
    """One answered request: a `ready` line may come before every route is live."""
    x = _input(0)
    retry(lambda: infer_http(http_address, x, MODEL_NAME, "x", "y"), "warm-up request")


def bench_backend(backend: str, work: Path, args: argparse.Namespace) -> RolloutResult:
    """Start ``turnout serve`` for ``backend`` as a subprocess and run the rollout against it."""
    config, state_dir = gateway_config(work, backend, host="127.0.0.1", http_port=0, grpc_port=0)
    command = serve_command(work / "models", backend, "--config", str(config))
    server = Server(command, work / f"server-{backend}.log")
    console.rule(f"turnout {backend}")
    console.print(" ".join(command), style="dim")
    with running(server):
        try:
            took = server.wait_ready()  # the gateway's own `turnout ready` line
            address = gateway_address(state_dir)
            http_address = address["http"].removeprefix("http://")
            warm_up(http_address)
        except (StartError, OSError, ValueError, KeyError) as exc:
            console.print(f"[red]turnout {backend} did not start: {exc}")
            return RolloutResult(backend, args.duration, args.concurrency, error=str(exc)[:500])
        console.print(f"ready after {took:.1f} s; {args.changes} changes in {args.duration:g} s")
        result = run_rollout(
            backend,
            http_address,
            address["grpc"],
            admin_token(state_dir),
            args.duration,
            args.changes,
            args.concurrency,
            args.seed,
        )
    for line in result.problems():
        console.print(f"[red]{line}")
    return result


# ------------------------------------------------------------------------------------- report


def print_table(results: list[RolloutResult]) -> None:
    columns = (
        "backend",
        "requests",
        "failures",
        "changes",
        "revisions",
        "violations",
        "stale",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99 in change",
        "change p50/max ms",
    )
    title = f"Policy changes under load ({MODEL_NAME}: two versions, x + version)"
    table = new_table(title, columns, left=("backend",))
    for r in results:
        table.add_row(
            r.backend,
            str(r.requests),
            str(r.failures),
            f"{r.changes_applied}/{r.changes_planned}",
            str(r.revisions_seen),
            str(r.violations),
            str(r.stale),
            fmt(r.rps, 0),
            fmt(r.p50_ms),
            fmt(r.p99_ms),
            fmt(r.p99_during_change_ms),
            f"{fmt(r.change_p50_ms, 1)}/{fmt(r.change_max_ms, 1)}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--backend", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load per backend")
    parser.add_argument("--changes", type=int, default=100, help="policy changes per backend")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0, help="seeds the changes' choices")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 on any failure, violation or stale answer"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.changes < 0 or args.concurrency < 1:
        parser.error("--duration must be > 0, --changes >= 0 and --concurrency >= 1")

    exit_on_sigterm()

    results = []
    with tempfile.TemporaryDirectory(prefix="turnout-rollout-") as tmp:
        work = Path(tmp)
        build_repository(work / "models")
        for backend in args.backend:
            results.append(bench_backend(backend, work, args))

    print_table(results)
    save_results(
        "rollout",
        args.out,
        {
            "machine": machine_info(),
            "settings": {
                "backends": args.backend,
                "duration_s": args.duration,
                "changes": args.changes,
                "concurrency": args.concurrency,
                "grpc_workers": round(args.concurrency * GRPC_SHARE) if args.concurrency > 1 else 0,
                "seed": args.seed,
                "model": f"{MODEL_NAME}: y = x + version, FP32 [1, {WIDTH}], versions {VERSIONS}",
                "model_config": MODEL_CONFIG,
                "change_cycle": CHANGE_CYCLE,
            },
            "results": [asdict(r) for r in results],
            "passed": all(r.passed for r in results),
        },
    )
    return 1 if args.strict and not all(r.passed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
