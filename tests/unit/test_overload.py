"""When the event loop counts as overrun, and how long it stays so: the Overload state
machine driven tick by tick on a fake clock."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.overload import Overload


class FakeLoop:
    """The two loop calls Overload makes, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.due: float | None = None

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Any:
        self.due = when
        return self


def ticking(overload: Overload) -> FakeLoop:
    loop = FakeLoop()
    overload._loop = loop  # type: ignore[assignment]
    overload._due = loop.now + overload.interval_s
    return loop


def tick(overload: Overload, loop: FakeLoop, late_s: float) -> None:
    """The next tick fires ``late_s`` after it was due."""
    assert loop.due is not None or overload._due
    loop.now = (loop.due if loop.due is not None else overload._due) + late_s
    overload._tick()


def test_a_loop_on_time_never_holds_anything() -> None:
    overload = Overload(0.5)
    loop = ticking(overload)
    for i in range(200):
        tick(overload, loop, 0.001 if i % 5 == 0 else 0.0)  # an open loop: 0-1 ms
    assert not overload.storming and overload.hold() == 0 and overload.storms == 0


def test_a_lone_pause_is_not_a_storm() -> None:
    """A GC pause or one slow callback: one tick very late, the rest on time."""
    overload = Overload(0.5)
    loop = ticking(overload)
    for i in range(100):
        tick(overload, loop, 0.06 if i == 10 else 0.0)
    assert not overload.storming and overload.storms == 0


def test_long_turns_are_a_storm_even_when_no_tick_is_very_late() -> None:
    """What a crowd of refused clients did on a fast gateway: every turn long, each tick
    4-10 ms late (median over 100 ms), never the 10 ms that a threshold on every tick
    needed."""
    overload = Overload(0.5)
    loop = ticking(overload)
    lags = [0.004, 0.009, 0.005, 0.010, 0.006, 0.002, 0.008]
    for i in range(40):
        tick(overload, loop, lags[i % len(lags)])
    assert overload.storming and overload.storms == 1


def test_sustained_lag_starts_a_storm_that_lasts_while_the_crowd_is_held() -> None:
    overload = Overload(0.5, min_held=16)
    loop = ticking(overload)
    for _ in range(4):
        tick(overload, loop, 0.03)  # 4 ticks, 30 ms late each: a 100 ms window lagging
    assert overload.storming and 0.375 <= overload.hold() <= 0.5 and overload.storms == 1
    overload.held = 200  # the crowd, held: the loop is on time again
    for _ in range(1000):  # 5 s of on-time ticks
        tick(overload, loop, 0.0)
    assert overload.storming and overload.storms == 1
    overload.held = 3  # the crowd left
    started = loop.now
    while overload.storming:
        tick(overload, loop, 0.0)
    assert 0 < loop.now - started <= 1.0 + overload.interval_s
    assert overload.hold() == 0


def test_a_zero_hold_never_holds() -> None:
    overload = Overload(0.0)
    loop = ticking(overload)
    for _ in range(40):
        tick(overload, loop, 0.05)
    assert overload.hold() == 0


def test_refusals_outnumbering_answers_are_a_storm_while_the_loop_is_on_time() -> None:
    """32 closed-loop clients on a queue of 8: turns stay short (no lag), but ten refusals
    for every request served keep the loop busy and the batches waiting a turn at each
    step. An open loop at twice capacity refuses about as many as it serves: no storm."""
    churning, open_loop = Overload(0.5), Overload(0.5)
    for overload, refused_per_tick, served_per_tick in ((churning, 10, 1), (open_loop, 2, 2)):
        loop = ticking(overload)
        for _ in range(60):
            for _ in range(refused_per_tick):
                overload.hold()
            overload.answers += refused_per_tick + served_per_tick
            tick(overload, loop, 0.0)
    assert churning.storming and churning.storms == 1
    assert not open_loop.storming and open_loop.storms == 0


def test_a_loop_that_never_rests_and_refuses_as_much_as_it_serves_is_a_storm() -> None:
    """An open loop at twice capacity over multiplexed gRPC connections: every turn short
    (no lag), about as many refused as served, and the loop's thread busy all the time.
    Busy only half the time, or serving most of what it answers, it is not."""
    cases = {"saturated": (1.0, 3, 3), "half busy": (0.5, 3, 3), "mostly served": (1.0, 3, 9)}
    storms = {}
    for name, (busy, refused, served) in cases.items():
        cpu = [0.0]
        overload = Overload(0.5, cpu_clock=lambda cpu=cpu: cpu[0])
        loop = ticking(overload)
        for _ in range(60):
            for _ in range(refused):
                overload.hold()
            overload.answers += refused + served
            cpu[0] += busy * overload.interval_s  # the loop's thread until the tick
            tick(overload, loop, 0.0)
        storms[name] = overload.storms
    assert storms == {"saturated": 1, "half busy": 0, "mostly served": 0}


def test_a_few_refusals_are_not_a_storm_whatever_the_ratio() -> None:
    overload = Overload(0.5)
    loop = ticking(overload)
    for i in range(60):
        if i % 3 == 0:
            overload.hold()  # about 7 refusals a 100 ms window, nothing served
        overload.answers += i % 3 == 0
        tick(overload, loop, 0.0)
    assert not overload.storming and overload.refusals == 20


def test_one_window_of_refusals_alone_is_not_a_storm() -> None:
    """A stall (a GC) in an open loop: one window refuses ten times what it serves, the
    next is back to one to one."""
    overload = Overload(0.5)
    loop = ticking(overload)
    for i in range(80):
        refused, served = (10, 1) if i < 20 else (2, 2)  # 20 ticks: one 100 ms window
        for _ in range(refused):
            overload.hold()
        overload.answers += refused + served
        tick(overload, loop, 0.0)
    assert not overload.storming and overload.storms == 0


def refuse_and_tick(
    overload: Overload, loop: FakeLoop, refused: int, served: int, late_s: float
) -> None:
    """One tick's answers, the served spread among the refused as a turn sends them."""
    for i in range(refused):
        overload.answers += 1 + served * (i + 1) // refused - served * i // refused
        overload.hold()
    if not refused:
        overload.answers += served
    tick(overload, loop, late_s)


def test_a_crowd_is_seen_on_its_second_long_turn() -> None:
    """100 closed-loop clients arriving (fewer than a herd): each turn refuses all of them
    and serves a batch. Storming after the second such turn, not at the end of a 100 ms
    window; the third turn's refusals are held."""
    overload = Overload(0.5)
    loop = ticking(overload)
    started = loop.now
    refuse_and_tick(overload, loop, 100, 8, 0.010)
    assert not overload.storming and overload.storms == 0
    refuse_and_tick(overload, loop, 96, 8, 0.010)
    assert overload.storming and overload.storms == 1
    assert loop.now - started < 0.05
    assert 0.375 <= overload.hold() <= 0.5


def test_a_ramping_crowd_is_seen_without_any_late_tick() -> None:
    """hey's 256 clients connecting over a few dozen ms: each 5 ms tick refuses 50-70 and
    serves 4, every turn short (0-3 ms late)."""
    overload = Overload(0.5)
    loop = ticking(overload)
    refuse_and_tick(overload, loop, 20, 6, 0.001)
    refuse_and_tick(overload, loop, 60, 8, 0.002)
    assert not overload.storming
    refuse_and_tick(overload, loop, 64, 4, 0.001)
    assert overload.storming and overload.storms == 1


def test_ticks_need_many_refusals_and_few_answers() -> None:
    """Long turns that served (a slow batch on the loop's thread, a burst of admitted
    requests) or that refused a handful are not a crowd's onset."""
    for refused, served in ((200, 100), (20, 0)):
        overload = Overload(0.5)
        loop = ticking(overload)
        for _ in range(3):  # 3 ticks 20 ms late: under one 100 ms window
            refuse_and_tick(overload, loop, refused, served, 0.020)
        assert not overload.storming, (refused, served)


def test_one_late_tick_of_refusals_alone_is_not_a_storm() -> None:
    """A stall in an open loop: the turn after it refuses the backlog, the next is short."""
    overload = Overload(0.5)
    loop = ticking(overload)
    refuse_and_tick(overload, loop, 0, 0, 0.030)  # the stall itself
    refuse_and_tick(overload, loop, 100, 8, 0.012)  # its backlog (10 ms at 10k/s)
    for _ in range(10):
        refuse_and_tick(overload, loop, 3, 3, 0.001)
    assert not overload.storming and overload.storms == 0


def test_a_herd_is_held_within_the_turn_that_reads_it() -> None:
    """256 new clients in one turn: from the 128th refusal on (each served request being
    rarer than a fifth of them), the rest are held, before any tick."""
    overload = Overload(0.5)
    loop = ticking(overload)
    tick(overload, loop, 0.0)
    holds = []
    for i in range(256):
        overload.answers += 1 + (i % 8 == 0)  # the refusal, and a served request now and then
        holds.append(overload.hold())
    assert holds[:127] == [0.0] * 127
    assert all(0.375 <= h <= 0.5 for h in holds[127:])
    assert overload.storming and overload.storms == 1


def test_a_turn_that_serves_as_it_refuses_is_no_herd() -> None:
    overload = Overload(0.5)
    loop = ticking(overload)
    tick(overload, loop, 0.0)
    for _ in range(400):
        overload.answers += 2  # one refused, one served
        assert overload.hold() == 0.0
    assert not overload.storming


def test_a_turn_reads_its_share_of_new_connections_and_those_put_off_have_their_own() -> None:
    """Past ``first_reads_per_turn`` new connections in one loop turn, the next are put
    off; a later turn starts a new share, and connections put off before ask from a share
    of their own, so a newcomer is not queued behind a whole crowd."""
    overload = Overload(0.5, first_reads_per_turn=3)

    async def turns() -> list[list[bool]]:
        first = [overload.first_read_now() for _ in range(5)]
        await asyncio.sleep(0)  # the next turn
        again = [overload.first_read_now(again=True) for _ in range(4)]
        newcomer = overload.first_read_now()
        return [first, again, [newcomer]]

    first, again, newcomer = asyncio.run(turns())
    assert first == [True, True, True, False, False]
    assert again == [True, True, True, False]
    assert newcomer == [True]
    assert overload.deferred_first_reads == 2  # connections put off, each counted once


def test_a_crowd_of_new_connections_is_held_once_its_refusals_are_most_of_the_answers() -> None:
    """The acceptor took 40 connections at once: for a window, 16 refusals since the last
    tick, five times what was served, start a storm (before any tick could see one), so
    the rest of the crowd is held from its first refusal."""
    overload = Overload(0.5, crowd_connections=16, crowd_refusals=16)
    loop = ticking(overload)
    tick(overload, loop, 0.0)
    overload.arrived(40)
    holds = []
    for _ in range(40):
        overload.answers += 1  # each refusal is an answer
        holds.append(overload.hold())
    assert holds[:15] == [0.0] * 15
    assert all(0.375 <= h <= 0.5 for h in holds[15:])
    assert overload.storming and overload.storms == 1


def test_an_open_loops_new_connections_refused_as_often_as_served_are_not_held() -> None:
    """An open loop's pool opening many connections at once, at twice capacity: one
    refused for each served, never held for the crowd."""
    overload = Overload(0.5, crowd_connections=16, crowd_refusals=16)
    loop = ticking(overload)
    tick(overload, loop, 0.0)
    overload.arrived(64)
    for _ in range(64):
        overload.answers += 2  # one refused, one served
        assert overload.hold() == 0.0
    assert not overload.storming and overload.storms == 0


def test_a_few_connections_at_once_or_a_crowd_long_gone_hold_nothing() -> None:
    overload = Overload(0.5, crowd_connections=16, crowd_refusals=4, sustain_s=0.1)
    loop = ticking(overload)
    tick(overload, loop, 0.0)
    overload.arrived(15)  # fewer than a crowd
    for _ in range(8):
        overload.answers += 1
        assert overload.hold() == 0.0
    overload.arrived(64)
    loop.now += 0.1  # the window after the crowd's arrival has passed
    for _ in range(8):
        overload.answers += 1
        assert overload.hold() == 0.0
    assert not overload.storming and overload.storms == 0


def test_hold_reads_pauses_a_refused_connection_only_while_storming_and_resumes_it() -> None:
    class Storming(Overload):
        storm = False

        @property
        def storming(self) -> bool:
            return self.storm

    overload = Storming(0.02)
    events: list[str] = []

    def resume() -> None:
        overload.held -= 1
        events.append("resumed")

    async def main() -> None:
        assert overload.hold_reads(lambda: events.append("paused"), resume) is None
        assert events == [] and overload.refusals == 1  # counted, not held: no storm
        overload.storm = True
        timer = overload.hold_reads(lambda: events.append("paused"), resume)
        assert timer is not None and events == ["paused"] and overload.held == 1
        await asyncio.sleep(0.05)  # the hold is 3/4 to all of 20 ms
        assert events == ["paused", "resumed"] and overload.held == 0
        assert overload.refusals == 2

    asyncio.run(main())
