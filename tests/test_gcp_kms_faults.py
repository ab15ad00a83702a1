"""The Google Cloud KMS keyring when the service is not well: UNAVAILABLE and
RESOURCE_EXHAUSTED retried within the deadline then the breaker; PERMISSION_DENIED and
NOT_FOUND answered once with clear text; CRC32C mismatches caught and retried; a slow
service cut off at the deadline; nothing left behind (tasks, connections); and what
caching saves it (one Encrypt for 10,000 encrypts, one Decrypt for 10,000 concurrent
decrypts). The real async client against the fake of ``gcp_kms_fake.py``, whose call
counts are the server's (each attempt counted)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from fake_clock import FakeClock
from gcp_kms_fake import KEY_RING, GcpKmsFake
from google.auth import credentials as ga_credentials
from google.auth import exceptions as ga_exceptions
from google.auth.credentials import AnonymousCredentials
from task_leaks import other_tasks

from aioenvelope import (
    AlgorithmSuite,
    CacheConfig,
    DecryptionMaterials,
    EncryptionMaterials,
    EnvelopeClient,
    GcpKmsKeyring,
    errors,
)

CONTEXT = {"tenant": "t1", "purpose": "gcp-kms-faults"}
PLAINTEXT = b"while the service is unwell"
THRESHOLD = 5  # CircuitBreakerConfig's default failures in a row

Make = Callable[..., GcpKmsKeyring]


@pytest.fixture
def key(gcp_kms: GcpKmsFake) -> str:
    return gcp_kms.create_key("orders")


@pytest.fixture
def make(gcp_kms: GcpKmsFake, key: str) -> Make:
    def make_keyring(**options: Any) -> GcpKmsKeyring:
        options.setdefault("credentials", AnonymousCredentials())  # type: ignore[no-untyped-call]
        options.setdefault("client_options", gcp_kms.client_options())
        return GcpKmsKeyring(options.pop("key_name", key), **options)

    return make_keyring


def established_to(port: int) -> int:
    """This machine's TCP connections to ``port`` that are still ESTABLISHED (the client
    side of each), from /proc/net/tcp and tcp6 (gRPC's sockets may be IPv6 ones)."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path, encoding="ascii") as table:
            next(table)
            for line in table:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait until ``predicate()`` holds, polling for up to 10 s: gRPC closes a channel's
    sockets from its own threads, so loop turns alone (``task_leaks.settle``) do not see it."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def client_tasks() -> set[asyncio.Task[Any]]:
    """The loop's tasks but the fake server's (it runs on the test's loop: it waits for
    each next request, and handles the cut-off call until its delay ends)."""
    return {
        t for t in other_tasks() if "server.pyx" not in repr(t) and "gcp_kms_fake" not in repr(t)
    }


@pytest.mark.parametrize("status", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL"])
async def test_transient_statuses_are_retried_within_the_call(
    gcp_kms: GcpKmsFake, make: Make, status: str
) -> None:
    """Two failures then success: the encrypt and the decrypt succeed, the server saw
    three attempts of each, the keyring counts one call of each, the breaker is closed."""
    keyring = make(deadline=5.0)
    async with EnvelopeClient(keyring, cache=None) as client:
        gcp_kms.fail_next(2, status)
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        gcp_kms.fail_next(2, status)
        assert await client.decrypt(message) == PLAINTEXT
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    assert gcp_kms.calls["Encrypt"] == 3
    assert gcp_kms.calls["Decrypt"] == 3
    assert keyring.gcp_calls["Encrypt"] == 1
    assert keyring.gcp_calls["Decrypt"] == 1


async def test_an_outage_costs_max_attempts_then_opens_the_breaker(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """UNAVAILABLE on every attempt: a call makes max_attempts attempts and fails
    transient, naming the status; five such calls open the breaker, after which calls
    fail fast with CircuitOpenError and reach no server; after the reset timeout one
    probe succeeds and closes it."""
    keyring = make(deadline=10.0, max_attempts=2)
    clock = FakeClock()
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        gcp_kms.fail_next(2 * THRESHOLD, "UNAVAILABLE")
        for _ in range(THRESHOLD):
            with pytest.raises(errors.GcpKmsError) as info:
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            assert info.value.transient is True
            assert info.value.error_code == "UNAVAILABLE"
        assert "the last of 2 attempts" in str(info.value)
        assert info.value.service == "gcp-kms"
        assert gcp_kms.calls["Encrypt"] == 2 * THRESHOLD
        assert client.stats.breaker_states[keyring.breaker_name] == "open"
        with pytest.raises(errors.CircuitOpenError):
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert gcp_kms.calls["Encrypt"] == 2 * THRESHOLD
        clock.advance(31)
        assert await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    assert gcp_kms.calls["Encrypt"] == 2 * THRESHOLD + 1


async def test_permission_denied_is_an_answer_sent_once_with_clear_text(
    gcp_kms: GcpKmsFake, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """PERMISSION_DENIED on Encrypt: not retried, not transient, the breaker closed; the
    error keeps Google's words and names the permission and role to grant. On Decrypt:
    NoUsableKeyError (a 4xx for a web service) chaining it. Log lines name the method,
    key and status."""
    caplog.set_level("DEBUG", logger="aioenvelope")
    keyring = make()
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        gcp_kms.fail_next(1, "PERMISSION_DENIED")
        with pytest.raises(errors.GcpKmsError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        gcp_kms.fail_next(1, "PERMISSION_DENIED")
        with pytest.raises(errors.NoUsableKeyError) as denied:
            await client.decrypt(message)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    assert gcp_kms.calls["Encrypt"] == 2
    assert gcp_kms.calls["Decrypt"] == 1
    assert info.value.transient is False
    assert info.value.error_code == "PERMISSION_DENIED"
    assert "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied" in str(info.value)
    assert "roles/cloudkms.cryptoKeyEncrypter" in str(info.value)
    assert "roles/cloudkms.cryptoKeyDecrypter" in str(denied.value)
    assert isinstance(denied.value.__cause__, errors.GcpKmsError)
    assert any(
        "Cloud KMS Encrypt with key" in r.getMessage() and "PERMISSION_DENIED" in r.getMessage()
        for r in caplog.records
    )


async def test_not_found_is_an_answer_naming_the_key(gcp_kms: GcpKmsFake, make: Make) -> None:
    """A key that is not there (start-up check skipped): NOT_FOUND, sent once, with
    the service's words and the advice to check the resource name."""
    missing = f"{KEY_RING}/cryptoKeys/gone"
    keyring = make(key_name=missing, check_keys=False)
    async with EnvelopeClient(keyring, cache=None) as client:
        with pytest.raises(errors.GcpKmsError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert gcp_kms.calls["Encrypt"] == 1
    assert info.value.error_code == "NOT_FOUND"
    assert info.value.transient is False
    assert info.value.key_id == missing
    assert f"CryptoKey {missing} not found. Check the key's resource name" in str(info.value)


async def test_a_wrong_response_crc32c_is_caught_and_retried(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """A response whose CRC32C does not match its ciphertext (Encrypt) or plaintext
    (Decrypt), or an Encrypt response that does not say it verified the request's
    checksums, is corrupted: retried, and the call succeeds with the good answer."""
    keyring = make(deadline=5.0)
    async with EnvelopeClient(keyring, cache=None) as client:
        gcp_kms.corrupt_crc_next(1)
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert gcp_kms.calls["Encrypt"] == 2
        gcp_kms.unverified_next(1)
        await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert gcp_kms.calls["Encrypt"] == 4
        gcp_kms.corrupt_crc_next(1)
        assert await client.decrypt(message) == PLAINTEXT
        assert gcp_kms.calls["Decrypt"] == 2


async def test_crc32c_mismatches_on_every_attempt_are_a_transient_error(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """Corrupted on every attempt: a transient GcpKmsError ChecksumMismatch after
    max_attempts, no data key used, and no key bytes in the error."""
    keyring = make(deadline=5.0, max_attempts=3)
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        gcp_kms.corrupt_crc_next(3)
        with pytest.raises(errors.GcpKmsError) as info:
            await client.decrypt(message)
    assert gcp_kms.calls["Decrypt"] == 3
    assert info.value.error_code == "ChecksumMismatch"
    assert info.value.transient is True
    assert "plaintext's CRC32C did not match" in str(info.value)


async def test_a_slow_service_is_cut_off_at_the_deadline(gcp_kms: GcpKmsFake, make: Make) -> None:
    """An answer later than the deadline: a transient Timeout saying the deadline (the
    client's own 60 s retry never runs); a slow answer within it succeeds."""
    keyring = make(deadline=0.5)
    async with EnvelopeClient(keyring, cache=None) as client:
        gcp_kms.delay_next(1, 0.1)
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        gcp_kms.delay_next(5, 3.0)
        with pytest.raises(errors.GcpKmsError) as info:
            await client.decrypt(message)
    assert info.value.transient is True
    assert info.value.error_code == "Timeout"
    assert "did not finish within the call's deadline of 0.5 s" in str(info.value)


async def test_no_task_or_connection_is_left_after_the_client_exits(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """After a round trip, a cut-off call and a refusal, exiting the client closes the
    keyring's own channel: no task of ours on the loop, no ESTABLISHED connection to
    the server, even while the errors are held (Google's exceptions, which hold the gRPC
    call and keep its connection open, are not chained to ours)."""
    port = int(gcp_kms.address.rsplit(":", 1)[1])
    before = client_tasks()
    async with EnvelopeClient(make(deadline=0.5), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert established_to(port) >= 1
        gcp_kms.delay_next(1, 0.7)  # past the deadline: cut off
        with pytest.raises(errors.GcpKmsError) as cut_off:
            await client.decrypt(message)
        gcp_kms.fail_next(1, "PERMISSION_DENIED")
        with pytest.raises(errors.NoUsableKeyError) as denied:
            await client.decrypt(message)
    # The errors are still held here: they must not hold the gRPC calls (and so the
    # connection) either.
    await eventually(lambda: established_to(port) == 0, "the channel's connection closed")
    assert cut_off.value.error_code == "Timeout"
    assert "PERMISSION_DENIED" in str(denied.value)
    await eventually(lambda: client_tasks() <= before, "the keyring's tasks ended")


async def test_ten_thousand_encrypts_under_one_context_make_one_encrypt_call(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """10,000 concurrent encrypts under one context with caching: each message is its
    own, all share one data key, and the server saw one Encrypt."""
    async with EnvelopeClient(make(), cache=CacheConfig()) as client:
        messages = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(10_000))
        )
    assert len(set(messages)) == 10_000
    assert gcp_kms.calls["Encrypt"] == 1


async def test_ten_thousand_concurrent_decrypts_of_one_message_make_one_decrypt_call(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """10,000 concurrent decrypts of one message: one Decrypt (coalesced, then cached),
    as the server saw it."""
    async with EnvelopeClient(make(), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    async with EnvelopeClient(make(), cache=CacheConfig()) as client:
        plaintexts = await asyncio.gather(*(client.decrypt(message) for _ in range(10_000)))
    assert set(plaintexts) == {PLAINTEXT}
    assert gcp_kms.calls["Decrypt"] == 1


async def test_a_callers_cancel_scope_cancels_a_call_in_flight_and_only_that(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """A caller's own timeout (an anyio scope, asyncio.wait_for) around an encrypt cancels the
    Encrypt in flight and is caught by that scope, not passed on as a cancellation of
    the whole task; the breaker hears no verdict and the client goes on working."""
    keyring = make(deadline=5.0)
    async with EnvelopeClient(keyring, cache=None) as client:
        gcp_kms.delay_next(1, 1.0)
        with anyio.move_on_after(0.2) as scope:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert scope.cancelled_caught
        gcp_kms.delay_next(1, 1.0)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.encrypt(PLAINTEXT, encryption_context=CONTEXT), 0.2)
        assert await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    assert gcp_kms.calls["Encrypt"] == 3


async def test_an_outage_at_start_up_is_transient_and_closes_the_channel(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """UNAVAILABLE on every GetCryptoKey: entering the client fails with a transient
    GcpKmsError (the key was not checked, for want of the service: not a
    GcpKmsKeyCheckError), and the keyring's channel is closed."""
    port = int(gcp_kms.address.rsplit(":", 1)[1])
    gcp_kms.fail_next(4, "UNAVAILABLE")
    with pytest.raises(errors.GcpKmsError) as info:
        async with EnvelopeClient(make(deadline=5.0)):
            pass
    assert info.value.transient is True
    assert info.value.operation == "GetCryptoKey"
    assert gcp_kms.calls["GetCryptoKey"] == 4
    await eventually(lambda: established_to(port) == 0, "the channel's connection closed")


async def test_a_data_key_of_another_suites_length_is_no_usable_key_not_an_outage(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """Anyone with Encrypt permission can wrap a 16-byte data key and present it in a
    message of a 32-byte suite. Cloud KMS answers that Decrypt as asked, so it is the
    message's fault: NoUsableKeyError naming the length, and the breaker hears a
    success. Were it counted as a failure, five such messages would open the location's
    breaker and refuse every caller's decrypts (a denial of service)."""
    keyring = make()
    async with EnvelopeClient(keyring, cache=None) as client:
        good = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        short = await keyring.on_encrypt(
            EncryptionMaterials(AlgorithmSuite.AES_128_GCM_IV12_TAG16_HKDF_SHA256, CONTEXT)
        )
        hostile = DecryptionMaterials(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, CONTEXT)
        for _ in range(2 * THRESHOLD):
            with pytest.raises(errors.NoUsableKeyError) as info:
                await keyring.on_decrypt(hostile, short.encrypted_data_keys)
            assert "wrong length (not the suite's 32 bytes)" in str(info.value)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
        assert await client.decrypt(good) == PLAINTEXT
    assert gcp_kms.calls["Decrypt"] == 2 * THRESHOLD + 1


class RefusedCredentials(ga_credentials.Credentials):
    """Credentials Google refuses: each refresh raises RefreshError (invalid_grant), as
    for a deleted service account key."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.refreshes = 0

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        raise ga_exceptions.RefreshError(  # type: ignore[no-untyped-call]
            "invalid_grant: Invalid JWT Signature.", {"error": "invalid_grant"}
        )


async def test_refused_credentials_are_a_lasting_error_not_an_outage() -> None:
    """google-auth's RefreshError reaches gRPC as UNAVAILABLE ("Getting metadata from
    plugin failed"), but nothing was sent and retrying will not mend the credentials:
    a non-transient CredentialUnavailable, one attempt per call, no breaker verdict (ten
    calls leave it closed), the same on decrypt (not NoUsableKeyError: no EDK will do)
    and at start-up (not a key-check failure)."""
    credentials = RefusedCredentials()
    async with GcpKmsFake(local_credentials=True) as kms:
        name = kms.create_key("orders")
        options = kms.authenticated_client_options()
        keyring = GcpKmsKeyring(
            name, credentials=credentials, check_keys=False, client_options=options
        )
        async with EnvelopeClient(keyring, cache=None) as client:
            for _ in range(2 * THRESHOLD):
                with pytest.raises(errors.GcpKmsError) as info:
                    await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
                assert info.value.error_code == "CredentialUnavailable"
                assert info.value.transient is False
            assert credentials.refreshes == 2 * THRESHOLD  # one attempt each
            assert "invalid_grant" in str(info.value)
            assert "fix the credentials" in str(info.value)
            assert client.stats.breaker_states[keyring.breaker_name] == "closed"
            message = await encrypt_under(kms, name)
            with pytest.raises(errors.GcpKmsError) as decrypting:
                await client.decrypt(message)
            assert decrypting.value.error_code == "CredentialUnavailable"
        with pytest.raises(errors.GcpKmsError) as opening:
            async with EnvelopeClient(
                GcpKmsKeyring(name, credentials=credentials, client_options=options)
            ):
                pass
        assert not isinstance(opening.value, errors.GcpKmsKeyCheckError)
        assert opening.value.error_code == "CredentialUnavailable"
        assert kms.calls == {}  # nothing ever reached the service


async def encrypt_under(kms: GcpKmsFake, name: str) -> bytes:
    """A message under ``name``, made by a caller whose credentials are good."""
    keyring = GcpKmsKeyring(
        name, credentials=GoodCredentials(), client_options=kms.authenticated_client_options()
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    kms.calls.clear()
    return message


class GoodCredentials(ga_credentials.Credentials):
    """Credentials whose refresh always gets a token."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def refresh(self, request: Any) -> None:
        self.token = "test-access-token"


async def test_one_key_unreachable_and_another_refused_is_an_outage_not_no_usable_key(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """A message under two keys: the first down for the whole call (UNAVAILABLE), the
    second answering PERMISSION_DENIED to this caller. The first might have opened it,
    so the caller gets the transient outage (retry later, a 503), not NoUsableKeyError
    (a 4xx, "this message is not for you")."""
    second = gcp_kms.create_key("invoices")
    message = await encrypt_with(make(additional_key_names=[second]))
    async with EnvelopeClient(
        make(additional_key_names=[second], check_keys=False), cache=None
    ) as client:
        gcp_kms.fail_next(4, "UNAVAILABLE")  # the first key: every attempt
        gcp_kms.fail_next(1, "PERMISSION_DENIED")  # the second
        with pytest.raises(errors.GcpKmsError) as info:
            await client.decrypt(message)
    assert not isinstance(info.value, errors.NoUsableKeyError)
    assert info.value.transient is True
    assert info.value.error_code == "UNAVAILABLE"
    assert gcp_kms.calls["Decrypt"] == 4 + 1  # every attempt at the first, one at the second


async def test_an_open_breaker_and_another_key_refused_is_an_outage_not_no_usable_key(
    gcp_kms: GcpKmsFake, make: Make
) -> None:
    """The first key's location has its breaker open (five outages in a row, while the
    second key, elsewhere, opened each message), and the second key answers
    PERMISSION_DENIED: CircuitOpenError (retry after), not NoUsableKeyError; the
    refused key costs no request."""
    first = gcp_kms.create_key("orders-eu", location="europe-west1")
    second = gcp_kms.create_key("orders-us", location="us-east1")
    message = await encrypt_with(make(key_name=first, additional_key_names=[second]))
    keyring = make(key_name=first, additional_key_names=[second], check_keys=False)
    async with EnvelopeClient(keyring, cache=None) as client:
        for _ in range(THRESHOLD):
            gcp_kms.fail_next(4, "UNAVAILABLE")  # the first key; the second opens it
            assert await client.decrypt(message) == PLAINTEXT
        assert client.stats.breaker_states["gcp-kms europe-west1"] == "open"
        assert client.stats.breaker_states["gcp-kms us-east1"] == "closed"
        sent = gcp_kms.calls["Decrypt"]
        gcp_kms.fail_next(1, "PERMISSION_DENIED")
        with pytest.raises(errors.CircuitOpenError) as info:
            await client.decrypt(message)
    assert info.value.retry_after > 0
    assert gcp_kms.calls["Decrypt"] == sent + 1


async def encrypt_with(keyring: GcpKmsKeyring) -> bytes:
    """A message under ``keyring``'s keys, from a client of its own."""
    async with EnvelopeClient(keyring, cache=None) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
