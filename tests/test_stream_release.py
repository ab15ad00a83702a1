"""What a decrypting stream releases from a truncated or tampered message: at most a
verified prefix of the plaintext, in whole frames, never the final frame (which waits
for the signature and the end of the input); and refusals before any plaintext
(``allow_signed=False``, a wrong encryption context).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from chunkers import (
    agen,
    fixed_chunks,
)
from frame_layout import REGULAR_OVERHEAD, body_end, header_length
from stream_outcome import Received, assert_verified_prefix, drain
from suites import COMMIT, COMMIT_SIGN, KIB, SUITES
from task_leaks import settle

from aioenvelope import (
    AlgorithmSuite,
    EnvelopeClient,
    RawAesKeyring,
    StreamSource,
    errors,
)

CONTEXT = {"tenant": "t1", "purpose": "streams"}

# -- 5. tampering ------------------------------------------------------------------------

FRAME = 64
REGULAR_PLAINTEXT = 3 * FRAME
FINAL_CONTENT = b"<<the final frame: only once the message is whole>>"
assert len(FINAL_CONTENT) < FRAME


@dataclass
class Sealed:
    message: bytes
    plaintext: bytes
    suite: AlgorithmSuite

    @property
    def header_end(self) -> int:
        return header_length(self.message)

    @property
    def body_end(self) -> int:
        return body_end(self.message, FRAME, len(self.plaintext))

    def frame(self, i: int) -> tuple[int, int]:
        """Start and end of regular frame ``i`` (0-based)."""
        start = self.header_end + i * (FRAME + REGULAR_OVERHEAD)
        return start, start + FRAME + REGULAR_OVERHEAD

    @property
    def frame_boundaries(self) -> list[int]:
        ends = [self.header_end + i * (FRAME + REGULAR_OVERHEAD) for i in range(4)]
        return [*ends, self.body_end]


@pytest.fixture(params=SUITES, ids=lambda s: s.name)
async def sealed(request: pytest.FixtureRequest, client: EnvelopeClient) -> Sealed:
    """Three regular frames of random bytes, then a distinctive final frame."""
    suite: AlgorithmSuite = request.param
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, encryption_context=CONTEXT, algorithm_suite=suite)
    sealed = Sealed(message, plaintext, suite)
    assert (sealed.body_end == len(message)) == (suite is COMMIT)
    return sealed


async def assert_stream_refused(
    client: EnvelopeClient,
    message: bytes,
    plaintext: bytes,
    *,
    chunk: int | None = 37,
    error: type[errors.EnvelopeError],
    match: str,
) -> Received:
    """decrypt_stream raises ``error`` saying ``match``; what came before is exactly a
    prefix of the plaintext, in whole frames, without any of the final frame."""
    source: StreamSource = message if chunk is None else agen(fixed_chunks(message, chunk))
    received = await drain(client.decrypt_stream(source))
    assert received.error is not None, "a tampered message was accepted"
    assert isinstance(received.error, error), received.error
    assert re.search(match, str(received.error)), received.error
    assert_verified_prefix(received.plaintext, plaintext, FRAME)
    assert FINAL_CONTENT not in received.plaintext
    return received


def truncated_inside(sealed: Sealed, cut: int) -> str:
    """What the error for ``sealed.message[:cut]`` says the message ends inside."""
    if cut < sealed.header_end:
        return "the message header"
    if cut >= sealed.body_end:
        return "the signature footer"
    return f"frame {(cut - sealed.header_end) // (FRAME + REGULAR_OVERHEAD) + 1}"


TRUNCATED = "the message is truncated: it ends inside {}\\. Check that the whole ciphertext"
OUT_OF_ORDER = "found where frame {} belongs: the frames are out of order"
TRAILING = "unexpected bytes after the end of the message"
FRAME_FORGED = "frame {} failed authentication: the message was changed or corrupted"
SIGNATURE_FORGED = "message signature does not verify"


async def test_untampered_message_streams_in_full(client: EnvelopeClient, sealed: Sealed) -> None:
    for chunk in (7, 37, 1000):
        received = await drain(client.decrypt_stream(agen(fixed_chunks(sealed.message, chunk))))
        assert received.error is None
        assert received.plaintext == sealed.plaintext


@pytest.mark.parametrize("chunk", [None, 7, 37], ids=["whole", "7", "37"])
async def test_truncating_at_a_frame_boundary_never_releases_the_final_frame(
    client: EnvelopeClient, sealed: Sealed, chunk: int | None
) -> None:
    cuts = [0, *sealed.frame_boundaries, sealed.body_end + 1, len(sealed.message) - 1]
    for cut in sorted(set(cuts)):
        if cut >= len(sealed.message):
            continue
        received = await assert_stream_refused(
            client,
            sealed.message[:cut],
            sealed.plaintext,
            chunk=chunk,
            error=errors.TruncatedMessageError,
            match=TRUNCATED.format(truncated_inside(sealed, cut)),
        )
        assert isinstance(received.error, errors.TruncatedMessageError), cut


async def test_truncating_at_any_offset_never_releases_the_final_frame(
    client: EnvelopeClient, sealed: Sealed
) -> None:
    for cut in range(len(sealed.message)):
        await assert_stream_refused(
            client,
            sealed.message[:cut],
            sealed.plaintext,
            error=errors.TruncatedMessageError,
            match=TRUNCATED.format(truncated_inside(sealed, cut)),
        )


@pytest.mark.parametrize("pair", [(0, 1), (1, 2)], ids=["frames-1-2", "frames-2-3"])
async def test_swapping_two_frames_is_refused_before_the_swapped_frame(
    client: EnvelopeClient, sealed: Sealed, pair: tuple[int, int]
) -> None:
    (a0, a1), (b0, b1) = sealed.frame(pair[0]), sealed.frame(pair[1])
    m = sealed.message
    swapped = m[:a0] + m[b0:b1] + m[a0:a1] + m[b1:]
    assert len(swapped) == len(m)
    received = await assert_stream_refused(
        client,
        swapped,
        sealed.plaintext,
        error=errors.MalformedMessageError,
        match=OUT_OF_ORDER.format(pair[0] + 1),
    )
    assert len(received.plaintext) <= pair[0] * FRAME


@pytest.mark.parametrize(
    "extra", [b"\x00", b"\xff" * 17, b"\x02" * 200], ids=["one-byte", "17-bytes", "200-bytes"]
)
@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_appending_bytes_is_refused_without_the_final_frame(
    client: EnvelopeClient, sealed: Sealed, extra: bytes, chunk: int | None
) -> None:
    await assert_stream_refused(
        client,
        sealed.message + extra,
        sealed.plaintext,
        chunk=chunk,
        error=errors.MalformedMessageError,
        match=TRAILING,
    )


async def test_appending_bytes_in_a_separate_chunk_is_refused(
    client: EnvelopeClient, sealed: Sealed
) -> None:
    source = agen([sealed.message, b"", b"trailing"])
    received = await drain(client.decrypt_stream(source))
    assert isinstance(received.error, errors.MalformedMessageError)
    assert str(received.error) == TRAILING
    assert FINAL_CONTENT not in received.plaintext
    assert_verified_prefix(received.plaintext, sealed.plaintext, FRAME)


async def test_appending_a_second_message_is_refused(
    client: EnvelopeClient, sealed: Sealed
) -> None:
    await assert_stream_refused(
        client,
        sealed.message + sealed.message,
        sealed.plaintext,
        error=errors.MalformedMessageError,
        match=TRAILING,
    )


@pytest.mark.parametrize("back", [1, 5, 16, 30, 85], ids=lambda b: f"{b}-from-end")
@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_flipping_a_bit_in_the_final_frame_never_releases_it(
    client: EnvelopeClient, sealed: Sealed, back: int, chunk: int | None
) -> None:
    mutated = bytearray(sealed.message)
    mutated[sealed.body_end - back] ^= 0x10
    if back <= 16 + len(FINAL_CONTENT):  # in the ciphertext or tag: the tag check fails
        error: type[errors.EnvelopeError] = errors.AuthenticationError
        match = FRAME_FORGED.format(4)
    else:  # in the sequence number: frame 4 now claims another number
        error, match = errors.MalformedMessageError, OUT_OF_ORDER.format(4)
    received = await assert_stream_refused(
        client, bytes(mutated), sealed.plaintext, chunk=chunk, error=error, match=match
    )
    if back <= 16 + len(FINAL_CONTENT):
        assert isinstance(received.error, errors.AuthenticationError)


@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_flipping_a_bit_in_an_earlier_frame_stops_at_that_frame(
    client: EnvelopeClient, sealed: Sealed, chunk: int | None
) -> None:
    _, end = sealed.frame(1)
    mutated = bytearray(sealed.message)
    mutated[end - 3] ^= 0x01
    received = await assert_stream_refused(
        client,
        bytes(mutated),
        sealed.plaintext,
        chunk=chunk,
        error=errors.AuthenticationError,
        match=FRAME_FORGED.format(2),
    )
    assert isinstance(received.error, errors.AuthenticationError)
    assert len(received.plaintext) <= FRAME


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize("frame_hit", [1, 2])
@pytest.mark.parametrize("chunk", [None, 64 * KIB], ids=["whole", "64KiB"])
async def test_a_forged_large_frame_is_never_released_whether_opened_whole_or_in_pieces(
    aes_keyring: RawAesKeyring, suite: AlgorithmSuite, frame_hit: int, chunk: int | None
) -> None:
    """Frames of 256 KiB or more are opened into their own buffers, piece by piece as
    the chunks arrive when they come split: a bit flipped in the ciphertext of regular
    frame ``frame_hit`` is refused as that frame forged, and exactly the frames before
    it are released (none of the forged frame, however much of it was opened). From
    one ``bytes`` source the whole message is one step, refused before it hands out
    frame 1: nothing is released."""
    frame = 256 * KIB
    plaintext = os.urandom(3 * frame + 100)
    async with EnvelopeClient(aes_keyring, frame_length=frame) as client:
        message = await client.encrypt(plaintext, algorithm_suite=suite)
        mutated = bytearray(message)
        frame_start = header_length(message) + (frame_hit - 1) * (frame + REGULAR_OVERHEAD)
        mutated[frame_start + 16 + frame // 2] ^= 0x04  # inside the frame's ciphertext
        source: StreamSource = (
            bytes(mutated) if chunk is None else agen(fixed_chunks(bytes(mutated), chunk))
        )
        received = await drain(client.decrypt_stream(source))
    assert type(received.error) is errors.AuthenticationError, received.error
    assert re.match(FRAME_FORGED.format(frame_hit), str(received.error)), received.error
    released = b"" if chunk is None else plaintext[: (frame_hit - 1) * frame]
    assert received.plaintext == released


@pytest.mark.parametrize("where", ["last-byte", "first-signature-byte", "length-field"])
@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_corrupted_signature_never_releases_the_final_frame(
    client: EnvelopeClient, where: str, chunk: int | None
) -> None:
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT_SIGN)
    footer = body_end(message, FRAME, len(plaintext))
    index = {"last-byte": len(message) - 1, "first-signature-byte": footer + 2}.get(
        where, footer + 1
    )
    mutated = bytearray(message)
    mutated[index] ^= 0x01
    declared = int.from_bytes(message[footer : footer + 2], "big")  # a DER ECDSA signature
    if where == "length-field" and declared % 2 == 0:
        # One byte more is announced than the message holds.
        error: type[errors.EnvelopeError] = errors.TruncatedMessageError
        match = TRUNCATED.format("the signature footer")
    else:  # a changed signature, or one byte less of it (then a byte after the message)
        error, match = errors.AuthenticationError, SIGNATURE_FORGED
    received = await assert_stream_refused(
        client, bytes(mutated), plaintext, chunk=chunk, error=error, match=match
    )
    if where != "length-field":
        assert isinstance(received.error, errors.AuthenticationError)


async def test_signed_stream_releases_earlier_frames_before_the_signature_check(
    client: EnvelopeClient,
) -> None:
    """As in the ESDK, regular frames of a signed message stream out as they verify; only
    the final frame waits for the signature."""
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT_SIGN)
    end = body_end(message, FRAME, len(plaintext))
    source = agen([message[:end], message[end:]])
    async with client.decrypt_stream(source) as stream:
        early = b""
        while len(early) < REGULAR_PLAINTEXT:
            early += await anext(stream)
        assert early == plaintext[:REGULAR_PLAINTEXT]
        rest = b"".join([c async for c in stream])
    assert rest == FINAL_CONTENT


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_final_frame_waits_for_the_end_of_the_input(
    client: EnvelopeClient, suite: AlgorithmSuite
) -> None:
    """A source that delivered the whole message but has not ended yet might still send
    trailing garbage: the final frame is held until it ends."""
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, algorithm_suite=suite)
    release = asyncio.Event()

    async def held_open() -> AsyncIterator[bytes]:
        yield message
        await release.wait()

    received: list[bytes] = []

    async def consume() -> None:
        async for chunk in client.decrypt_stream(held_open()):
            received.append(chunk)

    task = asyncio.create_task(consume())
    await settle(lambda: len(b"".join(received)) >= REGULAR_PLAINTEXT, "the regular frames")
    for _ in range(20):
        await asyncio.sleep(0)
    assert b"".join(received) == plaintext[:REGULAR_PLAINTEXT]
    release.set()
    await asyncio.wait_for(task, 5)
    assert b"".join(received) == plaintext


# -- 6. allow_signed=False ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 10], ids=["whole", "10"])
async def test_allow_signed_false_refuses_a_signed_message_before_any_plaintext(
    client: EnvelopeClient, chunk: int | None
) -> None:
    plaintext = os.urandom(500)
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT_SIGN)
    source: StreamSource = message if chunk is None else agen(fixed_chunks(message, chunk))
    stream = client.decrypt_stream(source, allow_signed=False)
    received = await drain(stream)
    assert isinstance(received.error, errors.SignedStreamRefusedError)
    assert received.plaintext == b""
    assert await client.decrypt_stream(message).read_all() == plaintext  # default allows


async def test_allow_signed_false_still_decrypts_unsigned_messages(
    client: EnvelopeClient,
) -> None:
    plaintext = os.urandom(500)
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT)
    stream = client.decrypt_stream(agen(fixed_chunks(message, 33)), allow_signed=False)
    assert await stream.read_all() == plaintext


# -- 7. wrong encryption context ---------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_wrong_encryption_context_is_refused_with_no_plaintext(
    client: EnvelopeClient, suite: AlgorithmSuite
) -> None:
    plaintext = os.urandom(300)
    message = await client.encrypt(plaintext, encryption_context=CONTEXT, algorithm_suite=suite)
    received = await drain(
        client.decrypt_stream(agen(fixed_chunks(message, 50)), encryption_context={"tenant": "t2"})
    )
    assert isinstance(received.error, errors.EncryptionContextMismatchError)
    assert received.plaintext == b""
    right = client.decrypt_stream(message, encryption_context={"tenant": "t1"})
    assert await right.read_all() == plaintext
