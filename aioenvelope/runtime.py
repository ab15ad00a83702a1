"""What an open ``EnvelopeClient`` shares with its keyrings: the clock, the counters, the
per-region circuit breakers, the decrypt rate limit and the telemetry observer."""

from __future__ import annotations

import collections
from collections.abc import Callable

from .breaker import CLOSED, CircuitBreaker
from .config import CircuitBreakerConfig, RateLimit
from .rate_limit import TokenBucket
from .stats import StatsRecorder
from .telemetry import NULL_OBSERVER, Observer

__all__ = ["Runtime"]

# Breakers kept at once. Keyrings call KMS only in regions their configuration names
# (keys, discovery ``regions=``), so a client rarely needs more than a handful; the cap
# is a second line of defence against a configuration (or a bug) that names many.
MAX_BREAKERS = 64


class Runtime:
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        stats: StatsRecorder,
        breaker_config: CircuitBreakerConfig | None,
        decrypt_rate_limit: RateLimit | None = None,
        max_breakers: int = MAX_BREAKERS,
        observer: Observer | None = None,
    ) -> None:
        self.clock = clock
        self.stats = stats
        # What keyrings tell telemetry: key-service calls, breaker transitions, branch
        # key cache lookups (the base records nothing).
        self.observer = observer if observer is not None else NULL_OBSERVER
        self._breaker_config = breaker_config
        self._breakers: collections.OrderedDict[str, CircuitBreaker] = collections.OrderedDict()
        self._max_breakers = max(1, max_breakers)
        self._limiter = (
            TokenBucket(decrypt_rate_limit, clock, stats) if decrypt_rate_limit else None
        )

    def breaker(self, region: str) -> CircuitBreaker | None:
        """The breaker guarding KMS in ``region`` (one per region, made on first use).

        At most ``max_breakers`` are kept. Over that, closed breakers go first, least
        recently used first (a closed breaker forgets little: a new one starts closed too),
        then open ones; an evicted region also leaves ``stats.breaker_states``.
        """
        if self._breaker_config is None:
            return None
        breaker = self._breakers.get(region)
        if breaker is not None:
            self._breakers.move_to_end(region)
            return breaker
        breaker = self._breakers[region] = CircuitBreaker(
            region, self._breaker_config, self.clock, self.stats, self.observer
        )
        while len(self._breakers) > self._max_breakers:
            victim = next(
                (r for r, b in self._breakers.items() if b.state == CLOSED and r != region),
                next(iter(self._breakers)),
            )
            del self._breakers[victim]
            self.stats.breaker_states.pop(victim, None)
        return breaker

    async def admit_remote_decrypt(self) -> None:
        """Take a token from the decrypt rate limit (``decrypt_rate_limit=``) for one
        request that asks a remote service to unwrap a data key.

        Keyrings that call out to unwrap (KMS Decrypt; Vault, GCP or Azure unwrap) await
        this once per request, just before sending it: the bucket bounds what callers can
        make us spend, and one message can hold many EDKs. Keyrings that unwrap locally
        (raw AES, raw RSA) cost nobody anything and never call it. Raises
        :class:`~aioenvelope.errors.KMSDecryptRateLimited`, or waits in ``wait=True`` mode.
        """
        if self._limiter is not None:
            await self._limiter.take()
