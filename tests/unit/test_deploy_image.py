"""deploy/Containerfile, read without building it (the build is `make image`, its smoke test
`make image-test`): the stages, the user, the entrypoint, the health check, and what the
build copies, checked against the code and the build context's ignore file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
HEALTHCHECK = ROOT / "deploy" / "image" / "healthcheck.py"
IGNORE = ROOT / ".containerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    split: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            split.append([])
        if split:
            split[-1].append(instruction)
    return split


def test_two_stages_on_one_base() -> None:
    """A build stage and a final stage, both FROM the BASE_IMAGE argument (the same Python
    in both), the final one taking only the venv from the build."""
    build, final = stages()
    assert build[0] == ("FROM", "${BASE_IMAGE} AS build")
    assert final[0] == ("FROM", "${BASE_IMAGE}")
    copies = [args for word, args in final if word == "COPY"]
    assert [c for c in copies if c.startswith("--from")] == [
        "--from=build /opt/turnout /opt/turnout"
    ]
    apt = " ".join(args for word, args in final if word == "RUN" and "apt-get install" in args)
    for tool in ("build-essential", "gcc", "python3-pip", "python3-venv", "python3-dev"):
        assert tool not in apt.split(), tool


def test_build_arguments() -> None:
    args = {args.split("=")[0] for word, args in instructions() if word == "ARG"}
    assert {"BASE_IMAGE", "ONNXRUNTIME", "RAY_VERSION", "PIP_CERT"} <= args
    makefile = (ROOT / "Makefile").read_text()
    assert "ONNXRUNTIME='onnxruntime-gpu[cuda,cudnn]'" in makefile


def test_runs_turnout_serve_as_a_non_root_user() -> None:
    final = stages()[-1]
    (user,) = [args for word, args in final if word == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == ["/usr/bin/tini", "--", "turnout", "serve"]
    exposed = {int(port) for word, args in final if word == "EXPOSE" for port in args.split()}
    assert exposed == {8000, 8001, 8002, 9100}


def test_environment_names_real_settings() -> None:
    """TURNOUT_* variables outrank a --config file, so the image sets only what a container
    needs: the binding addresses and the sidecar's fixed port."""
    from gateway.settings import ServerSettings
    from monitor.settings import MonitorSettings

    env = " ".join(args for word, args in stages()[-1] if word == "ENV")
    variables = set(re.findall(r"\b(TURNOUT_[A-Z_]+)=", env))
    fields = {f"TURNOUT_{name.upper()}" for name in ServerSettings.model_fields}
    fields |= {f"TURNOUT_MONITOR_{name.upper()}" for name in MonitorSettings.model_fields}
    assert variables <= fields
    assert variables == {"TURNOUT_HOST", "TURNOUT_MONITOR_HOST", "TURNOUT_MONITOR_METRICS_PORT"}
    # The default state dir under XDG_STATE_HOME is where the health check looks.
    assert "XDG_STATE_HOME=/var/lib" in env
    assert '"/var/lib/turnout"' in HEALTHCHECK.read_text()


def test_health_check_is_the_script() -> None:
    final = stages()[-1]
    (check,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert check.split("CMD ", 1)[1] == '["/usr/bin/python3", "/usr/local/bin/turnout-healthcheck"]'
    assert "COPY deploy/image/healthcheck.py /usr/local/bin/turnout-healthcheck" in [
        f"{word} {args}" for word, args in final
    ]


def test_build_context_holds_what_is_copied() -> None:
    """Every source a COPY takes from the context is let through .containerignore."""
    ignore = IGNORE.read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert source in allowed, source
                assert (ROOT / source).exists(), source


@pytest.mark.parametrize(
    ("address", "expected"), [("http://127.0.0.1:{port}", 0), ("http://127.0.0.1:1", 1)]
)
def test_health_check_script(
    tmp_path: Path, local_gateway_port: int, address: str, expected: int
) -> None:
    """The script asks the address in gateway.json: 0 when ready, 1 when nothing answers."""
    (tmp_path / "gateway.json").write_text(
        json.dumps({"http": address.format(port=local_gateway_port)})
    )
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env={"TURNOUT_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == expected, result.stdout + result.stderr


def test_health_check_without_an_address_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env={"TURNOUT_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "not ready" in result.stderr


@pytest.fixture
def local_gateway_port(local_gateway: object) -> int:
    url: str = local_gateway.http_url  # type: ignore[attr-defined]
    return int(url.rsplit(":", 1)[1].split("/")[0])
