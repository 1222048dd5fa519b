"""The loop timer that keeps sub-millisecond waits without spinning the loop.

Run on uvloop, the loop the gateway runs on (its ``call_later`` rounds to whole
milliseconds), and on asyncio's own. Assertions are about order and counts, never about
how long anything took, except that a callback never runs before the instant it was armed
for.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any
from unittest import mock

import pytest
import uvloop

from gateway import precise_timer
from gateway.precise_timer import MAX_LATENESS_S, PreciseTimer

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    loop = LOOPS[request.param]()
    yield loop.run_until_complete
    loop.close()


class Calls:
    def __init__(self) -> None:
        self.at: list[float] = []
        self.fired = asyncio.Event()

    def __call__(self) -> None:
        self.at.append(time.perf_counter())
        self.fired.set()


async def settle(turns: int = 50) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@linux_only
def test_a_sub_millisecond_wait_runs_once_and_never_early(run: Any) -> None:
    async def main() -> None:
        calls = Calls()
        timer = PreciseTimer(asyncio.get_running_loop(), calls)
        assert timer.precise
        for delay in (0.0002, 0.0004, 0.0007, 0.0015):
            calls.fired.clear()
            due = time.perf_counter() + delay
            timer.arm(due)
            assert timer.due == due
            await asyncio.wait_for(calls.fired.wait(), 5)
            assert calls.at[-1] >= due
            assert timer.due is None
        await asyncio.sleep(0.005)
        assert len(calls.at) == 4  # once per arming
        assert 0 <= timer.lateness_s <= MAX_LATENESS_S
        timer.close()

    run(main())


@linux_only
def test_a_fresh_timer_sleeps_through_the_wait_and_turns_once(run: Any) -> None:
    """Until it has learned a lateness the timer wakes no earlier than due, so its callback
    path runs once: the loop slept through the 400 us (uvloop's ``call_later`` would have
    run it at the next turn, and a caller re-arming it would have spun until due)."""

    async def main() -> None:
        calls = Calls()
        timer = PreciseTimer(asyncio.get_running_loop(), calls)
        assert timer.lateness_s == 0
        fire = mock.Mock(wraps=timer._fire)  # counts, and fires
        timer._fire = fire  # type: ignore[method-assign]
        due = time.perf_counter() + 0.0004
        timer.arm(due)
        await asyncio.wait_for(calls.fired.wait(), 5)
        assert calls.at == [pytest.approx(calls.at[0])]
        assert calls.at[0] >= due
        assert fire.call_count == 1
        timer.close()

    run(main())


def test_rearming_replaces_the_instant_and_cancel_forgets_it(run: Any) -> None:
    async def main() -> None:
        calls = Calls()
        timer = PreciseTimer(asyncio.get_running_loop(), calls)
        timer.arm(time.perf_counter() + 0.050)
        early = time.perf_counter() + 0.002
        timer.arm(early)
        await asyncio.wait_for(calls.fired.wait(), 5)
        assert calls.at[0] >= early
        await asyncio.sleep(0.080)
        assert len(calls.at) == 1  # the replaced instant never fires
        timer.arm(time.perf_counter() + 0.002)
        timer.cancel()
        assert timer.due is None
        await asyncio.sleep(0.020)
        assert len(calls.at) == 1
        timer.close()

    run(main())


def test_without_a_timerfd_the_wait_rounds_up_to_whole_milliseconds(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precise_timer, "_TIMERFD", None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        asked: list[float] = []
        real_call_later = loop.call_later

        def call_later(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            asked.append(delay)
            return real_call_later(delay, callback, *args)

        monkeypatch.setattr(loop, "call_later", call_later)
        calls = Calls()
        timer = PreciseTimer(loop, calls)
        assert not timer.precise
        due = time.perf_counter() + 0.0003
        timer.arm(due)
        await asyncio.wait_for(calls.fired.wait(), 5)
        assert calls.at[0] >= due
        assert asked[0] == pytest.approx(0.001)  # not 0.0003, which uvloop would run at once
        timer.close()

    run(main())


@linux_only
def test_close_and_collection_release_the_descriptor(run: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        before = open_descriptors()
        timer = PreciseTimer(loop, Calls())
        assert open_descriptors() - before  # the timerfd
        timer.arm(time.perf_counter() + 1)
        timer.close()
        timer.close()  # twice is harmless
        assert open_descriptors() <= before

    run(main())

    # Dropped without close, on a loop that has closed: released when collected.
    loop = asyncio.new_event_loop()
    before = open_descriptors()
    timer = PreciseTimer(loop, Calls())
    assert open_descriptors() - before
    loop.close()
    del timer
    gc.collect()
    assert open_descriptors() <= before
