"""Failed SSH connections per source address, and when an address is refused (pure)."""

from __future__ import annotations

from collections import deque


class FailureLimiter:
    """At most ``max_failures`` failures per address within ``window_s`` seconds; an address
    past that is blocked until its oldest failure in the window is ``window_s`` old. Failures
    are not recorded while an address is blocked, so a blocked address is let in again at
    the latest ``window_s`` after its last counted failure. ``max_failures`` 0 means no limit.
    Times are the caller's (``time.monotonic()``), so tests pass their own clock. The table
    is bounded: the least recently failed addresses are dropped beyond ``max_addresses``."""

    def __init__(self, *, max_failures: int, window_s: float,
                 max_addresses: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, addr: str, now: float) -> deque[float] | None:
        times = self._failures.get(addr)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[addr]
            return None
        return times

    def retry_after_s(self, addr: str, now: float) -> float:
        """0 when ``addr`` may connect, else the seconds until it may."""
        if self.max_failures <= 0:
            return 0.0
        times = self._recent(addr, now)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[-self.max_failures] + self.window_s - now)

    def blocked(self, addr: str, now: float) -> bool:
        return self.retry_after_s(addr, now) > 0

    def record_failure(self, addr: str, now: float) -> None:
        if self.max_failures <= 0 or self.blocked(addr, now):
            return
        times = self._failures.pop(addr, None) or deque()
        times.append(now)
        while len(times) > self.max_failures:
            times.popleft()
        self._failures[addr] = times  # re-inserted: the dict's order is least recent first
        while len(self._failures) > self.max_addresses:
            del self._failures[next(iter(self._failures))]
