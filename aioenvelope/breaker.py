"""A circuit breaker per KMS region: fail fast while KMS is down, probe to recover.

Hand-written because it is small and must know our error taxonomy (which failures are
outages); the clock is injected so tests don't wait 30 s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import CircuitBreakerConfig
from .errors import CircuitOpenError
from .stats import StatsRecorder

__all__ = ["CircuitBreaker"]

log = logging.getLogger("aioenvelope.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        region: str,
        config: CircuitBreakerConfig,
        clock: Callable[[], float],
        stats: StatsRecorder,
    ) -> None:
        self.region = region
        self._config = config
        self._clock = clock
        self._stats = stats
        self._failures = 0
        self._opened_at = 0.0
        self.state = CLOSED
        stats.breaker_states[region] = CLOSED

    def before_call(self) -> None:
        """Let the call through, or raise :class:`CircuitOpenError` without any I/O."""
        if self.state == CLOSED:
            return
        waited = self._clock() - self._opened_at
        if self.state == OPEN and waited >= self._config.reset_timeout:
            self._move(HALF_OPEN)  # this call is the one probe
            return
        retry_after = max(self._config.reset_timeout - waited, 0.001)
        raise CircuitOpenError(
            f"KMS in {self.region} failed {self._config.failure_threshold} times in a row; "
            f"calls fail fast for {retry_after:.1f} s more, then one probe is tried. "
            "Retry later (HTTP 503)",
            region=self.region,
            retry_after=retry_after,
        )

    def record_success(self) -> None:
        """KMS answered (success, or an error that proves it is up)."""
        self._failures = 0
        if self.state != CLOSED:
            self._move(CLOSED)

    def record_failure(self) -> None:
        """A transient failure: timeout, network, 5xx, throttling after retries."""
        if self.state == HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self.state == CLOSED and self._failures >= self._config.failure_threshold:
            self._open()

    def record_abandoned(self) -> None:
        """The probe was cancelled before an answer: the next call may probe again."""
        if self.state == HALF_OPEN:
            self._move(OPEN)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move(OPEN)

    def _move(self, state: str) -> None:
        log.log(
            logging.WARNING if state == OPEN else logging.INFO,
            "KMS circuit breaker for %s: %s -> %s",
            self.region,
            self.state,
            state,
        )
        self.state = state
        self._stats.breaker_states[self.region] = state
        self._stats.breaker_transitions += 1
