"""The model-name rule and the path containment check, on the names an attacker tries."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout_contract.names import MAX_NAME_LENGTH, check_model_name, contained, is_model_name

GOOD = ["add_sub", "breast_cancer", "m", "resnet-50", "bert.base", "v2_model.onnx", "_x", "0"]
BAD = [
    "", ".", "..", "../outside", "..\\x", "a/b", "/etc", ".hidden", "a b", "name\x00",
    "x" * (MAX_NAME_LENGTH + 1), "caf\u00e9", "a%2Fb", "a\nb", "~root", "$HOME",
]  # fmt: skip


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name: str) -> None:
    assert check_model_name(name) == name and is_model_name(name)


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_with_a_reason(name: str) -> None:
    assert not is_model_name(name)
    with pytest.raises(ValueError, match="model name"):
        check_model_name(name)


def test_paths_stay_inside_their_root(tmp_path: Path) -> None:
    (tmp_path / "repo" / "m").mkdir(parents=True)
    assert contained(tmp_path / "repo", "m", "1") == (tmp_path / "repo" / "m" / "1").resolve()
    with pytest.raises(ValueError, match="outside"):
        contained(tmp_path / "repo", "..", "secret")
    (tmp_path / "repo" / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        contained(tmp_path / "repo", "link", "x")
