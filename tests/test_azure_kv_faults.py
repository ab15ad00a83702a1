"""The Azure Key Vault keyring when the service is not well: 503 and 429 retried within
the deadline (Retry-After honoured when it fits) then the breaker; 403 and 404 answered
once with clear text; a slow vault cut off at the deadline; an outage of one vault
while another answers; no credential at all; nothing left behind (tasks, connections);
and what caching saves (one wrap for 10,000 encrypts, one unwrap for 10,000 concurrent
decrypts). The real async client against ``azure_kv_fake.py``, whose counts are the
server's (each attempt counted)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure_kv_fake import AzureKeyVaultFake
from fake_clock import FakeClock
from task_leaks import other_tasks, settle

from aioenvelope import AzureKeyVaultKeyring, CacheConfig, EnvelopeClient, errors

CONTEXT = {"tenant": "t1", "purpose": "azure-kv-faults"}
PLAINTEXT = b"while the vault is unwell"
THRESHOLD = 5  # CircuitBreakerConfig's default failures in a row

Make = Callable[..., AzureKeyVaultKeyring]


@pytest.fixture
def key(azure_kv: AzureKeyVaultFake) -> str:
    return azure_kv.create_key()


@pytest.fixture
def make(azure_kv: AzureKeyVaultFake, key: str) -> Make:
    def make_keyring(key_id: str | None = None, **options: Any) -> AzureKeyVaultKeyring:
        options.setdefault("credential", azure_kv.credential())
        options.setdefault("client_options", azure_kv.client_options())
        return AzureKeyVaultKeyring(key_id or key, **options)

    return make_keyring


def counts(azure_kv: AzureKeyVaultFake, key: str) -> tuple[int, int]:
    """(wrapkey, unwrapkey) requests the vault received for ``key``, attempts included."""
    seen = azure_kv.requests(key.rsplit("/", 1)[1])
    return seen["wrapkey"], seen["unwrapkey"]


def established_to(port: int) -> int:
    """This machine's ESTABLISHED TCP connections to 127.0.0.1:``port`` (client sides)."""
    count = 0
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


@pytest.mark.parametrize("status", [503, 500, 429])
async def test_transient_statuses_are_retried_within_the_call(
    azure_kv: AzureKeyVaultFake, make: Make, key: str, status: int
) -> None:
    """Two failures then success: the encrypt and the decrypt succeed, the vault saw
    three attempts of each, the breaker is closed."""
    keyring = make(deadline=5.0)
    async with EnvelopeClient(keyring, cache=None) as client:
        azure_kv.fail_next(2, status)
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.fail_next(2, status)
        assert await client.decrypt(message) == PLAINTEXT
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    assert counts(azure_kv, key) == (3, 3)


async def test_a_retry_after_that_fits_the_deadline_is_waited_out(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """429 with Retry-After 0.3 (within a 5 s deadline): waited, then the retry
    succeeds; one more request, not a burst."""
    async with EnvelopeClient(make(deadline=5.0), cache=None) as client:
        azure_kv.fail_next(1, 429, retry_after=0.3)
        assert await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert counts(azure_kv, key) == (2, 0)


async def test_a_retry_after_beyond_the_deadline_ends_the_call_at_once(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """429 with Retry-After 30 s and a 1 s deadline: no waiting in vain and no second
    request; a transient Throttled error with Key Vault's code."""
    async with EnvelopeClient(make(deadline=1.0), cache=None) as client:
        azure_kv.fail_next(1, 429, retry_after=30)
        with pytest.raises(errors.AzureKeyVaultError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert info.value.transient is True
    assert info.value.error_code == "Throttled"
    assert info.value.service == "azure-kv"
    assert counts(azure_kv, key) == (1, 0)


async def test_an_outage_costs_max_attempts_then_opens_the_breaker(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """503 on every attempt: a call makes max_attempts attempts and fails transient;
    five such calls open the vault's breaker, after which calls fail fast with
    CircuitOpenError and reach no server; after the reset timeout one probe closes it."""
    keyring = make(deadline=10.0, max_attempts=2)
    clock = FakeClock()
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        azure_kv.fail_next(2 * THRESHOLD, 503)
        for _ in range(THRESHOLD):
            with pytest.raises(errors.AzureKeyVaultError) as info:
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            assert info.value.transient is True
        assert info.value.error_code == "ServiceUnavailable"
        assert "the last of 2 attempts" in str(info.value)
        assert counts(azure_kv, key) == (2 * THRESHOLD, 0)
        assert client.stats.breaker_states[keyring.breaker_name] == "open"
        with pytest.raises(errors.CircuitOpenError):
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert counts(azure_kv, key) == (2 * THRESHOLD, 0)
        clock.advance(31)
        assert await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    assert counts(azure_kv, key) == (2 * THRESHOLD + 1, 0)


async def test_forbidden_is_an_answer_sent_once_with_clear_text(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """403 on wrap: not retried, not transient, the breaker closed; the error keeps Key
    Vault's words and names the permission and role to grant. On unwrap: NoUsableKeyError
    (a 4xx for a web service) chaining it, naming keys/unwrapKey."""
    keyring = make()
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.refuse_next(1, 403)
        with pytest.raises(errors.AzureKeyVaultError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.refuse_next(1, 403)
        with pytest.raises(errors.NoUsableKeyError) as denied:
            await client.decrypt(message)
        assert client.stats.breaker_states[keyring.breaker_name] == "closed"
    assert counts(azure_kv, key) == (2, 1)
    assert info.value.transient is False
    assert info.value.error_code == "Forbidden"
    assert "Caller is not authorized to perform action on resource" in str(info.value)
    assert "keys/wrapKey" in str(info.value)
    assert "Key Vault Crypto Service Encryption User" in str(info.value)
    assert "keys/unwrapKey" in str(denied.value)
    assert isinstance(denied.value.__cause__, errors.AzureKeyVaultError)


async def test_not_found_is_an_answer_naming_the_key(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """404 KeyNotFound on unwrap (a key deleted after the message was made): sent once,
    NoUsableKeyError naming the key URL and saying there is no such key or version."""
    async with EnvelopeClient(make(), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.refuse_next(1, 404, "KeyNotFound", "A key with (name/id) x was not found.")
        with pytest.raises(errors.NoUsableKeyError) as info:
            await client.decrypt(message)
    assert counts(azure_kv, key) == (1, 1)
    assert key in str(info.value)
    assert "KeyNotFound" in str(info.value)
    assert "no such key or key version in this vault" in str(info.value)


async def test_a_slow_vault_is_cut_off_at_the_deadline(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """An answer later than the deadline: a transient Timeout saying the deadline (the
    SDK's per-call timeout would not have bounded it); a slow answer within it succeeds."""
    async with EnvelopeClient(make(deadline=0.5), cache=None) as client:
        azure_kv.delay_next(1, 0.1)
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.delay_next(5, 2.0)
        with pytest.raises(errors.AzureKeyVaultError) as info:
            await client.decrypt(message)
    assert info.value.transient is True
    assert info.value.error_code == "Timeout"
    assert "did not finish within 0.5 s" in str(info.value)


@pytest.fixture
def second_vault(azure_kv: AzureKeyVaultFake) -> Iterator[AzureKeyVaultFake]:
    """Another vault (another host:port) that the same credential and CA reach."""
    with AzureKeyVaultFake(like=azure_kv) as vault:
        yield vault


async def test_an_outage_of_one_vault_leaves_a_key_in_another_to_decrypt(
    azure_kv: AzureKeyVaultFake, second_vault: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """Keys in two vaults: the first vault down (503) on decrypt, the key in the second
    vault opens the message; each vault has a breaker of its own."""
    other = second_vault.create_key()
    keyring = make(additional_key_ids=[other], max_attempts=1)
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.fail_next(1, 503)
        assert await client.decrypt(message) == PLAINTEXT
        assert set(client.stats.breaker_states) >= {
            f"azure-kv {azure_kv.url}",
            f"azure-kv {second_vault.url}",
        }
    assert counts(azure_kv, key) == (1, 1)
    assert counts(second_vault, other) == (1, 1)


async def test_an_open_breaker_of_one_vault_leaves_a_key_in_another_to_decrypt(
    azure_kv: AzureKeyVaultFake, second_vault: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """Five outages of the first vault open its breaker while every decrypt still
    succeeds through the second vault; then the first vault is skipped (no request) and
    the second still answers."""
    other = second_vault.create_key()
    keyring = make(additional_key_ids=[other], max_attempts=1)
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.fail_next(THRESHOLD, 503)
        for _ in range(THRESHOLD + 2):
            assert await client.decrypt(message) == PLAINTEXT
        assert client.stats.breaker_states[f"azure-kv {azure_kv.url}"] == "open"
    assert counts(azure_kv, key) == (1, THRESHOLD)
    assert counts(second_vault, other) == (1, THRESHOLD + 2)


async def test_no_credential_anywhere_fails_start_up_within_the_deadline(
    azure_kv: AzureKeyVaultFake, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without credential=, DefaultAzureCredential is made on entering the client; with
    no Azure identity in the environment it finds none (or its managed-identity probe is
    cut off at the deadline): an AzureKeyVaultError either way, and the credential is
    closed again (no task left)."""
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "IDENTITY_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_CONFIG_DIR", "/nonexistent-azure-config")
    before = other_tasks()
    keyring = AzureKeyVaultKeyring(key, client_options=azure_kv.client_options(), deadline=1.0)
    with pytest.raises(errors.AzureKeyVaultError) as info:
        async with EnvelopeClient(keyring):
            pass
    assert info.value.error_code in ("CredentialUnavailable", "Timeout")
    assert info.value.transient is (info.value.error_code == "Timeout")
    await settle(lambda: other_tasks() <= before, "the credential's tasks ended")


async def test_no_task_or_connection_is_left_after_the_client_exits(
    azure_kv: AzureKeyVaultFake, make: Make
) -> None:
    """After a round trip, a cut-off call and a refusal, exiting the client closes the
    keyring's own HTTP session: no task of ours on the loop, no ESTABLISHED connection
    to the vault."""
    port = int(azure_kv.url.rsplit(":", 1)[1])
    await settle(lambda: established_to(port) == 0, "earlier tests' connections closed")
    before = other_tasks()
    async with EnvelopeClient(make(deadline=0.5), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert established_to(port) >= 1
        azure_kv.delay_next(1, 1.0)
        with pytest.raises(errors.AzureKeyVaultError):
            await client.decrypt(message)
        azure_kv.refuse_next(1, 403)
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(message)
    await settle(lambda: established_to(port) == 0, "the session's connections closed")
    await settle(lambda: other_tasks() <= before, "the keyring's tasks ended")


async def test_ten_thousand_encrypts_under_one_context_make_one_wrap_call(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """10,000 concurrent encrypts under one context with caching: each message is its
    own, all share one data key, and the vault saw one wrapkey."""
    async with EnvelopeClient(make(), cache=CacheConfig()) as client:
        messages = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(10_000))
        )
    assert len(set(messages)) == 10_000
    assert counts(azure_kv, key) == (1, 0)


async def test_ten_thousand_concurrent_decrypts_of_one_message_make_one_unwrap_call(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """10,000 concurrent decrypts of one message: one unwrapkey (coalesced, then
    cached), as the vault saw it."""
    async with EnvelopeClient(make(), cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    async with EnvelopeClient(make(), cache=CacheConfig()) as client:
        plaintexts = await asyncio.gather(*(client.decrypt(message) for _ in range(10_000)))
    assert set(plaintexts) == {PLAINTEXT}
    assert counts(azure_kv, key) == (1, 1)


def strings_reachable(exc: BaseException) -> list[str]:
    """Every str (and decoded bytes) reachable from ``exc``: its causes and contexts,
    group members, args and the attributes of every object reached (not traceback
    frames), so a test can say a token is nowhere in what a caller may log or keep."""
    found: list[str] = []
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, (bytes, bytearray)):
            found.append(bytes(item).decode("latin-1"))
        elif isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo += list(item)
        elif isinstance(item, (int, float, bool)):
            continue
        else:
            if isinstance(item, BaseException):
                todo += [item.__cause__, item.__context__, *item.args]
                todo += list(getattr(item, "exceptions", ()))
            found.append(repr(item))
            todo += list(getattr(item, "__dict__", {}).values())
    return found


@pytest.mark.parametrize(
    ("status", "content_type"),
    [(200, "application/json"), (502, "application/json"), (503, "text/xml")],
)
async def test_an_answer_that_does_not_parse_is_a_transient_failure_holding_no_token(
    azure_kv: AzureKeyVaultFake, make: Make, key: str, status: int, content_type: str
) -> None:
    """A gateway's body that is not what its Content-Type says makes azure-core raise
    DecodeError, whose response holds the request and its Authorization header. It is
    a library error (InvalidResponse, transient), retried, and counted by the breaker;
    the vendor's exception is nowhere in what is raised, so neither is the token."""
    keyring = make(max_attempts=2)
    async with EnvelopeClient(keyring, cache=None) as client:
        azure_kv.garble_next(1, status, content_type=content_type)
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert counts(azure_kv, key) == (2, 0)  # the garbled answer was retried
        for _ in range(THRESHOLD):
            azure_kv.garble_next(2, status, content_type=content_type)
            with pytest.raises(errors.AzureKeyVaultError) as info:
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            assert info.value.error_code == "InvalidResponse"
            assert info.value.transient is True
            assert not any(azure_kv.token in text for text in strings_reachable(info.value))
        assert "DecodeError" in str(info.value)
        assert client.stats.breaker_states[keyring.breaker_name] == "open"
    async with EnvelopeClient(make(max_attempts=1), cache=None) as client:
        azure_kv.garble_next(1, status, content_type=content_type)
        with pytest.raises(errors.AzureKeyVaultError) as info:
            await client.decrypt(message)
        assert info.value.error_code == "InvalidResponse"
        assert not any(azure_kv.token in text for text in strings_reachable(info.value))


async def test_a_connection_cut_mid_body_is_a_retried_connection_error(
    azure_kv: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """A 200 whose body stops short of its Content-Length before the socket closes is
    azure-core's IncompleteReadError: a network failure (ConnectionError, transient),
    retried, and counted by the breaker, never the vendor's exception."""
    keyring = make(max_attempts=1)
    async with EnvelopeClient(make(max_attempts=2), cache=None) as client:
        azure_kv.cut_next(1)
        assert await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert counts(azure_kv, key) == (2, 0)
    async with EnvelopeClient(keyring, cache=None) as client:
        for _ in range(THRESHOLD):
            azure_kv.cut_next(1)
            with pytest.raises(errors.AzureKeyVaultError) as info:
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            assert info.value.error_code == "ConnectionError"
            assert info.value.transient is True
            assert info.value.__cause__ is None
            assert info.value.__context__ is None
        assert client.stats.breaker_states[keyring.breaker_name] == "open"


async def test_a_refused_token_at_one_vault_leaves_a_key_in_another_to_decrypt(
    azure_kv: AzureKeyVaultFake, second_vault: AzureKeyVaultFake, make: Make, key: str
) -> None:
    """401 from the first vault (say it moved to another tenant) is about that vault,
    not about the message: the key in the second vault is still asked and opens it.
    Only when no vault opens the message is the 401 the error."""
    other = second_vault.create_key()
    keyring = make(additional_key_ids=[other])
    async with EnvelopeClient(keyring, cache=None) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        azure_kv.refuse_next(
            1, status=401, code="Unauthorized", message="AKV10032: Invalid issuer."
        )
        assert await client.decrypt(message) == PLAINTEXT
        azure_kv.refuse_next(
            1, status=401, code="Unauthorized", message="AKV10032: Invalid issuer."
        )
        second_vault.refuse_next(1, status=403)
        with pytest.raises(errors.AzureKeyVaultError) as info:
            await client.decrypt(message)
        assert info.value.error_code == "Unauthorized"
    assert counts(azure_kv, key) == (1, 2)
    assert counts(second_vault, other) == (1, 2)
