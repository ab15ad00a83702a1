"""A circuit breaker per AWS region: fail fast while KMS (or a branch key store's
DynamoDB) is down, probe to recover.

Hand-written because it is small and must know our error taxonomy (which failures are
outages); the clock is injected so tests don't wait 30 s.

Failures are counted per service: a branch key fetch is a DynamoDB GetItem then a KMS
Decrypt, and a GetItem that succeeds says nothing about KMS, so it must not end a run of
KMS failures (if it did, a KMS outage behind a healthy table would never open the
breaker). Open, the breaker refuses every call in its region, of either service; the
probe is a call to the service that opened it, and only its answer closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import CircuitBreakerConfig
from .errors import CircuitOpenError, KeyServiceError
from .stats import StatsRecorder
from .telemetry import NULL_OBSERVER, Observer, service_name

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
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.region = region
        self._observer = observer
        # The failure that opened it (or last reopened it): named in the log line.
        self._cause: tuple[str | None, str | None] = (None, None)
        self._config = config
        self._clock = clock
        self._stats = stats
        self._failures: dict[str, int] = {}  # consecutive transient failures per service
        self._opened_at = 0.0
        self._opened_by = "KMS"  # the service whose failures opened it
        self.state = CLOSED
        stats.breaker_states[region] = CLOSED

    def before_call(self, service: str = "KMS") -> None:
        """Let a call to ``service`` through, or raise :class:`CircuitOpenError` without
        any I/O.

        Open, the breaker refuses every call in its region, of either service, until the
        reset timeout; then the first call to the service that opened it is the one
        probe (half-open: everything else is refused until it answers). A call to the
        other service, made then on the way to that probe (a branch key fetch's GetItem
        before its KMS Decrypt), goes through without becoming the probe."""
        if self.state == CLOSED:
            return
        waited = self._clock() - self._opened_at
        if self.state == OPEN and waited >= self._config.reset_timeout:
            if service == self._opened_by:
                self._move(HALF_OPEN)  # this call is the one probe
            return
        retry_after = max(self._config.reset_timeout - waited, 0.001)
        raise CircuitOpenError(
            f"{self._opened_by} in {self.region} failed {self._config.failure_threshold} "
            "times in a row; "
            f"calls fail fast for {retry_after:.1f} s more, then one probe is tried. "
            "Retry later (HTTP 503)",
            region=self.region,
            retry_after=retry_after,
        )

    @property
    def opened_by(self) -> str:
        """The service whose failures opened the breaker (last opened, if closed)."""
        return self._opened_by

    def refuses(self) -> bool:
        """Whether :meth:`before_call` would refuse any call now (open, before the reset
        timeout, or a probe in flight); no state changes. Lets a caller refuse early,
        before it spends a rate-limit token on a call that cannot go out."""
        if self.state == CLOSED:
            return False
        return self.state == HALF_OPEN or (
            self._clock() - self._opened_at < self._config.reset_timeout
        )

    def record_success(self, service: str = "KMS") -> None:
        """``service`` answered (success, or an error that proves it is up).

        Only the probe's answer closes an open breaker: answers that arrive while it is
        open, or from the other service while half-open, are late answers to calls let
        through before (or on the way to the probe) and prove nothing about the service
        that failed."""
        if self.state == CLOSED:
            self._failures.pop(service, None)
        elif self.state == HALF_OPEN and service == self._opened_by:
            self._failures.clear()
            self._move(CLOSED)

    def record_failure(self, service: str = "KMS", cause: KeyServiceError | None = None) -> None:
        """A transient failure of ``service``: timeout, network, 5xx, throttling after
        retries (``cause``: the error, whose operation and code the log line names).
        Counted while closed; the probe's failure reopens the breaker; other answers
        while it is open change nothing (they would reopen it, or carry stale counts past
        its closing)."""
        if self.state == HALF_OPEN:
            if service == self._opened_by:
                self._open(service, cause)
            return
        if self.state == OPEN:
            return
        failures = self._failures[service] = self._failures.get(service, 0) + 1
        if failures >= self._config.failure_threshold:
            self._open(service, cause)

    def record_abandoned(self) -> None:
        """The probe was cancelled before an answer: the next call may probe again."""
        if self.state == HALF_OPEN:
            self._move(OPEN, f"the probe of {self._opened_by} was abandoned")

    def _open(self, service: str, cause: KeyServiceError | None) -> None:
        self._opened_at = self._clock()
        self._opened_by = service
        self._cause = (cause.operation, cause.error_code) if cause is not None else (None, None)
        self._move(OPEN)

    def _move(self, state: str, why: str | None = None) -> None:
        """Every transition is logged at WARNING (an operator wants to see the recovery
        as much as the outage), naming the endpoint, the service and the failure that
        opened it, and why it moved (``why`` overrides: an abandoned probe); and told to
        telemetry."""
        operation, error_code = self._cause
        failed = " ".join(filter(None, (self._opened_by, operation)))
        failed += f" failing with {error_code}" if error_code else " failing"
        if why is None:
            if state == OPEN:
                why = failed if self.state == CLOSED else f"the probe failed: {failed}"
            elif state == HALF_OPEN:
                why = f"probing {self._opened_by}, after {failed}"
            else:
                why = f"{self._opened_by} answered the probe"
        log.warning(
            "circuit breaker for %s: %s -> %s (%s)",
            self.region,
            self.state,
            state,
            why,
            extra={
                "aioenvelope_endpoint": self.region,
                "aioenvelope_service": service_name(self._opened_by),
                "aioenvelope_operation": operation,
                "aioenvelope_error_code": error_code,
            },
        )
        old, self.state = self.state, state
        self._stats.breaker_states[self.region] = state
        self._stats.breaker_transitions += 1
        self._observer.breaker_moved(
            self.region,
            old,
            state,
            service=service_name(self._opened_by),
            operation=operation,
            error_code=error_code,
        )
