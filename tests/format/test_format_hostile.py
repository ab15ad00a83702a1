"""The sans-I/O reader against hostile shapes: limits enforced as fields are read, a header
read once however it is cut, and bodies that straddle pieces (large frames, non-framed
content) opened into memory that grows with what arrived.

CPU-time and address-space bounds are measured in a child process: tests/test_hostile_input.py.
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from messages import DUMMY_EDK, build_encryptor

from aioenvelope import inspect
from aioenvelope.errors import (
    AuthenticationError,
    MalformedMessageError,
    MessageLimitError,
    TruncatedMessageError,
)
from aioenvelope.format import END_OF_MESSAGE, AlgorithmSuite, ContentType, MessageDecryptor
from aioenvelope.format.body import LARGE_FRAME, SINGLE_BLOCK_AAD, body_aad, frame_iv
from aioenvelope.format.derivation import derive_keys
from aioenvelope.format.header import (
    MAX_FRAME_LENGTH,
    HeaderReader,
    MessageHeader,
    parse_header,
    serialize_header_auth,
    serialize_header_body,
)
from aioenvelope.format.signing import Verifier

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
LEGACY = AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256
CONTEXT = {"tenant": "t1", "purpose": "hostile-input tests"}


def non_framed_message(
    suite: AlgorithmSuite, data_key: bytes, plaintext: bytes, *, declared: int | None = None
) -> bytes:
    """A non-framed (content type 1) message, which our writer never produces: header,
    IV, UInt64 length (``declared`` overrides it), sealed content. Non-signing suites."""
    assert not suite.signing
    message_id = os.urandom(32 if suite.message_version == 2 else 16)
    key, commitment = derive_keys(suite, data_key, message_id)
    header = MessageHeader(
        version=suite.message_version,
        algorithm_suite=suite,
        message_id=message_id,
        encryption_context=CONTEXT,
        encrypted_data_keys=(DUMMY_EDK,),
        content_type=ContentType.NON_FRAMED,
        frame_length=0,
        suite_data=commitment,
    )
    aead = AESGCM(key)
    body = serialize_header_body(header)
    head = body + serialize_header_auth(header.version, aead.encrypt(bytes(12), b"", body))
    iv = frame_iv(1)
    sealed = aead.encrypt(iv, plaintext, body_aad(message_id, SINGLE_BLOCK_AAD, 1, len(plaintext)))
    length = len(plaintext) if declared is None else declared
    return head + iv + struct.pack(">Q", length) + sealed


def opened(message: bytes, data_key: bytes, *, first: int | None = None) -> MessageDecryptor:
    """A decryptor given ``message[:first]`` (all of it by default), header checked."""
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(message[:first])
    parsed = decryptor.read_header()
    assert parsed is not None
    assert parsed.header == inspect(message)  # the streaming and one-shot readers agree
    verifier = None
    if parsed.header.algorithm_suite.signing:
        verifier = Verifier(
            parsed.header.algorithm_suite, parsed.header.encryption_context["aws-crypto-public-key"]
        )
    decryptor.begin_body(data_key, verifier=verifier)
    return decryptor


def fed_in_pieces(decryptor: MessageDecryptor, rest: bytes, piece: int) -> bytes:
    """Feed ``rest`` ``piece`` bytes at a time, draining as it goes; the plaintext."""
    out: list[bytes] = []
    for start in range(0, len(rest), piece):
        decryptor.receive_data(rest[start : start + piece])
        while (item := decryptor.next_plaintext()) is not None:
            assert item is not END_OF_MESSAGE
            out.append(bytes(item))  # type: ignore[arg-type]
    decryptor.receive_eof()
    out.append(decryptor.read_all())
    return b"".join(out)


def with_frame_length(header: bytes, suite: AlgorithmSuite, frame_length: int) -> bytes:
    """``header`` (v2, no signature) with its frame length field replaced."""
    at = len(header) - suite.info.tag_length - suite.info.suite_data_length - 4
    return header[:at] + struct.pack(">I", frame_length) + header[at + 4 :]


# -- limits read from the header ---------------------------------------------------------


@pytest.mark.parametrize("frame_length", [MAX_FRAME_LENGTH + 1, 2**32 - 1])
def test_a_frame_length_above_2_31_minus_1_is_refused_as_the_header_is_read(
    frame_length: int,
) -> None:
    """The ESDK writes and reads frames of at most 2^31-1 bytes; a larger one is refused
    from the header alone, before any key is asked for (it would make the reader hold
    up to 4 GiB per frame)."""
    header = build_encryptor(COMMIT).header
    hostile = with_frame_length(header, COMMIT, frame_length)
    with pytest.raises(MessageLimitError, match=f"frames of {frame_length} bytes"):
        parse_header(hostile, max_encrypted_data_keys=10)
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(hostile)
    with pytest.raises(MessageLimitError):
        decryptor.read_header()


def test_the_largest_frame_length_the_esdk_allows_is_accepted() -> None:
    header = with_frame_length(build_encryptor(COMMIT).header, COMMIT, MAX_FRAME_LENGTH)
    assert parse_header(header, max_encrypted_data_keys=10).header.frame_length == MAX_FRAME_LENGTH


def test_non_framed_content_longer_than_the_format_allows_is_refused_from_its_length() -> None:
    data_key = os.urandom(32)
    message = non_framed_message(LEGACY, data_key, b"x", declared=2**36 - 31)
    decryptor = opened(message, data_key)
    with pytest.raises(MalformedMessageError, match="longer than the format allows"):
        decryptor.next_plaintext()


# -- the header, read once ---------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    suite=st.sampled_from(list(AlgorithmSuite)),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=12),
)
def test_a_header_cut_anywhere_reads_as_the_whole_header(
    suite: AlgorithmSuite, cuts: list[int]
) -> None:
    """However the bytes are cut, the incremental reader gives the one-shot parse and
    uses exactly the header's bytes (the rest is the body's)."""
    encryptor = build_encryptor(suite, context=CONTEXT, edks=(DUMMY_EDK,) * 3)
    message = encryptor.header + b"BODY"
    whole = parse_header(message, max_encrypted_data_keys=10)
    reader = HeaderReader(max_encrypted_data_keys=10)
    bounds = [0, *sorted(c for c in cuts if c < len(message)), len(message)]
    used = 0
    for a, b in itertools.pairwise(bounds):
        used += reader.feed(message[a:b])
    assert reader.parsed == whole
    assert used == len(encryptor.header)


def test_the_header_reader_waits_for_the_bytes_a_length_field_announces() -> None:
    """What keeps a slow header linear: once a length field is read, the reader is not
    resumed (and reads nothing again) before all the bytes it announces are there."""
    header = build_encryptor(COMMIT, context={"k": "v" * 1000}).header
    ec_length = int.from_bytes(header[35:37], "big")
    reader = HeaderReader(max_encrypted_data_keys=10)
    assert reader.feed(header[:37]) == 37
    assert reader.missing == ec_length + 2  # the context and the EDK count after it
    for i in range(37, 37 + ec_length + 1):
        reader.feed(header[i : i + 1])
    assert reader.missing == 1
    reader.feed(header[37 + ec_length + 1 :])
    assert reader.parsed is not None
    assert reader.parsed.header.encryption_context == {"k": "v" * 1000}


def test_a_header_fed_one_byte_at_a_time_decrypts() -> None:
    data_key = os.urandom(32)
    encryptor = build_encryptor(COMMIT, data_key=data_key, context=CONTEXT, frame_length=64)
    plaintext = os.urandom(200)
    message = encryptor.encrypt_all(plaintext)
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    for i in range(len(encryptor.header) - 1):
        decryptor.receive_data(message[i : i + 1])
        assert decryptor.read_header() is None
    decryptor.receive_data(message[len(encryptor.header) - 1 :])
    parsed = decryptor.read_header()
    assert parsed is not None
    assert (parsed.header, parsed.length) == (encryptor.header_value, len(encryptor.header))
    decryptor.begin_body(data_key)
    decryptor.receive_eof()
    assert decryptor.read_all() == plaintext


def test_a_header_found_bad_stays_bad() -> None:
    header = bytearray(build_encryptor(COMMIT).header)
    at = len(header) - COMMIT.info.tag_length - COMMIT.info.suite_data_length - 4 - 1
    header[at] = 7  # unknown content type
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(bytes(header[:10]))
    assert decryptor.read_header() is None
    decryptor.receive_data(bytes(header[10:]))
    for _ in range(2):
        with pytest.raises(MalformedMessageError, match="unknown content type 0x07"):
            decryptor.read_header()


def test_a_header_ending_early_at_eof_is_truncated_whatever_the_length_fields_promised() -> None:
    header = build_encryptor(COMMIT, context=CONTEXT).header
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(header[:40])
    assert decryptor.read_header() is None
    decryptor.receive_eof()
    with pytest.raises(TruncatedMessageError, match="inside the message header"):
        decryptor.read_header()


# -- bodies that straddle pieces ----------------------------------------------------------


def test_buffered_bytes_counts_every_queued_piece() -> None:
    data_key = os.urandom(32)
    encryptor = build_encryptor(COMMIT, data_key=data_key, frame_length=4096)
    message = encryptor.encrypt_all(os.urandom(5000))
    decryptor = opened(message, data_key, first=len(encryptor.header))
    body = message[len(encryptor.header) :]
    for i in range(100):
        decryptor.receive_data(body[i : i + 1])
        assert decryptor.next_plaintext() is None
        assert decryptor.buffered_bytes == i + 1


@pytest.mark.parametrize("piece", [1 << 10, 100_000, 1 << 20])
def test_a_large_frame_fed_in_pieces_grows_its_buffer_and_decrypts(piece: int) -> None:
    """The plaintext buffer starts at what arrived and grows with the frame (no
    reservation for the declared length); the bytes are the same however it grew, and
    the next frame reuses the full-size buffer once it was recycled."""
    frame = 3 * LARGE_FRAME + 5
    data_key = os.urandom(32)
    encryptor = build_encryptor(COMMIT, data_key=data_key, frame_length=frame)
    plaintext = os.urandom(2 * frame + 7)
    message = encryptor.encrypt_all(plaintext)
    decryptor = opened(message, data_key, first=len(encryptor.header))
    assert fed_in_pieces(decryptor, message[len(encryptor.header) :], piece) == plaintext


@pytest.mark.parametrize("piece", [1, 1 << 10, 1 << 20])
@pytest.mark.parametrize("size", [0, 1, LARGE_FRAME - 1, 2 * LARGE_FRAME + 3])
def test_non_framed_content_fed_in_pieces_decrypts(piece: int, size: int) -> None:
    if piece == 1 and size > LARGE_FRAME:
        size = LARGE_FRAME + 3  # one byte at a time: keep it quick
    data_key = os.urandom(32)
    plaintext = os.urandom(size)
    message = non_framed_message(LEGACY, data_key, plaintext)
    header_length = len(message) - size - 36
    decryptor = opened(message, data_key, first=header_length)
    assert fed_in_pieces(decryptor, message[header_length:], piece) == plaintext


@pytest.mark.parametrize("size", [100, 2 * LARGE_FRAME + 3])
def test_tampered_non_framed_content_releases_nothing(size: int) -> None:
    data_key = os.urandom(32)
    message = bytearray(non_framed_message(COMMIT, data_key, os.urandom(size)))
    message[-size // 2] ^= 1
    decryptor = opened(bytes(message), data_key, first=len(message) - size - 36)
    rest = bytes(message[len(message) - size - 36 :])
    for start in range(0, len(rest) - 16, 65_536):
        decryptor.receive_data(rest[start : min(start + 65_536, len(rest) - 16)])
        assert decryptor.next_plaintext() is None
    decryptor.receive_data(rest[-16:])
    decryptor.receive_eof()
    with pytest.raises(AuthenticationError, match="the message body"):
        decryptor.next_plaintext()


def test_a_large_frame_cut_short_at_eof_is_truncated() -> None:
    frame = 4 * LARGE_FRAME
    data_key = os.urandom(32)
    encryptor = build_encryptor(COMMIT, data_key=data_key, frame_length=frame)
    message = encryptor.encrypt_all(os.urandom(frame + 1))
    header_length = len(encryptor.header)
    decryptor = opened(message, data_key, first=header_length)
    decryptor.receive_data(message[header_length : header_length + 16 + LARGE_FRAME])
    assert decryptor.next_plaintext() is None
    decryptor.receive_eof()
    with pytest.raises(TruncatedMessageError, match="frame 1"):
        decryptor.next_plaintext()
