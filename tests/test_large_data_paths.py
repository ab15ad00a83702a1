"""The large-data fast paths (issue 18): streams of 16-256 KiB frames hand out each frame
as soon as it is sealed or opened, and one-shot calls of a MiB or more seal and open
straight into the ``bytes`` they return (``format.body.unshared_bytes``).

What must hold whatever the speed: every chunk and result is its own immutable ``bytes``
that nothing overwrites later (no buffer is reused behind a caller's back); a tampered or
reordered frame in the middle of a one-shot message is refused with the same errors as
anywhere else, and nothing is returned; every seal is seen by the nonce log, once.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
from collections.abc import AsyncIterator, Iterator

import pytest
from chunkers import agen, fixed_chunks
from frame_layout import REGULAR_OVERHEAD, header_length
from suites import COMMIT, COMMIT_SIGN
from twin_encryptors import Twins

from aioenvelope import AlgorithmSuite, EnvelopeClient, RawAesKeyring, errors
from aioenvelope.format import nonce_log

MIB = 1 << 20
FRAME = 64 << 10  # the default frame length: the per-frame paths
CONTEXT = {"tenant": "t1", "purpose": "large"}


@pytest.fixture
async def client(aes_keyring: RawAesKeyring) -> AsyncIterator[EnvelopeClient]:
    async with EnvelopeClient(aes_keyring, frame_length=FRAME) as c:
        yield c


def _digests(chunks: list[bytes]) -> list[bytes]:
    return [hashlib.sha256(chunk).digest() for chunk in chunks]


async def test_stream_chunks_kept_by_the_caller_never_change(client: EnvelopeClient) -> None:
    """Both streams' chunks are kept, uncopied, until both streams ended: each is exact
    ``bytes`` and still holds what it held when handed out, so no later frame was sealed
    or opened into it."""
    data = random.Random(1).randbytes(3 * MIB + 12345)
    sealed = [c async for c in client.encrypt_stream(agen(fixed_chunks(data, 300_000)))]
    sealed_digests = _digests(sealed)
    message = b"".join(sealed)
    opened = [c async for c in client.decrypt_stream(agen(fixed_chunks(message, 200_000)))]
    opened_digests = _digests(opened)
    again = [c async for c in client.encrypt_stream(agen(fixed_chunks(data, 300_000)))]
    assert [c async for c in client.decrypt_stream(b"".join(again))]
    assert all(type(c) is bytes for c in sealed + opened)
    assert _digests(sealed) == sealed_digests
    assert _digests(opened) == opened_digests
    assert b"".join(opened) == data
    # One chunk per frame (and the header): each handed out as it was sealed or opened.
    assert len(sealed) == 1 + (len(data) + FRAME - 1) // FRAME
    assert len(opened) == (len(data) + FRAME - 1) // FRAME


async def test_a_reused_source_buffer_is_copied_where_a_frame_is_held_back(
    client: EnvelopeClient,
) -> None:
    """A source that refills one ``bytearray`` for every chunk: the tail the encryptor
    holds back (it may be the final frame) must be a copy, or the next refill would
    change plaintext not yet sealed. ``bytes`` tails are held in place instead."""
    data = random.Random(2).randbytes(2 * MIB + 777)
    size = 100_000

    async def refilled() -> AsyncIterator[bytearray]:
        buf = bytearray(size)
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            buf[: len(piece)] = piece
            yield buf if len(piece) == size else bytearray(piece)
            buf[:] = bytes(size)  # scribble over it before the next chunk

    message = await client.encrypt_stream(refilled()).read_all()
    assert await client.decrypt(message) == data


async def test_large_one_shot_results_are_bytes_that_later_calls_never_change(
    client: EnvelopeClient,
) -> None:
    """One-shot results of a MiB or more are built in place: each is exact ``bytes`` and
    is unchanged by the calls that come after it."""
    data = os.urandom(2 * MIB + 5)
    first = await client.encrypt(data, encryption_context=CONTEXT)
    first_digest = hashlib.sha256(first).digest()
    plain = await client.decrypt(first, encryption_context=CONTEXT)
    plain_digest = hashlib.sha256(plain).digest()
    for _ in range(3):
        again = await client.encrypt(os.urandom(2 * MIB + 5), encryption_context=CONTEXT)
        await client.decrypt(again, encryption_context=CONTEXT)
    assert type(first) is bytes
    assert type(plain) is bytes
    assert hashlib.sha256(first).digest() == first_digest
    assert hashlib.sha256(plain).digest() == plain_digest
    assert plain == data


def _frame_at(message: bytes, i: int) -> tuple[int, int]:
    """Start and end of regular frame ``i`` (0-based) of a ``FRAME``-framed message."""
    start = header_length(message) + i * (FRAME + REGULAR_OVERHEAD)
    return start, start + FRAME + REGULAR_OVERHEAD


@pytest.mark.parametrize("suite", [COMMIT, COMMIT_SIGN], ids=lambda s: s.name)
async def test_large_one_shot_decrypt_refuses_a_tampered_or_moved_middle_frame(
    client: EnvelopeClient, suite: AlgorithmSuite
) -> None:
    """Frames in the middle of a one-shot message are opened in place by the fast path:
    a flipped byte there is an ``AuthenticationError``, two frames swapped a
    ``MalformedMessageError`` naming the frame, and a message cut inside a regular frame
    a ``TruncatedMessageError``, as on every other path."""
    data = os.urandom(3 * MIB)
    message = await client.encrypt(data, algorithm_suite=suite)
    start, end = _frame_at(message, 20)
    flipped = bytearray(message)
    flipped[start + 100] ^= 1
    with pytest.raises(errors.AuthenticationError, match="frame 21"):
        await client.decrypt(bytes(flipped))
    later_start, later_end = _frame_at(message, 21)
    swapped = (
        message[:start] + message[later_start:later_end] + message[start:end] + message[end:]
        if later_start == end
        else b""
    )
    with pytest.raises(errors.MalformedMessageError, match="frame 22 found where frame 21"):
        await client.decrypt(swapped)
    with pytest.raises(errors.TruncatedMessageError):
        await client.decrypt(message[: end + 1000])
    assert await client.decrypt(message) == data


@pytest.fixture
def seals() -> Iterator[list[tuple[bytes, bytes]]]:
    log: list[tuple[bytes, bytes]] = []
    with nonce_log.observe_seals(lambda key, iv: log.append((key, iv))):
        yield log


async def test_every_frame_of_the_fast_paths_is_a_logged_seal_with_a_fresh_iv(
    seals: list[tuple[bytes, bytes]],
) -> None:
    """The per-frame stream and the in-place one-shot seal report every (key, IV) pair
    to the nonce log: one for the header and one per frame, none repeated."""
    wrapping_key = os.urandom(32)
    keyring = RawAesKeyring("test-namespace", "test-key", wrapping_key)
    sizes = (MIB + 1, 3 * MIB, 2 * MIB - 7)
    async with EnvelopeClient(keyring, frame_length=FRAME) as client:
        for size in sizes[:2]:
            await client.encrypt(os.urandom(size))
        data = os.urandom(sizes[2])
        await client.encrypt_stream(agen(fixed_chunks(data, 123_457))).read_all()
    wrapping = nonce_log.fingerprint(wrapping_key)
    message_seals = [pair for pair in seals if pair[0] != wrapping]
    frames = sum((size - 1) // FRAME + 1 for size in sizes)
    assert len(message_seals) == len(sizes) + frames  # a header tag, then each frame
    assert len({key for key, _ in message_seals}) == len(sizes)
    assert [pair for pair, n in collections.Counter(seals).items() if n > 1] == []


def test_the_encryptor_refuses_more_input_or_the_end_before_the_frames_fed_are_taken() -> None:
    """``feed`` then ``next_frame`` until None: feeding again, or finalizing, while fed
    plaintext is still unsealed would lose it (or seal it out of order), so both are
    refused; once drained, the frames are those ``update_frames`` gives."""
    twins = Twins(COMMIT, FRAME, CONTEXT)
    data = os.urandom(3 * FRAME + 5)
    pulled = twins.make()
    pulled.feed(data)
    with pytest.raises(errors.ConfigurationError):
        pulled.feed(b"more")
    with pytest.raises(errors.ConfigurationError):
        pulled.finalize_frames()
    frames = []
    while (frame := pulled.next_frame()) is not None:
        frames.append(frame)
    pushed = twins.make()
    assert frames == pushed.update_frames(data)
    final = pulled.finalize_frames()
    assert final == pushed.finalize_frames()
    assert twins.read(b"".join([pulled.header, *frames, *final])) == data
