"""Each peer in a virtualenv of its own under ``bench/.peers/<peer>/`` (git-ignored).

Idempotent: a venv holds a stamp file with the pinned requirement list it was installed
with, and is left alone while that list is unchanged. A failed install leaves no stamp, so
the next run tries again, and the benchmark reports the peer as unavailable.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.harness import REPO_ROOT

PEERS_DIR = REPO_ROOT / "bench" / ".peers"
STAMP = ".requirements"
FAILED = ".install-failed"  # why the last install failed, for the benchmark's table
INSTALL_TIMEOUT_S = 1800

# ONNX Runtime as in the project's venv, so every system runs the same kernels.
ONNXRUNTIME = "onnxruntime==1.32.0"


@dataclass(frozen=True)
class Peer:
    """A peer's pinned requirements; ``key`` names its venv and its systems."""

    key: str
    requirements: tuple[str, ...]

    def venv(self, root: Path = PEERS_DIR) -> Path:
        return root / self.key

    def python(self, root: Path = PEERS_DIR) -> Path:
        return self.venv(root) / "bin" / "python"


PEERS = {
    peer.key: peer
    for peer in (
        # The wheel bundles tritonserver and its backends (the Python backend runs our model).
        Peer("triton", ("nvidia-pytriton==0.7.0", ONNXRUNTIME)),
        Peer("kserve", ("kserve==0.21.0", ONNXRUNTIME)),
        # MLServer 1.7.1 fails to start with uvloop 0.22.
        Peer("mlserver", ("mlserver==1.7.1", "uvloop<0.22", ONNXRUNTIME)),
        Peer("litserve", ("litserve==0.2.19", ONNXRUNTIME)),
        Peer("bentoml", ("bentoml==1.4.40", ONNXRUNTIME)),
    )
}


def stamp_text(peer: Peer) -> str:
    return "\n".join(peer.requirements) + "\n"


def is_installed(peer: Peer, root: Path = PEERS_DIR) -> bool:
    """True when the venv exists and was installed with exactly ``peer.requirements``."""
    stamp = peer.venv(root) / STAMP
    try:
        return peer.python(root).exists() and stamp.read_text() == stamp_text(peer)
    except OSError:
        return False


def install_commands(peer: Peer, root: Path = PEERS_DIR) -> list[list[str]]:
    """The commands that make ``peer``'s venv: ``python3 -m venv``, then pip."""
    python3 = shutil.which("python3") or "python3"
    pip = [str(peer.python(root)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    return [[python3, "-m", "venv", str(peer.venv(root))], [*pip, *peer.requirements]]


def ensure_installed(peer: Peer, root: Path = PEERS_DIR, log: Path | None = None) -> str | None:
    """Install ``peer`` unless its stamp matches; None when ready, else why it is not."""
    if is_installed(peer, root):
        return None
    venv = peer.venv(root)
    (venv / STAMP).unlink(missing_ok=True)
    why = _install(peer, root, log)
    if why is None:
        (venv / FAILED).unlink(missing_ok=True)
        (venv / STAMP).write_text(stamp_text(peer))
    else:
        venv.mkdir(parents=True, exist_ok=True)
        (venv / FAILED).write_text(why)
    return why


def _install(peer: Peer, root: Path, log: Path | None) -> str | None:
    for command in install_commands(peer, root):
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"install failed: {exc}"
        if log is not None:
            with log.open("a") as out:
                out.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
            step = " ".join(Path(c).name for c in command[:3])  # e.g. "python -m pip"
            why = f"install failed ({step} exited {done.returncode})"
            return f"{why}: {last[0]}" if last else why
    return None


def install_failure(peer: Peer, root: Path = PEERS_DIR) -> str | None:
    """Why the last install of ``peer`` failed; None when it did not (or never ran)."""
    try:
        return (peer.venv(root) / FAILED).read_text().strip() or None
    except OSError:
        return None


def installed_versions(peer: Peer, root: Path = PEERS_DIR) -> dict[str, str]:
    """``pip freeze`` of the peer's venv as name -> version (empty when not installed)."""
    if not peer.python(root).exists():
        return {}
    done = subprocess.run(
        [str(peer.python(root)), "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
    )
    pairs = (line.split("==", 1) for line in done.stdout.splitlines() if "==" in line)
    return {name.lower(): version for name, version in pairs}
