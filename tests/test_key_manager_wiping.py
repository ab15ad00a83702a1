"""Cached data keys are zeroed when they leave the cache: evicted, expired, replaced, or
the client closed.

The key manager keeps each cached data key in a ``bytearray`` and overwrites it with
zeros when the entry leaves (README, "On wiping"). No public seam shows the cache's
storage, so these tests look where a memory dump would: every live ``bytearray`` the
garbage collector can reach (bytearrays are not gc-tracked themselves, so the scan
walks the referents of every tracked object, a cache entry included). Before the event
exactly one bytearray holds the key (the scan sees the entry: it cannot pass by seeing
nothing) and the test keeps a reference to it; after the event that very buffer must
be all zeros (an entry merely dropped would be freed with its bytes intact, which a
scan of live objects alone cannot tell from a wipe), and no live bytearray holds the key.

The data keys come from a recording keyring around a raw AES keyring (the public
``Keyring`` interface), so no KMS and no private attribute is involved.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
from fake_clock import FakeClock
from live_buffers import bytearrays_holding, the_one_holding, zeroed

from aioenvelope import (
    CacheConfig,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    RawAesKeyring,
)

CONTEXT = {"purpose": "wiping-tests"}
WRAPPING_KEY = os.urandom(32)


class RecordingKeyring(Keyring):
    """A raw AES keyring that notes every data key it hands out or recovers."""

    def __init__(self) -> None:
        self.inner = RawAesKeyring("wiping-tests", "key-1", WRAPPING_KEY)
        self.data_keys: list[bytes] = []

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        result = await self.inner.on_encrypt(materials)
        assert result.plaintext_data_key is not None
        self.data_keys.append(result.plaintext_data_key)
        return result

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        result = await self.inner.on_decrypt(materials, encrypted_data_keys)
        assert result.plaintext_data_key is not None
        self.data_keys.append(result.plaintext_data_key)
        return result


async def two_messages() -> tuple[list[bytes], list[bytes]]:
    """Two messages under two different data keys (written without a cache); both keys."""
    writer = RecordingKeyring()
    async with EnvelopeClient(writer, cache=None) as client:
        messages = [
            await client.encrypt(b"message %d" % i, encryption_context=CONTEXT) for i in (0, 1)
        ]
    assert len(set(writer.data_keys)) == 2
    return messages, writer.data_keys


# -- decrypt cache ---------------------------------------------------------------------


async def test_decrypt_cache_zeroes_the_data_key_it_evicts() -> None:
    (first, second), (key_1, key_2) = await two_messages()
    async with EnvelopeClient(RecordingKeyring(), cache=CacheConfig(decrypt_entries=1)) as client:
        await client.decrypt(first, encryption_context=CONTEXT)
        held = the_one_holding(key_1)
        await client.decrypt(second, encryption_context=CONTEXT)  # evicts the first entry
        assert zeroed(held)
        assert bytearrays_holding(key_1) == []
        assert len(bytearrays_holding(key_2)) == 1
        assert client.stats.decrypt_cache_misses == 2


async def test_decrypt_cache_zeroes_the_data_key_that_expired() -> None:
    """Expired entries leave (and are zeroed) when the cache is next written."""
    clock = FakeClock()
    (first, second), (key_1, _) = await two_messages()
    config = CacheConfig(decrypt_ttl=60.0)
    async with EnvelopeClient(RecordingKeyring(), cache=config, clock=clock) as client:
        await client.decrypt(first, encryption_context=CONTEXT)
        held = the_one_holding(key_1)
        clock.advance(61.0)
        await client.decrypt(second, encryption_context=CONTEXT)
        assert zeroed(held)
        assert bytearrays_holding(key_1) == []


async def test_closing_the_client_zeroes_every_cached_data_key() -> None:
    (first, second), keys = await two_messages()
    async with EnvelopeClient(RecordingKeyring()) as client:
        for message in (first, second):
            await client.decrypt(message, encryption_context=CONTEXT)
        held = [the_one_holding(key) for key in keys]
    assert [zeroed(buffer) for buffer in held] == [True, True]
    assert [bytearrays_holding(key) for key in keys] == [[], []]


# -- encrypt cache (reused data keys) ---------------------------------------------------


async def test_encrypt_cache_zeroes_a_data_key_replaced_at_its_message_limit() -> None:
    keyring = RecordingKeyring()
    async with EnvelopeClient(keyring, cache=CacheConfig(max_messages=1)) as client:
        await client.encrypt(b"first", encryption_context=CONTEXT)
        (key_1,) = keyring.data_keys
        held = the_one_holding(key_1)
        await client.encrypt(b"second", encryption_context=CONTEXT)  # a new data key
        key_2 = keyring.data_keys[1]
        assert zeroed(held)
        assert bytearrays_holding(key_1) == []
        assert len(bytearrays_holding(key_2)) == 1


async def test_encrypt_cache_zeroes_a_data_key_replaced_at_its_age_limit() -> None:
    clock = FakeClock()
    keyring = RecordingKeyring()
    config = CacheConfig(max_age=60.0)
    async with EnvelopeClient(keyring, cache=config, clock=clock) as client:
        await client.encrypt(b"first", encryption_context=CONTEXT)
        (key_1,) = keyring.data_keys
        held = the_one_holding(key_1)
        clock.advance(61.0)
        await client.encrypt(b"second", encryption_context=CONTEXT)
        assert len(keyring.data_keys) == 2
        assert zeroed(held)
        assert bytearrays_holding(key_1) == []


async def test_encrypt_cache_zeroes_the_data_key_it_evicts() -> None:
    keyring = RecordingKeyring()
    async with EnvelopeClient(keyring, cache=CacheConfig(encrypt_entries=1)) as client:
        await client.encrypt(b"first", encryption_context={"tenant": "a"})
        (key_a,) = keyring.data_keys
        held = the_one_holding(key_a)
        await client.encrypt(b"second", encryption_context={"tenant": "b"})  # evicts "a"
        assert zeroed(held)
        assert bytearrays_holding(key_a) == []
        assert len(bytearrays_holding(keyring.data_keys[1])) == 1


async def test_closing_the_client_zeroes_every_reused_data_key() -> None:
    keyring = RecordingKeyring()
    async with EnvelopeClient(keyring) as client:
        for tenant in ("a", "b"):
            await client.encrypt(b"data", encryption_context={"tenant": tenant})
        held = [the_one_holding(key) for key in keyring.data_keys]
    assert [zeroed(buffer) for buffer in held] == [True, True]
    assert [bytearrays_holding(key) for key in keyring.data_keys] == [[], []]


@pytest.mark.parametrize("cache", [None, CacheConfig()], ids=["no-cache", "default-cache"])
async def test_a_message_in_flight_leaves_no_bytearray_holding_its_data_key(
    cache: CacheConfig | None,
) -> None:
    """The control for the scans above: only a cache entry holds a data key in a
    bytearray, so without a cache nothing does, and with one exactly the entry does."""
    keyring = RecordingKeyring()
    async with EnvelopeClient(keyring, cache=cache) as client:
        message = await client.encrypt(b"data", encryption_context=CONTEXT)
        (key,) = keyring.data_keys
        assert len(bytearrays_holding(key)) == (0 if cache is None else 1)
        assert await client.decrypt(message, encryption_context=CONTEXT) == b"data"
