"""The KMS keyrings' client options, seen from the wire: ``grant_tokens``, ``retry_mode``
(with ``max_attempts``) and ``max_connections``.

The keyrings talk to moto through :class:`fault_proxy.FaultProxy`, which records every
request (operation, botocore's ``amz-sdk-request`` retry header, JSON body), injects
error answers and slow responses, and counts the requests it is handling at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fault_proxy import FaultProxy, wait_for
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_discovery_keyring, moto_kms_keyring

from aioenvelope import EnvelopeClient, KmsDiscoveryKeyring, KmsKeyring, errors

CONTEXT = {"tenant": "t1", "purpose": "kms-client-options"}
PLAINTEXT = b"options on the wire " * 5
GRANT_TOKENS = ["grant-token-1", "grant-token-2"]
# Long enough that botocore's jittered backoff (up to 1 s before a first retry) never
# meets it: the retry tests test retries, not the deadline.
RETRY_DEADLINE = 30.0


def via(fault_proxy: FaultProxy, moto_kms: MotoKms, key: KmsKey, **options: Any) -> KmsKeyring:
    return moto_kms_keyring(moto_kms, key.arn, endpoint_url=fault_proxy.url, **options)


async def message_under(moto_kms: MotoKms, key: KmsKey) -> bytes:
    """A message made straight on moto (no proxy): something to decrypt."""
    async with EnvelopeClient(moto_kms_keyring(moto_kms, key.arn)) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)


# -- grant_tokens ------------------------------------------------------------------------


async def test_grant_tokens_go_with_every_kms_request_of_a_keyring(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey, fault_proxy: FaultProxy
) -> None:
    """A new grant is eventually consistent, so its token must go with every call: the
    start-up DescribeKey of each key, GenerateDataKey, Encrypt under the additional key
    and Decrypt all carry the tokens, as given and in order."""
    keyring = via(
        fault_proxy,
        moto_kms,
        kms_key,
        additional_key_ids=[kms_key_2.arn],
        grant_tokens=GRANT_TOKENS,
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    received = fault_proxy.received()
    assert sorted(r.operation for r in received) == [
        "Decrypt",
        "DescribeKey",
        "DescribeKey",
        "Encrypt",
        "GenerateDataKey",
    ]
    assert [r.body["GrantTokens"] for r in received] == [GRANT_TOKENS] * 5


async def test_a_discovery_keyring_sends_its_grant_tokens_with_decrypt(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    message = await message_under(moto_kms, kms_key)
    keyring = moto_kms_discovery_keyring(
        moto_kms, endpoint_url=fault_proxy.url, grant_tokens=GRANT_TOKENS
    )
    async with EnvelopeClient(keyring) as client:
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    (decrypt,) = fault_proxy.received()
    assert (decrypt.operation, decrypt.body["GrantTokens"]) == ("Decrypt", GRANT_TOKENS)


async def test_without_grant_tokens_kms_gets_an_empty_list(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    async with EnvelopeClient(via(fault_proxy, moto_kms, kms_key), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    received = fault_proxy.received()
    assert [r.operation for r in received] == ["DescribeKey", "GenerateDataKey", "Decrypt"]
    assert [r.body["GrantTokens"] for r in received] == [[], [], []]


# -- retry_mode and max_attempts ---------------------------------------------------------


@pytest.mark.parametrize("retry_mode", [None, "standard", "adaptive"])
async def test_standard_and_adaptive_retry_modes_retry_a_limit_exceeded_answer(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy, retry_mode: str | None
) -> None:
    """botocore's standard mode (the default) and adaptive mode count a 400
    LimitExceededException as throttling and retry it: two GenerateDataKey requests,
    the second marked as attempt 2 of ``max_attempts``."""
    options: dict[str, Any] = {"check_keys": False, "deadline": RETRY_DEADLINE}
    if retry_mode is not None:
        options["retry_mode"] = retry_mode
    keyring = via(fault_proxy, moto_kms, kms_key, max_attempts=3, **options)
    fault_proxy.fail_next(1, 400, error_type="LimitExceededException", operation="GenerateDataKey")
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    async with EnvelopeClient(moto_kms_keyring(moto_kms, kms_key.arn)) as reader:
        assert await reader.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    first, second = fault_proxy.received("GenerateDataKey")
    assert first.sdk_request == "attempt=1"
    assert second.sdk_request is not None
    assert second.sdk_request.endswith("; attempt=2; max=3")
    assert keyring.kms_calls["GenerateDataKey"] == 1


async def test_legacy_retry_mode_does_not_retry_a_limit_exceeded_answer(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """botocore's legacy mode knows LimitExceededException only as an HTTP 509: a 400
    one is not retried, and comes back at once as a transient KMSError."""
    keyring = via(
        fault_proxy,
        moto_kms,
        kms_key,
        check_keys=False,
        deadline=RETRY_DEADLINE,
        retry_mode="legacy",
        max_attempts=3,
    )
    fault_proxy.fail_next(1, 400, error_type="LimitExceededException", operation="GenerateDataKey")
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.KMSError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert type(info.value) is errors.KMSError
    assert (info.value.operation, info.value.error_code, info.value.transient) == (
        "GenerateDataKey",
        "LimitExceededException",
        True,
    )
    assert [r.sdk_request for r in fault_proxy.received("GenerateDataKey")] == ["attempt=1"]


@pytest.mark.parametrize("keyring_type", [KmsKeyring, KmsDiscoveryKeyring])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_mode": "Standard"}, "retry_mode must be 'standard', 'adaptive' or 'legacy'"),
        ({"retry_mode": ""}, "retry_mode must be 'standard', 'adaptive' or 'legacy'"),
        ({"max_attempts": 0}, "max_attempts and max_connections must be at least 1"),
        ({"max_connections": 0}, "max_attempts and max_connections must be at least 1"),
        ({"deadline": 0}, "deadline must be a positive number of seconds"),
    ],
    ids=["capitalised-mode", "empty-mode", "no-attempts", "no-connections", "no-deadline"],
)
def test_client_options_are_checked_when_the_keyring_is_made(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    keyring_type: type[KmsKeyring | KmsDiscoveryKeyring],
    options: dict[str, Any],
    message: str,
) -> None:
    """A bad option fails at construction (ConfigurationError, a ValueError), not at the
    first call in production."""
    if keyring_type is KmsKeyring:
        with pytest.raises(errors.ConfigurationError) as info:
            moto_kms_keyring(moto_kms, kms_key.arn, **options)
    else:
        with pytest.raises(errors.ConfigurationError) as info:
            moto_kms_discovery_keyring(moto_kms, **options)
    assert str(info.value) == message


# -- max_connections ---------------------------------------------------------------------

# More than botocore's default pool of 10 connections: all in flight at once only if
# the client's pool is max_connections large.
CONCURRENT = 12


@pytest.mark.parametrize(("max_connections", "in_flight"), [(3, 3), (32, CONCURRENT)])
async def test_max_connections_caps_the_requests_in_flight_per_region(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    fault_proxy: FaultProxy,
    max_connections: int,
    in_flight: int,
) -> None:
    """Twelve concurrent uncached decrypts while KMS holds every request: ``max_connections``
    of them reach KMS, the rest wait their turn (and all succeed once KMS answers); with
    room for all twelve (the default 32), all twelve are in flight at once."""
    message = await message_under(moto_kms, kms_key)
    keyring = via(
        fault_proxy,
        moto_kms,
        kms_key,
        check_keys=False,
        deadline=RETRY_DEADLINE,
        max_connections=max_connections,
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        fault_proxy.hang(True)
        try:
            calls = [
                asyncio.create_task(client.decrypt(message, encryption_context=CONTEXT))
                for _ in range(CONCURRENT)
            ]
            await wait_for(
                lambda: fault_proxy.requests().get("Decrypt", 0) >= in_flight, "the first calls"
            )
            await asyncio.sleep(0.2)  # room for a request over the cap to arrive
            assert fault_proxy.requests()["Decrypt"] == in_flight
        finally:
            fault_proxy.hang(False)
        assert await asyncio.gather(*calls) == [PLAINTEXT] * CONCURRENT
    assert fault_proxy.requests()["Decrypt"] == CONCURRENT
    assert fault_proxy.most_in_flight() == in_flight


# The README: "A burst waits for one of max_connections connections before its deadline
# starts". One connection, two calls, each request answered after 55% of the deadline:
# the second call ends 110% of a deadline after it began, which is fine only if its
# waiting for the connection did not count. The margins (45% of the deadline for moto
# to answer, 10% by which the old behaviour would miss) are seconds, not milliseconds.
DEADLINE = 3.0
SLOW = 0.55 * DEADLINE


async def test_a_call_waiting_for_a_connection_still_gets_its_whole_deadline(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    message = await message_under(moto_kms, kms_key)
    keyring = via(
        fault_proxy, moto_kms, kms_key, check_keys=False, deadline=DEADLINE, max_connections=1
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        fault_proxy.slow_next(2, SLOW, operation="Decrypt")
        started = time.monotonic()
        results = await asyncio.gather(
            client.decrypt(message, encryption_context=CONTEXT),
            client.decrypt(message, encryption_context=CONTEXT),
        )
        took = time.monotonic() - started
    assert list(results) == [PLAINTEXT, PLAINTEXT]
    assert fault_proxy.most_in_flight() == 1
    assert fault_proxy.requests() == {"Decrypt": 2}
    assert took > DEADLINE  # the scenario happened: the second call outlived a deadline
