"""The HTTP answer for the two errors that mean "try again later", framework-free, so
the Starlette and aiohttp integrations cannot drift apart."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CircuitOpenError, KMSDecryptRateLimited

__all__ = ["RetryLater", "retry_later"]


@dataclass(frozen=True)
class RetryLater:
    status: int
    body: dict[str, object]
    headers: dict[str, str]


def retry_later(exc: KMSDecryptRateLimited | CircuitOpenError) -> RetryLater:
    """429 for a spent decrypt rate limit, 503 for an open circuit, with ``Retry-After``.

    ``Retry-After`` takes whole seconds: rounded up (never invite a retry too early), at
    least 1 (0 would invite a retry storm). The body carries a fixed code, not the
    exception's text, which names the rate limit and the KMS region: details for the
    server's logs, not for callers.
    """
    delay = exc.retry_after
    seconds = max(1, math.ceil(delay)) if math.isfinite(delay) else 1
    status, code = (
        (429, "decrypt_rate_limited")
        if isinstance(exc, KMSDecryptRateLimited)
        else (503, "kms_unavailable")
    )
    return RetryLater(
        status, {"error": code, "retry_after": seconds}, {"Retry-After": str(seconds)}
    )
