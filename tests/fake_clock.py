"""A clock for ``EnvelopeClient(clock=...)`` that moves only when a test moves it.

Cache ages, TTLs, token refills and the circuit breaker's reset timeout all read the
client's clock, so a test that passes this one never sleeps and never races the machine:
``clock.advance(31)`` (or ``clock.now += 31``) is 31 seconds later, at once.
"""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """Seconds as a float, moved by hand; it never moves on its own.

    The default start, 1024.0, is binary-exact, so that advancing by 0.5 or 0.25 stays
    exact and a test can assert on equalities of times.
    """

    def __init__(self, now: float = 1024.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (never back: a clock the client reads is monotonic)."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds
