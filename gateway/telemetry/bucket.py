"""The sampling budget: a token bucket of rows a second."""

from __future__ import annotations

import time

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``rate`` (one second's worth) saved up."""

    __slots__ = ("_last", "_tokens", "capacity", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self._tokens = self.capacity
        self._last = time.monotonic()

    def take(self, amount: int) -> bool:
        if self.rate <= 0:
            return False
        now = time.monotonic()
        tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if tokens >= amount:
            self._tokens = tokens - amount
            return True
        self._tokens = tokens
        return False
