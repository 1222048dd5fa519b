"""bench.peers without any peer installed: the command line, the install stamps, the
systems' commands, the targets, and the table, JSON and plots written from made-up rows."""

from __future__ import annotations

import json
import py_compile
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.harness import StartError
from bench.peers import install, run
from bench.peers.install import Peer, ensure_installed, install_failure, is_installed
from bench.peers.report import Target, evaluate_targets, versus_best_peer
from bench.peers.systems import (
    MAX_BATCH_SIZE,
    all_systems,
    bentoml_answer,
    bentoml_body,
    peer_launch,
    peer_systems,
)
from bench.serving import Row

SERVERS = Path(run.__file__).parent / "servers"


def make_python(python: Path) -> list[list[str]]:
    """An "install" that only creates the venv's interpreter file."""
    code = f"import pathlib; p = pathlib.Path({str(python)!r}); "
    code += "p.parent.mkdir(parents=True); p.touch()"
    return [[sys.executable, "-c", code]]


# -------------------------------------------------------------------------------- arguments


def test_defaults_run_every_system_at_1_16_64() -> None:
    args = run.parse_args([])
    assert args.systems == list(all_systems())
    assert args.concurrency == [1, 16, 64]
    assert args.duration == 10
    assert not args.skip_install


def test_options() -> None:
    argv = ["--systems", "turnout_ray", "triton", "--concurrency", "16", "--duration", "3"]
    args = run.parse_args([*argv, "--skip-install", "--out", "/tmp/r", "--img", "/tmp/i"])
    assert args.systems == ["turnout_ray", "triton"]
    assert (args.concurrency, args.duration, args.skip_install) == ([16], 3.0, True)
    assert (args.out, args.img) == (Path("/tmp/r"), Path("/tmp/i"))


def test_an_unknown_system_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--systems", "nope"])
    assert "nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------- install stamp


def test_install_writes_a_stamp_and_is_skipped_while_the_requirements_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = Peer("demo", ("demo-server==1.0", "onnxruntime==1.32.0"))
    assert not is_installed(peer, tmp_path)
    monkeypatch.setattr(install, "install_commands", lambda p, root: make_python(p.python(root)))
    assert ensure_installed(peer, tmp_path) is None
    assert is_installed(peer, tmp_path)
    assert (
        peer.venv(tmp_path) / install.STAMP
    ).read_text() == "demo-server==1.0\nonnxruntime==1.32.0\n"

    # Up to date: nothing runs (a command that would fail is never reached).
    monkeypatch.setattr(install, "install_commands", lambda p, root: [["false"]])
    assert ensure_installed(peer, tmp_path) is None

    # Another pin: installed again, and this time it fails.
    bumped = Peer("demo", ("demo-server==2.0", "onnxruntime==1.32.0"))
    assert not is_installed(bumped, tmp_path)
    why = ensure_installed(bumped, tmp_path)
    assert why is not None and why.startswith("install failed")
    assert not is_installed(bumped, tmp_path) and not is_installed(peer, tmp_path)
    assert install_failure(bumped, tmp_path) == why


def test_a_failed_install_makes_the_peer_unavailable_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(install, "install_commands", lambda p, root: [["false"]])
    peer = install.PEERS["litserve"]
    why = ensure_installed(peer, tmp_path)
    launch = peer_launch(peer, "/health", tmp_path)
    with pytest.raises(StartError, match=r"^unavailable: install failed") as raised:
        launch(tmp_path, 1, 2, tmp_path / "log")
    assert str(raised.value) == f"unavailable: {why}"


def test_a_peer_never_installed_is_unavailable(tmp_path: Path) -> None:
    for system in peer_systems(tmp_path).values():
        with pytest.raises(StartError, match=r"^unavailable: not installed"):
            system.launch(tmp_path, 1, 2, tmp_path / "log")


def test_every_peer_pins_its_server_and_onnxruntime() -> None:
    for peer in install.PEERS.values():
        assert all("==" in r or "<" in r for r in peer.requirements), peer
        assert install.ONNXRUNTIME in peer.requirements


# ------------------------------------------------------------------------------------ systems


def test_an_installed_peer_runs_its_script_with_its_own_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(install, "install_commands", lambda p, root: make_python(p.python(root)))
    systems = peer_systems(tmp_path)
    for name in install.PEERS:
        assert ensure_installed(install.PEERS[name], tmp_path) is None
        server = systems[name].launch(tmp_path / "models", 8100, 8101, tmp_path / "log")
        python = str(install.PEERS[name].python(tmp_path))
        assert server.command[0] in (python, str(Path(python).parent / "bentoml"))
        assert server.ready_url is not None and server.ready_url.startswith(
            "http://127.0.0.1:8100/"
        )
        if name != "bentoml":
            assert f"bench.peers.servers.{name}_server" in server.command
            i = server.command.index("--max-batch-size")
            assert server.command[i + 1] == str(MAX_BATCH_SIZE)
        else:
            assert server.env is not None and server.env["BENCH_PEER_MODEL"].endswith("model.onnx")


def test_peers_with_v2_grpc_are_loaded_over_grpc_too() -> None:
    systems = all_systems()
    grpc = {name for name, s in systems.items() if s.grpc}
    assert grpc == {"turnout_local", "turnout_ray", "triton", "kserve", "mlserver"}
    assert len({s.key for s in systems.values()}) == len(systems)


def test_bentoml_json_round_trip() -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    assert json.loads(bentoml_body(x)) == {"x": [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]}
    np.testing.assert_array_equal(
        bentoml_answer(b"[[1.5, 2.5]]"), np.array([[1.5, 2.5]], np.float32)
    )


@pytest.mark.parametrize("script", sorted(p.name for p in SERVERS.glob("*.py")))
def test_peer_scripts_compile(script: str, tmp_path: Path) -> None:
    # They import the peers' packages, absent here: compiled, never imported.
    py_compile.compile(str(SERVERS / script), cfile=str(tmp_path / "x.pyc"), doraise=True)


# ------------------------------------------------------------------------------ the report


def fake_rows() -> list[Row]:
    def row(key: str, name: str, protocol: str, conc: int, rps: float, p99: float) -> Row:
        return Row(key, name, protocol, conc, rps=rps, p50_ms=p99 / 3, p99_ms=p99, requests=100)

    rows = []
    for conc, scale in ((1, 0.3), (16, 1.0), (64, 1.2)):
        rows += [
            row("a", "floor", "http", conc, 1000 * scale, 20),
            row("c", "turnout local", "http", conc, 3000 * scale, 10),
            row("d", "turnout ray", "http", conc, 1800 * scale, 15),
            row("d", "turnout ray", "grpc", conc, 1500 * scale, 18),
            row("f", "triton (pytriton)", "http", conc, 1000 * scale, 30),
            row("f", "triton (pytriton)", "grpc", conc, 900 * scale, 35),
            row("g", "kserve", "http", conc, 800 * scale, 40),
        ]
    rows.append(Row("j", "bentoml", "-", 0, error="start failed: exited with code 1"))
    return rows


def test_each_row_against_the_best_peer_of_its_protocol() -> None:
    rows = fake_rows()
    ratios = versus_best_peer(rows, {"f", "g", "j"})
    by = {(r.system, r.protocol, r.concurrency): ratios.get(id(r)) for r in rows}
    assert by[("c", "http", 16)] == pytest.approx(3.0)
    assert by[("d", "grpc", 16)] == pytest.approx(1500 / 900)
    assert by[("f", "http", 64)] == pytest.approx(1.0)
    assert by[("j", "-", 0)] is None


def test_targets_pass_fail_and_skip() -> None:
    rows = fake_rows()
    targets = [Target("d", "ray", 2.0, lower_p99=True), Target("c", "local", 2.5, lower_p99=False)]
    verdicts = evaluate_targets(rows, targets, {"f", "g"}, [16, 64])
    assert [v["verdict"] for v in verdicts] == ["FAIL", "FAIL", "PASS", "PASS"]
    assert verdicts[0]["detail"].startswith("1.80x of (f) triton (pytriton)")
    skipped = evaluate_targets(rows, [Target("z", "absent", 2.0, False)], {"f"}, [16])
    assert skipped[0]["verdict"] == "SKIP"
    no_peer = evaluate_targets(rows, targets[:1], set(), [16])
    assert no_peer[0] == {
        "target": no_peer[0]["target"],
        "verdict": "FAIL",
        "detail": "no result for any peer",
    }


def test_report_writes_the_json_and_both_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(run, "installed_versions", lambda peer: {"numpy": "0"})
    everything = all_systems(tmp_path)
    names = ["floor", "turnout_local", "turnout_ray", "triton", "kserve", "bentoml"]
    systems = {name: everything[name] for name in names}
    args = run.parse_args(
        ["--systems", *names, "--out", str(tmp_path), "--img", str(tmp_path / "img")]
    )
    path, verdicts = run.report(fake_rows(), systems, args, {"max_batch_size": 64})

    printed = capsys.readouterr().out
    assert "x best peer" in printed and "unavailable: start failed" in printed
    document = json.loads(path.read_text())
    assert path.name.startswith("peers-") and (tmp_path / "peers-latest.json").exists()
    assert document["settings"]["systems"]["bentoml"]["http_request"].startswith("POST /infer")
    assert set(document["peers"]) == {"triton", "kserve", "bentoml"}
    unavailable = [r for r in document["results"] if r["system"] == "j"]
    assert unavailable[0]["error"] == "unavailable: start failed: exited with code 1"
    local16 = next(r for r in document["results"] if (r["system"], r["concurrency"]) == ("c", 16))
    assert local16["ratio_best_peer"] == pytest.approx(3.0) and local16["ratio_a"] == pytest.approx(
        3.0
    )
    assert [v["verdict"] for v in document["targets"]] == [v["verdict"] for v in verdicts]
    for suffix in ("rps", "p99"):
        for png in (
            tmp_path / f"{path.stem}-{suffix}.png",
            tmp_path / "img" / f"peers-{suffix}.png",
        ):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
