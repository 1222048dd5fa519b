"""bench.open_loop_cost's arithmetic and its checks before it starts anything."""

from __future__ import annotations

import pytest

from bench import open_loop_cost


def test_each_open_phase_is_compared_with_the_capacities_on_either_side() -> None:
    # Capacities 100, 80, 120 around goodputs 81 and 90: 81 / 90 and 90 / 100.
    assert open_loop_cost.bracketed([100.0, 80.0, 120.0], [81.0, 90.0]) == pytest.approx([0.9, 0.9])


def test_a_capacity_is_needed_after_the_last_open_phase() -> None:
    with pytest.raises(ValueError, match="one after the last"):
        open_loop_cost.bracketed([100.0, 80.0], [81.0, 90.0])


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--pairs", "1"], "--pairs: at least 2"), (["--phase", "2"], "--phase: at least 3")],
)
def test_settings_the_bench_cannot_measure_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        open_loop_cost.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
