"""The sans-I/O writer and reader: header layout, frames, and the decryptor's promises."""

from __future__ import annotations

import itertools
import os

import pytest
from aws_encryption_sdk.identifiers import Algorithm
from aws_encryption_sdk.internal.crypto.data_keys import (
    calculate_commitment_key,
    derive_data_encryption_key,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from messages import DUMMY_EDK, build_encryptor

from aioenvelope import inspect
from aioenvelope.errors import (
    AuthenticationError,
    ConfigurationError,
    MalformedMessageError,
    MessageLimitError,
    TruncatedMessageError,
)
from aioenvelope.format import (
    END_OF_MESSAGE,
    AlgorithmSuite,
    ContentType,
    EncryptedDataKey,
    MessageDecryptor,
)
from aioenvelope.format._cursor import NeedMoreData
from aioenvelope.format.derivation import derive_keys
from aioenvelope.format.header import parse_header

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
LEGACY_SIGN = AlgorithmSuite.AES_128_GCM_IV12_TAG16_HKDF_SHA256_ECDSA_P256


def open_message(message: bytes, data_key: bytes, **kwargs: object) -> MessageDecryptor:
    """A decryptor fed the whole message, header checked, ready for the body."""
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(message)
    decryptor.receive_eof()
    parsed = decryptor.read_header()
    assert parsed is not None
    assert parsed.header == inspect(message)  # the streaming and one-shot readers agree
    from aioenvelope.format.signing import Verifier

    verifier = None
    suite = parsed.header.algorithm_suite
    if suite.signing:
        verifier = Verifier(suite, parsed.header.encryption_context["aws-crypto-public-key"])
    decryptor.begin_body(data_key, verifier=verifier, **kwargs)  # type: ignore[arg-type]
    return decryptor


# -- key derivation ----------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(AlgorithmSuite), ids=lambda s: s.name)
def test_key_derivation_matches_the_reference_sdk(suite: AlgorithmSuite) -> None:
    data_key = os.urandom(suite.key_length)
    message_id = os.urandom(32 if suite.message_version == 2 else 16)
    reference = Algorithm.get_by_id(suite.suite_id)
    key, commitment = derive_keys(suite, data_key, message_id)
    assert key == derive_data_encryption_key(data_key, reference, message_id)
    if suite.committing:
        assert commitment == calculate_commitment_key(data_key, reference, message_id)
    else:
        assert commitment == b""


# -- header ------------------------------------------------------------------------------


def test_v2_header_has_the_specified_layout() -> None:
    message_id = bytes(range(32))
    edk = EncryptedDataKey("p", b"i", b"c")
    encryptor = build_encryptor(COMMIT, message_id=message_id, context={"a": "b"}, edks=(edk,))
    header = encryptor.header
    assert header[0] == 0x02
    assert header[1:3] == b"\x04\x78"
    assert header[3:35] == message_id
    assert header[35:37] == b"\x00\x08"  # EC length: count 2, then 2+1 and 2+1
    assert header[37:45] == bytes.fromhex("0001000161000162")
    assert header[45:47] == b"\x00\x01"  # one EDK
    assert header[47:56] == bytes.fromhex("000170000169000163")
    assert header[56] == ContentType.FRAMED
    assert header[57:61] == (16).to_bytes(4, "big")
    assert len(header) == 61 + 32 + 16  # commitment, then the tag alone


def test_v1_header_has_type_reserved_iv_length_and_zero_iv() -> None:
    encryptor = build_encryptor(AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA256, context={})
    header = encryptor.header
    assert header[:4] == b"\x01\x80\x01\x78"
    body_end = len(header) - 12 - 16
    assert header[body_end - 9 : body_end - 4] == b"\x00\x00\x00\x00\x0c"
    assert header[body_end : body_end + 12] == b"\x00" * 12


@pytest.mark.parametrize("suite", list(AlgorithmSuite), ids=lambda s: s.name)
def test_header_parses_back_to_what_was_written(suite: AlgorithmSuite) -> None:
    encryptor = build_encryptor(suite, context={"ключ": "значение"})
    parsed = parse_header(encryptor.header, max_encrypted_data_keys=1)
    assert parsed.header == encryptor.header_value
    assert parsed.length == len(encryptor.header)


def test_header_cut_short_anywhere_needs_more_data() -> None:
    header = build_encryptor(COMMIT_SIGN, context={"a": "b"}).header
    for cut in range(len(header)):
        with pytest.raises(NeedMoreData):
            parse_header(header[:cut], max_encrypted_data_keys=10)


def test_too_many_encrypted_data_keys_is_refused_before_reading_them() -> None:
    header = build_encryptor(edks=(DUMMY_EDK,) * 3).header
    with pytest.raises(MessageLimitError, match="3 encrypted data keys"):
        parse_header(header, max_encrypted_data_keys=2)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 0x03, "unknown version"),
        (1, 0x99, "unknown algorithm suite"),
        (2, 0x78, None),  # 0x0478 -> 0x0078 is a v1 suite in a v2 header
    ],
)
def test_bad_leading_fields_are_refused_at_once(
    offset: int, value: int, message: str | None
) -> None:
    header = bytearray(build_encryptor().header)
    header[offset] = value if offset != 2 else header[offset]
    if offset == 2:
        header[1] = 0x00
    with pytest.raises(MalformedMessageError, match=message):
        parse_header(bytes(header[: offset + 3]), max_encrypted_data_keys=10)


def test_a_huge_length_field_does_not_allocate_or_wait() -> None:
    header = bytearray(build_encryptor(context={"a": "b"}).header)
    header[35:37] = b"\xff\xff"  # the EC claims 64 KiB
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(bytes(header))
    decryptor.receive_eof()
    with pytest.raises(TruncatedMessageError):
        decryptor.read_header()


# -- frames ------------------------------------------------------------------------------


def frames_of(message: bytes, header_length: int, frame_length: int) -> list[bytes]:
    """Split a body (no signature) into its frames."""
    frames, pos = [], header_length
    while pos < len(message):
        if message[pos : pos + 4] == b"\xff\xff\xff\xff":
            length = int.from_bytes(message[pos + 20 : pos + 24], "big")
            frames.append(message[pos : pos + 24 + length + 16])
            break
        frames.append(message[pos : pos + 16 + frame_length + 16])
        pos += 16 + frame_length + 16
    return frames


@pytest.mark.parametrize(
    ("size", "regular", "final"),
    [(0, 0, 0), (1, 0, 1), (15, 0, 15), (16, 0, 16), (17, 1, 1), (32, 1, 16), (33, 2, 1)],
)
def test_final_frame_carries_the_last_one_to_frame_length_bytes(
    size: int, regular: int, final: int
) -> None:
    encryptor = build_encryptor(frame_length=16)
    message = encryptor.encrypt_all(os.urandom(size))
    frames = frames_of(message, len(encryptor.header), 16)
    assert len(frames) == regular + 1
    assert frames[-1][:4] == b"\xff\xff\xff\xff"
    assert int.from_bytes(frames[-1][4:8], "big") == regular + 1
    assert int.from_bytes(frames[-1][20:24], "big") == final
    for seq, frame in enumerate(frames[:-1], start=1):
        assert frame[:4] == seq.to_bytes(4, "big")
        assert frame[4:16] == b"\x00" * 8 + seq.to_bytes(4, "big")


@settings(max_examples=60, deadline=None)
@given(
    plaintext=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    suite=st.sampled_from([COMMIT, COMMIT_SIGN]),
)
def test_streaming_writer_matches_one_shot_bytes(
    plaintext: bytes, cuts: list[int], suite: AlgorithmSuite
) -> None:
    """The same message ID, key and signer give the same message, however it is fed.

    (ECDSA signatures are randomized, so for signing suites the body is compared.)"""
    data_key, message_id = os.urandom(32), os.urandom(32)
    one = build_encryptor(suite, data_key=data_key, message_id=message_id)
    two = build_encryptor(suite, data_key=data_key, message_id=message_id)
    whole = one.encrypt_all(plaintext)
    bounds = sorted({0, len(plaintext), *(c for c in cuts if c <= len(plaintext))})
    pieces = [two.header]
    pieces += [two.update(plaintext[a:b]) for a, b in itertools.pairwise(bounds)]
    pieces.append(two.finalize())
    streamed = b"".join(pieces)
    if suite.signing:
        # Headers differ in their public keys; compare the frames (same key, same IVs).
        assert open_message(streamed, data_key).read_all() == plaintext
        assert len(streamed) - len(two.header) - 2 - 110 <= len(whole) - len(one.header)
    else:
        assert streamed == whole


def test_decryptor_fed_byte_by_byte_releases_each_frame_once_verified() -> None:
    data_key = os.urandom(32)
    plaintext = os.urandom(40)
    encryptor = build_encryptor(data_key=data_key, frame_length=16)
    message = encryptor.encrypt_all(plaintext)
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    out: list[bytes] = []
    released_at: list[int] = []
    started = False
    for i in range(len(message)):
        decryptor.receive_data(message[i : i + 1])
        if not started and decryptor.read_header() is not None:
            decryptor.begin_body(data_key)
            started = True
        while started:
            item = decryptor.next_plaintext()
            if item is None:
                break
            assert item is not END_OF_MESSAGE
            assert isinstance(item, bytes)
            out.append(item)
            released_at.append(i + 1)
    decryptor.receive_eof()
    final = decryptor.next_plaintext()
    assert isinstance(final, bytes)
    out.append(final)
    assert decryptor.next_plaintext() is END_OF_MESSAGE
    assert b"".join(out) == plaintext
    header_len = len(encryptor.header)
    frame = 16 + 16 + 16
    # Each regular frame is released exactly when its last tag byte arrives.
    assert released_at == [header_len + frame, header_len + 2 * frame]


def test_final_frame_is_held_until_the_input_ends_cleanly() -> None:
    data_key = os.urandom(32)
    encryptor = build_encryptor(data_key=data_key)
    message = encryptor.encrypt_all(b"tail")
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(message)
    parsed = decryptor.read_header()
    assert parsed is not None
    assert (parsed.header, parsed.length) == (encryptor.header_value, len(encryptor.header))
    decryptor.begin_body(data_key)
    assert decryptor.next_plaintext() is None  # complete, but EOF not yet seen
    decryptor.receive_eof()
    assert decryptor.next_plaintext() == b"tail"


@pytest.mark.parametrize("suite", [COMMIT_SIGN, LEGACY_SIGN], ids=lambda s: s.name)
def test_signing_suite_final_frame_waits_for_the_signature(suite: AlgorithmSuite) -> None:
    data_key = os.urandom(suite.key_length)
    message = build_encryptor(suite, data_key=data_key, frame_length=16).encrypt_all(b"x" * 20)
    decryptor = open_message(message[:-1], data_key)  # the last signature byte is missing
    assert decryptor.next_plaintext() == b"x" * 16  # regular frame: tag verified
    with pytest.raises(TruncatedMessageError):
        decryptor.next_plaintext()


def test_bytes_after_the_message_are_refused() -> None:
    data_key = os.urandom(32)
    message = build_encryptor(data_key=data_key).encrypt_all(b"abc")
    with pytest.raises(MalformedMessageError, match="after the end"):
        open_message(message + b"\x00", data_key).read_all()


def test_swapped_frames_are_refused() -> None:
    data_key = os.urandom(32)
    encryptor = build_encryptor(data_key=data_key, frame_length=16)
    message = encryptor.encrypt_all(os.urandom(40))
    header_len = len(encryptor.header)
    f1, f2, final = frames_of(message, header_len, 16)
    with pytest.raises(MalformedMessageError, match="out of order"):
        open_message(message[:header_len] + f2 + f1 + final, data_key).read_all()


def test_wrong_data_key_fails_the_commitment_check() -> None:
    message = build_encryptor().encrypt_all(b"abc")
    with pytest.raises(AuthenticationError, match="commitment"):
        open_message(message, os.urandom(32))


def test_required_context_must_be_reproduced_to_authenticate_the_header() -> None:
    data_key = os.urandom(32)
    message = build_encryptor(data_key=data_key, required={"tenant": "t1"}).encrypt_all(b"abc")
    with pytest.raises(AuthenticationError, match="header authentication"):
        open_message(message, data_key)
    with pytest.raises(AuthenticationError):
        open_message(message, data_key, required_encryption_context={"tenant": "t2"})
    decryptor = open_message(message, data_key, required_encryption_context={"tenant": "t1"})
    assert decryptor.read_all() == b"abc"


def test_frame_length_outside_the_format_is_a_configuration_error() -> None:
    for bad in (0, 2**31):
        with pytest.raises(ConfigurationError, match="frame_length"):
            build_encryptor(frame_length=bad)


def test_encryptor_update_after_finalize_is_a_misuse() -> None:
    encryptor = build_encryptor()
    encryptor.finalize()
    with pytest.raises(ConfigurationError):
        encryptor.update(b"more")
