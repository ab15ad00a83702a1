"""The per-region KMS circuit breaker, end to end through ``EnvelopeClient``.

KMS is moto behind :class:`fault_proxy.FaultProxy`, which fails, throttles or holds
requests on demand and counts every request it receives, so "no network traffic" is a
counter that does not move. Keyrings make one attempt per call (``max_attempts=1``: one
failed call is one request) and skip the start-up DescribeKey (``check_keys=False``).
The client's ``clock`` is a :class:`fake_clock.FakeClock`, so the 30 s reset timeout
passes at once.
``cache=None`` wherever a cache would hide KMS calls.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import uuid
from collections.abc import Awaitable, Sequence

import pytest
from fake_clock import FakeClock
from fault_proxy import FaultProxy
from kms_server import REGION, KmsKey, MotoKms
from moto_keyrings import shared_session

from aioenvelope import (
    CacheConfig,
    CircuitBreakerConfig,
    EnvelopeClient,
    KmsDiscoveryKeyring,
    KmsKeyring,
    MultiKeyring,
    RawAesKeyring,
    errors,
)

CONTEXT = {"purpose": "circuit-breaker-tests"}
PLAINTEXT = b"fail fast, recover by probing " * 4
OTHER_REGION = "eu-west-1"
# Room for a request the proxy holds on purpose while the other calls are refused.
DEADLINE = 5.0
# The "timeout" fault: a hung KMS, abandoned at this deadline.
HUNG_DEADLINE = 0.2
RESET_TIMEOUT = 30.0  # CircuitBreakerConfig's default
THRESHOLD = 5  # CircuitBreakerConfig's default
# "Fails fast", judged against a control timed in the same run on the same machine: the
# median refused call must take under a tenth of the median KMS round trip it replaces
# (the absolute figure, "under 1 ms", is the bench's: ``bench/run.py``, "breaker").
FAST_FAIL_RATIO = 10
CONCURRENT = 8

# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def proxy(fault_proxy: FaultProxy) -> FaultProxy:
    """conftest's fresh-per-test proxy, under the short name this module's tests use."""
    return fault_proxy


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def other_region_key(moto_kms: MotoKms) -> KmsKey:
    return moto_kms.create_key(region=OTHER_REGION)


def via_proxy(proxy: FaultProxy, generator: str, deadline: float = DEADLINE) -> KmsKeyring:
    return KmsKeyring(
        generator,
        session=shared_session(),
        region_name=REGION,
        endpoint_url=proxy.url,
        check_keys=False,
        deadline=deadline,
        max_attempts=1,
    )


def sent(proxy: FaultProxy) -> int:
    """Requests the proxy has received so far, of any KMS operation."""
    return sum(proxy.requests().values())


def missing_key_arn(key: KmsKey) -> str:
    """A well-formed key ARN in ``key``'s account and region that KMS does not know."""
    return key.arn.rsplit("/", 1)[0] + "/" + str(uuid.uuid4())


async def message_under(moto: MotoKms, key: KmsKey, context: dict[str, str] = CONTEXT) -> bytes:
    """A message made straight on moto (no proxy, no breaker): something to decrypt."""
    keyring = KmsKeyring(key.arn, session=shared_session(), endpoint_url=moto.endpoint_url)
    async with EnvelopeClient(keyring, cache=None) as writer:
        return await writer.encrypt(PLAINTEXT, encryption_context=context)


async def kms_round_trip_seconds(moto: MotoKms, key: KmsKey, count: int) -> list[float]:
    """The control for "fails fast": seconds of each of ``count`` encrypts that do reach
    KMS (moto, no proxy, no cache), timed like :func:`refused` times a refusal."""
    keyring = KmsKeyring(key.arn, session=shared_session(), endpoint_url=moto.endpoint_url)
    async with EnvelopeClient(keyring, cache=None) as client:
        await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)  # connection warm
        gc.collect()
        times = []
        for i in range(count):
            started = time.perf_counter()
            await client.encrypt(PLAINTEXT, encryption_context={"control": str(i)})
            times.append(time.perf_counter() - started)
    return times


async def encrypt_fails_transiently(client: EnvelopeClient, tag: str) -> None:
    """One encrypt (fresh context: never a cache hit) that fails as a KMS outage."""
    with pytest.raises(errors.KMSError) as info:
        await client.encrypt(PLAINTEXT, encryption_context={"call": tag})
    assert not isinstance(info.value, errors.CircuitOpenError)
    assert info.value.transient is True


async def open_breaker(
    client: EnvelopeClient, proxy: FaultProxy, threshold: int = THRESHOLD
) -> None:
    """``threshold`` transient GenerateDataKey failures in a row: the breaker opens."""
    proxy.fail_next(threshold, 500, operation="GenerateDataKey")
    for i in range(threshold):
        await encrypt_fails_transiently(client, f"opening-{i}")
    assert client.stats.breaker_states[REGION] == "open"


async def refused(call: Awaitable[object]) -> tuple[errors.CircuitOpenError, float]:
    """Await ``call``, which must fail with CircuitOpenError; the error and its seconds."""
    started = time.perf_counter()
    try:
        await call
    except errors.CircuitOpenError as exc:
        return exc, time.perf_counter() - started
    pytest.fail("the call was not refused by the open circuit breaker")


async def probe_concurrently(
    client: EnvelopeClient, proxy: FaultProxy, n: int = CONCURRENT
) -> tuple[list[bytes | BaseException], int, str]:
    """Fire ``n`` encrypts at once while the proxy holds every request it receives.

    Returns each call's outcome (ciphertext or exception), how many requests reached
    the proxy, and the breaker's state while they were held. Holding the requests keeps
    the probe in flight until every other call has been answered by the breaker, so the
    count does not depend on how fast moto replies.
    """
    before = sent(proxy)
    proxy.hang(True)
    try:
        tasks = [
            asyncio.create_task(client.encrypt(PLAINTEXT, encryption_context={"probe": str(i)}))
            for i in range(n)
        ]
        # Settled: every call has either been answered already or is held at the proxy.
        deadline = time.monotonic() + DEADLINE / 2
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            held = sent(proxy) - before
            if held + sum(t.done() for t in tasks) >= n:
                break
        held = sent(proxy) - before
        state = client.stats.breaker_states[REGION]
    finally:
        proxy.hang(False)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes, held, state


def refusals(outcomes: Sequence[object]) -> list[errors.CircuitOpenError]:
    return [o for o in outcomes if isinstance(o, errors.CircuitOpenError)]


# -- opening: consecutive outages, then fail fast without the network -----------------


@pytest.mark.parametrize("fault", ["http-500", "http-503", "throttled", "timeout"])
async def test_breaker_opens_after_five_outages_and_then_fails_fast_without_traffic(
    moto_kms: MotoKms, kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock, fault: str
) -> None:
    """The point of the breaker: once KMS is known to be down, a caller gets its 503 in
    well under a millisecond instead of a deadline's wait, and a struggling KMS gets no
    more traffic from us. Every kind of outage (5xx, throttling, a hung KMS) counts."""
    blob = await message_under(moto_kms, kms_key)
    deadline = HUNG_DEADLINE if fault == "timeout" else DEADLINE
    keyring = via_proxy(proxy, kms_key.arn, deadline=deadline)
    if fault == "http-500":
        proxy.fail_next(THRESHOLD, 500)
    elif fault == "http-503":
        proxy.fail_next(THRESHOLD, 503, error_type="ServiceUnavailableException")
    elif fault == "throttled":
        proxy.throttle_next(THRESHOLD)
    else:
        proxy.hang(True)
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        for i in range(THRESHOLD):
            await encrypt_fails_transiently(client, str(i))
            expected = "open" if i == THRESHOLD - 1 else "closed"
            assert client.stats.breaker_states[REGION] == expected
        assert sent(proxy) == THRESHOLD

        kms_calls = dict(client.stats.kms_calls)
        error, _ = await refused(client.encrypt(PLAINTEXT, encryption_context={"call": "sixth"}))
        assert error.region == REGION
        # Decrypt (cache=None: a keyring call) is refused the same way.
        await refused(client.decrypt(blob, encryption_context=CONTEXT))
        gc.collect()  # not the timed calls' business
        times = [
            (await refused(client.encrypt(PLAINTEXT, encryption_context={"n": str(i)})))[1]
            for i in range(25)
        ]
        assert sent(proxy) == THRESHOLD
        assert dict(client.stats.kms_calls) == kms_calls  # refused calls are not KMS calls
        assert client.stats.breaker_states[REGION] == "open"
    round_trips = await kms_round_trip_seconds(moto_kms, kms_key, 7)
    assert statistics.median(times) * FAST_FAIL_RATIO < statistics.median(round_trips), (
        times,
        round_trips,
    )


async def _answered_error_resets_streak(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    proxy: FaultProxy,
    clock: FakeClock,
    keyring: KmsKeyring,
    refused_blob: bytes | None,
    answer: str = "NotFoundException",
) -> None:
    """4 outages, 1 answered error (``answer``: KMS's error code), 4 outages: closed
    (and every call reached KMS); one more outage makes 5 in a row: open."""
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        proxy.fail_next(THRESHOLD - 1, 500)
        for i in range(THRESHOLD - 1):
            await encrypt_fails_transiently(client, f"before-{i}")
        if refused_blob is None:  # the generator does not exist: NotFoundException
            with pytest.raises(errors.KMSError) as kms_info:
                await client.encrypt(PLAINTEXT, encryption_context={"call": "answered"})
            assert kms_info.value.error_code == "NotFoundException"
            assert kms_info.value.transient is False
        else:
            with pytest.raises(errors.NoUsableKeyError) as keyring_info:
                await client.decrypt(refused_blob, encryption_context=CONTEXT)
            message = str(keyring_info.value)
            assert answer in message, message
        proxy.fail_next(THRESHOLD - 1, 500)
        for i in range(THRESHOLD - 1):
            await encrypt_fails_transiently(client, f"after-{i}")

        assert client.stats.breaker_states[REGION] == "closed"
        assert client.stats.breaker_transitions == 0
        assert sent(proxy) == 2 * (THRESHOLD - 1) + 1

        proxy.fail_next(1, 500)
        await encrypt_fails_transiently(client, "fifth-in-a-row")
        assert client.stats.breaker_states[REGION] == "open"
        await refused(client.encrypt(PLAINTEXT, encryption_context={"call": "refused"}))
        assert sent(proxy) == 2 * (THRESHOLD - 1) + 2


async def test_answered_not_found_does_not_count_and_resets_the_failure_streak(
    moto_kms: MotoKms, kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """An error KMS answers with (here NotFound: the key does not exist) proves KMS is
    up: it is the caller's problem, not an outage, so the breaker must not open on it,
    and must count outages again from zero after it (the streak is *consecutive*)."""
    await _answered_error_resets_streak(
        moto_kms, kms_key, proxy, clock, via_proxy(proxy, missing_key_arn(kms_key)), None
    )


@pytest.mark.parametrize("answer", ["InvalidCiphertextException", "AccessDeniedException"])
async def test_answered_decrypt_refusal_does_not_count_and_resets_the_failure_streak(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    kms_key_2: KmsKey,
    proxy: FaultProxy,
    clock: FakeClock,
    answer: str,
) -> None:
    """The same through Decrypt, where the keyring reports KMS's refusal as
    NoUsableKeyError: a corrupt EDK (InvalidCiphertext), or a key that did not make the
    EDK (moto: AccessDenied; AWS: IncorrectKey). Still answers, still not outages."""
    blob = await message_under(moto_kms, kms_key)
    if answer == "InvalidCiphertextException":
        async with EnvelopeClient(
            KmsKeyring(kms_key.arn, session=shared_session(), endpoint_url=moto_kms.endpoint_url),
            cache=None,
        ) as reader:
            (edk,) = (await reader.decrypt_with_header(blob)).header.encrypted_data_keys
        original = bytes(edk.ciphertext)
        assert blob.count(original) == 1
        blob = blob.replace(original, original[:-1] + bytes([original[-1] ^ 1]))
        keyring = via_proxy(proxy, kms_key.arn)
    else:  # an alias of another key: the keyring cannot match it locally, KMS refuses
        keyring = via_proxy(proxy, kms_key_2.alias_name)
    await _answered_error_resets_streak(moto_kms, kms_key, proxy, clock, keyring, blob, answer)


# -- recovery: one probe after reset_timeout --------------------------------------------


async def test_after_reset_timeout_one_probe_goes_out_and_its_success_closes_the_breaker(
    kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """A recovering KMS must not be hit by the whole backlog at once: of many concurrent
    calls after the timeout exactly one reaches KMS; the rest are refused at once. When
    the probe succeeds the breaker closes and traffic flows again."""
    async with EnvelopeClient(via_proxy(proxy, kms_key.arn), cache=None, clock=clock) as client:
        await open_breaker(client, proxy)
        clock.advance(RESET_TIMEOUT - 0.5)
        await refused(client.encrypt(PLAINTEXT, encryption_context={"call": "too-early"}))
        assert sent(proxy) == THRESHOLD

        clock.advance(1.0)
        outcomes, held, state_during_probe = await probe_concurrently(client, proxy)
        assert held == 1
        assert state_during_probe == "half_open"
        assert len(refusals(outcomes)) == CONCURRENT - 1
        (probe,) = [o for o in outcomes if isinstance(o, bytes)]
        index = outcomes.index(probe)
        assert await client.decrypt(probe, encryption_context={"probe": str(index)}) == PLAINTEXT

        assert client.stats.breaker_states[REGION] == "closed"
        before = sent(proxy)
        for i in range(3):
            await client.encrypt(PLAINTEXT, encryption_context={"after": str(i)})
        assert sent(proxy) == before + 3


async def test_a_failed_probe_reopens_the_breaker_for_another_reset_timeout(
    kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """A probe that meets the outage proves KMS is still down: the breaker opens again
    for a full reset_timeout from the probe (not from the first opening), with the
    same single-probe rule at its end."""
    async with EnvelopeClient(via_proxy(proxy, kms_key.arn), cache=None, clock=clock) as client:
        await open_breaker(client, proxy)
        clock.advance(RESET_TIMEOUT + 1.0)
        proxy.fail_next(1, 500)
        outcomes, held, state_during_probe = await probe_concurrently(client, proxy)
        assert held == 1
        assert state_during_probe == "half_open"
        assert len(refusals(outcomes)) == CONCURRENT - 1
        (probe_error,) = [o for o in outcomes if not isinstance(o, errors.CircuitOpenError)]
        assert isinstance(probe_error, errors.KMSError)
        assert probe_error.transient is True
        assert client.stats.breaker_states[REGION] == "open"

        error, _ = await refused(client.encrypt(PLAINTEXT, encryption_context={"call": "x"}))
        assert error.retry_after == pytest.approx(RESET_TIMEOUT, abs=0.5)
        clock.advance(RESET_TIMEOUT - 1.0)
        await refused(client.encrypt(PLAINTEXT, encryption_context={"call": "y"}))
        assert sent(proxy) == THRESHOLD + 1

        clock.advance(2.0)
        outcomes, held, _ = await probe_concurrently(client, proxy)
        assert held == 1
        assert len(refusals(outcomes)) == CONCURRENT - 1
        assert sum(isinstance(o, bytes) for o in outcomes) == 1
        assert client.stats.breaker_states[REGION] == "closed"


async def test_breaker_transitions_count_every_state_change(
    kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """``breaker_transitions`` is what an operator alerts on (a flapping KMS), so each
    change counts once: closed->open, open->half_open, half_open->open, again to
    half_open, then closed. Refused calls and the failures before opening are not
    changes. A stats snapshot is frozen: later changes do not show up in it."""
    async with EnvelopeClient(via_proxy(proxy, kms_key.arn), cache=None, clock=clock) as client:
        await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert client.stats.breaker_states[REGION] == "closed"
        assert client.stats.breaker_transitions == 0

        await open_breaker(client, proxy)
        opened = client.stats
        assert opened.breaker_transitions == 1
        await refused(client.encrypt(PLAINTEXT, encryption_context={"call": "refused"}))
        assert client.stats.breaker_transitions == 1

        clock.advance(RESET_TIMEOUT)
        proxy.fail_next(1, 500)
        await encrypt_fails_transiently(client, "failed-probe")  # open->half_open->open
        assert client.stats.breaker_states[REGION] == "open"
        assert client.stats.breaker_transitions == 3

        clock.advance(RESET_TIMEOUT)
        await client.encrypt(PLAINTEXT, encryption_context={"call": "good-probe"})
        assert client.stats.breaker_states[REGION] == "closed"
        assert client.stats.breaker_transitions == 5
        assert opened.breaker_transitions == 1
        assert opened.breaker_states[REGION] == "open"


# -- caches keep serving while KMS is down ----------------------------------------------


async def test_cached_data_key_still_decrypts_while_the_breaker_is_open(
    moto_kms: MotoKms, kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """The breaker guards KMS calls, not decryption: a message whose data key is cached
    needs no KMS, so it must keep decrypting through an outage (with no traffic), while
    a message that needs KMS is refused."""
    uncached = await message_under(moto_kms, kms_key, {"other": "message"})
    async with EnvelopeClient(
        via_proxy(proxy, kms_key.arn), cache=CacheConfig(), clock=clock
    ) as client:
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
        await open_breaker(client, proxy)

        before, hits = sent(proxy), client.stats.decrypt_cache_hits
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
        assert client.stats.decrypt_cache_hits == hits + 1
        await refused(client.decrypt(uncached, encryption_context={"other": "message"}))
        assert sent(proxy) == before
        assert client.stats.breaker_states[REGION] == "open"


async def test_reused_data_key_still_encrypts_while_the_breaker_is_open(
    kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """Likewise for encryption: a context whose data key is cached for reuse encrypts
    without KMS through the outage; a new context needs GenerateDataKey and is refused.
    A *new* message under the reused key then decrypts from the decrypt cache too (same
    EDKs), once one message of that key was decrypted while KMS was up (encrypting does
    not fill the decrypt cache, as in the ESDK)."""
    async with EnvelopeClient(
        via_proxy(proxy, kms_key.arn), cache=CacheConfig(), clock=clock
    ) as client:
        first = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(first, encryption_context=CONTEXT) == PLAINTEXT
        await open_breaker(client, proxy)

        before = sent(proxy)
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        await refused(client.encrypt(PLAINTEXT, encryption_context={"new": "context"}))
        assert sent(proxy) == before
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT


# -- configuration ------------------------------------------------------------------------


async def test_custom_failure_threshold_and_reset_timeout_are_honoured(
    kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """A deployment tuning the breaker must get what it asked for: open after 2, probe
    after 5 s (not the defaults' 5 and 30 s)."""
    config = CircuitBreakerConfig(failure_threshold=2, reset_timeout=5)
    async with EnvelopeClient(
        via_proxy(proxy, kms_key.arn), cache=None, clock=clock, circuit_breaker=config
    ) as client:
        proxy.fail_next(2, 500)
        await encrypt_fails_transiently(client, "1")
        assert client.stats.breaker_states[REGION] == "closed"
        await encrypt_fails_transiently(client, "2")
        assert client.stats.breaker_states[REGION] == "open"

        error, _ = await refused(client.encrypt(PLAINTEXT, encryption_context={"n": "3"}))
        assert 0 < error.retry_after <= 5
        clock.advance(4.9)
        await refused(client.encrypt(PLAINTEXT, encryption_context={"n": "4"}))
        assert sent(proxy) == 2

        clock.advance(0.2)
        await client.encrypt(PLAINTEXT, encryption_context={"n": "probe"})
        assert sent(proxy) == 3
        assert client.stats.breaker_states[REGION] == "closed"


async def test_without_a_circuit_breaker_every_call_reaches_kms(
    kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """``circuit_breaker=None`` switches it off: however long the outage, every call is
    tried (and fails with the KMS error itself), and KMS is used as soon as it is back."""
    failures = 4 * THRESHOLD
    async with EnvelopeClient(
        via_proxy(proxy, kms_key.arn), cache=None, clock=clock, circuit_breaker=None
    ) as client:
        proxy.fail_next(failures, 500)
        for i in range(failures):
            await encrypt_fails_transiently(client, str(i))
        assert sent(proxy) == failures
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
        assert sent(proxy) == failures + 2
        stats = client.stats
    assert stats.breaker_transitions == 0
    assert "open" not in stats.breaker_states.values()


async def test_breaker_is_per_region(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    proxy: FaultProxy,
    clock: FakeClock,
    other_region_key: KmsKey,
) -> None:
    """An outage of KMS in one region says nothing about another: with us-west-2 open,
    a message under a key in eu-west-1 still decrypts through the same client."""
    here = await message_under(moto_kms, kms_key)
    there = await message_under(moto_kms, other_region_key)
    keyring = KmsDiscoveryKeyring(
        session=shared_session(),
        endpoint_url=proxy.url,
        deadline=DEADLINE,
        max_attempts=1,
        regions=[REGION, OTHER_REGION],  # discovery calls only regions it is told to
    )
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KMSError) as info:
                await client.decrypt(here, encryption_context=CONTEXT)
            assert info.value.transient is True
        error, _ = await refused(client.decrypt(here, encryption_context=CONTEXT))
        assert error.region == REGION

        assert await client.decrypt(there, encryption_context=CONTEXT) == PLAINTEXT
        assert dict(client.stats.breaker_states) == {REGION: "open", OTHER_REGION: "closed"}


async def test_open_region_is_skipped_for_a_message_also_wrapped_in_another_region(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    proxy: FaultProxy,
    clock: FakeClock,
    other_region_key: KmsKey,
) -> None:
    """Wrapping a data key under keys in two regions is how users survive a regional
    KMS outage: with us-west-2's breaker open, decrypt must go on to the eu-west-1 EDK
    (one request, to eu-west-1) instead of failing on the refused first one."""
    here = await message_under(moto_kms, kms_key)
    writer = KmsKeyring(
        kms_key.arn,
        additional_key_ids=[other_region_key.arn],
        session=shared_session(),
        endpoint_url=moto_kms.endpoint_url,
    )
    async with EnvelopeClient(writer, cache=None) as write:
        both = await write.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    keyring = KmsDiscoveryKeyring(
        session=shared_session(),
        endpoint_url=proxy.url,
        deadline=DEADLINE,
        max_attempts=1,
        regions=[REGION, OTHER_REGION],  # discovery calls only regions it is told to
    )
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KMSError) as info:
                await client.decrypt(here, encryption_context=CONTEXT)
            assert not isinstance(info.value, errors.CircuitOpenError)
            assert info.value.transient is True
        assert client.stats.breaker_states[REGION] == "open"

        before = sent(proxy)
        assert await client.decrypt(both, encryption_context=CONTEXT) == PLAINTEXT
        assert sent(proxy) == before + 1
        assert dict(client.stats.breaker_states) == {REGION: "open", OTHER_REGION: "closed"}


async def test_multi_keyring_falls_back_to_a_raw_key_while_its_kms_child_is_refused(
    moto_kms: MotoKms, kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """A raw key kept beside KMS as a break-glass path must work exactly when KMS does
    not: with the KMS child's breaker open, the MultiKeyring goes on to the next child."""
    backup = RawAesKeyring("break-glass", "backup-1", bytes(range(32)))
    writer = MultiKeyring(
        KmsKeyring(kms_key.arn, session=shared_session(), endpoint_url=moto_kms.endpoint_url),
        [backup],
    )
    async with EnvelopeClient(writer, cache=None) as write:
        message = await write.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    reader = MultiKeyring(via_proxy(proxy, kms_key.arn), [backup])
    async with EnvelopeClient(reader, cache=None, clock=clock) as client:
        proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
        for _ in range(THRESHOLD):  # KMS fails transiently; the raw child answers
            assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        assert client.stats.breaker_states[REGION] == "open"
        before = sent(proxy)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        assert sent(proxy) == before  # refused at once, no request


async def test_multi_keyring_says_try_later_not_wrong_key_when_kms_could_not_be_asked(
    moto_kms: MotoKms, kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """If the only child that could hold the key is unavailable, the answer is the
    outage (CircuitOpenError, a 503), not NoUsableKeyError (which reads as a bad key)."""
    message = await message_under(moto_kms, kms_key)
    other = RawAesKeyring("elsewhere", "k", bytes(32))
    reader = MultiKeyring(via_proxy(proxy, kms_key.arn), [other])
    async with EnvelopeClient(reader, cache=None, clock=clock) as client:
        proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KMSError) as info:
                await client.decrypt(message, encryption_context=CONTEXT)
            assert info.value.transient
        await refused(client.decrypt(message, encryption_context=CONTEXT))


# -- what the caller is told --------------------------------------------------------------


async def test_circuit_open_error_says_where_when_to_retry_and_what_to_do(
    kms_key: KmsKey, proxy: FaultProxy, clock: FakeClock
) -> None:
    """A web handler turns the refusal into HTTP 503 with Retry-After, so the error must
    carry the region and a retry_after that counts down to the probe, and its message
    must tell a human reading a log what happened and what to do."""
    async with EnvelopeClient(via_proxy(proxy, kms_key.arn), cache=None, clock=clock) as client:
        await open_breaker(client, proxy)
        error, _ = await refused(client.encrypt(PLAINTEXT, encryption_context=CONTEXT))
        assert isinstance(error, errors.EnvelopeError)
        assert error.region == REGION
        assert 0 < error.retry_after <= RESET_TIMEOUT
        assert error.retry_after == pytest.approx(RESET_TIMEOUT, abs=0.5)

        clock.advance(10.0)
        later, _ = await refused(client.encrypt(PLAINTEXT, encryption_context=CONTEXT))
        assert later.retry_after == pytest.approx(RESET_TIMEOUT - 10.0, abs=0.5)
        message = str(later)
        assert REGION in message
        assert "retry" in message.lower() or "try again" in message.lower(), message


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", 0),
        ("failure_threshold", -1),
        ("reset_timeout", 0.0),
        ("reset_timeout", -1.0),
        ("reset_timeout", float("nan")),
    ],
)
def test_invalid_circuit_breaker_config_is_a_configuration_error_naming_the_field(
    field: str, value: float
) -> None:
    """A breaker that never opens (threshold 0) or never probes again (no positive
    reset timeout) is refused when configured, with the rule the field broke."""
    rule = {
        "failure_threshold": f"failure_threshold must be >= 1, not {value}: it is how many "
        "consecutive transient failures open the breaker",
        "reset_timeout": f"reset_timeout must be > 0 seconds, not {value}: it is how long "
        "the breaker stays open before one probe is let through",
    }
    with pytest.raises(errors.ConfigurationError) as info:
        CircuitBreakerConfig(**{field: value})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert str(info.value) == rule[field]


def test_circuit_breaker_config_defaults_are_five_failures_and_thirty_seconds() -> None:
    """The figures the module's tests (THRESHOLD, RESET_TIMEOUT) and the README rely on."""
    config = CircuitBreakerConfig()
    assert (config.failure_threshold, config.reset_timeout) == (THRESHOLD, RESET_TIMEOUT)
    assert CircuitBreakerConfig(failure_threshold=1, reset_timeout=0.001).failure_threshold == 1
