"""The key manager's decrypt cache against a real moto KMS, through the public API.

Hits, TTL (on a fake clock passed as ``clock=``), LRU eviction, isolation between
contexts, and what happens to the cached data keys when they leave the cache.
"""

from __future__ import annotations

import asyncio

import key_manager_support as support
import pytest
from fake_clock import FakeClock
from key_manager_support import (
    BURST,
    BURST_DEADLINE,
    CONTEXT,
    PLAINTEXT,
    edk_ciphertext,
    encrypt_messages,
    kms_keyring,
    nonzero,
    payload,
    with_edk_ciphertext,
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


# -- decrypt cache -----------------------------------------------------------------------


async def test_ten_thousand_concurrent_decrypts_of_one_edk_make_one_decrypt_call(
    keyring: KmsKeyring, moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """10,000 messages sharing one EDK, decrypted at once by a cold client: one KMS
    Decrypt, everyone else coalesces on it or hits the cache, and every request is
    accounted for exactly once. (The shared Decrypt has BURST_DEADLINE: the claim is
    coalescing, not how fast one loop starts 10,000 tasks.)"""
    reader_keyring = kms_keyring(moto_kms, kms_key.arn, deadline=BURST_DEADLINE)
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


async def test_a_message_with_a_large_context_is_cached_under_a_digest(
    keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    """Past a few KiB of EDKs and context the cache key is a SHA-384 digest, not the
    bytes (an entry costs 48 bytes however large the header): the second message under
    the same data key and context is still a hit, and no key in the cache is large."""
    context = {"tenant": "a", "notes": "n" * 5000}
    first, second = await encrypt_messages(keyring, 2, context=context)
    async with EnvelopeClient(reader_keyring) as client:
        assert await client.decrypt(first, encryption_context=context) == payload(0)
        assert await client.decrypt(second, encryption_context=context) == payload(1)
        stats = client.stats
        cache = client._materials._decrypt
        assert cache is not None
        assert len(cache) == 1
        assert all(isinstance(key, bytes) and len(key) == 48 for key in cache)
    assert reader_keyring.kms_calls == {"Decrypt": 1}
    assert (stats.decrypt_cache_misses, stats.decrypt_cache_hits) == (1, 1)


async def test_decrypt_cache_keys_never_join_parts_into_one(
    reader_keyring: KmsKeyring,
) -> None:
    """Small cache keys are the header's bytes, each part its own element: EDKs and a
    context whose concatenations are equal (or that move bytes from one part to the
    next, or split one EDK in two) give different keys, large or small."""
    from aioenvelope.format.suites import AlgorithmSuite

    suite = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    async with EnvelopeClient(reader_keyring) as client:
        key_of = client._materials._decrypt_key
        for pad in (0, 3000):  # tuple keys, then digests
            tail = b"x" * pad
            keys = [
                key_of(suite, [b"ab"], b"c" + tail),
                key_of(suite, [b"a"], b"bc" + tail),
                key_of(suite, [b"a", b"b"], b"c" + tail),
                key_of(AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256, [b"ab"], b"c" + tail),
            ]
            assert len(set(keys)) == len(keys)


async def test_decrypt_cache_keys_of_many_edks_are_digests(
    reader_keyring: KmsKeyring,
) -> None:
    """A header of hundreds of tiny EDKs stays under the size bound but would make a
    tuple of hundreds of objects: more than a few EDKs are digested, 48 bytes a key."""
    from aioenvelope.format.suites import AlgorithmSuite

    suite = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    async with EnvelopeClient(reader_keyring) as client:
        key_of = client._materials._decrypt_key
        one = key_of(suite, [b"\x00" * 6], b"")
        many = key_of(suite, [b"\x00" * 6] * 300, b"")
    assert isinstance(one, tuple)
    assert isinstance(many, bytes)
    assert len(many) == 48
