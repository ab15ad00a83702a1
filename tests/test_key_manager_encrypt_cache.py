"""The key manager's encrypt side against a real moto KMS, through the public API.

Data key reuse (one GenerateDataKey for many messages), its limits (messages, bytes,
age, on a fake clock passed as ``clock=``), what a cache entry is keyed by (context,
suite, required keys), errors that must not be cached, and switching caching off.
"""

from __future__ import annotations

import asyncio
import collections

import key_manager_support as support
import pytest
from fake_clock import FakeClock
from key_manager_support import (
    BURST,
    COMMIT,
    COMMIT_SIGN,
    CONTEXT,
    KIB,
    PLAINTEXT,
    PUBLIC_KEY_FIELD,
    edk_ciphertext,
    encrypt_messages,
    header_of,
    kms_keyring,
    missing_key,
    nonzero,
    payload,
)
from kms_server import KmsKey, MotoKms

from aioenvelope import (
    CacheConfig,
    EnvelopeClient,
    KmsKeyring,
    errors,
)

# The support module's fixtures, for this module's tests.
clock = support.clock
keyring = support.keyring
reader_keyring = support.reader_keyring


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
            with pytest.raises(errors.KMSError) as info:
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            assert info.value.error_code == "NotFoundException"
            assert info.value.transient is False
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


@pytest.mark.parametrize("cache", [CacheConfig(), CacheConfig(reuse_data_keys=False), None])
async def test_a_context_value_that_cannot_be_hashed_is_an_encryption_context_error(
    keyring: KmsKeyring, cache: CacheConfig | None
) -> None:
    """Cache keys and memos hash the context first; a value whose hash raises (a
    writable memoryview raises ValueError) is still reported as the library's error,
    with no KMS call."""
    async with EnvelopeClient(keyring, cache=cache) as client:
        with pytest.raises(errors.EncryptionContextError):
            await client.encrypt(
                b"x",
                encryption_context={"k": memoryview(bytearray(b"v"))},  # type: ignore[dict-item]
            )
    assert keyring.kms_calls == {}
