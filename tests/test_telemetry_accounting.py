"""Telemetry's accounting of key-service calls: attempts are requests sent, and a refusal
the caller expects is logged at DEBUG.

``aioenvelope.attempts`` is documented as the requests sent for a call, retries included
(0 when refused before sending); docs/observability.md promises nothing at INFO or above
per message. Each test here pins one case where the two once disagreed with what went on
the wire or into the log: a KMS call that never left the process, a deadline that fell
in botocore's pause between retries, a Vault AppRole login counted as an attempt of the
transit call that needed the token, a discovery keyring logging a WARNING for every
message carrying a key it may not use, and creating a branch key table logging the
DescribeTable "not found" it expects. KMS and DynamoDB are the real moto server behind
the fault proxy, Vault the real dev server; what is counted is what the proxy received
or what the keyring says it sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aioboto3
import pytest
from fake_clock import FakeClock
from fault_proxy import FaultProxy
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_discovery_keyring, moto_kms_keyring, shared_session
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from otel_support import Otel, attributes_of
from vault_server import VaultServer

from aioenvelope import (
    AppRoleAuth,
    BranchKeyStore,
    EnvelopeClient,
    KmsKeyring,
    RateLimit,
    VaultTransitKeyring,
    errors,
)

PLAINTEXT = b"x" * 100
TRANSIT_POLICY = 'path "transit/*" { capabilities = ["update", "read"] }\n'


def client_spans(otel: Otel) -> list[ReadableSpan]:
    """The key-service calls' spans, oldest first."""
    return [s for s in otel.spans() if s.kind is SpanKind.CLIENT]


def failure_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The library's key-service failure lines (those carrying an error code)."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("aioenvelope") and hasattr(r, "aioenvelope_error_code")
    ]


def loud_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The library's log lines at ``level`` or above, as text for an assertion message."""
    return [
        f"{r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("aioenvelope") and r.levelno >= level
    ]


# -- refusals the caller expects: DEBUG, not WARNING --------------------------------------


async def test_a_discovery_keyring_logs_no_warning_per_message_for_keys_it_may_not_use(
    moto_kms: MotoKms, fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages wrapped under keys A and B, read by a service that may use only B: every
    decrypt of a new message asks KMS about A first and is refused. That refusal is the
    normal course of a discovery keyring, not an outage, so it must not log a WARNING per
    message (an application decrypting such messages would flood its log); it is still
    logged, at DEBUG, naming A and the error code, and the decrypt succeeds through B."""
    key_a = moto_kms.create_key()
    key_b = moto_kms.create_key()
    writer = KmsKeyring(
        key_a.arn,
        additional_key_ids=[key_b.arn],
        session=shared_session(),
        endpoint_url=moto_kms.endpoint_url,
        region_name=moto_kms.region,
        check_keys=False,
    )
    async with EnvelopeClient(writer, cache=None) as client:
        messages = [
            await client.encrypt(PLAINTEXT, encryption_context={"n": str(i)}) for i in range(5)
        ]

    caplog.set_level(logging.DEBUG, logger="aioenvelope")
    reader = moto_kms_discovery_keyring(moto_kms, endpoint_url=fault_proxy.url)
    async with EnvelopeClient(reader) as client:
        caplog.clear()
        for message in messages:
            fault_proxy.refuse_next(1, "AccessDeniedException", operation="Decrypt")  # A's
            assert await client.decrypt(message) == PLAINTEXT

    assert loud_records(caplog, logging.INFO) == []
    refusals = failure_records(caplog)
    assert len(refusals) == len(messages)
    for record in refusals:
        assert record.levelno == logging.DEBUG
        assert record.aioenvelope_operation == "Decrypt"  # type: ignore[attr-defined]
        assert record.aioenvelope_error_code == "AccessDeniedException"  # type: ignore[attr-defined]
        assert key_a.arn in record.getMessage()
    assert fault_proxy.requests()["Decrypt"] == 2 * len(messages)  # A refused, B answered


async def test_creating_a_branch_key_table_logs_no_warning(
    make_branch_key_store: Callable[..., BranchKeyStore], caplog: pytest.LogCaptureFixture
) -> None:
    """create_table() asks DescribeTable first and, for the documented set-up step of a
    new table, expects ResourceNotFoundException: that answer is logged at DEBUG, not as
    a WARNING about a failing DynamoDB, and the table is made."""
    caplog.set_level(logging.DEBUG, logger="aioenvelope")
    async with make_branch_key_store() as admin:
        arn = await admin.create_table()

    assert arn.endswith(f":table/{admin.table_name}")
    assert loud_records(caplog, logging.WARNING) == []
    (not_found,) = failure_records(caplog)
    assert not_found.levelno == logging.DEBUG
    assert not_found.aioenvelope_operation == "DescribeTable"  # type: ignore[attr-defined]
    assert not_found.aioenvelope_error_code == "ResourceNotFoundException"  # type: ignore[attr-defined]


async def test_a_branch_key_table_created_by_another_store_meanwhile_logs_no_warning(
    make_branch_key_store: Callable[..., BranchKeyStore],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two deployments creating the same table at once: the second one's DescribeTable
    says not found, then its CreateTable gets DynamoDB's ResourceInUseException (the
    other made the table meanwhile). create_table() expects both answers and accepts the
    table that is there, so neither is a WARNING. The race is made certain by answering
    the second store's DescribeTable 'not found' at the proxy; the ResourceInUseException
    is moto's own."""
    async with make_branch_key_store() as first:
        arn = await first.create_table()
    caplog.set_level(logging.DEBUG, logger="aioenvelope")
    fault_proxy.dynamodb_error_next(1, "ResourceNotFoundException", operation="DescribeTable")
    async with make_branch_key_store(endpoint_url=fault_proxy.url) as second:
        assert await second.create_table() == arn

    assert loud_records(caplog, logging.WARNING) == []
    answers = [
        (r.aioenvelope_operation, r.aioenvelope_error_code, r.levelno)  # type: ignore[attr-defined]
        for r in failure_records(caplog)
    ]
    assert answers == [
        ("DescribeTable", "ResourceNotFoundException", logging.DEBUG),
        ("CreateTable", "ResourceInUseException", logging.DEBUG),
    ]
    assert fault_proxy.requests().get("CreateTable") == 1


# -- attempts are requests sent -------------------------------------------------------------


@pytest.mark.usefixtures("no_credentials")
async def test_a_kms_call_that_never_sent_a_request_has_zero_attempts(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """With no credentials botocore fails while signing, before anything is sent: the
    start-up DescribeKey's span says 0 attempts (not 1, as if KMS had been asked), and no
    call duration is recorded, since no service latency was measured."""
    otel = Otel()
    keyring = moto_kms_keyring(
        moto_kms, kms_key.arn, session=aioboto3.Session(), endpoint_url=fault_proxy.url
    )
    with pytest.raises(errors.KMSError) as info:
        async with EnvelopeClient(keyring, telemetry=otel.telemetry()):
            pass  # the start-up DescribeKey is the first call

    assert info.value.error_code == "NoCredentialsError"
    assert fault_proxy.requests() == {}
    (call,) = client_spans(otel)
    attrs = attributes_of(call)
    assert attrs["rpc.method"] == "DescribeKey"
    assert attrs["aioenvelope.outcome"] == "error"
    assert attrs["aioenvelope.attempts"] == 0
    assert otel.points("aioenvelope.key_service.call.duration") == []


async def test_kms_attempts_equal_the_requests_sent_when_the_deadline_falls_in_a_retry_pause(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """KMS throttles every GenerateDataKey and botocore retries with jittered backoff
    until the call's deadline, which comes while botocore sleeps between two attempts
    (the proxy answers at once: the pauses are nearly all the time). No request is in
    flight then, so none is added: the span's attempts are exactly the requests KMS
    received. botocore's first pause is under 1 s, so a 1.5 s deadline always lets a
    retry go out: the equality is about retries, not a single attempt."""
    otel = Otel()
    keyring = moto_kms_keyring(
        moto_kms,
        kms_key.arn,
        endpoint_url=fault_proxy.url,
        check_keys=False,
        deadline=1.5,
        max_attempts=10,
    )
    async with EnvelopeClient(keyring, circuit_breaker=None, telemetry=otel.telemetry()) as client:
        fault_proxy.throttle_next(100, operation="GenerateDataKey")
        with pytest.raises(errors.KMSTimeoutError):
            await client.encrypt(PLAINTEXT)

    sent = fault_proxy.requests()["GenerateDataKey"]
    assert sent >= 2
    (call,) = client_spans(otel)
    attrs = attributes_of(call)
    assert attrs["rpc.method"] == "GenerateDataKey"
    assert attrs["aioenvelope.outcome"] == "error"
    assert attrs["aioenvelope.attempts"] == sent


async def test_a_vault_login_is_not_an_attempt_of_the_transit_call(
    vault_server: VaultServer,
) -> None:
    """With AppRole the first transit call logs in first. The login is real traffic but
    not a request of that call: the datakey span says 1 attempt (the one datakey
    request), while the keyring shows the login was sent."""
    key = vault_server.create_key()
    vault_server.put_policy("telemetry-accounting", TRANSIT_POLICY)
    role_id, secret_id = vault_server.approle(["telemetry-accounting"])
    otel = Otel()
    keyring = VaultTransitKeyring(
        key, url=vault_server.url, auth=AppRoleAuth(role_id, secret_id), check_keys=False
    )
    async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
        await client.encrypt(PLAINTEXT)

    assert dict(keyring.vault_calls) == {"login": 1, "datakey": 1}
    calls = [(s.name, attributes_of(s)["aioenvelope.attempts"]) for s in client_spans(otel)]
    assert calls == [("vault-transit datakey", 1)]


async def test_a_refused_vault_decrypt_after_a_relogin_has_zero_attempts(
    vault_server: VaultServer,
) -> None:
    """A Vault decrypt whose token lease has run out logs in again before the client's
    decrypt rate limit refuses it. 'refused' means nothing of the call was sent, so its
    span says 0 attempts: the login it sent first is not one of its requests. The lease
    is 1 s, so the test waits it out once (the keyring reads the real monotonic clock for
    leases); the rate limit reads the client's fake clock, so its bucket never refills."""
    key = vault_server.create_key()
    vault_server.put_policy("telemetry-accounting-short", TRANSIT_POLICY)
    role_id, secret_id = vault_server.approle(
        ["telemetry-accounting-short"], token_ttl="1s", token_max_ttl="1s"
    )

    def keyring() -> VaultTransitKeyring:
        return VaultTransitKeyring(
            key, url=vault_server.url, auth=AppRoleAuth(role_id, secret_id), check_keys=False
        )

    async with EnvelopeClient(keyring(), cache=None) as writer:
        first = await writer.encrypt(b"1")
        second = await writer.encrypt(b"2")

    otel = Otel()
    reader = keyring()
    async with EnvelopeClient(
        reader,
        decrypt_rate_limit=RateLimit(rate=0.001, burst=1),
        clock=FakeClock(),
        telemetry=otel.telemetry(),
    ) as client:
        assert await client.decrypt(first) == b"1"
        await asyncio.sleep(1.2)  # past the lease's end: the next call logs in again
        with pytest.raises(errors.KMSDecryptRateLimited):
            await client.decrypt(second)

    assert dict(reader.vault_calls) == {"login": 2, "decrypt": 1}
    summary = [
        (a["rpc.method"], a["aioenvelope.outcome"], a["aioenvelope.attempts"])
        for a in map(attributes_of, client_spans(otel))
    ]
    assert summary == [("decrypt", "ok", 1), ("decrypt", "refused", 0)]
