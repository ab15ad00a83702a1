"""The token bucket on decrypt misses, and the key manager's stats and configuration.

Against a real moto KMS; token refills follow a fake clock passed as ``clock=``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import key_manager_support as support
import pytest
from fake_clock import FakeClock
from key_manager_support import (
    CONTEXT,
    PLAINTEXT,
    GatedKeyring,
    bogus_messages,
    encrypt_messages,
    nonzero,
    payload,
)
from task_leaks import settle

from aioenvelope import (
    CacheConfig,
    EnvelopeClient,
    KmsKeyring,
    RateLimit,
    errors,
)

# The support module's fixtures, for this module's tests.
clock = support.clock
keyring = support.keyring
reader_keyring = support.reader_keyring
gated_keyring = support.gated_keyring


# -- rate limit on decrypt misses --------------------------------------------------------


async def test_rate_limit_admits_the_burst_and_fails_the_rest_fast(
    keyring: KmsKeyring, reader_keyring: KmsKeyring, clock: FakeClock
) -> None:
    """1,000 distinct misses at once with burst=10 and the clock held still: exactly 10
    reach KMS; the other 990 fail at once with KMSDecryptRateLimited (an HTTP 429)."""
    bogus = bogus_messages((await encrypt_messages(keyring, 1))[0], 1000)
    limit = RateLimit(rate=5.0, burst=10)
    async with EnvelopeClient(reader_keyring, decrypt_rate_limit=limit, clock=clock) as client:
        outcomes = await asyncio.gather(
            *(client.decrypt(b, encryption_context=CONTEXT) for b in bogus),
            return_exceptions=True,
        )
        stats = client.stats
    limited = [o for o in outcomes if isinstance(o, errors.KMSDecryptRateLimited)]
    refused = [
        o
        for o in outcomes
        if isinstance(o, errors.NoUsableKeyError)
        and not isinstance(o, errors.KMSDecryptRateLimited)
    ]
    assert (len(refused), len(limited)) == (10, 990)
    assert reader_keyring.kms_calls == {"Decrypt": 10}
    assert stats.rate_limited == 990
    assert all(e.retry_after > 0 for e in limited)


async def test_rate_limit_refills_at_rate_per_second_of_the_clock(
    keyring: KmsKeyring, reader_keyring: KmsKeyring, clock: FakeClock
) -> None:
    """At most burst + rate * elapsed calls: 4 at once, then 8/s * 0.5 s = 4 more."""
    bogus = iter(bogus_messages((await encrypt_messages(keyring, 1))[0], 20))
    limit = RateLimit(rate=8.0, burst=4)
    async with EnvelopeClient(reader_keyring, decrypt_rate_limit=limit, clock=clock) as client:

        async def admitted(n: int) -> int:
            """Decrypt up to n bogus messages; how many reached KMS before one was refused."""
            for i in range(n):
                try:
                    await client.decrypt(next(bogus), encryption_context=CONTEXT)
                except errors.KMSDecryptRateLimited:
                    return i
                except errors.NoUsableKeyError:
                    pass
            return n

        assert await admitted(6) == 4
        clock.advance(0.5)
        assert await admitted(6) == 4
    assert reader_keyring.kms_calls == {"Decrypt": 8}


async def test_rate_limited_error_says_when_a_token_will_be_free(
    keyring: KmsKeyring, reader_keyring: KmsKeyring, clock: FakeClock
) -> None:
    """retry_after is the wait for the next token (1/rate from empty), and retrying after
    it succeeds in reaching KMS."""
    first, second, third = bogus_messages((await encrypt_messages(keyring, 1))[0], 3)
    limit = RateLimit(rate=4.0, burst=1)
    async with EnvelopeClient(reader_keyring, decrypt_rate_limit=limit, clock=clock) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(first, encryption_context=CONTEXT)
        with pytest.raises(errors.KMSDecryptRateLimited) as info:
            await client.decrypt(second, encryption_context=CONTEXT)
        assert info.value.retry_after == pytest.approx(0.25)
        clock.advance(info.value.retry_after)
        with pytest.raises(errors.NoUsableKeyError) as refused:
            await client.decrypt(third, encryption_context=CONTEXT)
    assert not isinstance(refused.value, errors.KMSDecryptRateLimited)
    assert reader_keyring.kms_calls == {"Decrypt": 2}


async def test_cache_hits_do_not_consume_rate_limit_tokens(
    keyring: KmsKeyring, reader_keyring: KmsKeyring, clock: FakeClock
) -> None:
    """With the bucket empty, cached keys still decrypt: the limit protects KMS, and a
    hit costs KMS nothing."""
    first, second = await encrypt_messages(keyring, 2)
    (bogus,) = bogus_messages(first, 1)
    limit = RateLimit(rate=1.0, burst=1)
    async with EnvelopeClient(reader_keyring, decrypt_rate_limit=limit, clock=clock) as client:
        assert await client.decrypt(first, encryption_context=CONTEXT) == payload(0)
        with pytest.raises(errors.KMSDecryptRateLimited):
            await client.decrypt(bogus, encryption_context=CONTEXT)
        for _ in range(10):
            assert await client.decrypt(first, encryption_context=CONTEXT) == payload(0)
            assert await client.decrypt(second, encryption_context=CONTEXT) == payload(1)
        stats = client.stats
    assert reader_keyring.kms_calls == {"Decrypt": 1}
    assert stats.rate_limited == 1
    assert stats.decrypt_cache_hits == 20


async def test_coalesced_waiters_do_not_consume_rate_limit_tokens(
    keyring: KmsKeyring, gated_keyring: GatedKeyring, clock: FakeClock
) -> None:
    """One token per keyring call: requests coalesced on an in-flight miss need none, so
    a burst of 1 serves any number of identical requests."""
    (blob,) = await encrypt_messages(keyring, 1)
    limit = RateLimit(rate=1.0, burst=1)
    async with EnvelopeClient(gated_keyring, decrypt_rate_limit=limit, clock=clock) as client:
        tasks = [
            asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
            for _ in range(100)
        ]
        await settle(lambda: client.stats.coalesced_waits == 99, "99 coalesced waiters")
        gated_keyring.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        stats = client.stats
    assert results == [payload(0)] * 100
    assert stats.rate_limited == 0
    assert gated_keyring.kms_calls == {"Decrypt": 1}


async def test_wait_mode_delays_misses_until_a_token_is_free(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """wait=True trades latency for success: 5 misses with burst=1 at 50/s all reach KMS,
    the last no sooner than 4/50 s after the first (real monotonic clock)."""
    bogus = bogus_messages((await encrypt_messages(keyring, 1))[0], 5)
    limit = RateLimit(rate=50.0, burst=1, wait=True)
    async with EnvelopeClient(reader_keyring, decrypt_rate_limit=limit) as client:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(client.decrypt(b, encryption_context=CONTEXT) for b in bogus),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        stats = client.stats
    assert all(
        isinstance(o, errors.NoUsableKeyError) and not isinstance(o, errors.KMSDecryptRateLimited)
        for o in outcomes
    )
    assert reader_keyring.kms_calls == {"Decrypt": 5}
    assert elapsed >= 0.07  # 4 refills at 50/s = 0.08 s, less float slack
    assert stats.rate_limited == 4


async def test_wait_mode_waits_for_the_clock_to_refill_the_bucket(
    keyring: KmsKeyring, reader_keyring: KmsKeyring, clock: FakeClock
) -> None:
    """In wait mode the injected clock still rules: while it stands still no token
    appears and the waiting miss does not reach KMS; once it moves, the miss proceeds."""
    first, second = bogus_messages((await encrypt_messages(keyring, 1))[0], 2)
    limit = RateLimit(rate=16.0, burst=1, wait=True)
    async with EnvelopeClient(reader_keyring, decrypt_rate_limit=limit, clock=clock) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(first, encryption_context=CONTEXT)
        waiting = asyncio.create_task(client.decrypt(second, encryption_context=CONTEXT))
        await asyncio.sleep(0.2)  # real time: a dozen refill periods at 16/s
        assert not waiting.done()
        assert reader_keyring.kms_calls == {"Decrypt": 1}
        clock.advance(1.0)
        with pytest.raises(errors.NoUsableKeyError):
            await asyncio.wait_for(waiting, 5)
    assert reader_keyring.kms_calls == {"Decrypt": 2}


async def test_deadline_while_waiting_for_a_rate_limit_token_takes_effect_at_once(
    keyring: KmsKeyring, reader_keyring: KmsKeyring, clock: FakeClock
) -> None:
    """In wait mode a request may wait a long time for a token; its deadline (an anyio
    cancel scope) must still end it on time rather than when a token turns up."""
    first, second = bogus_messages((await encrypt_messages(keyring, 1))[0], 2)
    limit = RateLimit(rate=1.0, burst=1, wait=True)
    async with EnvelopeClient(reader_keyring, decrypt_rate_limit=limit, clock=clock) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(first, encryption_context=CONTEXT)

        async def with_deadline() -> bool:
            with anyio.move_on_after(0.1) as scope:
                await client.decrypt(second, encryption_context=CONTEXT)
            return scope.cancelled_caught

        started = time.monotonic()
        assert await asyncio.wait_for(with_deadline(), 3) is True
        assert time.monotonic() - started < 1.0
    assert reader_keyring.kms_calls == {"Decrypt": 1}


# -- stats and configuration -------------------------------------------------------------


async def test_stats_is_a_frozen_snapshot(keyring: KmsKeyring) -> None:
    """A snapshot taken earlier does not change under later traffic and cannot be edited."""
    async with EnvelopeClient(keyring) as client:
        before = client.stats
        await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        after = client.stats
    assert (before.encrypt_cache_misses, nonzero(before.kms_calls)) == (0, {})
    assert (after.encrypt_cache_misses, nonzero(after.kms_calls)) == (1, {"GenerateDataKey": 1})
    field = "encrypt_cache_hits"
    with pytest.raises(AttributeError):
        setattr(after, field, 5)


@pytest.mark.parametrize(
    "options",
    [
        {"max_age": 0.0},
        {"max_age": -1.0},
        {"max_messages": 0},
        {"max_messages": 2**32 + 1},  # the ESDK's bound on messages per data key
        {"max_bytes": -1},
        {"decrypt_ttl": -1.0},
        {"decrypt_entries": -1},
        {"encrypt_entries": -1},
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()),
)
def test_invalid_cache_config_is_a_configuration_error(
    keyring: KmsKeyring, options: dict[str, Any]
) -> None:
    """Nonsense limits are refused up front, not discovered as odd behaviour in production."""
    with pytest.raises(errors.ConfigurationError):
        EnvelopeClient(keyring, cache=CacheConfig(**options))


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.0, 1), (-1.0, 1), (1.0, 0)],
    ids=["zero-rate", "negative-rate", "no-burst"],
)
def test_invalid_rate_limit_is_a_configuration_error(
    keyring: KmsKeyring, rate: float, burst: int
) -> None:
    """A bucket that can never hold a token would refuse every miss forever."""
    with pytest.raises(errors.ConfigurationError):
        EnvelopeClient(keyring, decrypt_rate_limit=RateLimit(rate=rate, burst=burst))
