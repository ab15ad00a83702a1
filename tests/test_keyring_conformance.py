"""The keyring conformance suite: what every keyring must do, run over every keyring.

Each test takes a ``harness`` (:class:`keyring_harness.KeyringHarness`): a backend with
keys A and B, and for keyrings that call a service, faults and a count of the requests
the service saw. The harnesses are registered in ``keyring_harness.py`` (one fixture per
keyring: AWS KMS against moto behind the fault proxy, raw AES, raw RSA); each test runs
over those that declare what it needs, so nothing here is skipped for a keyring it does
not apply to.

Where the count of keyring calls matters for every keyring, a :class:`WatchedKeyring`
counts them from outside (the ``Keyring`` interface is public); for remote keyrings the
server's own count is checked too. Breaker tests use keyrings that make one attempt per
call (one failed call is one failed request) and a :class:`FakeClock`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

import pytest
from fake_clock import FakeClock
from keyring_harness import (
    HARNESSES,
    Can,
    Key,
    KeyringHarness,
    RemoteBackend,
    WatchedKeyring,
    leaks,
    texts_of,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from otel_support import Otel, attributes_of

from aioenvelope import (
    AlgorithmSuite,
    CacheConfig,
    EnvelopeClient,
    Keyring,
    MultiKeyring,
    RateLimit,
    RawAesKeyring,
    errors,
    inspect,
)

CONTEXT = {"tenant": "t1", "purpose": "keyring-conformance"}
PLAINTEXT = bytes(range(256)) * 3 + b"a partial last frame"
FRAME_LENGTH = 64  # PLAINTEXT is 13 frames, the last one partial
CONCURRENT = 8
THRESHOLD = 5  # CircuitBreakerConfig's defaults: 5 failures in a row, open 30 s
RESET_TIMEOUT = 30.0
SUITES = [
    pytest.param(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, id="committing"),
    pytest.param(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384, id="signing"),
]


def harnesses(*needs: Can, lacking: Can | None = None) -> pytest.MarkDecorator:
    """Parametrize ``harness`` over every registered harness that declares ``needs``
    (and not ``lacking``)."""
    names = [
        name
        for name, capabilities in HARNESSES.items()
        if set(needs) <= capabilities and (lacking is None or lacking not in capabilities)
    ]
    assert names, f"no harness can {needs}"
    return pytest.mark.parametrize(
        "harness", names, indirect=True, ids=[n.removesuffix("_harness") for n in names]
    )


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> KeyringHarness:
    """The harness fixture named by the parameter, checked against its declaration."""
    built: KeyringHarness = request.getfixturevalue(request.param)
    remote = Can.CALL_A_REMOTE_SERVICE in HARNESSES[request.param]
    assert (built.remote is not None) == remote, f"{built.name}: remote= vs its declaration"
    return built


@pytest.fixture
def declared(request: pytest.FixtureRequest) -> frozenset[Can]:
    """What the test's harness declared it can do."""
    return HARNESSES[request.node.callspec.params["harness"]]


def remote_of(harness: KeyringHarness) -> RemoteBackend:
    assert harness.remote is not None
    return harness.remote


@pytest.fixture
def partner() -> RawAesKeyring:
    """A raw AES keyring of another party: a MultiKeyring sibling, a rotation's other end."""
    return RawAesKeyring("partner", "partner-key", os.urandom(32))


async def encrypt_with(keyring: Keyring) -> bytes:
    async with EnvelopeClient(keyring, frame_length=FRAME_LENGTH) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)


async def decrypt_with(
    keyring: Keyring, message: bytes, context: dict[str, str] | None = CONTEXT
) -> bytes:
    async with EnvelopeClient(keyring, cache=None) as client:
        return await client.decrypt(message, encryption_context=context)


async def failure(call: Awaitable[object], kind: type[BaseException]) -> BaseException:
    """Await ``call``, which must raise exactly ``kind`` (not a subclass); the error."""
    with pytest.raises(kind) as info:
        await call
    assert type(info.value) is kind, f"{type(info.value).__name__}, not {kind.__name__}"
    return info.value


def is_transient(exc: BaseException) -> object:
    return getattr(exc, "transient", None)


# -- round trips -----------------------------------------------------------------------


@harnesses()
@pytest.mark.parametrize("suite", SUITES)
async def test_one_shot_round_trip_restores_plaintext_suite_and_context(
    harness: KeyringHarness, suite: AlgorithmSuite
) -> None:
    """What one key wraps, the same key unwraps: the plaintext, the suite, the context,
    and one encrypted data key."""
    keyring = harness.keyring("A")
    async with EnvelopeClient(keyring, frame_length=FRAME_LENGTH) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT, algorithm_suite=suite)
        result = await client.decrypt_with_header(message, encryption_context=CONTEXT)
    assert result.plaintext == PLAINTEXT
    assert result.header.algorithm_suite is suite
    assert dict(result.header.encryption_context).items() >= CONTEXT.items()
    assert len(result.header.encrypted_data_keys) == 1


@harnesses()
@pytest.mark.parametrize("suite", SUITES)
async def test_stream_round_trip_restores_the_plaintext(
    harness: KeyringHarness, suite: AlgorithmSuite
) -> None:
    """The streaming API over the same keyring: a message streamed out in uneven chunks
    decrypts streamed and in one shot, to the same plaintext."""
    chunks = [PLAINTEXT[i : i + 100] for i in range(0, len(PLAINTEXT), 100)]
    async with EnvelopeClient(harness.keyring("A"), frame_length=FRAME_LENGTH) as client:
        message = await client.encrypt_stream(
            chunks, encryption_context=CONTEXT, algorithm_suite=suite
        ).read_all()
        pieces = [message[i : i + 77] for i in range(0, len(message), 77)]
        streamed = await client.decrypt_stream(pieces, encryption_context=CONTEXT).read_all()
        one_shot = await client.decrypt(message, encryption_context=CONTEXT)
    assert streamed == one_shot == PLAINTEXT
    assert inspect(message).algorithm_suite is suite


# -- several keys ------------------------------------------------------------------------


@harnesses()
@pytest.mark.parametrize("key", ["A", "B"])
async def test_each_key_alone_decrypts_a_message_wrapped_under_several(
    harness: KeyringHarness, key: Key
) -> None:
    """A message wrapped under keys A and B carries one encrypted data key per key, and
    a keyring holding either key alone decrypts it."""
    message = await encrypt_with(harness.wrapping_all(["A", "B"]))
    assert len(inspect(message).encrypted_data_keys) == 2
    assert await decrypt_with(harness.keyring(key), message) == PLAINTEXT


@harnesses(Can.CALL_A_REMOTE_SERVICE)
@pytest.mark.parametrize("key", ["A", "B"])
async def test_each_key_alone_unwraps_with_one_remote_request(
    harness: KeyringHarness, key: Key
) -> None:
    """The other key's encrypted data key is not sent to the service: one unwrap."""
    remote = remote_of(harness)
    message = await encrypt_with(harness.wrapping_all(["A", "B"]))
    assert remote.wrap_requests() == 2
    assert await decrypt_with(harness.keyring(key), message) == PLAINTEXT
    assert remote.unwrap_requests() == 1


# -- wrong context, another key ----------------------------------------------------------


@harnesses()
async def test_wrong_stored_context_is_refused_before_the_keyring_is_asked(
    harness: KeyringHarness,
) -> None:
    """The stored context is in the header: a reader expecting another value is refused
    with EncryptionContextMismatchError before any key is used (no unwrap, no request)."""
    message = await encrypt_with(harness.keyring("A"))
    reader = WatchedKeyring(harness.keyring("A"))
    error = await failure(
        decrypt_with(reader, message, {**CONTEXT, "tenant": "t2"}),
        errors.EncryptionContextMismatchError,
    )
    assert str(error) == "encryption context value for key 'tenant' does not match the message"
    assert reader.decrypt_calls == 0


@harnesses(Can.BIND_CONTEXT_TO_WRAPPED_KEY)
@pytest.mark.parametrize("reader_context", ["wrong", "missing"])
async def test_wrong_required_context_is_refused_by_the_unwrap(
    harness: KeyringHarness, reader_context: str
) -> None:
    """A required (unstored) pair is checked where the context is bound to the wrapped
    key: a wrong or missing one makes the unwrap fail, NoUsableKeyError; also in the
    caching client that has just unwrapped the same EDK under the right context (the
    cached key is not served for another context: the keyring is asked again)."""
    given = {**CONTEXT, "tenant": "t2"} if reader_context == "wrong" else {}
    watched = WatchedKeyring(harness.keyring("A"))
    async with EnvelopeClient(watched, cache=CacheConfig()) as client:
        message = await client.encrypt(
            PLAINTEXT, encryption_context=CONTEXT, required_encryption_context_keys={"tenant"}
        )
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        await failure(client.decrypt(message, encryption_context=given), errors.NoUsableKeyError)
        assert watched.decrypt_calls == 2
    await failure(decrypt_with(harness.keyring("A"), message, given), errors.NoUsableKeyError)


@harnesses(lacking=Can.BIND_CONTEXT_TO_WRAPPED_KEY)
@pytest.mark.parametrize("reader_context", ["wrong", "missing"])
async def test_wrong_required_context_fails_header_authentication(
    harness: KeyringHarness, reader_context: str
) -> None:
    """A keyring that does not bind the context to the wrapped key (RSA) unwraps the
    data key anyway; the header's tag, over the whole context, refuses the message."""
    async with EnvelopeClient(harness.keyring("A")) as client:
        message = await client.encrypt(
            PLAINTEXT, encryption_context=CONTEXT, required_encryption_context_keys={"tenant"}
        )
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    given = {**CONTEXT, "tenant": "t2"} if reader_context == "wrong" else {}
    error = await failure(
        decrypt_with(harness.keyring("A"), message, given), errors.AuthenticationError
    )
    assert str(error) == (
        "header authentication failed: the header was changed, or the encryption context "
        "or data key is not the one it was written with"
    )


@harnesses()
async def test_message_under_another_key_is_refused_with_no_usable_key(
    harness: KeyringHarness,
) -> None:
    """Key B cannot open what key A wrapped: NoUsableKeyError, no plaintext."""
    message = await encrypt_with(harness.keyring("A"))
    await failure(decrypt_with(harness.keyring("B"), message), errors.NoUsableKeyError)
    assert await decrypt_with(harness.keyring("A"), message) == PLAINTEXT


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_message_under_another_key_costs_no_remote_request(
    harness: KeyringHarness,
) -> None:
    """The encrypted data key names key A: a keyring on key B has nothing to ask."""
    message = await encrypt_with(harness.keyring("A"))
    await failure(decrypt_with(harness.keyring("B"), message), errors.NoUsableKeyError)
    assert remote_of(harness).unwrap_requests() == 0


# -- with raw AES in a MultiKeyring, and as a rotation's end -----------------------------


@harnesses()
@pytest.mark.parametrize("role", ["generator", "child"])
async def test_multikeyring_with_raw_aes_each_keyring_decrypts_alone(
    harness: KeyringHarness, partner: RawAesKeyring, role: str
) -> None:
    """Next to a raw AES key in a MultiKeyring, as the generator (it makes the data key)
    or as a child (it wraps the data key it is handed): either keyring alone decrypts."""
    keyring = harness.keyring("A")
    if role == "generator":
        writer = MultiKeyring(generator=keyring, children=[partner])
    else:
        writer = MultiKeyring(generator=partner, children=[keyring])
    message = await encrypt_with(writer)
    assert len(inspect(message).encrypted_data_keys) == 2
    assert await decrypt_with(harness.keyring("A"), message) == PLAINTEXT
    assert await decrypt_with(partner, message) == PLAINTEXT


@harnesses()
async def test_reencryption_to_the_keyring_gives_a_message_only_its_key_opens(
    harness: KeyringHarness, partner: RawAesKeyring
) -> None:
    """As ``reencrypt``'s target: the new message is wrapped under key A only (the old
    key refuses it), and decrypts with key A."""
    old = await encrypt_with(partner)
    async with EnvelopeClient(partner) as client:
        new = await client.reencrypt(
            old, to_keyring=harness.keyring("A"), encryption_context=CONTEXT
        )
    assert len(inspect(new).encrypted_data_keys) == 1
    assert await decrypt_with(harness.keyring("A"), new) == PLAINTEXT
    await failure(decrypt_with(partner, new), errors.NoUsableKeyError)


@harnesses()
async def test_reencryption_from_the_keyring_gives_a_message_only_the_target_opens(
    harness: KeyringHarness, partner: RawAesKeyring
) -> None:
    """As the source of a rotation: what key A wrapped is re-encrypted under another
    key, which opens it, while key A no longer does."""
    old = await encrypt_with(harness.keyring("A"))
    async with EnvelopeClient(harness.keyring("A")) as client:
        new = await client.reencrypt(old, to_keyring=partner, encryption_context=CONTEXT)
    assert await decrypt_with(partner, new) == PLAINTEXT
    await failure(decrypt_with(harness.keyring("A"), new), errors.NoUsableKeyError)


# -- outages and the circuit breaker -----------------------------------------------------


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_transient_failure_is_retried_and_the_call_succeeds(
    harness: KeyringHarness,
) -> None:
    """One failed request (a 5xx) is retried within the call: encrypt and decrypt each
    succeed, the service saw two requests for each, and the breaker never moved."""
    remote = remote_of(harness)
    async with EnvelopeClient(harness.keyring("A"), cache=None) as client:
        remote.fail_next(1)
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert remote.wrap_requests() == 2
        remote.fail_next(1)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        assert remote.unwrap_requests() == 2
        assert client.stats.breaker_states[remote.breaker_name] == "closed"
        assert client.stats.breaker_transitions == 0


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_five_transient_failures_open_the_breaker_until_a_probe_succeeds(
    harness: KeyringHarness,
) -> None:
    """Five outages in a row open the breaker: calls then fail fast (CircuitOpenError)
    with no request, wraps and unwraps alike, for 30 s; then one call is let through as
    the probe (calls meanwhile are still refused), and its success closes the breaker."""
    remote = remote_of(harness)
    message = await encrypt_with(harness.keyring("A"))
    clock = FakeClock()
    keyring = harness.keyring("A", one_attempt=True)
    async with EnvelopeClient(keyring, cache=None, clock=clock) as client:
        before = remote.wrap_requests()
        remote.fail_next(THRESHOLD)
        for i in range(THRESHOLD):
            error = await failure(
                client.encrypt(PLAINTEXT, encryption_context={"n": str(i)}),
                remote.request_error,
            )
            assert is_transient(error) is True
        assert client.stats.breaker_states[remote.breaker_name] == "open"
        assert remote.wrap_requests() == before + THRESHOLD

        await failure(
            client.encrypt(PLAINTEXT, encryption_context=CONTEXT), errors.CircuitOpenError
        )
        await failure(client.decrypt(message, encryption_context=CONTEXT), errors.CircuitOpenError)
        clock.advance(RESET_TIMEOUT - 1)
        await failure(
            client.encrypt(PLAINTEXT, encryption_context=CONTEXT), errors.CircuitOpenError
        )
        assert remote.wrap_requests() == before + THRESHOLD
        assert remote.unwrap_requests() == 0

        clock.advance(1)
        # Four calls at once: the first is the one probe, the others are refused while
        # it is out (each meets the breaker before any I/O, the probe's answer needs I/O).
        outcomes = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context={"p": str(i)}) for i in range(4)),
            return_exceptions=True,
        )
        assert [type(o) for o in outcomes] == [bytes] + [errors.CircuitOpenError] * 3
        probe = outcomes[0]
        assert isinstance(probe, bytes)
        assert client.stats.breaker_states[remote.breaker_name] == "closed"
        assert remote.wrap_requests() == before + THRESHOLD + 1
        assert await client.decrypt(probe, encryption_context={"p": "0"}) == PLAINTEXT
        assert remote.unwrap_requests() == 1


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_answered_refusals_do_not_count_towards_the_breaker(
    harness: KeyringHarness,
) -> None:
    """A refusal (access denied) is an answer: the service is up. Twice the threshold of
    refusals leave the breaker closed, and one between outages restarts their count."""
    remote = remote_of(harness)
    message = await encrypt_with(harness.keyring("A"))
    keyring = harness.keyring("A", one_attempt=True)
    async with EnvelopeClient(keyring, cache=None, clock=FakeClock()) as client:
        before = remote.wrap_requests()
        remote.refuse_next(2 * THRESHOLD)
        for i in range(2 * THRESHOLD):
            error = await failure(
                client.encrypt(PLAINTEXT, encryption_context={"n": str(i)}),
                remote.request_error,
            )
            assert is_transient(error) is False
        remote.refuse_next(1)
        await failure(client.decrypt(message, encryption_context=CONTEXT), errors.NoUsableKeyError)
        assert client.stats.breaker_states[remote.breaker_name] == "closed"

        remote.fail_next(THRESHOLD - 1)
        remote.refuse_next(1)
        remote.fail_next(THRESHOLD - 1)
        outcomes = []
        for i in range(2 * THRESHOLD - 1):
            error = await failure(
                client.encrypt(PLAINTEXT, encryption_context={"m": str(i)}),
                remote.request_error,
            )
            outcomes.append(is_transient(error))
        assert outcomes == [True] * (THRESHOLD - 1) + [False] + [True] * (THRESHOLD - 1)
        assert client.stats.breaker_states[remote.breaker_name] == "closed"
        assert client.stats.breaker_transitions == 0

        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
    assert remote.wrap_requests() == before + 2 * THRESHOLD + 2 * THRESHOLD - 1
    assert remote.unwrap_requests() == 2


# -- call counts under caching and coalescing --------------------------------------------


async def concurrent_encrypts(keyring: Keyring) -> tuple[list[bytes], EnvelopeClient]:
    async with EnvelopeClient(keyring, cache=CacheConfig()) as client:
        messages = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(CONCURRENT))
        )
    return list(messages), client


async def concurrent_decrypts(keyring: Keyring, message: bytes) -> EnvelopeClient:
    async with EnvelopeClient(keyring, cache=CacheConfig()) as client:
        plaintexts = await asyncio.gather(
            *(client.decrypt(message, encryption_context=CONTEXT) for _ in range(CONCURRENT))
        )
    assert plaintexts == [PLAINTEXT] * CONCURRENT
    return client


@harnesses(Can.SHARE_DATA_KEYS)
async def test_concurrent_encrypts_with_caching_ask_the_keyring_once(
    harness: KeyringHarness,
) -> None:
    """Eight concurrent encrypts with one context share one data key: the keyring is
    asked once, the seven others wait for it, and every message carries the same
    wrapped key (each still has its own message ID, so its own derived key)."""
    watched = WatchedKeyring(harness.keyring("A"))
    messages, client = await concurrent_encrypts(watched)
    assert watched.encrypt_calls == 1
    assert client.stats.coalesced_waits == CONCURRENT - 1
    assert len({inspect(m).encrypted_data_keys for m in messages}) == 1
    assert len({inspect(m).message_id for m in messages}) == CONCURRENT


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_concurrent_encrypts_with_caching_make_one_remote_request(
    harness: KeyringHarness,
) -> None:
    await concurrent_encrypts(harness.keyring("A"))
    assert remote_of(harness).wrap_requests() == 1


@harnesses(lacking=Can.SHARE_DATA_KEYS)
async def test_concurrent_encrypts_with_caching_still_give_each_message_its_own_data_key(
    harness: KeyringHarness,
) -> None:
    """A keyring that shares no data keys is asked once per message, even with the
    client's cache on and one context: every message carries its own wrapped key."""
    watched = WatchedKeyring(harness.keyring("A"))
    messages, client = await concurrent_encrypts(watched)
    assert watched.encrypt_calls == CONCURRENT
    assert len(set(watched.data_keys)) == CONCURRENT
    assert len({inspect(m).encrypted_data_keys for m in messages}) == CONCURRENT
    assert client.stats.encrypt_cache_hits == client.stats.encrypt_cache_misses == 0


@harnesses(Can.SHARE_DATA_KEYS)
async def test_concurrent_decrypts_of_one_message_ask_the_keyring_once(
    harness: KeyringHarness,
) -> None:
    """Eight concurrent decrypts of one message: one unwrap, seven waits for it."""
    message = await encrypt_with(harness.keyring("A"))
    watched = WatchedKeyring(harness.keyring("A"))
    client = await concurrent_decrypts(watched, message)
    assert watched.decrypt_calls == 1
    assert client.stats.coalesced_waits == CONCURRENT - 1


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_concurrent_decrypts_of_one_message_make_one_remote_request(
    harness: KeyringHarness,
) -> None:
    message = await encrypt_with(harness.keyring("A"))
    await concurrent_decrypts(harness.keyring("A"), message)
    assert remote_of(harness).unwrap_requests() == 1


# -- the decrypt rate limit --------------------------------------------------------------


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_each_remote_unwrap_takes_one_rate_limit_token(harness: KeyringHarness) -> None:
    """A burst of two with time standing still: two uncached decrypts (two unwrap
    requests), then the third is refused (429) before any request is sent."""
    remote = remote_of(harness)
    message = await encrypt_with(harness.keyring("A"))
    limit = RateLimit(rate=1.0, burst=2)
    async with EnvelopeClient(
        harness.keyring("A"), cache=None, decrypt_rate_limit=limit, clock=FakeClock()
    ) as client:
        for _ in range(2):
            assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        await failure(
            client.decrypt(message, encryption_context=CONTEXT), errors.KMSDecryptRateLimited
        )
        assert client.stats.rate_limited == 1
    assert remote.unwrap_requests() == 2


@harnesses(lacking=Can.CALL_A_REMOTE_SERVICE)
async def test_local_unwrapping_takes_no_rate_limit_token(harness: KeyringHarness) -> None:
    """A local key costs nobody anything: with a burst of 1 and time standing still,
    any number of uncached decryptions go through."""
    async with EnvelopeClient(
        harness.keyring("A"),
        cache=None,
        decrypt_rate_limit=RateLimit(rate=1.0, burst=1),
        clock=FakeClock(),
    ) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        for _ in range(5):
            assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        assert client.stats.rate_limited == 0


# -- no key bytes in reprs, strs and errors ----------------------------------------------


async def data_key_of(harness: KeyringHarness, message: bytes) -> bytes:
    """The data key ``message`` was written with, as the keyring recovers it."""
    watched = WatchedKeyring(harness.keyring("A"))
    assert await decrypt_with(watched, message) == PLAINTEXT
    (data_key,) = watched.data_keys
    return data_key


def tampered(message: bytes) -> bytes:
    """``message`` with a bit of its last byte (in the final frame's tag) flipped."""
    return message[:-1] + bytes([message[-1] ^ 0x01])


@harnesses()
async def test_no_key_bytes_in_reprs_strs_or_errors(
    harness: KeyringHarness, partner: RawAesKeyring, declared: frozenset[Can]
) -> None:
    """Reprs, strs and errors reach logs and bug reports: the keyring's and the client's
    (before, while and after use) and every error of a tour of failures (with all that
    is chained to them) show neither the data key of the message they handled nor any
    key material the process holds."""
    keyring = harness.keyring("A")
    texts = [repr(keyring), str(keyring)]
    client = EnvelopeClient(keyring, frame_length=FRAME_LENGTH)
    texts += [repr(client), str(client)]
    async with client:
        texts += [repr(keyring), str(keyring), repr(client), str(client)]
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        required = await client.encrypt(
            PLAINTEXT, encryption_context=CONTEXT, required_encryption_context_keys={"tenant"}
        )
        raised = [
            await failure(
                client.decrypt(message, encryption_context={**CONTEXT, "tenant": "t2"}),
                errors.EncryptionContextMismatchError,
            ),
            await failure(client.decrypt(tampered(message)), errors.AuthenticationError),
            await failure(client.decrypt(message[:-40]), errors.TruncatedMessageError),
            await failure(
                client.decrypt_stream(tampered(message)).read_all(), errors.AuthenticationError
            ),
        ]
        texts += [repr(client.stats), str(client.stats)]
    texts += [repr(keyring), str(keyring), repr(client), str(client)]
    raised += [
        await failure(decrypt_with(harness.keyring("B"), message), errors.NoUsableKeyError),
        await failure(decrypt_with(partner, message), errors.NoUsableKeyError),
    ]
    # A missing required pair: refused by the unwrap, or else by the header's tag.
    refusal = (
        errors.NoUsableKeyError
        if Can.BIND_CONTEXT_TO_WRAPPED_KEY in declared
        else errors.AuthenticationError
    )
    raised.append(await failure(decrypt_with(harness.keyring("A"), required, {}), refusal))
    texts += [text for exc in raised for text in texts_of(exc)]

    secrets = {f"key material {i}": s for i, s in enumerate(harness.secrets)}
    secrets["data key"] = await data_key_of(harness, message)
    secrets["required-context message's data key"] = await data_key_of(harness, required)
    assert leaks(texts, secrets) == []


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_no_key_bytes_in_remote_failure_errors(harness: KeyringHarness) -> None:
    """The errors of outages and refusals (which carry the service's own messages and
    chain the client library's exceptions) show no data key either: neither the one
    being wrapped nor the one being unwrapped."""
    remote = remote_of(harness)
    writer = WatchedKeyring(harness.keyring("A", one_attempt=True))
    raised: list[BaseException] = []
    async with EnvelopeClient(writer, cache=None, clock=FakeClock()) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        remote.fail_next(1)
        raised.append(await failure(client.decrypt(message), remote.request_error))
        remote.refuse_next(1)
        raised.append(await failure(client.decrypt(message), errors.NoUsableKeyError))
    # A MultiKeyring child is handed the data key to wrap: its failure must not show it.
    partner = RawAesKeyring("partner", "partner-key", os.urandom(32))
    child = WatchedKeyring(harness.keyring("A", one_attempt=True))
    async with EnvelopeClient(
        MultiKeyring(generator=WatchedKeyring(partner), children=[child]), cache=None
    ) as client:
        for fault in (remote.fail_next, remote.refuse_next):
            fault(1)
            raised.append(
                await failure(
                    client.encrypt(PLAINTEXT, encryption_context=CONTEXT), remote.request_error
                )
            )
        generator = client.keyring
    assert isinstance(generator, MultiKeyring)
    assert isinstance(generator.generator, WatchedKeyring)
    secrets = {f"data key {i}": k for i, k in enumerate(writer.data_keys)}
    secrets.update({f"wrapped key {i}": k for i, k in enumerate(generator.generator.data_keys)})
    assert len(secrets) == 3
    assert leaks([t for exc in raised for t in texts_of(exc)], secrets) == []


# -- telemetry ---------------------------------------------------------------------------


def client_spans(otel: Otel) -> list[ReadableSpan]:
    return [s for s in otel.spans() if s.kind is SpanKind.CLIENT]


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_each_request_to_the_service_is_one_client_span_and_one_duration_point(
    harness: KeyringHarness,
) -> None:
    """Every wrap and unwrap the service received is one CLIENT span named after the
    service (its error class's ``SERVICE``) and the operation, with the key, the
    endpoint, one attempt and outcome ok, and one point of the duration histogram."""
    remote = remote_of(harness)
    otel = Otel()
    service = remote.request_error.SERVICE  # type: ignore[attr-defined]
    async with EnvelopeClient(
        harness.keyring("A"), cache=None, telemetry=otel.telemetry()
    ) as client:
        otel.clear()  # start-up key checks are calls too, but not this test's
        before = otel.value("aioenvelope.key_service.call.duration")
        sent = remote.wrap_requests() + remote.unwrap_requests()
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        sent = remote.wrap_requests() + remote.unwrap_requests() - sent
    calls = client_spans(otel)
    assert sent >= 2
    assert len(calls) == sent
    assert otel.value("aioenvelope.key_service.call.duration") - before == sent
    for span in calls:
        attrs = attributes_of(span)
        assert span.name == f"{service} {attrs['rpc.method']}"
        assert attrs["aioenvelope.key_service"] == service
        assert attrs["aioenvelope.outcome"] == "ok"
        assert attrs["aioenvelope.attempts"] == 1
        assert attrs["aioenvelope.key_id"]
        assert attrs["server.address"]


@harnesses(Can.CALL_A_REMOTE_SERVICE)
async def test_outages_are_error_spans_and_the_breaker_opening_is_a_transition(
    harness: KeyringHarness,
) -> None:
    """Five outages: five transient error spans with the service's error code, one
    transition to open on the service's breaker and the state gauge saying so; then a
    refused span (no request)."""
    remote = remote_of(harness)
    otel = Otel()
    async with EnvelopeClient(
        harness.keyring("A", one_attempt=True),
        cache=None,
        clock=FakeClock(),
        telemetry=otel.telemetry(),
    ) as client:
        otel.clear()
        remote.fail_next(THRESHOLD)
        for i in range(THRESHOLD):
            await failure(
                client.encrypt(PLAINTEXT, encryption_context={"n": str(i)}), remote.request_error
            )
        await failure(
            client.encrypt(PLAINTEXT, encryption_context=CONTEXT), errors.CircuitOpenError
        )
        gauge = {
            "aioenvelope.circuit_breaker": remote.breaker_name,
            "aioenvelope.circuit_breaker.state": "open",
        }
        assert otel.value("aioenvelope.circuit_breaker.state", gauge) == 1
    *failed, refused = client_spans(otel)
    assert len(failed) == THRESHOLD
    for span in failed:
        attrs = attributes_of(span)
        assert attrs["aioenvelope.outcome"] == "error"
        assert attrs["aioenvelope.error.transient"] is True
        assert attrs["error.type"]
        assert span.status.status_code is StatusCode.ERROR
    assert attributes_of(refused)["error.type"] == "CircuitOpen"
    opened = {
        "aioenvelope.circuit_breaker": remote.breaker_name,
        "aioenvelope.circuit_breaker.state": "open",
        "aioenvelope.key_service": remote.request_error.SERVICE,  # type: ignore[attr-defined]
    }
    assert otel.value("aioenvelope.circuit_breaker.transitions", opened) == 1
