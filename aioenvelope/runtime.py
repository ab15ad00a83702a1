"""What an open ``EnvelopeClient`` shares with its keyrings: the clock, the counters and
the per-region circuit breakers."""

from __future__ import annotations

from collections.abc import Callable

from .breaker import CircuitBreaker
from .config import CircuitBreakerConfig
from .stats import StatsRecorder

__all__ = ["Runtime"]


class Runtime:
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        stats: StatsRecorder,
        breaker_config: CircuitBreakerConfig | None,
    ) -> None:
        self.clock = clock
        self.stats = stats
        self._breaker_config = breaker_config
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, region: str) -> CircuitBreaker | None:
        """The breaker guarding KMS in ``region`` (one per region, made on first use)."""
        if self._breaker_config is None:
            return None
        breaker = self._breakers.get(region)
        if breaker is None:
            breaker = self._breakers[region] = CircuitBreaker(
                region, self._breaker_config, self.clock, self.stats
            )
        return breaker
