"""How fast and how safely automated rollouts decide: bad canaries rolled back, healthy ones
promoted, measured against a real ``turnout serve``.

Each scenario starts a fresh gateway (local backend) on the ``scorer`` model of
bench.models, sends an open-loop ``--rate`` of HTTP requests (default 200 req/s) with
random features, and after a short warm-up on the stable version starts
``turnout rollout`` of a canary at 10%, 25%, 50%, 100%:

  errors     version 2 with 5% of its requests failing (``traffic fault --abort-percent 5``)
  latency    version 2 with every request 30 ms slower (``--delay-ms 30``)
  shifted    version 3: outputs shifted by 0.5 (prediction drift)
  accuracy   version 4: the classes rotated (same output distribution, 25% accuracy), with
             every answer's true label fed back through ``POST .../feedback`` (sidecar on)
  healthy    version 2 unchanged, ``--healthy-runs`` times: promoted, never rolled back

For the bad ones it prints and saves: seconds from the canary going bad (its first step) to
the rollback decision (audit entry) and to weight 0 (its last answer), the canary's answers
and the bad answers (failed, slow, shifted, wrong) as shares of every request answered in
the ``--window`` seconds from the rollout's start; for the healthy ones the seconds to
promotion and the false rollbacks. Targets: errors and latency rolled back within 10 s,
drift within 30 s, at most 0.2% of requests served badly, healthy promoted with 0 false
rollbacks.

Usage:
  python -m bench.rollout_safety [--rate 200] [--window 60] [--healthy-runs 20]
                                 [--scenarios errors latency shifted accuracy healthy]
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.harness import (
    AdminClient,
    HttpConnection,
    Server,
    admin_token,
    argument_parser,
    console,
    exit_status,
    fmt,
    free_port,
    gateway_address,
    gateway_config,
    machine_info,
    new_table,
    print_verdict,
    save_results,
    serve_command,
)
from bench.models import SCORER_MODEL_NAME, SCORER_WIDTH, build_scorer_repository

MODEL = SCORER_MODEL_NAME
STEPS = [10, 25, 50, 100]
WARM_UP_S = 3.0
SCENARIOS = {
    # name: (canary version, fault on it, monitor sidecar needed)
    "errors": (2, {"abort_percent": 5}, False),
    "latency": (2, {"delay_ms": 30}, False),
    "shifted": (3, None, False),
    "accuracy": (4, None, True),
    "healthy": (2, None, False),
}
TARGET_S = {"errors": 10.0, "latency": 10.0, "shifted": 30.0, "accuracy": 60.0}
MAX_BAD_SHARE = 0.002


@dataclass
class Answer:
    sent: float
    version: int
    status: int
    latency_s: float
    correct: bool


@dataclass
class ScenarioResult:
    scenario: str
    canary: int
    phase: str
    reason: str
    decision_s: float | None
    weight_zero_s: float | None
    answered: int
    canary_answers: int
    bad_answers: int
    canary_share: float
    bad_share: float
    gates_failed: list[str] = field(default_factory=list)


def rollout_config(scenario: str, step_seconds: float) -> dict[str, Any]:
    config: dict[str, Any] = {
        "steps": STEPS,
        "step_seconds": step_seconds,
        "min_requests": 200,
        "pause_after_s": 120,
    }
    if scenario == "accuracy":
        config["config"] = {"accuracy": {"required": True}}
    return config


async def run_scenario(
    scenario: str, work: Path, rate: float, window_s: float, step_seconds: float
) -> ScenarioResult:
    canary, fault, monitor = SCENARIOS[scenario]
    repo = build_scorer_repository(work / "models")
    metrics_port = free_port()
    settings: dict[str, Any] = {"monitor_http": f"http://127.0.0.1:{metrics_port}"}
    config, state_dir = gateway_config(work, scenario, **settings)
    options = ["--config", str(config), "--http-port", str(free_port())]
    options += ["--grpc-port", str(free_port())]
    if not monitor:
        options.append("--no-monitor")
    env = {"TURNOUT_MONITOR_METRICS_PORT": str(metrics_port)}
    server = Server(serve_command(repo, "local", *options), work / f"{scenario}.log", env)
    server.start()
    try:
        server.wait_ready()
        address = gateway_address(state_dir)["http"].removeprefix("http://")
        admin = AdminClient(address, admin_token(state_dir), MODEL)
        await admin.call("PUT", "traffic", {"weights": {"1": 100}})
        if fault is not None:
            status, document = await admin.call("PUT", f"versions/{canary}/fault", fault)
            assert status == 200, document
        return await _drive(scenario, canary, address, admin, rate, window_s, step_seconds)
    finally:
        server.stop()


async def _drive(
    scenario: str,
    canary: int,
    address: str,
    admin: AdminClient,
    rate: float,
    window_s: float,
    step_seconds: float,
) -> ScenarioResult:
    answers: list[Answer] = []
    labels: list[dict[str, Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    origin = loop.time()
    slots = iter(range(10**9))

    async def worker() -> None:
        connection = HttpConnection.to(address)
        rng = random.Random()
        while not stop.is_set():
            due = origin + next(slots) / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            x = [rng.random() for _ in range(SCORER_WIDTH)]
            request_id = f"{rng.getrandbits(64):016x}"
            body = orjson.dumps(
                {
                    "id": request_id,
                    "inputs": [
                        {"name": "x", "shape": [1, SCORER_WIDTH], "datatype": "FP32", "data": x}
                    ],
                }
            )
            sent = loop.time()
            status, _, reply = await connection.request("POST", f"/v2/models/{MODEL}/infer", body)
            took = loop.time() - sent
            version, correct = 0, False
            truth = max(range(SCORER_WIDTH), key=x.__getitem__)
            if status == 200:
                document = orjson.loads(reply)
                version = int(document["model_version"])
                scores = document["outputs"][0]["data"]
                correct = max(range(SCORER_WIDTH), key=scores.__getitem__) == truth
                labels.append({"id": request_id, "label": truth})
            else:
                version = -1
            answers.append(Answer(sent - origin, version, status, took, correct))
        await connection.close()

    async def feedback() -> None:
        connection = HttpConnection.to(address)
        while not stop.is_set():
            await asyncio.sleep(0.5)
            batch, labels[:] = labels[:], []
            if batch and scenario == "accuracy":
                body = orjson.dumps({"labels": batch})
                await connection.request("POST", f"/v2/models/{MODEL}/feedback", body)
        await connection.close()

    tasks = [asyncio.create_task(worker()) for _ in range(16)]
    tasks.append(asyncio.create_task(feedback()))
    await asyncio.sleep(WARM_UP_S)
    started = loop.time() - origin
    status, document = await admin.call(
        "POST", "rollout", {"canary": canary, **rollout_config(scenario, step_seconds)}
    )
    assert status == 200, document
    final = document
    deadline = loop.time() + window_s
    while loop.time() < deadline:
        status, final = await admin.call("GET", "rollout")
        if scenario == "healthy" and final["phase"] in ("promoted", "rolled_back", "paused"):
            break
        await asyncio.sleep(0.2)
    if scenario != "healthy":
        await asyncio.sleep(max(0.0, deadline - loop.time()))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    history = await admin.history()
    await admin.close()
    return _summarise(scenario, canary, answers, history, final, started, window_s)


def _summarise(
    scenario: str,
    canary: int,
    answers: list[Answer],
    history: list[dict[str, Any]],
    final: dict[str, Any],
    started: float,
    window_s: float,
) -> ScenarioResult:
    start_entry = next(e for e in reversed(history) if e["operation"] == "rollout_start")
    decided = [e for e in history if e["operation"] in ("rollout_rollback", "rollout_promote")]
    decision_s = decided[-1]["time"] - start_entry["time"] if decided else None
    inside = [a for a in answers if started <= a.sent <= started + window_s]
    stable_latency = sorted(a.latency_s for a in inside if a.version == 1 and a.status == 200)
    p99 = stable_latency[int(0.99 * (len(stable_latency) - 1))] if stable_latency else 0.0
    from_canary = [a for a in inside if a.version in (canary, -1)]  # -1: failed, maybe canary
    canary_answers = [a for a in inside if a.version == canary]
    if scenario == "errors":
        bad = [a for a in inside if a.status >= 500]
    elif scenario == "latency":
        bad = [a for a in canary_answers if a.latency_s > p99 + 0.010]
    elif scenario == "healthy":
        bad = [a for a in inside if a.status >= 500]
    else:  # shifted and wrong answers: every answer of the bad canary
        bad = canary_answers
    last_canary = max((a.sent for a in from_canary), default=None)
    weight_zero_s = (
        last_canary - started
        if last_canary is not None and final["phase"] == "rolled_back"
        else None
    )
    answered = len(inside)
    return ScenarioResult(
        scenario=scenario,
        canary=canary,
        phase=final["phase"],
        reason=final.get("reason", ""),
        decision_s=decision_s,
        weight_zero_s=weight_zero_s,
        answered=answered,
        canary_answers=len(canary_answers),
        bad_answers=len(bad),
        canary_share=len(canary_answers) / answered if answered else 0.0,
        bad_share=len(bad) / answered if answered else 0.0,
        gates_failed=[g["name"] for g in final.get("gates") or [] if g["decision"] == "fail"],
    )


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--rate", type=float, default=200.0, help="requests a second")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per bad scenario")
    parser.add_argument("--healthy-runs", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, default=5.0)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args()
    results: list[ScenarioResult] = []
    with tempfile.TemporaryDirectory(prefix="turnout-rollout-safety-") as tmp:
        for scenario in args.scenarios:
            runs = args.healthy_runs if scenario == "healthy" else 1
            for run in range(runs):
                work = Path(tmp) / f"{scenario}-{run}"
                work.mkdir()
                result = asyncio.run(
                    run_scenario(scenario, work, args.rate, args.window, args.step_seconds)
                )
                console.print(
                    f"{scenario} run {run + 1}: {result.phase} after "
                    f"{fmt(result.decision_s, 1)} s ({result.reason[:100]})"
                )
                results.append(result)
    table = new_table(
        "Rollout safety",
        ["scenario", "runs", "phase", "decision s", "weight 0 s", "canary share",
         "bad share", "gate"],
        left={"scenario", "phase", "gate"},
    )  # fmt: skip
    verdicts: list[tuple[bool, str, str]] = []
    for scenario in args.scenarios:
        group = [r for r in results if r.scenario == scenario]
        phases = sorted({r.phase for r in group})
        decisions = [r.decision_s for r in group if r.decision_s is not None]
        median = statistics.median(decisions) if decisions else None
        first = group[0]
        table.add_row(
            scenario,
            str(len(group)),
            ",".join(phases),
            fmt(median, 1),
            fmt(first.weight_zero_s, 1) if scenario != "healthy" else "-",
            f"{first.canary_share:.2%}" if scenario != "healthy" else "-",
            f"{first.bad_share:.3%}" if scenario != "healthy" else "-",
            ",".join(first.gates_failed) or "-",
        )
        if scenario == "healthy":
            false_rollbacks = sum(r.phase != "promoted" for r in group)
            verdicts.append(
                (
                    false_rollbacks == 0,
                    "healthy: promoted every run, 0 false rollbacks",
                    f"{len(group) - false_rollbacks}/{len(group)} promoted, median "
                    f"{fmt(median, 1)} s to promotion",
                )
            )
        else:
            in_time = first.phase == "rolled_back" and (median or 1e9) <= TARGET_S[scenario]
            verdicts.append(
                (
                    in_time,
                    f"{scenario}: rolled back within {TARGET_S[scenario]:.0f} s",
                    f"{first.phase} after {fmt(median, 1)} s",
                )
            )
            if scenario in ("errors", "latency"):
                verdicts.append(
                    (
                        first.bad_share <= MAX_BAD_SHARE,
                        f"{scenario}: at most {MAX_BAD_SHARE:.1%} of requests served badly",
                        f"{first.bad_share:.3%} ({first.bad_answers} of {first.answered})",
                    )
                )
    console.print(table)
    checks = [
        {"verdict": "PASS" if passed else "FAIL", "target": target, "measured": measured}
        for passed, target, measured in verdicts
    ]
    for check in checks:
        print_verdict(check["verdict"], f"{check['target']}: {check['measured']}")
    payload = {
        "machine": machine_info(),
        "settings": {
            "rate": args.rate,
            "window_s": args.window,
            "healthy_runs": args.healthy_runs,
            "step_seconds": args.step_seconds,
            "steps": STEPS,
        },
        "results": [asdict(r) for r in results],
        "targets": checks,
        "time": time.time(),
    }
    save_results("rollout-safety", args.out, payload)
    return exit_status(checks, strict=args.strict)


if __name__ == "__main__":
    raise SystemExit(main())
