"""The systems of ``python -m bench.peers``: bench.serving's four and one per peer.

A peer runs its script from bench/peers/servers/ with the interpreter of its own venv
(bench.peers.install), batching on with the same knobs: at most MAX_BATCH_SIZE rows, a wait
of at most MAX_DELAY_US for a batch to fill (BentoML has no such knob: it learns its wait).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from bench.harness import STATS_PATH, Server, StartError
from bench.models import DEFAULT_CONFIG, INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from bench.peers.install import PEERS, PEERS_DIR, Peer, install_failure, is_installed
from bench.serving import SYSTEMS as SERVING_SYSTEMS
from bench.serving import Launch, System, model_file

MAX_BATCH_SIZE: int = DEFAULT_CONFIG["max_batch_size"]
MAX_DELAY_US = 1000
V2_READY = f"/v2/models/{MODEL_NAME}/ready"


def peer_launch(peer: Peer, ready_path: str, root: Path = PEERS_DIR) -> Launch:
    """``bench/.peers/<peer>/bin/python -m bench.peers.servers.<peer>_server ...``."""

    def launch(repo: Path, http_port: int, grpc_port: int, log: Path) -> Server:
        python = require(peer, root)
        command = [str(python), "-m", f"bench.peers.servers.{peer.key}_server"]
        command += ["--model", model_file(repo), "--name", MODEL_NAME]
        command += ["--input-name", INPUT_NAME, "--output-name", OUTPUT_NAME]
        command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
        command += ["--max-batch-size", str(MAX_BATCH_SIZE), "--max-delay-us", str(MAX_DELAY_US)]
        return Server(command, log, ready_url=f"http://127.0.0.1:{http_port}{ready_path}")

    return launch


def bentoml_launch(root: Path = PEERS_DIR) -> Launch:
    """``bentoml serve bench.peers.servers.bentoml_service:MLP``, settings in the environment."""

    def launch(repo: Path, http_port: int, grpc_port: int, log: Path) -> Server:
        python = require(PEERS["bentoml"], root)
        service = "bench.peers.servers.bentoml_service:MLP"
        command = [str(python.parent / "bentoml"), "serve", service]
        command += ["--host", "127.0.0.1", "--port", str(http_port)]
        env = {
            "BENCH_PEER_MODEL": model_file(repo),
            "BENCH_PEER_INPUT": INPUT_NAME,
            "BENCH_PEER_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
            # Its own state (models, bentos) out of the user's home.
            "BENTOML_HOME": str(root / "bentoml" / "home"),
        }
        return Server(command, log, env=env, ready_url=f"http://127.0.0.1:{http_port}/readyz")

    return launch


def require(peer: Peer, root: Path) -> Path:
    """The peer's interpreter; StartError ("unavailable: ...") when its venv is not ready."""
    if not is_installed(peer, root):
        why = install_failure(peer, root) or "not installed (run without --skip-install)"
        raise StartError(f"unavailable: {why}")
    return peer.python(root)


def bentoml_body(x: np.ndarray) -> bytes:
    return orjson.dumps({"x": x}, option=orjson.OPT_SERIALIZE_NUMPY)


def bentoml_answer(answer: bytes) -> np.ndarray:
    return np.asarray(orjson.loads(answer), dtype=np.float32)


def peer_systems(root: Path = PEERS_DIR) -> dict[str, System]:
    triton, kserve, mlserver, litserve = (
        PEERS[k] for k in ("triton", "kserve", "mlserver", "litserve")
    )
    return {
        "triton": System(
            "f",
            "triton (pytriton)",
            peer_launch(triton, V2_READY, root),
            grpc=True,
            stats_path=STATS_PATH,  # Triton's statistics extension
        ),
        "kserve": System("g", "kserve", peer_launch(kserve, V2_READY, root), grpc=True),
        "mlserver": System("h", "mlserver", peer_launch(mlserver, V2_READY, root), grpc=True),
        "litserve": System("i", "litserve", peer_launch(litserve, "/health", root)),
        "bentoml": System(
            "j",
            "bentoml",
            bentoml_launch(root),
            infer_path="/infer",
            http_body=bentoml_body,
            http_answer=bentoml_answer,
            request_format='BentoML JSON: POST /infer {"x": [[...]]}, answer [[...]]',
        ),
    }


TURNOUT_SYSTEMS = {"turnout_ray": "d", "turnout_local": "c"}
"""turnout's systems by name; the first is its default backend, the one the targets name."""


def all_systems(root: Path = PEERS_DIR) -> dict[str, System]:
    """Every system by its command-line name, in the order they run."""
    serving = {"floor": "a", "ray_naive": "b", "turnout_local": "c", "turnout_ray": "d"}
    return {name: SERVING_SYSTEMS[key] for name, key in serving.items()} | peer_systems(root)
