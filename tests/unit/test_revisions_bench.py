"""bench.revisions' checks before it starts anything: a base that is no commit is refused
with a message naming it, and the base gateway's imports are checked to come from the
worktree it made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import revisions


def test_a_base_that_is_no_commit_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        revisions.main(["--base", "no-such-revision-anywhere"])
    assert exit_info.value.code == 2
    assert "--base 'no-such-revision-anywhere' is not a commit" in capsys.readouterr().err


def test_the_base_gateway_imports_from_the_path_put_first(tmp_path: Path) -> None:
    package = tmp_path / "gateway"
    package.mkdir()
    (package / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert revisions.imported_from(env) == str(package / "__init__.py")
    assert revisions.imported_from({**os.environ, "PYTHONPATH": ""}) != str(package / "__init__.py")


def test_new_connections_turn_keepalive_off_in_hey() -> None:
    from bench.harness import hey_command

    body = Path("body.json")
    assert "-disable-keepalive" not in hey_command("http://x/infer", body, 5, 16)
    command = hey_command("http://x/infer", body, 5, 16, keepalive=False)
    assert command[:7] == ["hey", "-z", "5s", "-c", "16", "-m", "POST"]
    assert "-disable-keepalive" in command and command[-1] == "http://x/infer"
