"""No AES-GCM (key, IV) pair ever seals twice, whatever the public API is asked to do.

The format layer reports every seal through ``format.nonce_log`` (a fingerprint of the
key and the IV) just before it makes it; these tests drive the public API through every
path that seals (one-shot and streamed encryption, small and large frames, data-key
reuse, files, re-encryption, signed suites, the raw AES keyring's wrapping) and assert
that no pair repeats, and that the seam saw exactly the seals the messages hold, so a
path that bypassed it could not pass unnoticed.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from chunkers import agen, fixed_chunks

from aioenvelope import AlgorithmSuite, CacheConfig, EnvelopeClient, RawAesKeyring, inspect
from aioenvelope.format import nonce_log

LARGE = 256 << 10  # body.LARGE_FRAME: frames sealed piece by piece in streams


class SealLog:
    """Every (key fingerprint, IV) sealed with, in order."""

    def __init__(self) -> None:
        self.pairs: list[tuple[bytes, bytes]] = []

    def __call__(self, key: bytes, iv: bytes) -> None:
        self.pairs.append((key, iv))

    def repeated(self) -> list[tuple[bytes, bytes]]:
        return [pair for pair, n in collections.Counter(self.pairs).items() if n > 1]


@pytest.fixture
def seals() -> Iterator[SealLog]:
    log = SealLog()
    with nonce_log.observe_seals(log):
        yield log


def frames_of(message: bytes, plaintext_length: int) -> int:
    """How many frames a message of ``plaintext_length`` bytes holds (full final frame
    at exact multiples, as we write them)."""
    f = inspect(message).frame_length
    return (plaintext_length - 1) // f + 1 if plaintext_length else 1


class Wrapping:
    """A raw AES keyring and the fingerprint its wraps are logged under."""

    def __init__(self, name: str) -> None:
        key = os.urandom(32)
        self.keyring = RawAesKeyring("nonce-test", name, key)
        self.fingerprint = nonce_log.fingerprint(key)


async def test_every_sealing_path_uses_each_key_and_iv_once(seals: SealLog, tmp_path: Path) -> None:
    old, new = Wrapping("old"), Wrapping("new")
    # Reuse on: many messages share one data key, so only their message IDs (hence
    # their derived keys) keep their pairs apart.
    cache = CacheConfig(max_messages=1000)
    async with EnvelopeClient(old.keyring, cache=cache) as client:
        made: list[tuple[bytes, int]] = []
        for size in (0, 1, 100, 4096):
            for _ in range(5):  # the same data key, reused
                made.append((await client.encrypt(os.urandom(size)), size))
        made.append((await client.encrypt(os.urandom(1000), frame_length=64), 1000))
        made.append((await client.encrypt(os.urandom(3 << 20)), 3 << 20))  # in place, in steps
        signed = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
        made.append((await client.encrypt(b"signed" * 50, algorithm_suite=signed), 300))
        # Large frames in streams of unknown length: partial, exact and one-over ends.
        for size in (LARGE - 1, 2 * LARGE, 2 * LARGE + 1, 3 * LARGE + 12345):
            data = os.urandom(size)
            stream = client.encrypt_stream(agen(fixed_chunks(data, 100_000)), frame_length=LARGE)
            message = await stream.read_all()
            assert await client.decrypt(message) == data
            made.append((message, size))
        source = tmp_path / "plain"
        source.write_bytes(os.urandom(LARGE + 3))
        await client.encrypt_file(source, tmp_path / "sealed", frame_length=LARGE)
        made.append(((tmp_path / "sealed").read_bytes(), LARGE + 3))
        # Re-encryption of all of them, one-shot and streamed.
        for message, size in list(made):
            again = await client.reencrypt(message, to_keyring=new.keyring)
            made.append((again, size))
        for message, size in list(made[:3]):
            again = await client.reencrypt_stream(
                agen(fixed_chunks(message, 7)), to_keyring=new.keyring
            ).read_all()
            made.append((again, size))

    assert seals.repeated() == []
    # The seam saw every seal, none missing and none extra: one header tag and one per
    # frame for each message; one wrap (random IV) for each data key, i.e. each distinct
    # EDK the messages carry.
    wrapping = {old.fingerprint, new.fingerprint}
    message_seals = [pair for pair in seals.pairs if pair[0] not in wrapping]
    assert len(message_seals) == sum(1 + frames_of(m, size) for m, size in made)
    edks = {edk for m, _ in made for edk in inspect(m).encrypted_data_keys}
    assert len(seals.pairs) - len(message_seals) == len(edks)
    # Reuse happened (fewer data keys than messages), and yet a key per message.
    assert len(edks) < len(made)
    assert len({key for key, _ in message_seals}) == len(made)


async def test_a_large_frame_stream_ending_on_a_frame_boundary_seals_no_iv_twice(
    seals: SealLog,
) -> None:
    """The case that used to seal a frame on a guess (regular) and again (final) when
    the stream ended right after it: same key, same IV, two seals."""
    async with EnvelopeClient(Wrapping("k").keyring) as client:
        data = os.urandom(2 * LARGE)
        message = await client.encrypt_stream(
            agen(fixed_chunks(data, 65536)), frame_length=LARGE
        ).read_all()
        assert await client.decrypt(message) == data
        # The last frame is a full final frame (the format's SHOULD), not an empty one.
        assert len(message) == len(await client.encrypt(data, frame_length=LARGE))
    assert seals.repeated() == []
    assert len(seals.pairs) == 2 * (1 + 2) + 2  # two messages of two frames, two wraps
