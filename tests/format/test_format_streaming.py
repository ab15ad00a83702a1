"""Sans-I/O streaming: ``update_frames``/``finalize_frames`` against ``encrypt_all``, and
the decryptor fed in arbitrary pieces. No event loop, no keyring."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twin_encryptors import Twins

from aioenvelope.errors import AuthenticationError, ConfigurationError
from aioenvelope.format import (
    END_OF_MESSAGE,
    AlgorithmSuite,
    MessageDecryptor,
    MessageEncryptor,
    nonce_log,
)
from aioenvelope.format.body import Buffer, frame_iv
from aioenvelope.format.decryptor import EndOfMessage

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
CONTEXT = {"tenant": "t1"}
REGULAR_OVERHEAD = 4 + 12 + 16
FINAL_OVERHEAD = 4 + 4 + 12 + 4 + 16


def cut_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def fed_past_the_header(
    decryptor: MessageDecryptor, twins: Twins, pieces: Sequence[bytes]
) -> Iterator[None]:
    """Feed ``pieces`` in turn; once the header is read, open the body with the twins'
    key (see :meth:`Twins.begin`), then yield after each piece fed, for the caller to
    drain. The header must have been read by the last piece."""
    begun = False
    for piece in pieces:
        decryptor.receive_data(piece)
        if not begun:
            if decryptor.read_header() is None:
                continue
            twins.begin(decryptor)
            begun = True
        yield
    assert begun


def released(decryptor: MessageDecryptor) -> Iterator[Buffer | EndOfMessage]:
    """Each plaintext item the decryptor has ready, one at a time (so the caller can
    copy and recycle one before the next is opened)."""
    while (item := decryptor.next_plaintext()) is not None:
        yield item


def streamed_frames(encryptor: MessageEncryptor, pieces: Sequence[bytes]) -> list[Buffer]:
    out: list[Buffer] = [encryptor.header]
    for piece in pieces:
        out.extend(encryptor.update_frames(piece))
        assert encryptor.pending_bytes <= encryptor.header_value.frame_length
    out.extend(encryptor.finalize_frames())
    return out


def body_end(header: bytes, frame_length: int, n: int) -> int:
    regular = (n - 1) // frame_length if n else 0
    return (
        len(header)
        + regular * (frame_length + REGULAR_OVERHEAD)
        + (FINAL_OVERHEAD + n - regular * frame_length)
    )


@settings(max_examples=80, deadline=None)
@given(
    data=st.binary(max_size=500),
    frame_length=st.sampled_from([1, 3, 16, 64, 4096]),
    cuts=st.lists(st.integers(0, 500), max_size=15),
)
def test_update_frames_then_finalize_frames_equals_encrypt_all(
    data: bytes, frame_length: int, cuts: list[int]
) -> None:
    twins = Twins(COMMIT, frame_length, CONTEXT)
    pieces = streamed_frames(twins.make(), cut_at(data, cuts))
    assert b"".join(pieces) == twins.make().encrypt_all(data)
    assert twins.read(b"".join(pieces)) == data


@settings(max_examples=50, deadline=None)
@given(
    data=st.binary(max_size=300),
    frame_length=st.sampled_from([1, 7, 64]),
    cuts=st.lists(st.integers(0, 300), max_size=10),
)
def test_update_and_finalize_equal_encrypt_all(
    data: bytes, frame_length: int, cuts: list[int]
) -> None:
    twins = Twins(COMMIT, frame_length, CONTEXT)
    encryptor = twins.make()
    streamed = encryptor.header
    for piece in cut_at(data, cuts):
        streamed += encryptor.update(piece)
    streamed += encryptor.finalize()
    assert streamed == twins.make().encrypt_all(data)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_update_frames_returns_whole_regular_frames_and_holds_the_last(
    data: bytes, cuts: list[int]
) -> None:
    """Each item is one regular frame; the last 1..F bytes wait for finalize."""
    f = 16
    encryptor = Twins(COMMIT, f, CONTEXT).make()
    regular: list[Buffer] = []
    seen = 0
    for piece in cut_at(data, cuts):
        regular.extend(encryptor.update_frames(piece))
        seen += len(piece)
        expected_regular = (seen - 1) // f if seen else 0
        assert len(regular) == expected_regular
        assert encryptor.pending_bytes == seen - expected_regular * f
    assert all(len(frame) == f + REGULAR_OVERHEAD for frame in regular)
    assert [int.from_bytes(frame[:4], "big") for frame in regular] == list(
        range(1, len(regular) + 1)
    )
    (final,) = encryptor.finalize_frames()
    assert final[:4] == b"\xff\xff\xff\xff"
    assert len(final) == FINAL_OVERHEAD + (len(data) - len(regular) * f)
    assert encryptor.pending_bytes == 0


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100])
def test_signed_streaming_matches_encrypt_all_up_to_the_signature(size: int) -> None:
    data = os.urandom(size)
    twins = Twins(COMMIT_SIGN, 16, CONTEXT)
    encryptor = twins.make()
    pieces = streamed_frames(encryptor, cut_at(data, [3, 40, 41]))
    *frames, footer = pieces
    streamed = b"".join(pieces)
    one_shot = twins.make().encrypt_all(data)
    end = body_end(encryptor.header, 16, size)
    assert len(b"".join(frames)) == end
    assert streamed[:end] == one_shot[:end]
    assert abs(len(streamed) - len(one_shot)) <= 4  # DER signatures vary by a few bytes
    assert int.from_bytes(footer[:2], "big") == len(footer) - 2
    assert twins.read(streamed) == data
    assert twins.read(one_shot) == data


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=300),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
    signed=st.booleans(),
)
def test_decryptor_fed_in_pieces_holds_the_final_frame_until_eof(
    data: bytes, cuts: list[int], signed: bool
) -> None:
    """Released plaintext is always a prefix in whole frames; the final frame comes out
    only after receive_eof, even once every byte has arrived."""
    f = 16
    twins = Twins(COMMIT_SIGN if signed else COMMIT, f, CONTEXT)
    message = twins.make().encrypt_all(data)
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    out = b""
    for _ in fed_past_the_header(decryptor, twins, cut_at(message, cuts)):
        for item in released(decryptor):
            assert item is not END_OF_MESSAGE
            assert isinstance(item, bytes)
            out += item
        assert data.startswith(out)
        assert len(out) % f == 0
        assert len(out) <= ((len(data) - 1) // f) * f
    decryptor.receive_eof()
    assert out + decryptor.read_all() == data


def test_encryptor_refuses_use_out_of_order() -> None:
    encryptor = Twins(COMMIT, 16, CONTEXT).make()
    encryptor.update_frames(b"x" * 40)
    with pytest.raises(ConfigurationError):
        encryptor.encrypt_all(b"y")
    encryptor.finalize_frames()
    with pytest.raises(ConfigurationError):
        encryptor.update_frames(b"z")
    with pytest.raises(ConfigurationError):
        encryptor.finalize_frames()
    fresh = Twins(COMMIT, 16, CONTEXT).make()
    fresh.encrypt_all(b"once")
    with pytest.raises(ConfigurationError):
        fresh.update_frames(b"again")


@pytest.mark.parametrize("suite", [COMMIT, COMMIT_SIGN], ids=["0x0478", "0x0578"])
@pytest.mark.parametrize("size", [0, 1, 300 << 10, (600 << 10) + 5])
def test_large_frames_come_as_prefix_and_body_and_still_equal_encrypt_all(
    suite: AlgorithmSuite, size: int
) -> None:
    frame_length = 300 << 10  # over the 256 KiB split point
    twins = Twins(suite, frame_length, CONTEXT)
    data = os.urandom(size)
    pieces = streamed_frames(twins.make(), cut_at(data, [size // 3, size // 2]))
    joined = b"".join(pieces)
    if suite.signing:
        # ECDSA signatures are randomized: the bytes before the footer must match.
        reference = twins.make().encrypt_all(data)
        end = body_end(twins.make().header, frame_length, size)
        assert joined[:end] == reference[:end]
    else:
        assert joined == twins.make().encrypt_all(data)
    assert twins.read(joined) == data
    # Bodies of large frames arrive apart from their 16/24-byte prefixes.
    if size > frame_length:
        assert any(len(p) == REGULAR_OVERHEAD - 16 for p in pieces)
    final_length = size - ((size - 1) // frame_length if size else 0) * frame_length
    final_split = any(len(p) == FINAL_OVERHEAD - 16 for p in pieces)
    assert final_split == (final_length >= 256 << 10)


LARGE = 256 << 10  # body.LARGE_FRAME: frames from here on use pooled buffers


@settings(max_examples=25, deadline=None)
@given(
    frames=st.integers(0, 4),
    tail=st.integers(0, 3),
    cuts=st.lists(st.integers(0, 5 * LARGE), max_size=12),
    signed=st.booleans(),
)
def test_recycled_large_frame_buffers_never_change_the_bytes(
    frames: int, tail: int, cuts: list[int], signed: bool
) -> None:
    """Both machines reuse a large frame's buffer once it is handed back through
    recycle(); a caller that copies each buffer out and recycles it at once gets
    exactly encrypt_all's ciphertext and the original plaintext, for any chunking."""
    f = LARGE + 7
    twins = Twins(COMMIT_SIGN if signed else COMMIT, f, CONTEXT)
    data = os.urandom(frames * f + tail)
    encryptor = twins.make()
    written = [encryptor.header]
    for piece in cut_at(data, cuts):
        for part in encryptor.update_frames(piece):
            written.append(bytes(part))
            encryptor.recycle(part)
    for part in encryptor.finalize_frames():
        written.append(bytes(part))
        encryptor.recycle(part)
    message = b"".join(written)
    reference = twins.make().encrypt_all(data)
    end = body_end(twins.make().header, f, len(data))
    assert message[:end] == reference[:end]  # signatures differ; all else is identical

    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    out = []
    for _ in fed_past_the_header(decryptor, twins, cut_at(message, [c * 2 + 1 for c in cuts])):
        for plain in released(decryptor):
            assert not isinstance(plain, EndOfMessage)
            out.append(bytes(plain))
            decryptor.recycle(plain)
    decryptor.receive_eof()
    while not isinstance(item := decryptor.next_plaintext(), EndOfMessage):
        assert item is not None
        out.append(bytes(item))
        decryptor.recycle(item)
    assert b"".join(out) == data


def test_a_recycled_large_frame_buffer_is_reused_for_the_next_frame() -> None:
    """What keeps the event loop free with large frames: after recycle(), the next
    frame is sealed/opened into the same buffer (no fresh allocation to zero and
    page-fault while holding the GIL)."""
    f = LARGE
    twins = Twins(COMMIT, f, CONTEXT)
    data = os.urandom(7 * f + 1)
    encryptor = twins.make()
    written = [encryptor.header]
    bodies: list[Buffer] = []  # kept alive, so no id is reused
    steps = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
    # Frames fill across calls, as in a stream; the last regular frame is sealed only
    # once the byte after it arrived, so finalize hands out its rest.
    for step in [*steps, None]:
        parts = encryptor.update_frames(step) if step else encryptor.finalize_frames()
        for part in parts:
            written.append(bytes(part))
            if not isinstance(part, bytes):
                bodies.append(part)
                encryptor.recycle(part)
    message = b"".join(written)
    assert message == twins.make().encrypt_all(data)
    # The next frame's buffer is taken while the last one is still out: two alternate.
    assert len({id(body) for body in bodies}) <= 2
    assert len(bodies) == 7

    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(message)
    decryptor.receive_eof()
    twins.begin(decryptor)
    one = decryptor.next_plaintext()
    assert one is not None
    assert not isinstance(one, (bytes, EndOfMessage))
    assert bytes(one) == data[:f]
    decryptor.recycle(one)
    two = decryptor.next_plaintext()
    assert two is one
    assert bytes(two) == data[f : 2 * f]


def test_a_large_frame_arriving_in_pieces_is_opened_as_they_come_and_released_whole() -> None:
    """What keeps decryption's steps small whatever the frame length: each piece of a
    large frame is decrypted as it arrives (nothing stays buffered), yet no plaintext
    comes out until the frame's tag has verified."""
    f = 4 * LARGE
    twins = Twins(COMMIT, f, CONTEXT)
    data = os.urandom(2 * f + 5)
    message = twins.make().encrypt_all(data)
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    header_length = len(twins.make().header)
    decryptor.receive_data(message[:header_length])
    twins.begin(decryptor)
    released: list[bytes] = []
    piece = 100_000
    for start in range(header_length, len(message), piece):
        decryptor.receive_data(message[start : start + piece])
        while (item := decryptor.next_plaintext()) is not None:
            assert not isinstance(item, EndOfMessage)
            released.append(bytes(item))
            decryptor.recycle(item)
        assert decryptor.buffered_bytes < 32  # at most a frame prefix or tag waits
        opened = start + piece - header_length  # ciphertext bytes received so far
        assert sum(map(len, released)) <= opened // (f + 32) * f  # only whole frames
    decryptor.receive_eof()
    released.append(decryptor.read_all())
    assert b"".join(released) == data


def test_a_tampered_piece_of_a_large_frame_releases_nothing_of_it() -> None:
    f = 2 * LARGE
    twins = Twins(COMMIT, f, CONTEXT)
    data = os.urandom(f + 1)
    message = bytearray(twins.make().encrypt_all(data))
    header_length = len(twins.make().header)
    message[header_length + 16 + f // 2] ^= 1  # inside frame 1's body
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(bytes(message[:header_length]))
    twins.begin(decryptor)
    for start in range(header_length, header_length + f, 65_536):
        decryptor.receive_data(bytes(message[start : start + 65_536]))
        assert decryptor.next_plaintext() is None
    decryptor.receive_data(bytes(message[header_length + f :]))
    with pytest.raises(AuthenticationError, match="frame 1"):
        decryptor.next_plaintext()


@settings(max_examples=30, deadline=None)
@given(
    frames=st.integers(0, 3),
    tail=st.sampled_from([0, 1, 5000, LARGE - 1]),
    cuts=st.lists(st.integers(0, 4 * LARGE), max_size=10),
)
def test_large_frames_streamed_at_any_chunking_seal_each_iv_once_and_equal_encrypt_all(
    frames: int, tail: int, cuts: list[int]
) -> None:
    """A large frame is sealed only once its kind is known (full, and a byte after it;
    or the input ended): no frame is sealed on a guess and sealed again, so each IV
    seals once under the message key, and the bytes are encrypt_all's."""
    f = LARGE
    twins = Twins(COMMIT, f, CONTEXT)
    data = os.urandom(frames * f + tail)
    log: list[tuple[bytes, bytes]] = []
    with nonce_log.observe_seals(lambda key, iv: log.append((key, iv))):
        encryptor = twins.make()
        written = [encryptor.header]
        for piece in cut_at(data, cuts):
            for part in encryptor.update_frames(piece):
                written.append(bytes(part))
                encryptor.recycle(part)
                assert encryptor.pending_bytes <= f
        written += [bytes(p) for p in encryptor.finalize_frames()]
    assert b"".join(written) == twins.make().encrypt_all(data)
    ivs = [iv for _, iv in log]
    assert len({key for key, _ in log}) == 1
    expected_frames = (len(data) - 1) // f + 1 if data else 1
    assert ivs == [bytes(12)] + [frame_iv(seq) for seq in range(1, expected_frames + 1)]
