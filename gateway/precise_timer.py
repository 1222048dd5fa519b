"""A timer on the event loop that wakes at the microsecond asked, for waits under a millisecond.

uvloop's timers count whole milliseconds: ``call_later`` rounds a delay to the nearest one
and runs a delay under half a millisecond at the loop's next turn. A batcher waiting 500 us
for a partial batch to fill therefore re-armed its timer every turn until due, spinning the
loop (its dispatch ran 262 times for one request in a unit test).

On Linux a timerfd (``timerfd_create(2)``, called through ctypes: ``os`` has it from Python
3.13) becomes readable at the instant asked and wakes the loop's poll then, at the cost of a
syscall to arm it. Elsewhere, or if the timerfd cannot be made, the wait is rounded up to
the loop's millisecond: late by less than one, never spinning.

A sleeping loop pays for waking: the kernel wakes its thread late (on this 2-core VM
50-150 us), and so reads arrivals late. Sleeping the whole wait cost a batcher waiting
500 us for four clients 8% of its throughput against the spinning loop. So the timer learns
its lateness (a moving average, at most ``MAX_LATENESS_S``), sleeps until that much before
the instant asked, and spins the loop only for that last stretch: the callback runs on
time, arrivals meanwhile are read at once, and the spin costs at most the lateness.

What is left of the trade, measured with ``python -m bench.revisions --base 7904672
--concurrency 1 2 4 16`` (the spinning batcher against this one, six alternating rounds):
CPU per request 910 -> 496 us with one client, 463 -> 323 with two, 257 -> 226 with four;
req/s 0.95-0.99 of the spinning loop's (paired medians), whose busy polling reads arrivals
sooner. Where a core can be spent on polling, the spinning loop's trade may be the better
one; where the gateway shares its cores with replicas or clients, it is not.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["PreciseTimer"]

_LOOP_RESOLUTION_S = 0.001  # uvloop's timers
_CLOCK_MONOTONIC = 1  # the clock time.perf_counter reads on Linux
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
MAX_LATENESS_S = 250e-6  # a busy loop's turns are not the timer's lateness to learn
_LEARNING_RATE = 1 / 8


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_DISARMED = _Itimerspec()  # an it_value of zero disarms a timerfd


def _timerfd_calls() -> tuple[Any, Any] | None:
    """libc's ``timerfd_create`` and ``timerfd_settime``, or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return create, settime


_TIMERFD = _timerfd_calls()


class PreciseTimer:
    """One callback, armed for one instant at a time (``time.perf_counter`` seconds).

    ``arm`` replaces the instant armed before; ``due`` is the instant armed, None when the
    timer is idle. The callback runs on the loop, once per arming, once ``due`` has come.
    ``close`` releases the timerfd; a timer dropped without it releases it when collected.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self.due: float | None = None
        self.lateness_s = 0.0
        self._handle: asyncio.Handle | None = None  # the fallback's timer, or the spin
        self._fd = -1
        if _TIMERFD is not None:
            fd = _TIMERFD[0](_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._release = weakref.finalize(self, os.close, fd)
                loop.add_reader(fd, self._readable)

    @property
    def precise(self) -> bool:
        """Whether waits under a millisecond are kept (a timerfd), not rounded up to one."""
        return self._fd >= 0

    def arm(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.due = due
        delay = due - time.perf_counter()
        if self._fd >= 0:
            # An it_value of zero would disarm it: a due instant already past waits 1 us.
            sleep = max(delay - self.lateness_s, 1e-6)
            seconds = int(sleep)
            spec = _Itimerspec(
                _Timespec(0, 0), _Timespec(seconds, int((sleep - seconds) * 1e9) or 1)
            )
            assert _TIMERFD is not None
            if _TIMERFD[1](self._fd, 0, ctypes.byref(spec), None) == 0:
                return
            self.close()  # the timerfd failed: fall back to the loop's timers from now on
            self.due = due
        # Whole milliseconds, rounded up: uvloop would round to the nearest.
        wait = math.ceil(max(delay, 0.0) / _LOOP_RESOLUTION_S) * _LOOP_RESOLUTION_S
        self._handle = self._loop.call_later(max(wait, _LOOP_RESOLUTION_S), self._fire)

    def cancel(self) -> None:
        self.due = None
        if self._fd >= 0:
            assert _TIMERFD is not None
            _TIMERFD[1](self._fd, 0, ctypes.byref(_DISARMED), None)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        self.cancel()
        if self._fd >= 0:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._release()  # closes the descriptor
            self._fd = -1

    def _readable(self) -> None:
        try:
            os.read(self._fd, 8)  # the count of expiries; reading it clears readiness
        except BlockingIOError:
            return  # re-armed or cancelled after it expired: that expiry no longer counts
        if self.due is None:
            return
        # The timerfd was set for due less the lateness (which only changes here).
        woke = time.perf_counter() - (self.due - self.lateness_s)
        late = min(max(woke, 0.0), MAX_LATENESS_S)
        self.lateness_s += (late - self.lateness_s) * _LEARNING_RATE
        self._fire()

    def _fire(self) -> None:
        self._handle = None
        if self.due is None:
            return
        if time.perf_counter() < self.due:  # woken early on purpose: turn until due
            self._handle = self._loop.call_soon(self._fire)
            return
        self.due = None
        self._callback()
