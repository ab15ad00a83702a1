"""A token bucket on remote unwrap calls (KMS Decrypt): the denial-of-wallet defence.

Every KMS Decrypt is billed and counted against the account's quota, and a caller
controls what it asks us to decrypt, including how many EDKs a message carries (one
cache miss can try each of them). One token per request sent, taken through
:meth:`aioenvelope.runtime.Runtime.admit_remote_decrypt`, bounds what a caller can make
us spend; cache hits and keyrings that unwrap locally take none.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from .config import RateLimit
from .errors import KMSDecryptRateLimited
from .stats import StatsRecorder
from .telemetry import note_local_wait

__all__ = ["TokenBucket"]


class TokenBucket:
    def __init__(self, config: RateLimit, clock: Callable[[], float], stats: StatsRecorder) -> None:
        self._config = config
        self._clock = clock
        self._stats = stats
        self._tokens = float(config.burst)
        self._last = clock()

    def _try_take(self) -> float:
        """Take a token and return 0, or return how long until one is there."""
        now = self._clock()
        rate, burst = self._config.rate, self._config.burst
        self._tokens = min(float(burst), self._tokens + max(now - self._last, 0.0) * rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rate

    async def take(self) -> None:
        delay = self._try_take()
        if delay == 0.0:
            return
        self._stats.rate_limited += 1
        if not self._config.wait:
            raise KMSDecryptRateLimited(
                "too many KMS Decrypt calls (decryptions that miss the cache, one call per "
                f"EDK tried): the decrypt rate limit ({self._config.rate:g}/s, burst "
                f"{self._config.burst}) is spent. "
                f"Retry after {delay:.2f} s (HTTP 429)",
                retry_after=delay,
            )
        started = time.perf_counter()
        try:
            while delay > 0.0:
                await anyio.sleep(delay)
                delay = self._try_take()
        finally:
            # Our wait, not the key service's latency: telemetry takes it out of the call.
            note_local_wait(time.perf_counter() - started)
