"""Overload, as the event loop feels it, and when to hold refused connections back.

A closed-loop client that is refused sends its next request at once, so a crowd of them
fills the event loop with refusals: every batch completion and every admitted request's
answer then waits behind them, and goodput collapses (2% of capacity at 256 clients on a
model with an 8-request queue). While the loop is overrun, a connection refused for
overload is not read again for ``hold_s`` (:mod:`gateway.http.protocol`,
:mod:`gateway.grpc.transport`), so its next request waits in the kernel, costing nothing;
a gRPC connection that multiplexes has its stream limit lowered instead.

A crowd of new connections is read in slices: at most ``first_reads_per_turn`` new
connections' first bytes a loop turn, the rest a millisecond later (:meth:`Overload.put_off`).

Overrun is measured five ways, each at its own speed: the loop's lag (the median of a
100 ms window of ticks reaches a few ms: each turn is long, not one callback slow);
refusals outnumbering what is served, five to one, over two windows or two 5 ms ticks
running (a crowd whose turns stay short); a herd within the one turn that reads it; a
crowd of new connections accepted at once whose refusals outnumber what is served, as
soon as they do (:meth:`Overload.arrived`); and a loop whose thread never rests in a
window while it refuses as much as it serves (an open loop at twice capacity, its turns
short). Arrivals that merely exceed capacity, with the
loop to spare, are not held. Once storming, the state lasts while many connections are
held or throttled (the crowd is still there) and ends soon after they leave.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Overload"]

log = logging.getLogger(__name__)

PUT_OFF_S = 0.001
"""A first read put off waits one poll of the loop (uvloop's timers have 1 ms steps)."""


class Overload:
    """A timer every ``interval_s`` measuring the loop's lag; ``storming`` once the median
    lag of a ``sustain_s`` window reaches ``lag_threshold_s``, or two windows running each
    refused (at least ``min_refusals``) ``refusal_ratio`` times what they served, or two
    ticks running did (at least ``burst_refusals`` each), or, at once, the refusals since
    the last tick did (at least ``herd_refusals``), or a window's refusals (at least
    ``min_refusals``) were at least what it served while the loop's thread was busy
    ``busy_share`` of it (``cpu_clock``, the thread's CPU seconds), or, within
    ``sustain_s`` of ``crowd_connections`` or more accepted at once (:meth:`arrived`), the
    refusals since the last tick did (at least ``crowd_refusals``)."""

    def __init__(
        self,
        hold_s: float,
        *,
        lag_threshold_s: float = 0.003,
        refusal_ratio: float = 5.0,
        min_refusals: int = 50,
        sustain_s: float = 0.100,
        min_held: int = 16,
        interval_s: float = 0.005,
        burst_refusals: int = 32,
        herd_refusals: int = 128,
        first_reads_per_turn: int = 16,
        crowd_connections: int = 16,
        crowd_refusals: int = 16,
        busy_share: float = 0.95,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.hold_s = hold_s
        self.lag_threshold_s = lag_threshold_s
        self.refusal_ratio = refusal_ratio
        self.min_refusals = min_refusals
        self.sustain_s = sustain_s
        self.min_held = min_held
        self.interval_s = interval_s
        self.burst_refusals = burst_refusals
        self.herd_refusals = herd_refusals
        self.first_reads_per_turn = first_reads_per_turn
        self.crowd_connections = crowd_connections
        self.crowd_refusals = crowd_refusals
        self.busy_share = busy_share
        self._cpu_clock = cpu_clock
        """The loop thread's CPU seconds (read on the loop's thread, in its ticks)."""
        self.deferred_first_reads = 0
        """New connections read a turn or more later than they arrived, each counted once
        (:meth:`first_read_now`)."""
        self._first_reads = 0  # this turn's new connections read at once
        self._later_reads = 0  # and those put off before
        self._put_off: deque[Callable[[], None]] = deque()
        self._reading_put_off: asyncio.TimerHandle | None = None
        self.lag_s = 0.0
        """The last tick's lateness."""
        self.held = 0
        """Connections not being read right now (kept by the transports)."""
        self.throttled = 0
        """Multiplexing gRPC connections whose stream limit is lowered right now."""
        self.storms = 0
        """Times the state was entered, for metrics and tests."""
        self.refusals = 0
        """Refusals for overload (each asks :meth:`hold`)."""
        self.answers = 0
        """Every answer the transports sent, refusals included (they count it)."""
        self._window_refusals = 0
        self._window_answers = 0
        self._churned = False  # the last window was churning
        self._tick_refusals = 0
        self._tick_answers = 0
        self._burst = False  # the last tick refused many and served few
        self._window: list[float] = []  # this window's tick lags
        self._window_start: float | None = None
        self._window_cpu = 0.0  # the loop thread's CPU time when the window started
        self._storm_until = 0.0
        self._crowd_until = 0.0  # a crowd of new connections came: its refusals are held
        self._crowd = 0  # how many connections that crowd's last accept took
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def storming(self) -> bool:
        return self._loop is not None and self._loop.time() < self._storm_until

    def hold(self) -> float:
        """Seconds a connection just refused for overload should not be read (0: read it):
        between three quarters and all of ``hold_s``, at random, so a crowd refused
        together is not released together into one loop turn. Called once per such
        refusal (it is counted)."""
        self.refusals += 1
        if self.hold_s <= 0:
            return 0.0
        if not self.storming and not self._herd():
            return 0.0
        return self.hold_s * (0.75 + 0.25 * random.random())

    def hold_reads(
        self, pause: Callable[[], None], resume: Callable[[], None]
    ) -> asyncio.TimerHandle | None:
        """For a connection just refused for overload (counted, as by :meth:`hold`): when it
        is to be held, ``pause`` its reads now and call ``resume`` after the hold, counted in
        :attr:`held`; the timer (to cancel, and ``held -= 1``, if the connection closes
        first), or None: read it as usual. ``resume`` does ``held -= 1``."""
        hold = self.hold()
        if not hold:
            return None
        pause()
        self.held += 1
        return asyncio.get_running_loop().call_later(hold, resume)

    def arrived(self, connections: int) -> None:
        """The acceptor took ``connections`` waiting in the kernel's queue at once: from
        ``crowd_connections`` up, a crowd, and for ``sustain_s`` fewer refusals make a
        herd (:meth:`_herd`)."""
        if connections >= self.crowd_connections and self._loop is not None:
            self._crowd_until = self._loop.time() + self.sustain_s
            self._crowd = connections

    def _herd(self) -> bool:
        """A herd arriving at once, seen within the turn that reads it: ``herd_refusals``
        refused since the last tick, ``refusal_ratio`` times what was served. 256 new
        clients took two or three turns of 20-35 ms each to be seen by ticks, every client
        refused again in each; from here on this turn's refusals are held, so the next
        turn reads only the clients refused before it. An open loop refuses that many
        between two ticks only after a stall (at 10,000 arrivals a second, one of 13 ms or
        more), and then its refused connections are held for one storm: backpressure.

        Within ``sustain_s`` of a crowd of new connections accepted at once
        (:meth:`arrived`), ``crowd_refusals`` are enough: each of the crowd's connections
        is about to be refused, and each that is not held sends its next request at once.
        Under the chaos bench's crowd the ticks had seen the storm 70-100 ms in, while 256
        connections were refused 344 times in turns of 6-23 ms. An open loop's pool that
        opens many connections at once (its others busy) refuses about as many as it
        serves at twice capacity, and is not held for it."""
        if self._loop is None:
            return False
        now = self._loop.time()
        crowd = now < self._crowd_until
        at_least = self.crowd_refusals if crowd else self.herd_refusals
        refused, served = self._since(self._tick_refusals, self._tick_answers)
        if not self._mostly_refused(refused, served, at_least):
            return False
        why = f"a crowd of {self._crowd} new connections, " if crowd else ""
        self._overrun(now, f"{why}{refused} refusals in one turn", refused, served)
        return True

    def first_read_now(self, again: bool = False) -> bool:
        """Whether a new connection's first bytes may be read in this loop turn (``again``:
        a connection put off before asks again).

        A crowd that connects at once (h2load's 256 clients) made one turn read 256 new
        connections, each with its preface, SETTINGS and first call: 20-35 ms in which
        every established connection's call waited, a kept-alive client's refusal among
        them. Past ``first_reads_per_turn`` in a turn, a new connection is read a
        millisecond later, after the loop has polled the others again: a crowd takes the
        same loop time, in slices (the kept-alive probe's refusal p99 under the crowd,
        median of 4 alternating rounds: 24.5 ms before, 10.8 ms with 16 a turn; a new
        connection's, 4.5 and 7.3 ms). Connections put off have a share of their own, so
        one that arrives after the crowd does not queue behind all of it. HTTP's
        connections ask too since the gateway accepts a crowd in one turn
        (:mod:`gateway.acceptor`); while uvloop accepted one connection a turn, the
        accept was the slower queue and the same rule had only made HTTP refusals slower."""
        if self._first_reads == 0 and self._later_reads == 0:
            asyncio.get_running_loop().call_soon(self._next_turn)
        if again:
            self._later_reads += 1
            allowed = self._later_reads <= self.first_reads_per_turn
        else:
            self._first_reads += 1
            allowed = self._first_reads <= self.first_reads_per_turn
        if not allowed and not again:
            self.deferred_first_reads += 1
        return allowed

    def _next_turn(self) -> None:
        self._first_reads = self._later_reads = 0

    def put_off(self, first_read: Callable[[], None]) -> None:
        """A new connection's first read, refused by :meth:`first_read_now`: called
        ``first_reads_per_turn`` a millisecond (one timer for all of them: a timer each,
        re-armed each turn, had cost a crowd of 256 connections ~200 timer callbacks a
        millisecond while it was read), newest first (adaptive LIFO: a newcomer arriving
        while a crowd's first reads wait is read next, not after the crowd).
        ``first_read`` checks that its connection is still open."""
        self._put_off.append(first_read)
        if self._reading_put_off is None:
            loop = asyncio.get_running_loop()
            self._reading_put_off = loop.call_later(PUT_OFF_S, self._read_put_off)

    def _read_put_off(self) -> None:
        self._reading_put_off = None
        waiting = self._put_off
        while waiting and self.first_read_now(again=True):
            waiting.pop()()
        if waiting:
            loop = asyncio.get_running_loop()
            self._reading_put_off = loop.call_later(PUT_OFF_S, self._read_put_off)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + self.interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._reading_put_off is not None:
            self._reading_put_off.cancel()
            self._reading_put_off = None

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.lag_s = now - self._due
        if self._window_start is None:
            self._window_start = now
            self._window_cpu = self._cpu_clock()
        self._window.append(self.lag_s)
        # A crowd's onset, seen within two ticks that each refused many and served few: a
        # window took 100-250 ms to say the same (a crowd that ramps up keeps each turn
        # short, 0-3 ms late, while it refuses 60 for every 4 served), and a crowd of
        # closed-loop clients is refused, not held, every turn until it is said. An open
        # loop over capacity refuses about as many as it serves; its stall (a GC) makes
        # one such tick, not two.
        refused, served = self._since(self._tick_refusals, self._tick_answers)
        self._tick_refusals, self._tick_answers = self.refusals, self.answers
        burst = self._mostly_refused(refused, served, self.burst_refusals)
        if burst and self._burst:
            self._overrun(now, f"{refused} refusals since the last tick", refused, served)
        self._burst = burst
        if now - self._window_start >= self.sustain_s:
            # The window's median: a lone pause (a GC, a slow callback) is not an overrun,
            # a loop whose every turn is long is, even when each tick is only a little late.
            lags = sorted(self._window)
            median = lags[len(lags) // 2]
            cpu = self._cpu_clock()
            busy = (cpu - self._window_cpu) / (now - self._window_start)
            self._window.clear()
            self._window_start, self._window_cpu = now, cpu
            refused, served = self._since(self._window_refusals, self._window_answers)
            self._window_refusals, self._window_answers = self.refusals, self.answers
            # Or refusals are most of what the loop answers: closed-loop clients retrying
            # at once keep every turn busy (the batch cycle waits a turn at each step)
            # although no turn is long; an open loop twice over capacity refuses about as
            # many as it serves.
            churning = self._mostly_refused(refused, served, self.min_refusals)
            # Two windows running: a stall of the batcher alone (a GC) can make one window
            # of an open loop look like this.
            churned, self._churned = self._churned and churning, churning
            # Or the loop's thread never rests and refuses at least as much as it serves:
            # an open loop at twice capacity over multiplexed gRPC connections keeps every
            # turn short (no lag) and refuses about half; each refusal takes loop time
            # from the calls served.
            saturated = (
                busy >= self.busy_share and refused >= self.min_refusals and refused >= served
            )
            if median >= self.lag_threshold_s or churned or saturated:
                why = f"a median lag of {median * 1e3:.0f} ms over {self.sustain_s * 1e3:.0f} ms"
                if churned:
                    why = f"refusals {self.refusal_ratio:g}x what was served, two windows running"
                elif saturated and median < self.lag_threshold_s:
                    why = f"the loop busy {busy:.0%} of {self.sustain_s * 1e3:.0f} ms, refusing"
                self._overrun(now, why, refused, served)
        if self.held + self.throttled >= self.min_held and now < self._storm_until:
            self._storm_until = max(self._storm_until, now + self.hold_s)
        self._due = now + self.interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def _since(self, refusals: int, answers: int) -> tuple[int, int]:
        """Refused and served since the counts were ``refusals`` and ``answers``."""
        refused = self.refusals - refusals
        return refused, self.answers - answers - refused

    def _mostly_refused(self, refused: int, served: int, at_least: int) -> bool:
        return refused >= at_least and refused >= self.refusal_ratio * served

    def _overrun(self, now: float, why: str, refused: int, served: int) -> None:
        if now >= self._storm_until:
            self.storms += 1
            log.warning(
                "overload: %s, %d refused and %d served in that time; connections refused "
                "for overload are not read for %.0f ms",
                why, refused, max(served, 0), self.hold_s * 1e3,
            )  # fmt: skip
        self._storm_until = max(self._storm_until, now + 2 * self.hold_s)
