"""Key-manager settings as small frozen value objects (pass ``None`` to switch one off)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["CacheConfig", "CircuitBreakerConfig", "RateLimit"]


@dataclass(frozen=True)
class CacheConfig:
    """Data-key reuse for encryption and a TTL cache of data keys for decryption.

    The defaults are conservative: a reused data key serves at most five minutes,
    100,000 messages and 4 GiB of plaintext, and every message still derives its own
    key from its own message ID. ``reuse_data_keys=False`` gives every encrypted message
    its own KMS call (a per-object trail in CloudTrail); decryption is still cached.
    """

    max_age: float = 300.0
    max_messages: int = 100_000
    max_bytes: int = 2**32
    reuse_data_keys: bool = True
    encrypt_entries: int = 256
    decrypt_entries: int = 1024
    decrypt_ttl: float = 300.0
    partition: str | None = None

    def __post_init__(self) -> None:
        if not (self.max_age > 0 and self.decrypt_ttl > 0):
            raise ConfigurationError("max_age and decrypt_ttl must be positive seconds")
        if min(self.max_messages, self.max_bytes, self.encrypt_entries, self.decrypt_entries) < 1:
            raise ConfigurationError("cache limits and sizes must be at least 1")
        if self.max_messages > 2**32:
            raise ConfigurationError("max_messages may not exceed 2^32 (the ESDK's own bound)")


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up; each KMS
    Decrypt call (each remote unwrap request) takes one.

    ``wait=False`` (default) refuses at once with ``KMSDecryptRateLimited`` (an HTTP
    429); ``wait=True`` waits for a token (batch jobs).
    """

    rate: float
    burst: int
    wait: bool = False

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1:
            raise ConfigurationError("RateLimit needs rate > 0 and burst >= 1")


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Per KMS region: open after ``failure_threshold`` consecutive transient failures,
    stay open ``reset_timeout`` seconds, then let one probe through."""

    failure_threshold: int = 5
    reset_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ConfigurationError(
                f"failure_threshold must be >= 1, not {self.failure_threshold}: it is how many "
                "consecutive transient failures open the breaker"
            )
        if not self.reset_timeout > 0:  # also refuses NaN
            raise ConfigurationError(
                f"reset_timeout must be > 0 seconds, not {self.reset_timeout}: it is how long "
                "the breaker stays open before one probe is let through"
            )
