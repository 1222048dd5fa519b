"""Token buckets: the sampling budget of request records, and rate limits on requests.

A bucket holds at most ``capacity`` tokens and gains ``rate`` a second; taking ``n`` succeeds
when ``n`` are there. :class:`RateLimits` keeps one bucket per key (a token's name, a model)
and answers a refused request with the seconds until it would pass (``Retry-After``).
"""

from __future__ import annotations

import math
import time

__all__ = ["RateLimits", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` (default: one second's worth) saved up."""

    __slots__ = ("_last", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0) if capacity is None else max(capacity, 1.0)
        self._tokens = self.capacity
        self._last = time.monotonic()

    def _refill(self) -> float:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens

    def take(self, amount: int = 1) -> bool:
        if self.rate <= 0:
            return False
        if self._refill() >= amount:
            self._tokens -= amount
            return True
        return False

    def fill(self) -> float:
        """The share of the capacity available now (1: full, 0: empty)."""
        return self._refill() / self.capacity

    def wait_s(self, amount: int = 1) -> float:
        """Seconds until ``amount`` tokens are there (0 when they are)."""
        missing = amount - self._refill()
        return 0.0 if missing <= 0 else missing / self.rate if self.rate > 0 else math.inf


class RateLimits:
    """One bucket per key with the same rate and burst; ``refused`` counts per key."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, TokenBucket] = {}
        self.refused: dict[str, int] = {}

    def bucket(self, key: str) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket

    def admit(self, key: str) -> float | None:
        """None when admitted; else the seconds after which to retry (at least 1)."""
        bucket = self.bucket(key)
        if bucket.take():
            return None
        self.refused[key] = self.refused.get(key, 0) + 1
        return max(1.0, math.ceil(bucket.wait_s()))
