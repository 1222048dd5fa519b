"""bench.overload_hold's check before it starts anything: a hold the gateway would refuse
is refused by the bench first, naming the flag."""

from __future__ import annotations

import pytest

from bench import overload_hold


@pytest.mark.parametrize("hold", ["-1", "2000"])
def test_a_hold_outside_what_the_gateway_accepts_is_refused(
    hold: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        overload_hold.main(["--holds", "500", hold, "--rounds", "1"])
    assert exit_info.value.code == 2
    assert "--holds: each between 0 and 1000 (ms)" in capsys.readouterr().err
