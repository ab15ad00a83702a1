"""The key manager against a real moto KMS, through the public API.

Encrypt-side data key reuse and its limits (messages, bytes, age) and cache keys
(context, suite, required keys); the decrypt cache (hits, TTL, LRU, isolation between
contexts); coalescing of concurrent misses (cancellation, errors, client shutdown); the
token bucket on decrypt misses; and the stats that report all of it. Everything that
depends on time runs on a fake clock passed as ``clock=``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aioboto3
import anyio
import pytest
from kms_server import KmsKey, MotoKms

from aioenvelope import (
    AlgorithmSuite,
    CacheConfig,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    KmsKeyring,
    MessageHeader,
    RateLimit,
    errors,
)
from aioenvelope.format.header import parse_header

CONTEXT = {"tenant": "t1", "purpose": "key-manager-tests"}
PLAINTEXT = b"attack at dawn " * 7
KIB = 1024
BURST = 10_000
COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
PUBLIC_KEY_FIELD = "aws-crypto-public-key"


# -- helpers -----------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when told to: cache ages, TTLs and token refills follow it."""

    def __init__(self) -> None:
        self.now = 1024.0  # binary-exact, so that advancing by 0.5 or 0.25 stays exact

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_shared_session: list[Any] = []


def shared_session() -> Any:
    """One aioboto3 session for the module's keyrings (a fresh one reloads botocore's
    service models). Made lazily, under the session's dummy credentials."""
    if not _shared_session:
        _shared_session.append(aioboto3.Session())
    return _shared_session[0]


def kms_keyring(moto_kms: MotoKms, key_arn: str) -> KmsKeyring:
    """A keyring on the moto server. Named by ARN without the start-up DescribeKey, so the
    only KMS calls are the data-key calls under test."""
    return KmsKeyring(
        key_arn,
        endpoint_url=moto_kms.endpoint_url,
        region_name=moto_kms.region,
        session=shared_session(),
        check_keys=False,
    )


def payload(i: int) -> bytes:
    """1 KiB of plaintext, different for every ``i``."""
    return (b"message %d " % i).ljust(KIB, b".")


def header_of(blob: bytes) -> MessageHeader:
    """The message's header, read without any KMS call."""
    return parse_header(blob, max_encrypted_data_keys=10).header


def edk_ciphertext(blob: bytes) -> bytes:
    """The ciphertext of the message's only EDK (KMS's CiphertextBlob)."""
    (edk,) = header_of(blob).encrypted_data_keys
    return edk.ciphertext


def with_edk_ciphertext(blob: bytes, ciphertext: bytes) -> bytes:
    """``blob`` with its EDK's ciphertext replaced (same length, so the header still parses)."""
    original = edk_ciphertext(blob)
    assert len(ciphertext) == len(original)
    assert blob.count(original) == 1
    return blob.replace(original, ciphertext)


def bogus_messages(blob: bytes, count: int) -> list[bytes]:
    """``count`` copies of ``blob``, each with a different corrupted EDK: every one is a
    distinct decrypt cache key, needs its own KMS Decrypt, and KMS refuses each
    (InvalidCiphertextException: the change is in the blob's authenticated part)."""
    original = edk_ciphertext(blob)
    messages = []
    for i in range(1, count + 1):
        flip = i.to_bytes(2, "big")
        bad = original[:-2] + bytes(a ^ b for a, b in zip(original[-2:], flip, strict=True))
        messages.append(with_edk_ciphertext(blob, bad))
    assert len(set(messages)) == count
    return messages


def missing_key(key: KmsKey) -> str:
    """The ARN of a key that does not exist (same account and region as ``key``)."""
    return key.arn.replace(key.key_id, "00000000-0000-4000-8000-000000000000")


def nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` without zero entries (stats may list every operation)."""
    return {name: n for name, n in counts.items() if n}


async def encrypt_messages(
    keyring: Keyring,
    count: int,
    *,
    context: Mapping[str, str] = CONTEXT,
    cache: CacheConfig | None = CacheConfig(),  # noqa: B008 - frozen config, never mutated
) -> list[bytes]:
    """``count`` messages of ``payload(i)`` from one client (by default sharing a data key)."""
    async with EnvelopeClient(keyring, cache=cache) as client:
        return [await client.encrypt(payload(i), encryption_context=context) for i in range(count)]


async def settle(predicate: Callable[[], bool], what: str) -> None:
    """Let other tasks run until ``predicate`` holds (a bounded number of loop turns)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def other_tasks() -> set[asyncio.Task[Any]]:
    """The loop's unfinished tasks, except the test itself."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


class GatedKeyring(Keyring):
    """A real KmsKeyring whose decrypts wait at a gate first, so that a cache miss stays
    in flight for exactly as long as a test needs (instead of racing moto)."""

    def __init__(self, inner: KmsKeyring) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls = 0

    @property
    def kms_calls(self) -> Mapping[str, int]:
        return self.inner.kms_calls

    def attach(self, runtime: Any) -> None:
        self.inner.attach(runtime)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        return await self.inner.on_encrypt(materials)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        return await self.inner.on_decrypt(materials, encrypted_data_keys)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    """The writer's keyring: a fresh one per test, so its ``kms_calls`` start at zero."""
    return kms_keyring(moto_kms, kms_key.arn)


@pytest.fixture
def reader_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    """A second keyring for a second client, whose decrypt cache starts cold."""
    return kms_keyring(moto_kms, kms_key.arn)


@pytest.fixture
def gated_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> GatedKeyring:
    return GatedKeyring(kms_keyring(moto_kms, kms_key.arn))


# -- encrypt: one data key for many messages ---------------------------------------------


async def test_ten_thousand_encrypts_with_one_context_make_one_generate_data_key(
    keyring: KmsKeyring,
) -> None:
    """The point of the cache: under the default limits, a stream of messages with one
    context costs one KMS round trip, not one per message."""
    async with EnvelopeClient(keyring) as client:
        for i in range(BURST):
            await client.encrypt(payload(i), encryption_context=CONTEXT)
        stats = client.stats
    assert keyring.kms_calls == {"GenerateDataKey": 1}
    assert nonzero(stats.kms_calls) == {"GenerateDataKey": 1}
    assert stats.encrypt_cache_misses == 1
    assert stats.encrypt_cache_hits == BURST - 1


async def test_concurrent_encrypts_with_one_context_make_one_generate_data_key(
    keyring: KmsKeyring,
) -> None:
    """A cold burst must not stampede KMS: concurrent misses for the same entry share
    one GenerateDataKey."""
    async with EnvelopeClient(keyring) as client:
        blobs = await asyncio.gather(
            *(client.encrypt(payload(i), encryption_context=CONTEXT) for i in range(1000))
        )
    assert keyring.kms_calls == {"GenerateDataKey": 1}
    assert len({edk_ciphertext(b) for b in blobs}) == 1


async def test_messages_sharing_a_data_key_decrypt_and_have_distinct_message_ids(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """Reuse shares the EDK, never the message: each message has its own ID (so its own
    derived key) and decrypts on its own."""
    blobs = await encrypt_messages(keyring, 100)
    async with EnvelopeClient(reader_keyring) as client:
        results = [await client.decrypt_with_header(b, encryption_context=CONTEXT) for b in blobs]
    assert [r.plaintext for r in results] == [payload(i) for i in range(100)]
    assert len({r.header.message_id for r in results}) == 100
    assert len({r.header.encrypted_data_keys[0].ciphertext for r in results}) == 1
    assert len(set(blobs)) == 100
    assert keyring.kms_calls == {"GenerateDataKey": 1}


async def test_signing_suite_reuses_the_data_key_and_the_signing_key(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """Signing suites are reused too: the signing key goes with the cache entry (its public
    key is in the context KMS saw), and every message still verifies."""
    async with EnvelopeClient(keyring) as client:
        blobs = [
            await client.encrypt(
                payload(i), encryption_context=CONTEXT, algorithm_suite=COMMIT_SIGN
            )
            for i in range(20)
        ]
    assert keyring.kms_calls == {"GenerateDataKey": 1}
    headers = [header_of(b) for b in blobs]
    assert {h.algorithm_suite for h in headers} == {COMMIT_SIGN}
    assert len({h.encryption_context[PUBLIC_KEY_FIELD] for h in headers}) == 1
    async with EnvelopeClient(reader_keyring) as client:
        plaintexts = [await client.decrypt(b, encryption_context=CONTEXT) for b in blobs]
    assert plaintexts == [payload(i) for i in range(20)]


# -- encrypt: the limits -----------------------------------------------------------------


async def test_message_limit_crossed_makes_exactly_one_more_generate_data_key(
    keyring: KmsKeyring,
) -> None:
    """max_messages=100: the 101st message gets a new data key, which is then reused."""
    async with EnvelopeClient(keyring, cache=CacheConfig(max_messages=100)) as client:
        blobs = [await client.encrypt(payload(i), encryption_context=CONTEXT) for i in range(100)]
        assert keyring.kms_calls == {"GenerateDataKey": 1}
        blobs += [
            await client.encrypt(payload(i), encryption_context=CONTEXT) for i in range(100, 200)
        ]
        stats = client.stats
    assert keyring.kms_calls == {"GenerateDataKey": 2}
    assert stats.encrypt_cache_misses == 2
    first, second = (
        {edk_ciphertext(b) for b in blobs[:100]},
        {edk_ciphertext(b) for b in blobs[100:]},
    )
    assert len(first) == len(second) == 1
    assert first != second


async def test_byte_limit_crossed_makes_exactly_one_more_generate_data_key(
    keyring: KmsKeyring,
) -> None:
    """max_bytes=10 KiB: ten 1 KiB messages fit exactly; the 11th would exceed the limit
    and gets a new data key."""
    async with EnvelopeClient(keyring, cache=CacheConfig(max_bytes=10 * KIB)) as client:
        for i in range(10):
            await client.encrypt(payload(i), encryption_context=CONTEXT)
        assert keyring.kms_calls == {"GenerateDataKey": 1}
        await client.encrypt(payload(10), encryption_context=CONTEXT)
        assert keyring.kms_calls == {"GenerateDataKey": 2}
        await client.encrypt(payload(11), encryption_context=CONTEXT)
    assert keyring.kms_calls == {"GenerateDataKey": 2}


async def test_message_larger_than_byte_limit_never_shares_its_data_key(
    keyring: KmsKeyring,
) -> None:
    """A message that alone exceeds max_bytes may not use a cached key, nor leave one
    behind for the next message."""
    async with EnvelopeClient(keyring, cache=CacheConfig(max_bytes=KIB)) as client:
        big = [await client.encrypt(b"x" * (2 * KIB), encryption_context=CONTEXT) for _ in range(3)]
    assert keyring.kms_calls == {"GenerateDataKey": 3}
    assert len({edk_ciphertext(b) for b in big}) == 3


async def test_age_limit_crossed_makes_exactly_one_more_generate_data_key(
    keyring: KmsKeyring, clock: FakeClock
) -> None:
    """max_age=60 s: a key is reused until it is 60 s old (by the client's clock), then
    replaced once."""
    async with EnvelopeClient(keyring, cache=CacheConfig(max_age=60.0), clock=clock) as client:
        await client.encrypt(payload(0), encryption_context=CONTEXT)
        clock.advance(59.0)
        await client.encrypt(payload(1), encryption_context=CONTEXT)
        assert keyring.kms_calls == {"GenerateDataKey": 1}
        clock.advance(2.0)
        await client.encrypt(payload(2), encryption_context=CONTEXT)
        assert keyring.kms_calls == {"GenerateDataKey": 2}
        await client.encrypt(payload(3), encryption_context=CONTEXT)
    assert keyring.kms_calls == {"GenerateDataKey": 2}


async def test_concurrent_encrypts_never_use_a_data_key_beyond_max_messages(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """The message limit is a security bound, so it must hold under concurrency too: no
    data key may protect more than max_messages messages."""
    async with EnvelopeClient(keyring, cache=CacheConfig(max_messages=10)) as client:
        blobs = await asyncio.gather(
            *(client.encrypt(payload(i), encryption_context=CONTEXT) for i in range(100))
        )
    uses = collections.Counter(edk_ciphertext(b) for b in blobs)
    assert max(uses.values()) <= 10
    assert keyring.kms_calls == {"GenerateDataKey": len(uses)}
    async with EnvelopeClient(reader_keyring) as reader:
        plaintexts = [await reader.decrypt(b, encryption_context=CONTEXT) for b in blobs]
    assert plaintexts == [payload(i) for i in range(100)]


# -- encrypt: what a cache entry is for --------------------------------------------------


async def test_different_encryption_contexts_do_not_share_a_data_key(
    keyring: KmsKeyring,
) -> None:
    """KMS binds an EDK to its context, so another context needs another data key."""
    contexts = [{"tenant": "a"}, {"tenant": "b"}]
    async with EnvelopeClient(keyring) as client:
        blobs = [
            await client.encrypt(PLAINTEXT, encryption_context=contexts[i % 2]) for i in range(10)
        ]
    assert keyring.kms_calls == {"GenerateDataKey": 2}
    assert len({edk_ciphertext(b) for b in blobs[0::2]}) == 1
    assert len({edk_ciphertext(b) for b in blobs[1::2]}) == 1
    assert edk_ciphertext(blobs[0]) != edk_ciphertext(blobs[1])


async def test_different_algorithm_suites_do_not_share_a_data_key(keyring: KmsKeyring) -> None:
    """A data key belongs to one suite (and a signing suite's context has its public key)."""
    async with EnvelopeClient(keyring) as client:
        for i in range(10):
            suite = (COMMIT, COMMIT_SIGN)[i % 2]
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT, algorithm_suite=suite)
    assert keyring.kms_calls == {"GenerateDataKey": 2}


async def test_required_context_keys_are_part_of_the_encrypt_cache_key(
    keyring: KmsKeyring,
) -> None:
    """Same context, different required keys: different headers and readers' duties, so
    the two must not share an entry."""
    async with EnvelopeClient(keyring) as client:
        for i in range(10):
            required = ("tenant",) if i % 2 else ()
            await client.encrypt(
                PLAINTEXT, encryption_context=CONTEXT, required_encryption_context_keys=required
            )
    assert keyring.kms_calls == {"GenerateDataKey": 2}


async def test_encrypt_cache_keeps_at_most_encrypt_entries_contexts(keyring: KmsKeyring) -> None:
    """encrypt_entries=2 bounds memory: a third context pushes the oldest entry out, and
    that context then needs a new data key."""
    a, b, c = {"tenant": "a"}, {"tenant": "b"}, {"tenant": "c"}
    async with EnvelopeClient(keyring, cache=CacheConfig(encrypt_entries=2)) as client:
        for context in (a, b, c):
            await client.encrypt(PLAINTEXT, encryption_context=context)
        await client.encrypt(PLAINTEXT, encryption_context=a)
        assert keyring.kms_calls == {"GenerateDataKey": 4}
        await client.encrypt(PLAINTEXT, encryption_context=c)
    assert keyring.kms_calls == {"GenerateDataKey": 4}


async def test_generate_data_key_error_reaches_every_concurrent_encrypt(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """A failed GenerateDataKey fails every encrypt coalesced on it, once, with KMS's reason."""
    keyring = kms_keyring(moto_kms, missing_key(kms_key))
    async with EnvelopeClient(keyring) as client:
        outcomes = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(50)),
            return_exceptions=True,
        )
    assert all(
        isinstance(o, errors.KMSError) and o.error_code == "NotFoundException" for o in outcomes
    )
    assert keyring.kms_calls == {"GenerateDataKey": 1}


async def test_generate_data_key_error_is_not_cached(moto_kms: MotoKms, kms_key: KmsKey) -> None:
    """After a failed GenerateDataKey the next encrypt asks KMS again."""
    keyring = kms_keyring(moto_kms, missing_key(kms_key))
    async with EnvelopeClient(keyring) as client:
        for _ in range(2):
            with pytest.raises(errors.KMSError):
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert keyring.kms_calls == {"GenerateDataKey": 2}


# -- switching caching off ---------------------------------------------------------------


async def test_reuse_disabled_makes_one_generate_data_key_per_message(
    keyring: KmsKeyring,
) -> None:
    """reuse_data_keys=False is for callers who want a fresh data key for every message."""
    async with EnvelopeClient(keyring, cache=CacheConfig(reuse_data_keys=False)) as client:
        blobs = [await client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(5)]
        stats = client.stats
    assert keyring.kms_calls == {"GenerateDataKey": 5}
    assert len({edk_ciphertext(b) for b in blobs}) == 5
    assert stats.encrypt_cache_hits == 0


async def test_reuse_disabled_still_caches_decrypted_data_keys(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """reuse_data_keys=False switches off encrypt reuse only; decrypts are still cached."""
    (blob,) = await encrypt_messages(keyring, 1)
    async with EnvelopeClient(reader_keyring, cache=CacheConfig(reuse_data_keys=False)) as client:
        for _ in range(3):
            assert await client.decrypt(blob, encryption_context=CONTEXT) == payload(0)
        stats = client.stats
    assert reader_keyring.kms_calls == {"Decrypt": 1}
    assert (stats.decrypt_cache_misses, stats.decrypt_cache_hits) == (1, 2)


async def test_no_cache_makes_one_kms_call_per_encrypt_and_per_decrypt(
    keyring: KmsKeyring,
) -> None:
    """cache=None: every message makes its own KMS call, in both directions."""
    async with EnvelopeClient(keyring, cache=None) as client:
        blobs = [await client.encrypt(PLAINTEXT, encryption_context=CONTEXT) for _ in range(5)]
        for _ in range(5):
            assert await client.decrypt(blobs[0], encryption_context=CONTEXT) == PLAINTEXT
        stats = client.stats
    assert keyring.kms_calls == {"GenerateDataKey": 5, "Decrypt": 5}
    assert nonzero(stats.kms_calls) == {"GenerateDataKey": 5, "Decrypt": 5}
    assert stats.encrypt_cache_hits == stats.decrypt_cache_hits == 0


async def test_no_cache_gives_concurrent_decrypts_of_distinct_messages_their_own_kms_calls(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """cache=None means every message makes its own KMS call (one CloudTrail record per
    object), also when messages that share an EDK are decrypted at the same time."""
    blobs = await encrypt_messages(keyring, 20)
    async with EnvelopeClient(reader_keyring, cache=None) as client:
        plaintexts = await asyncio.gather(
            *(client.decrypt(b, encryption_context=CONTEXT) for b in blobs)
        )
    assert plaintexts == [payload(i) for i in range(20)]
    assert reader_keyring.kms_calls == {"Decrypt": 20}


# -- decrypt cache -----------------------------------------------------------------------


async def test_ten_thousand_concurrent_decrypts_of_one_edk_make_one_decrypt_call(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """10,000 messages sharing one EDK, decrypted at once by a cold client: one KMS
    Decrypt, everyone else coalesces on it or hits the cache, and every request is
    accounted for exactly once."""
    blobs = await encrypt_messages(keyring, BURST)
    assert keyring.kms_calls == {"GenerateDataKey": 1}
    async with EnvelopeClient(reader_keyring) as client:
        results = await asyncio.gather(
            *(client.decrypt_with_header(b, encryption_context=CONTEXT) for b in blobs)
        )
        stats = client.stats
    assert reader_keyring.kms_calls == {"Decrypt": 1}
    assert nonzero(stats.kms_calls) == {"Decrypt": 1}
    assert [r.plaintext for r in results] == [payload(i) for i in range(BURST)]
    assert len({r.header.message_id for r in results}) == BURST
    assert len({r.header.encrypted_data_keys[0].ciphertext for r in results}) == 1
    assert stats.coalesced_waits > 0
    assert stats.decrypt_cache_hits + stats.coalesced_waits == BURST - 1
    assert stats.decrypt_cache_hits + stats.decrypt_cache_misses == BURST


async def test_second_message_with_the_same_edk_is_a_decrypt_cache_hit(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """A hit skips KMS: two messages under one reused data key cost one Decrypt."""
    first, second = await encrypt_messages(keyring, 2)
    async with EnvelopeClient(reader_keyring) as client:
        assert await client.decrypt(first, encryption_context=CONTEXT) == payload(0)
        assert await client.decrypt(second, encryption_context=CONTEXT) == payload(1)
        stats = client.stats
    assert reader_keyring.kms_calls == {"Decrypt": 1}
    assert (stats.decrypt_cache_misses, stats.decrypt_cache_hits) == (1, 1)


async def test_decrypt_cache_entry_expires_after_decrypt_ttl(
    keyring: KmsKeyring, reader_keyring: KmsKeyring, clock: FakeClock
) -> None:
    """decrypt_ttl=60 s: within it the key comes from the cache; after it, from KMS again."""
    (blob,) = await encrypt_messages(keyring, 1)
    config = CacheConfig(decrypt_ttl=60.0)
    async with EnvelopeClient(reader_keyring, cache=config, clock=clock) as client:
        await client.decrypt(blob, encryption_context=CONTEXT)
        clock.advance(59.0)
        await client.decrypt(blob, encryption_context=CONTEXT)
        assert reader_keyring.kms_calls == {"Decrypt": 1}
        clock.advance(2.0)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == payload(0)
    assert reader_keyring.kms_calls == {"Decrypt": 2}


async def test_decrypt_cache_evicts_the_least_recently_used_entry(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """decrypt_entries=2: a third key evicts the one used longest ago, which then costs a
    new KMS call; the recently used one stays."""
    a, b, c = [
        (await encrypt_messages(keyring, 1, context={"tenant": t}))[0] for t in ("a", "b", "c")
    ]
    contexts = {a: {"tenant": "a"}, b: {"tenant": "b"}, c: {"tenant": "c"}}
    async with EnvelopeClient(reader_keyring, cache=CacheConfig(decrypt_entries=2)) as client:

        async def decrypt(blob: bytes) -> int:
            await client.decrypt(blob, encryption_context=contexts[blob])
            return reader_keyring.kms_calls["Decrypt"]

        assert [await decrypt(m) for m in (a, b, a, c, a, b)] == [1, 2, 2, 3, 3, 4]


async def test_edk_copied_into_a_message_with_another_context_does_not_hit_the_cache(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """The context is part of the decrypt cache key: a cached data key must not be handed
    to a message that only copied its EDK. KMS decides (and refuses)."""
    (blob_a,) = await encrypt_messages(keyring, 1, context={"tenant": "a"})
    (blob_b,) = await encrypt_messages(keyring, 1, context={"tenant": "b"})
    forged = with_edk_ciphertext(blob_b, edk_ciphertext(blob_a))
    async with EnvelopeClient(reader_keyring) as client:
        assert await client.decrypt(blob_a, encryption_context={"tenant": "a"}) == payload(0)
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(forged, encryption_context={"tenant": "b"})
        stats = client.stats
    assert reader_keyring.kms_calls == {"Decrypt": 2}
    assert stats.decrypt_cache_hits == 0


async def test_reproduced_required_context_is_part_of_the_decrypt_cache_key(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """A required (unstored) pair is supplied by the reader: a wrong value must not get
    the key cached for the right one; the right value again is a hit."""
    context = {"tenant": "a", "order": "1"}
    async with EnvelopeClient(keyring) as client:
        blob = await client.encrypt(
            PLAINTEXT, encryption_context=context, required_encryption_context_keys=["order"]
        )
    async with EnvelopeClient(reader_keyring) as client:
        assert await client.decrypt(blob, encryption_context={"order": "1"}) == PLAINTEXT
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(blob, encryption_context={"order": "2"})
        assert reader_keyring.kms_calls == {"Decrypt": 2}
        assert client.stats.decrypt_cache_hits == 0
        assert await client.decrypt(blob, encryption_context={"order": "1"}) == PLAINTEXT
        assert client.stats.decrypt_cache_hits == 1
    assert reader_keyring.kms_calls == {"Decrypt": 2}


# -- coalescing --------------------------------------------------------------------------


async def test_cancelling_the_request_that_started_a_miss_does_not_fail_the_waiters(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """The shared call belongs to the client, not to the first caller: cancelling that
    caller (a client disconnect) must not fail or hang everyone coalesced on it."""
    (blob,) = await encrypt_messages(keyring, 1)
    async with EnvelopeClient(gated_keyring) as client:
        first = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await asyncio.wait_for(gated_keyring.entered.wait(), 5)
        waiters = [
            asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT)) for _ in range(50)
        ]
        await settle(lambda: client.stats.coalesced_waits == 50, "50 coalesced waiters")
        first.cancel()
        await asyncio.wait([first])
        assert first.cancelled()
        gated_keyring.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert results == [payload(0)] * 50
    assert gated_keyring.calls == 1
    assert gated_keyring.kms_calls == {"Decrypt": 1}


async def test_cancelling_a_waiter_does_not_cancel_the_shared_call(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """A waiter that gives up leaves the others (the starter included) unaffected."""
    (blob,) = await encrypt_messages(keyring, 1)
    async with EnvelopeClient(gated_keyring) as client:
        first = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await asyncio.wait_for(gated_keyring.entered.wait(), 5)
        waiter = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await settle(lambda: client.stats.coalesced_waits == 1, "one coalesced waiter")
        waiter.cancel()
        await asyncio.wait([waiter])
        gated_keyring.gate.set()
        assert await asyncio.wait_for(first, 5) == payload(0)
    assert waiter.cancelled()
    assert gated_keyring.kms_calls == {"Decrypt": 1}


async def test_deadline_on_the_request_that_started_a_miss_takes_effect_at_once(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """The request's own deadline (an anyio cancel scope, as anyio-based servers and
    callers use) ends that request when it expires, not when the shared call ends."""
    (blob,) = await encrypt_messages(keyring, 1)
    async with EnvelopeClient(gated_keyring) as client:

        async def with_deadline() -> bool:
            with anyio.move_on_after(0.1) as scope:
                await client.decrypt(blob, encryption_context=CONTEXT)
            return scope.cancelled_caught

        started = time.monotonic()
        assert await asyncio.wait_for(with_deadline(), 2) is True
        assert time.monotonic() - started < 1.0
        gated_keyring.gate.set()
        assert await client.decrypt(blob, encryption_context=CONTEXT) == payload(0)


async def test_closing_the_client_leaves_no_abandoned_miss_running(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """A shared call whose callers all left must end with the client that owns it, not
    linger as a pending task on the loop."""
    (blob,) = await encrypt_messages(keyring, 1)
    before = other_tasks()
    async with EnvelopeClient(gated_keyring) as client:
        request = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await asyncio.wait_for(gated_keyring.entered.wait(), 5)
        request.cancel()
        await asyncio.wait([request])
    await asyncio.sleep(0)
    assert other_tasks() - before == set()
    assert gated_keyring.kms_calls == {}


async def test_keyring_error_reaches_every_concurrent_waiter(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """One failed KMS Decrypt fails every request coalesced on it, with KMS's reason."""
    (bogus,) = bogus_messages((await encrypt_messages(keyring, 1))[0], 1)
    async with EnvelopeClient(gated_keyring) as client:
        tasks = [
            asyncio.create_task(client.decrypt(bogus, encryption_context=CONTEXT))
            for _ in range(50)
        ]
        await settle(lambda: client.stats.coalesced_waits == 49, "49 coalesced waiters")
        gated_keyring.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(o, errors.NoUsableKeyError) for o in outcomes)
    assert all("InvalidCiphertextException" in str(o) for o in outcomes)
    assert gated_keyring.kms_calls == {"Decrypt": 1}


async def test_keyring_error_is_not_cached(keyring: KmsKeyring, reader_keyring: KmsKeyring) -> None:
    """A failure is not remembered: retrying the same message asks KMS again (the fault
    may have been fixed, e.g. a grant added)."""
    (bogus,) = bogus_messages((await encrypt_messages(keyring, 1))[0], 1)
    async with EnvelopeClient(reader_keyring) as client:
        for _ in range(2):
            with pytest.raises(errors.NoUsableKeyError):
                await client.decrypt(bogus, encryption_context=CONTEXT)
    assert reader_keyring.kms_calls == {"Decrypt": 2}


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
