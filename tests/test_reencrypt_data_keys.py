"""Which data key a re-encrypted message gets: never the old message's, and otherwise
one cached data key of the target shared by the rotation (one wrap, not one a message)."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterable
from pathlib import Path

import pytest

from aioenvelope import CacheConfig, EnvelopeClient, RawAesKeyring, errors, inspect


def keyring(name: str) -> RawAesKeyring:
    return RawAesKeyring("rotation", name, os.urandom(32))


def edks(message: bytes) -> set[object]:
    return set(inspect(message).encrypted_data_keys)


async def test_reencrypting_under_the_same_keyring_gets_a_new_data_key() -> None:
    own = keyring("own")
    async with EnvelopeClient(own) as client:
        message = await client.encrypt(b"record", encryption_context={"row": "1"})
        # The cache holds the data key the message was written with, for this context.
        again = await client.encrypt(b"other", encryption_context={"row": "1"})
        assert edks(again) == edks(message)
        rotated = await client.reencrypt(message, to_keyring=own)
        assert edks(rotated).isdisjoint(edks(message))
        assert inspect(rotated).message_id != inspect(message).message_id
        assert await client.decrypt(rotated) == b"record"


async def test_reencrypting_twice_to_one_target_changes_the_data_key_each_time() -> None:
    target = keyring("target")
    async with EnvelopeClient(keyring("old")) as client:
        message = await client.encrypt(b"record")
        once = await client.reencrypt(message, to_keyring=target)
        async with EnvelopeClient(target) as reader:
            twice = await reader.reencrypt(once, to_keyring=target)
            assert await reader.decrypt(twice) == b"record"
        assert edks(twice).isdisjoint(edks(once))


async def test_a_rotation_wraps_one_cached_data_key_of_the_target_for_all_messages() -> None:
    target = keyring("target")
    async with EnvelopeClient(keyring("old")) as client:
        plaintexts = [os.urandom(100) for _ in range(20)]
        messages = [await client.encrypt(p) for p in plaintexts]
        misses = client.stats.encrypt_cache_misses
        rotated = [await client.reencrypt(m, to_keyring=target) for m in messages]
        assert client.stats.encrypt_cache_misses == misses + 1  # one data key of target
        assert len({frozenset(edks(m)) for m in rotated}) == 1
        assert len({inspect(m).message_id for m in rotated}) == 20
        streamed = await client.reencrypt_stream(messages[0], to_keyring=target).read_all()
        assert edks(streamed) == edks(rotated[0])  # a bytes source uses the cache too
    async with EnvelopeClient(target) as reader:
        for plaintext, new in zip(plaintexts, rotated, strict=True):
            assert await reader.decrypt(new) == plaintext


async def test_reencrypt_file_from_a_pipe_never_charges_the_cache_zero_bytes(
    tmp_path: Path,
) -> None:
    """A FIFO's size is 0: taken as the plaintext's bound it let one cached data key
    seal any amount past CacheConfig.max_bytes. A pipe now gets a fresh data key."""
    old, new = keyring("old"), keyring("new")
    async with EnvelopeClient(old, cache=CacheConfig(max_bytes=1000)) as client:
        message = await client.encrypt(os.urandom(100_000))
        outputs = []
        for i in range(3):
            fifo = tmp_path / f"in{i}"
            os.mkfifo(fifo)
            writer = threading.Thread(target=fifo.write_bytes, args=(message,))
            writer.start()
            await client.reencrypt_file(fifo, tmp_path / f"out{i}", to_keyring=new)
            writer.join()
            outputs.append((tmp_path / f"out{i}").read_bytes())
    assert len({frozenset(edks(m)) for m in outputs}) == 3
    async with EnvelopeClient(new) as reader:
        for output in outputs:
            assert len(await reader.decrypt(output)) == 100_000


async def test_a_message_longer_than_the_bound_it_was_charged_for_is_refused() -> None:
    """The bound a re-encryption charged the data-key cache with (its input's size when
    it was opened: a file's, or here a bytearray's) is enforced: an input that grew
    after that holds more plaintext than measured, and the new message is never
    completed."""
    new = keyring("new")
    out: list[bytes] = []

    async def drain(stream: AsyncIterable[bytes]) -> None:
        async for chunk in stream:
            out.append(chunk)

    async with EnvelopeClient(keyring("old")) as client:
        message = await client.encrypt(os.urandom(5000), frame_length=1000)
        growing = bytearray(message[:2500])
        stream = client.reencrypt_stream(growing, to_keyring=new, frame_length=1000)
        growing.extend(message[2500:])  # the rest arrives after the size was taken
        with pytest.raises(errors.ConfigurationError, match="more than the 2500 bytes"):
            await drain(stream)
    assert out  # the new header (at least) came out before the refusal
    async with EnvelopeClient(new) as reader:
        with pytest.raises(errors.TruncatedMessageError):
            await reader.decrypt(b"".join(out))


async def test_a_client_opens_at_most_sixteen_target_keyrings_and_says_to_reuse_one() -> None:
    """A new target keyring object per call would stay open (a KMS client, a data-key
    cache) until the client exits: the seventeenth distinct one is refused."""
    async with EnvelopeClient(keyring("old")) as client:
        message = await client.encrypt(b"record")
        targets = [keyring(f"t{i}") for i in range(17)]
        for target in targets[:16]:
            await client.reencrypt(message, to_keyring=target)
        with pytest.raises(errors.ConfigurationError, match="pass the same keyring object"):
            await client.reencrypt(message, to_keyring=targets[16])
        again = await client.reencrypt(message, to_keyring=targets[3])  # reuse is fine
    async with EnvelopeClient(targets[3]) as reader:
        assert await reader.decrypt(again) == b"record"
