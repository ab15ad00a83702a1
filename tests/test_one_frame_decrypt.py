"""``EnvelopeClient.decrypt`` of a small one-frame message takes the one-frame path
(``bytes`` in, no state machine); any other input type takes the general reader. Both
must behave alike: the same plaintext, the same header, the same counters, and for
hostile input the same error (type and text), never plaintext."""

from __future__ import annotations

import os

import pytest

from aioenvelope import CacheConfig, EnvelopeClient, RawAesKeyring
from aioenvelope.errors import EncryptionContextMismatchError, EnvelopeError

CONTEXT = {"purpose": "test", "tenant": "t1"}


def _keyring() -> RawAesKeyring:
    return RawAesKeyring("ns", "name", bytes(range(32)))


async def _outcome(client: EnvelopeClient, message: bytes | bytearray) -> tuple[str, str]:
    """What decrypting ``message`` gives: its plaintext, or its error's type and text."""
    try:
        plaintext = await client.decrypt(message, encryption_context={"purpose": "test"})
    except EnvelopeError as exc:
        return type(exc).__name__, str(exc)
    return "plaintext", plaintext.hex()


@pytest.mark.parametrize("cache", [None, CacheConfig()], ids=["no cache", "cache"])
async def test_one_frame_path_reads_what_the_general_path_reads(cache: CacheConfig | None) -> None:
    async with EnvelopeClient(_keyring(), cache=cache) as client:
        for size in (0, 1, 1024, 65536):
            plaintext = os.urandom(size)
            message = await client.encrypt(plaintext, encryption_context=CONTEXT)
            fast = await client.decrypt_with_header(message, encryption_context=CONTEXT)
            general = await client.decrypt_with_header(
                bytearray(message), encryption_context=CONTEXT
            )
            assert fast.plaintext == general.plaintext == plaintext
            assert fast.header == general.header
            assert await client.decrypt(message, encryption_context=CONTEXT) == plaintext


async def test_one_frame_path_counts_messages_bytes_and_cache_lookups() -> None:
    async with EnvelopeClient(_keyring()) as client:
        message = await client.encrypt(b"x" * 100, encryption_context=CONTEXT)
        before = client.stats
        await client.decrypt(message, encryption_context=CONTEXT)
        await client.decrypt(message, encryption_context=CONTEXT)
        after = client.stats
    assert after.messages_decrypted - before.messages_decrypted == 2
    assert after.bytes_decrypted - before.bytes_decrypted == 200
    assert after.decrypt_cache_misses - before.decrypt_cache_misses == 1
    assert after.decrypt_cache_hits - before.decrypt_cache_hits == 1


async def test_one_frame_and_general_paths_share_the_decrypt_cache_entry() -> None:
    """The cache key from the header's EDK bytes in place is the general path's key."""
    async with EnvelopeClient(_keyring()) as client:
        message = await client.encrypt(b"data", encryption_context=CONTEXT)
        await client.decrypt(bytearray(message), encryption_context=CONTEXT)
        before = client.stats
        await client.decrypt(message, encryption_context=CONTEXT)
        after = client.stats
    assert after.decrypt_cache_hits - before.decrypt_cache_hits == 1
    assert after.decrypt_cache_misses == before.decrypt_cache_misses


async def test_one_frame_path_needs_the_required_context_back() -> None:
    async with EnvelopeClient(_keyring(), cache=None) as client:
        message = await client.encrypt(
            b"data", encryption_context=CONTEXT, required_encryption_context_keys={"tenant"}
        )
        assert await client.decrypt(message, encryption_context=CONTEXT) == b"data"
        wrong = {**CONTEXT, "tenant": "t2"}
        fast = await _outcome_with(client, message, wrong)
        assert fast == await _outcome_with(client, bytearray(message), wrong)
        assert fast[0] == "NoUsableKeyError"  # the raw AES wrap's AAD is the context
        with pytest.raises(EncryptionContextMismatchError):
            await client.decrypt(message, encryption_context={"purpose": "other"})


async def _outcome_with(
    client: EnvelopeClient, message: bytes | bytearray, context: dict[str, str]
) -> tuple[str, str]:
    try:
        return "plaintext", (await client.decrypt(message, encryption_context=context)).hex()
    except EnvelopeError as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("cache", [None, CacheConfig()], ids=["no cache", "cache"])
async def test_a_message_cut_at_any_byte_fails_as_on_the_general_path(
    cache: CacheConfig | None,
) -> None:
    async with EnvelopeClient(_keyring(), cache=cache) as client:
        message = await client.encrypt(os.urandom(64), encryption_context={"purpose": "test"})
        for cut in range(len(message)):
            fast = await _outcome(client, message[:cut])
            assert fast[0] != "plaintext"
            assert fast == await _outcome(client, bytearray(message[:cut]))
        extended = await _outcome(client, message + b"\x00")
        assert extended[0] == "MalformedMessageError"
        assert extended == await _outcome(client, bytearray(message + b"\x00"))


@pytest.mark.parametrize("cache", [None, CacheConfig()], ids=["no cache", "cache"])
async def test_a_flipped_bit_anywhere_fails_as_on_the_general_path(
    cache: CacheConfig | None,
) -> None:
    async with EnvelopeClient(_keyring(), cache=cache) as client:
        message = await client.encrypt(os.urandom(16), encryption_context={"purpose": "test"})
        for i in range(len(message)):
            for bit in range(8):
                forged = bytearray(message)
                forged[i] ^= 1 << bit
                fast = await _outcome(client, bytes(forged))
                assert fast[0] != "plaintext", (i, bit)
                assert fast == await _outcome(client, forged), (i, bit)
