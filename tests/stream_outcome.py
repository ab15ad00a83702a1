"""What a stream released before it ended or failed, and the check that it was safe.

The streaming promise: nothing unauthenticated is released, and the final frame only
once the whole message verified. A refused stream may have released some plaintext;
that must be exactly a prefix of the true plaintext, ending on a frame boundary, and
shorter than the part before the final frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from aioenvelope import DecryptingStream, EncryptingStream, errors


@dataclass
class Received:
    plaintext: bytes
    error: errors.EnvelopeError | None


async def drain(stream: DecryptingStream | EncryptingStream) -> Received:
    """Everything the stream yields until it ends or raises one of the library's errors."""
    pieces: list[bytes] = []
    try:
        async with stream:
            async for chunk in stream:
                assert isinstance(chunk, bytes)
                pieces.append(chunk)
    except errors.EnvelopeError as exc:
        return Received(b"".join(pieces), exc)
    return Received(b"".join(pieces), None)


def assert_verified_prefix(released: bytes, plaintext: bytes, frame_length: int) -> None:
    """``released`` is the plaintext's first bytes, in whole frames, without any of the
    final frame (whose length is ``len(plaintext) % frame_length`` or a whole frame).

    That final-frame length is our writer's layout; the ESDK ends a plaintext of whole
    frames with an empty final frame, so its messages need their own bound."""
    assert released == plaintext[: len(released)], "released bytes are not the plaintext"
    assert len(released) % frame_length == 0, "released up to the middle of a frame"
    regular_length = (len(plaintext) - 1) // frame_length * frame_length if plaintext else 0
    assert len(released) <= regular_length, "the final frame was released"
