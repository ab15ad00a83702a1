"""KMS under stress: throttling, server errors, a hung KMS, and a 10,000-call burst.

moto never misbehaves, so these tests put :class:`fault_proxy.FaultProxy` between the
keyring and moto and make it throttle, fail or hang. Everything goes through the public
API (``EnvelopeClient`` over a ``KmsKeyring``) and botocore's real retry logic. The keys
are named by ARN with ``check_keys=False`` where a start-up DescribeKey would use up a
fault meant for the data-key call.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from fault_proxy import FaultProxy
from kms_server import KmsKey, MotoKms
from task_leaks import other_tasks

from aioenvelope import EnvelopeClient, KmsKeyring, errors

CONTEXT = {"purpose": "fault-tests"}
# Long enough that botocore's jittered backoff (up to 1 s, 2 s, 4 s ... per retry) never
# meets it, so the retry tests test retries and not the deadline (and the burst test,
# sharing and not speed).
RETRY_DEADLINE = 30.0
HUNG_DEADLINE = 0.5
# "Not later than the deadline": generous slack for a loaded CI box, not a perf figure.
DEADLINE_SLACK = 1.0
BURST = 10_000


def proxied_keyring(proxy: FaultProxy, key: KmsKey, **kwargs: Any) -> KmsKeyring:
    options: dict[str, Any] = {"check_keys": False, "deadline": RETRY_DEADLINE}
    options.update(kwargs)
    return KmsKeyring(key.arn, endpoint_url=proxy.url, **options)


@contextlib.contextmanager
def no_unclosed_resources(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail if anything in the block leaves a session, connector or socket to the GC.

    aiohttp reports an unclosed session both as a ResourceWarning and through the
    loop's exception handler (the ``asyncio`` logger), so both are watched.
    """
    caplog.set_level(logging.ERROR, logger="asyncio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    leaks = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) or "nclosed" in str(w.message)
    ]
    leaks += [r.getMessage() for r in caplog.records if "nclosed" in r.getMessage()]
    assert leaks == []


# ---------------------------------------------------------------------------------------
# Retries: botocore retries, we count one call
# ---------------------------------------------------------------------------------------


async def test_throttled_generate_data_key_is_retried_until_it_succeeds(
    fault_proxy: FaultProxy, kms_key: KmsKey
) -> None:
    """Throttling is KMS's normal answer to a burst: botocore must absorb it, and our
    call count must show one logical call, not three."""
    keyring = proxied_keyring(fault_proxy, kms_key)
    fault_proxy.throttle_next(2)
    async with EnvelopeClient(keyring) as client:
        blob = await client.encrypt(b"throttled once or twice", encryption_context=CONTEXT)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == (
            b"throttled once or twice"
        )
    assert fault_proxy.requests()["GenerateDataKey"] == 3
    assert keyring.kms_calls["GenerateDataKey"] == 1


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(500, "KMSInternalException"), (503, "DependencyTimeoutException")],
)
async def test_server_error_is_retried_until_it_succeeds(
    fault_proxy: FaultProxy, kms_key: KmsKey, status: int, error_type: str
) -> None:
    """A 5xx says nothing about the request, so it is retried like throttling."""
    keyring = proxied_keyring(fault_proxy, kms_key)
    fault_proxy.fail_next(2, status, error_type=error_type)
    async with EnvelopeClient(keyring) as client:
        blob = await client.encrypt(b"after a 5xx", encryption_context=CONTEXT)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == b"after a 5xx"
    assert fault_proxy.requests()["GenerateDataKey"] == 3
    assert keyring.kms_calls["GenerateDataKey"] == 1


@pytest.mark.parametrize(
    ("fault", "error_code"),
    [("throttle", "ThrottlingException"), ("fail", "KMSInternalException")],
)
async def test_a_fault_outlasting_the_retries_is_a_transient_kms_error(
    fault_proxy: FaultProxy, kms_key: KmsKey, fault: str, error_code: str
) -> None:
    """When retries run out the caller gets one KMSError that says which call, which key
    and why, and that it is transient (an outage, worth retrying later)."""
    keyring = proxied_keyring(fault_proxy, kms_key, max_attempts=2)
    if fault == "throttle":
        fault_proxy.throttle_next(100)
    else:
        fault_proxy.fail_next(100)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.KMSError) as info:
            await client.encrypt(b"never", encryption_context=CONTEXT)
    error = info.value
    assert not isinstance(error, errors.KMSTimeoutError)
    assert error.error_code == error_code
    assert error.transient is True
    assert error.operation == "GenerateDataKey"
    assert error.key_id == kms_key.arn
    assert "GenerateDataKey" in str(error)
    assert kms_key.arn in str(error)
    assert keyring.kms_calls["GenerateDataKey"] == 1


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_max_attempts_counts_the_first_attempt(
    fault_proxy: FaultProxy, kms_key: KmsKey, max_attempts: int
) -> None:
    """``max_attempts`` is documented as botocore's standard-mode attempts, first one
    included (``max_attempts=1``: no retry), so KMS must see exactly that many requests."""
    keyring = proxied_keyring(fault_proxy, kms_key, max_attempts=max_attempts)
    fault_proxy.throttle_next(100)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.KMSError) as info:
            await client.encrypt(b"never", encryption_context=CONTEXT)
    assert type(info.value) is errors.KMSError
    assert info.value.error_code == "ThrottlingException"
    assert str(info.value) == (
        f"KMS GenerateDataKey with key {kms_key.arn} failed with ThrottlingException: Rate exceeded"
    )
    assert fault_proxy.requests()["GenerateDataKey"] == max_attempts


async def test_a_failing_additional_key_is_a_kms_error_naming_that_key(
    fault_proxy: FaultProxy, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """Additional keys are wrapped in parallel; a failure there must still reach the
    caller as the library's KMSError for that key, not as a task-group wrapper."""
    keyring = KmsKeyring(
        kms_key.arn,
        additional_key_ids=[kms_key_2.arn],
        endpoint_url=fault_proxy.url,
        check_keys=False,
        deadline=RETRY_DEADLINE,
        max_attempts=1,
    )
    fault_proxy.fail_next(100, operation="Encrypt")
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.KMSError) as info:
            await client.encrypt(b"never", encryption_context=CONTEXT)
    assert type(info.value) is errors.KMSError
    assert info.value.operation == "Encrypt"
    assert info.value.key_id == kms_key_2.arn
    assert info.value.error_code == "KMSInternalException"
    assert info.value.transient is True


def assert_describe_key_timed_out(error: errors.KMSTimeoutError, key: KmsKey) -> None:
    """The start-up check's timeout: which call, which key, how long, and transient."""
    assert error.operation == "DescribeKey"
    assert error.key_id == key.arn
    assert error.error_code == "Timeout"
    assert error.transient is True
    assert str(error) == (
        f"KMS DescribeKey with key {key.arn} did not finish within {HUNG_DEADLINE:g} s "
        "(retries included)"
    )


# ---------------------------------------------------------------------------------------
# A KMS that never answers: the deadline holds
# ---------------------------------------------------------------------------------------


async def test_a_hung_kms_fails_at_the_deadline_and_leaves_nothing_behind(
    fault_proxy: FaultProxy, kms_key: KmsKey, caplog: pytest.LogCaptureFixture
) -> None:
    """A KMS that accepts and never answers must cost a caller the deadline, not a
    socket timeout times the retries; the abandoned request must not leave a task or
    a connection behind, and the client must work again once KMS does."""
    before = other_tasks()
    with no_unclosed_resources(caplog):
        keyring = proxied_keyring(fault_proxy, kms_key, deadline=HUNG_DEADLINE)
        async with EnvelopeClient(keyring) as client:
            fault_proxy.hang(True)
            started = time.monotonic()
            with pytest.raises(errors.KMSTimeoutError) as info:
                await client.encrypt(b"never", encryption_context=CONTEXT)
            elapsed = time.monotonic() - started
            assert other_tasks() - before == set()
            fault_proxy.hang(False)
            blob = await client.encrypt(b"after the outage", encryption_context=CONTEXT)
            assert await client.decrypt(blob, encryption_context=CONTEXT) == (b"after the outage")
    assert elapsed < HUNG_DEADLINE + DEADLINE_SLACK
    assert info.value.operation == "GenerateDataKey"
    assert info.value.key_id == kms_key.arn
    assert info.value.transient is True
    assert other_tasks() - before == set()


async def test_start_up_check_against_a_hung_kms_fails_the_entry_within_the_deadline(
    fault_proxy: FaultProxy, kms_key: KmsKey
) -> None:
    """``async with EnvelopeClient`` must not hang with KMS: the DescribeKey check fails
    the entry with a library error at the deadline, and says it was a timeout (an
    outage to wait out, not a key to fix)."""
    keyring = proxied_keyring(fault_proxy, kms_key, check_keys=True, deadline=HUNG_DEADLINE)
    fault_proxy.hang(True)
    started = time.monotonic()
    with pytest.raises(errors.KMSTimeoutError) as info:
        async with EnvelopeClient(keyring):
            pytest.fail("the client opened although DescribeKey never answered")
    elapsed = time.monotonic() - started
    assert elapsed < HUNG_DEADLINE + DEADLINE_SLACK
    assert_describe_key_timed_out(info.value, kms_key)
    assert fault_proxy.requests()["DescribeKey"] >= 1


async def test_a_failed_start_up_leaves_no_client_open_and_can_be_retried(
    fault_proxy: FaultProxy, kms_key: KmsKey, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failed entry nothing may stay open (no task, no connection), and the
    same keyring must open cleanly in a new EnvelopeClient once KMS answers again."""
    before = other_tasks()
    with no_unclosed_resources(caplog):
        keyring = proxied_keyring(fault_proxy, kms_key, check_keys=True, deadline=HUNG_DEADLINE)
        fault_proxy.hang(True)
        entered = False
        with pytest.raises(errors.KMSTimeoutError) as info:
            async with EnvelopeClient(keyring):
                entered = True
        assert entered is False
        assert_describe_key_timed_out(info.value, kms_key)
        assert other_tasks() - before == set()
        fault_proxy.hang(False)
        async with EnvelopeClient(keyring) as client:
            blob = await client.encrypt(b"second try", encryption_context=CONTEXT)
            assert await client.decrypt(blob, encryption_context=CONTEXT) == b"second try"
    assert other_tasks() - before == set()
    assert keyring.kms_calls["DescribeKey"] == 2


# ---------------------------------------------------------------------------------------
# A burst: 10,000 concurrent encrypts over one client
# ---------------------------------------------------------------------------------------


async def test_ten_thousand_concurrent_encrypts_share_one_client_cleanly(
    moto_kms: MotoKms, kms_key: KmsKey, caplog: pytest.LogCaptureFixture
) -> None:
    """One long-lived client must carry a burst far above its connection pool: every
    call waits for a connection, none fails, and closing leaves no task or socket.

    The claim is clean sharing, not speed: moto runs in this process and answers the
    32 pooled requests in turn, so on a loaded 2-core VM one request can take seconds.
    Each call gets the retry tests' 30 s deadline instead of the default 2 s, so only a
    call that never completes (a lost wake-up, a leaked connection) fails here."""
    before = other_tasks()
    with no_unclosed_resources(caplog):
        keyring = KmsKeyring(
            kms_key.arn, endpoint_url=moto_kms.endpoint_url, deadline=RETRY_DEADLINE
        )
        async with EnvelopeClient(keyring) as client:
            blobs = await asyncio.gather(
                *(
                    client.encrypt(b"message %d" % i, encryption_context={"n": str(i)})
                    for i in range(BURST)
                )
            )
            for i in range(0, BURST, BURST // 20):
                plaintext = await client.decrypt(blobs[i], encryption_context={"n": str(i)})
                assert plaintext == b"message %d" % i
    assert len(blobs) == BURST
    assert len(set(blobs)) == BURST
    assert keyring.kms_calls["GenerateDataKey"] == BURST
    assert other_tasks() - before == set()
