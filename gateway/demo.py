"""``turnout demo``: a real model served on local Ray, with traffic and two rollouts shown.

The models are trained on scikit-learn's bundled breast-cancer data and converted to ONNX
with skl2onnx: version 1 a scaled logistic regression, version 2 gradient-boosted trees,
version 3 a logistic regression trained on shuffled labels (broken on purpose). After a
burst of requests, version 2 is rolled out automatically under steady traffic and promoted
by itself; then version 3's rollout is rolled back by itself, with the evidence printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["build_demo_models", "run_demo"]

MODEL = "breast_cancer"
FEATURES = 30


def build_demo_models(root: Path) -> Path:
    """Write ``root/breast_cancer/{1,2,3}/model.onnx`` and its config; return the model dir.

    Version 3 is broken on purpose: trained on shuffled labels, so its answers are noise (the
    rollout of it must be rolled back by itself)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = load_breast_cancer(return_X_y=True)
    candidates = {
        1: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        2: GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=0),
        3: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
    }
    shuffled = np.random.default_rng(0).permutation(labels)
    model_dir = root / MODEL
    for version, estimator in candidates.items():
        estimator.fit(features, shuffled if version == 3 else labels)
        onx = to_onnx(
            estimator,
            initial_types=[("features", FloatTensorType([None, FEATURES]))],
            options={id(estimator): {"zipmap": False}}
            if version == 2
            else {id(estimator.steps[-1][1]): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        target = model_dir / str(version) / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(onx.SerializeToString())
    config = {"max_batch_size": 64, "max_queue_delay_us": 500, "num_replicas": 1}
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return model_dir


def demo_rows() -> np.ndarray[Any, Any]:
    from sklearn.datasets import load_breast_cancer

    features: np.ndarray[Any, Any] = load_breast_cancer().data.astype(np.float32)
    return features


async def _burst(url: str, count: int, concurrency: int) -> dict[str, dict[str, Any]]:
    """Send ``count`` requests over gRPC, alternating explicit versions; time each."""
    import tritonclient.grpc.aio as grpcclient
    from rich.progress import Progress

    rows = demo_rows()
    client = grpcclient.InferenceServerClient(url)
    results: dict[str, dict[str, Any]] = {v: {"latencies": [], "errors": 0} for v in ("1", "2")}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    with Progress() as progress:
        task = progress.add_task("sending requests", total=count)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                version = "1" if i % 2 == 0 else "2"
                tensor = grpcclient.InferInput("features", [1, FEATURES], "FP32")
                tensor.set_data_from_numpy(rows[i % len(rows)][None, :])
                started = time.perf_counter()
                try:
                    await client.infer(MODEL, [tensor], model_version=version)
                    results[version]["latencies"].append(time.perf_counter() - started)
                except Exception:
                    results[version]["errors"] += 1
                progress.advance(task)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return results


DEMO_ROLLOUT = {
    "steps": [10, 50, 100],
    "step_seconds": 3,
    "min_requests": 100,
    "pause_after_s": 60,
    "config": {"drift": {"margin_sd": 0.5}},
}


async def _rollouts(http: str, grpc_url: str) -> None:
    """Roll version 2 out by itself, then a broken version 3, which is rolled back."""
    import argparse

    from gateway.admin.cli import call_admin
    from gateway.admin.rollout_cli import print_rollout

    admin = argparse.Namespace(url=http, token=None, state_dir=None)
    call_admin(admin, "PUT", f"models/{MODEL}/traffic", {"weights": {"1": 100}})
    stop = asyncio.Event()
    traffic = asyncio.create_task(_steady(grpc_url, stop))
    try:
        for canary, story in (
            (2, "version 2 (gradient boosting) over version 1: expect it promoted"),
            (3, "version 3 (trained on shuffled labels) over version 2: expect a rollback"),
        ):
            print(f"\nautomated rollout of {story}", flush=True)
            body = {**DEMO_ROLLOUT, "canary": canary}
            document = await asyncio.to_thread(
                call_admin, admin, "POST", f"models/{MODEL}/rollout", body
            )
            shown = None
            while document["phase"] in ("progressing", "paused") and not traffic.done():
                line = (document["phase"], document["step"], str(document["weights"]))
                if line != shown:
                    weights = " ".join(f"v{v}={w}%" for v, w in document["weights"].items())
                    print(f"  {document['phase']}: step {document['step'] + 1}, {weights}")
                    shown = line
                await asyncio.sleep(0.5)
                document = await asyncio.to_thread(
                    call_admin, admin, "GET", f"models/{MODEL}/rollout"
                )
            print_rollout(document)
    finally:
        stop.set()
        await traffic


async def _steady(url: str, stop: asyncio.Event, rate: float = 150.0) -> None:
    """Requests at about ``rate`` a second, routed by the policy, until ``stop``."""
    import tritonclient.grpc.aio as grpcclient

    rows = demo_rows()
    client = grpcclient.InferenceServerClient(url)

    async def worker(offset: int) -> None:
        i = offset
        while not stop.is_set():
            tensor = grpcclient.InferInput("features", [1, FEATURES], "FP32")
            tensor.set_data_from_numpy(rows[i % len(rows)][None, :])
            i += 8
            with contextlib.suppress(Exception):  # a failing canary's errors are expected
                await client.infer(MODEL, [tensor])
            await asyncio.sleep(8 / rate)

    await asyncio.gather(*(worker(k) for k in range(8)))
    await client.close()


def _stats(http: str) -> dict[str, tuple[int, int]]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{http}/v2/models/{MODEL}/stats", timeout=10) as reply:
        stats = json.load(reply)["model_stats"]
    return {s["version"]: (s["inference_count"], s["execution_count"]) for s in stats}


def _summary(results: dict[str, dict[str, Any]], before: Any, after: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{MODEL}: one burst, per version")
    for column in ("version", "requests", "errors", "p50 ms", "p99 ms", "avg batch"):
        table.add_column(column, justify="right")
    for version, result in results.items():
        latencies = np.array(result["latencies"]) * 1e3
        rows = after[version][0] - before[version][0]
        batches = after[version][1] - before[version][1]
        table.add_row(
            version,
            str(len(latencies) + result["errors"]),
            str(result["errors"]),
            f"{np.percentile(latencies, 50):.2f}" if len(latencies) else "-",
            f"{np.percentile(latencies, 99):.2f}" if len(latencies) else "-",
            f"{rows / batches:.1f}" if batches else "-",
        )
    Console().print(table)


def _how_to_call(http_port: int, grpc_port: int) -> str:
    row = ", ".join(f"{v:.4g}" for v in demo_rows()[0])
    return f"""
Keep going: the gateway is still serving (Ctrl-C stops it).

  curl -s localhost:{http_port}/v2/models/{MODEL}
  curl -s -X POST localhost:{http_port}/v2/models/{MODEL}/versions/1/infer \\
    -d '{{"inputs":[{{"name":"features","shape":[1,{FEATURES}],"datatype":"FP32",\
"data":[{row}]}}]}}'

  grpcurl -plaintext -import-path protos -proto inference.proto \\
    -d '{{"model_name":"{MODEL}","inputs":[{{"name":"features","datatype":"FP32",\
"shape":[1,{FEATURES}],"contents":{{"fp32_contents":[{row}]}}}}]}}' \\
    localhost:{grpc_port} inference.GRPCInferenceService/ModelInfer

  python - <<'EOF'
import numpy as np, tritonclient.http as http
client = http.InferenceServerClient("localhost:{http_port}")
x = http.InferInput("features", [1, {FEATURES}], "FP32")
x.set_data_from_numpy(np.random.rand(1, {FEATURES}).astype(np.float32))
print(client.infer("{MODEL}", [x]).as_numpy("probabilities"))
EOF

With TLS (turnout serve --tls-cert server.pem --tls-key server.key), the same with
https:// and the CA: curl --cacert ca.pem, turnout traffic status --cacert ca.pem,
grpcclient.InferenceServerClient(url, ssl=True, root_certificates="ca.pem").

Watch it: requests per version, arm, protocol and status; the sidecar's drift and latency.

  curl -s localhost:{http_port}/metrics | grep '^turnout_requests_total'
  turnout monitor status {MODEL}
  # traces: restart with OTEL_EXPORTER_OTLP_ENDPOINT=http://<collector>:4318 make demo
"""


def run_demo(
    root: Path,
    *,
    backend: str = "ray",
    requests: int = 2000,
    keep_serving: bool = True,
    http_port: int = 8000,
    grpc_port: int = 8001,
) -> int:
    print(f"building demo models in {root}/ ...", flush=True)
    build_demo_models(root)
    command = [
        sys.executable, "-m", "turnout.cli", "serve",
        "--model-repository", str(root), "--backend", backend,
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
    ]  # fmt: skip
    print("starting:", " ".join(command[2:]), flush=True)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        for line in server.stdout:
            print(line, end="", flush=True)
            if "ready" in line:
                break
        else:
            print("turnout serve exited before it was ready", file=sys.stderr)
            return 1
        http = f"http://127.0.0.1:{http_port}"
        before = _stats(http)
        results = asyncio.run(_burst(f"127.0.0.1:{grpc_port}", requests, concurrency=16))
        _summary(results, before, _stats(http))
        asyncio.run(_rollouts(http, f"127.0.0.1:{grpc_port}"))
        if not keep_serving:
            return 0
        print(_how_to_call(http_port, grpc_port), flush=True)
        for line in server.stdout:
            print(line, end="", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
