"""``turnout traffic ...`` and ``turnout models ...`` as users run them: a real CLI process
against a real gateway, found (address and admin token) through ``--state-dir`` alone.

Each test that changes traffic gets a fresh gateway with no configured tokens, so the first
start writes the admin token (named ``admin``) to the state directory for the CLI to find.
Every change made with the CLI is checked in the CLI's own output and in where real
inference requests go.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from gateways import GatewayThread, local_settings, running

ROOT = Path(__file__).resolve().parents[2]
MODEL = "add_sub"
CALL_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 60.0
# Only --state-dir may tell the CLI where the gateway is; a wide terminal keeps tables whole.
ENV = {
    **{
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("TURNOUT_") and not k.lower().endswith("_proxy")
    },
    "COLUMNS": "200",
}


def run_cli(
    state_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turnout.cli", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENV, **(env or {})},
        timeout=CLI_TIMEOUT_S,
    )


class Cli:
    """The CLI pointed at one gateway's state directory."""

    def __init__(self, gateway: GatewayThread) -> None:
        self.gateway = gateway
        self.state_dir = gateway.gateway.settings.state_dir

    def ok(self, *args: str) -> str:
        result = run_cli(self.state_dir, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, *args: str) -> str:
        """Run a command that must be refused; return its one-line message."""
        result = run_cli(self.state_dir, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("turnout: ") and result.stderr.count("\n") == 1
        return result.stderr.strip()

    def status(self) -> dict[str, Any]:
        (status,) = self.json("traffic", "status", MODEL)
        assert isinstance(status, dict)
        return status

    def rest(self, path: str) -> Any:
        """The REST admin API directly (cheaper than a CLI process), with the token the
        gateway wrote to the state directory."""
        tokens = json.loads((self.state_dir / "tokens.json").read_text())["tokens"]
        (token,) = [t["token"] for t in tokens if t["role"] == "admin"]
        host, port = self.gateway.http_url.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
        try:
            connection.request(
                "GET", f"/admin/v1/models/{MODEL}/traffic{path}", headers=bearer(token)
            )
            response = connection.getresponse()
            document = orjson.loads(response.read())
            assert response.status == 200, document
            return document
        finally:
            connection.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def table(output: str) -> list[dict[str, str]]:
    """The rows of a rich table printed by the CLI, keyed by column title."""
    lines = output.splitlines()
    (header,) = [line for line in lines if line.startswith("┃")]
    titles = [cell.strip() for cell in header.strip("┃").split("┃")]
    return [
        dict(zip(titles, (cell.strip() for cell in line.strip("│").split("│")), strict=True))
        for line in lines
        if line.startswith("│")
    ]


def served(gateway: GatewayThread) -> tuple[int, int]:
    """(model_version, x-turnout-revision) of a real inference answer."""
    body = {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}
            for n in ("a", "b")
        ]
    }
    host, port = gateway.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", orjson.dumps(body))
        response = connection.getresponse()
        document = orjson.loads(response.read())
        assert response.status == 200, document
        return int(document["model_version"]), int(response.getheader("x-turnout-revision", ""))
    finally:
        connection.close()


@pytest.fixture
def gateway(repository: Path) -> Iterator[GatewayThread]:
    with running(local_settings(repository)) as server:
        yield server


@pytest.fixture
def cli(gateway: GatewayThread) -> Cli:
    return Cli(gateway)


def test_status_as_a_table_and_as_json(gateway: GatewayThread, cli: Cli) -> None:
    rows = table(cli.ok("traffic", "status"))
    served_models = sorted({m.spec.name for m in gateway.gateway.models.loaded()})
    assert [row["model"] for row in rows] == served_models
    assert {
        "model": MODEL,
        "revision": "0",
        "kind": "single",
        "weights": "v2=100%",
        "standby": "-",
        "shadow": "-",
        "explicit": "yes",
        "loaded": "v1, v2",
    } in rows

    statuses = cli.json("traffic", "status")
    assert [s["model"] for s in statuses] == served_models
    assert all(s["revision"] == 0 for s in statuses)
    status = cli.status()
    assert status == next(s for s in statuses if s["model"] == MODEL)
    assert (status["revision"], status["weights"], status["loaded_versions"]) == (
        0,
        {"2": 100},
        [1, 2],
    )


def test_every_change_from_the_cli(gateway: GatewayThread, cli: Cli) -> None:
    status = cli.json("traffic", "set", MODEL, "1=90", "2=10")
    assert (status["revision"], status["kind"], status["weights"]) == (
        1,
        "canary",
        {"1": 90, "2": 10},
    )
    assert served(gateway)[1] == 1

    (row,) = table(cli.ok("traffic", "set", MODEL, "2=100", "--standby", "1"))
    assert (row["revision"], row["kind"], row["weights"], row["standby"]) == (
        "2",
        "blue-green",
        "v2=100%",
        "v1",
    )
    assert served(gateway) == (2, 2)

    status = cli.json("traffic", "switch", MODEL)
    assert (status["revision"], status["weights"], status["standby"]) == (3, {"1": 100}, 2)
    assert served(gateway) == (1, 3)

    status = cli.json("traffic", "promote", MODEL, "2")
    assert (status["revision"], status["weights"], status["standby"]) == (4, {"2": 100}, None)
    assert served(gateway) == (2, 4)

    status = cli.json("traffic", "rollback", MODEL)
    assert (status["revision"], status["weights"], status["standby"]) == (5, {"1": 100}, 2)
    assert served(gateway) == (1, 5)

    status = cli.json("traffic", "shadow", MODEL, "2", "--percent", "100")
    assert (status["revision"], status["shadow"]) == (6, {"version": 2, "percent": 100.0})
    for _ in range(5):
        assert served(gateway) == (1, 6)
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while cli.rest("")["shadow_stats"]["2"]["exact_match_rate"] != 1.0:
        assert time.monotonic() < deadline, cli.rest("")
        time.sleep(0.02)
    (row,) = table(cli.ok("traffic", "status", MODEL))
    assert row["shadow"] == "v2 100% (v2: 100.0% exact, 5 req)"

    status = cli.json("traffic", "shadow", MODEL, "--clear")
    assert (status["revision"], status["shadow"]) == (7, None)

    (row,) = table(cli.ok("traffic", "set", MODEL, "1=100", "--explicit", "deny"))
    assert (row["revision"], row["weights"], row["explicit"], row["standby"]) == (
        "8",
        "v1=100%",
        "no",
        "-",
    )
    status = cli.rest("")

    operations = ["set", "set", "switch", "promote", "rollback", "shadow", "clear_shadow", "set"]
    rows = table(cli.ok("traffic", "history", MODEL))
    assert [(r["revision"], r["actor"], r["operation"]) for r in rows] == [
        (str(revision), "admin", operation) for revision, operation in enumerate(operations, 1)
    ]
    assert rows[0]["weights"] == "v1=90% v2=10%"
    entries = cli.json("traffic", "history", MODEL)
    assert [e["revision"] for e in entries] == list(range(1, 9))
    assert entries[-1]["new"] == {k: status[k] for k in entries[-1]["new"]}


def test_if_revision_conflict_exits_non_zero_with_the_message(cli: Cli) -> None:
    message = cli.fails("traffic", "promote", MODEL, "1", "--if-revision", "5")
    assert message == "turnout: 409: model 'add_sub' is at revision 0, not 5"
    assert cli.rest("")["revision"] == 0
    assert cli.json("traffic", "promote", MODEL, "1", "--if-revision", "0")["revision"] == 1
    message = cli.fails("traffic", "set", MODEL, "2=100", "--if-revision", "0")
    assert message == "turnout: 409: model 'add_sub' is at revision 1, not 0"
    status = cli.rest("")
    assert (status["revision"], status["weights"]) == (1, {"1": 100})


def test_models_unload_is_refused_while_in_use_and_load_brings_a_version_back(
    gateway: GatewayThread, cli: Cli
) -> None:
    message = cli.fails("models", "unload", MODEL, "2")
    assert message == (
        "turnout: 409: model 'add_sub' version 2 has traffic under revision 0; move traffic "
        "away first (promote, set, clear_shadow)"
    )
    assert json.loads(cli.ok("models", "unload", MODEL, "1")) == {
        "model": MODEL,
        "unloaded": 1,
        "loaded_versions": [2],
    }
    assert cli.rest("")["loaded_versions"] == [2]

    loaded = json.loads(cli.ok("models", "load", MODEL, "1"))
    # The load pinned revision 0's implicit policy (v2 at 100%) as revision 1.
    assert (loaded["loaded_versions"], loaded["revision"]) == ([1, 2], 1)
    assert cli.json("traffic", "promote", MODEL, "1")["revision"] == 2
    assert served(gateway) == (1, 2)
    message = cli.fails("models", "unload", MODEL, "1")
    assert "version 1 has traffic under revision 2" in message


@pytest.fixture(scope="module")
def untouched(repository: Path) -> Iterator[GatewayThread]:
    with running(local_settings(repository)) as server:
        yield server


def refused(case_id: str, command: str, *words: str) -> Any:
    return pytest.param(command.split(), words, id=case_id)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        refused("switch-no-standby", "traffic switch add_sub",
                "400: model 'add_sub' has no standby version to switch to"),
        refused("sum-90", "traffic set add_sub 1=60 2=30",
                "400: invalid traffic policy for model 'add_sub'",
                "weights must sum to 100, they sum to 90"),
        refused("negative", "traffic set add_sub 1=110 2=-10",
                "weight of version 2 is negative (-10)"),
        refused("syntax", "traffic set add_sub 1=abc",
                "weights are VERSION=PERCENT, e.g. 1=90 2=10; got '1=abc'"),
        refused("unknown-version", "traffic set add_sub 3=100",
                "400: model 'add_sub' version(s) 3 not loaded"),
        refused("shadow-no-version", "traffic shadow add_sub",
                "give a shadow VERSION, or --clear"),
        refused("rollback-no-history", "traffic rollback add_sub",
                "400: model 'add_sub' has no earlier revision to roll back to"),
        refused("unknown-model", "traffic status nope", "404: model 'nope' is not served"),
        refused("unload-unknown", "models unload add_sub 3",
                "404: model 'add_sub' version 3 is not loaded"),
        refused("load-loaded", "models load add_sub 2",
                "409: model 'add_sub' version 2 is already loaded"),
    ],
)  # fmt: skip
def test_refused_commands_exit_non_zero_and_change_nothing(
    untouched: GatewayThread, args: list[str], words: tuple[str, ...]
) -> None:
    cli = Cli(untouched)
    message = cli.fails(*args)
    missing = [w for w in words if w not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    status = cli.rest("")
    assert (status["revision"], status["weights"], status["loaded_versions"]) == (
        0,
        {"2": 100},
        [1, 2],
    )
    assert cli.rest("/history")["history"] == []


def test_without_a_gateway_the_cli_says_where_it_looked(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "traffic", "status")
    assert result.returncode == 1
    assert result.stderr == (
        f"turnout: no running gateway found in {tmp_path} (start `turnout serve`, or pass --url)\n"
    )


def test_configured_tokens_are_not_written_so_the_cli_needs_one(repository: Path) -> None:
    token = "c" * 24
    admin_tokens = [{"name": "ci", "token": token, "role": "admin"}]
    server = GatewayThread(local_settings(repository, admin_tokens=admin_tokens))
    try:
        state_dir = server.gateway.settings.state_dir
        result = run_cli(state_dir, "traffic", "status")
        assert result.returncode == 1
        assert (
            result.stderr == f"turnout: no admin token in {state_dir}/tokens.json (pass --token)\n"
        )
        result = run_cli(state_dir, "traffic", "promote", MODEL, "1", "--token", token, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["revision"] == 1
        result = run_cli(
            state_dir, "traffic", "history", MODEL, "--json", env={"TURNOUT_TOKEN": token}
        )
        assert result.returncode == 0, result.stderr
        assert [e["actor"] for e in json.loads(result.stdout)] == ["ci"]
        result = run_cli(state_dir, "traffic", "status", "--token", "z" * 24)
        assert (result.returncode, result.stderr) == (1, "turnout: 401: invalid bearer token\n")
    finally:
        server.stop()
