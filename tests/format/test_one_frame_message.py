"""The one-frame reader (``read_one_frame_message``) against the general reader: it takes
only a whole 0x0478 message of one final frame, reads its header exactly as the checked
parser does, and gives way (None) for every other shape, so that the general reader
reports it. Sans-I/O: the data key is made here, no keyring."""

from __future__ import annotations

import os

import pytest

from aioenvelope.errors import AuthenticationError
from aioenvelope.format import AlgorithmSuite
from aioenvelope.format.decryptor import MessageDecryptor, read_one_frame_message
from aioenvelope.format.encryption_context import PUBLIC_KEY_FIELD
from aioenvelope.format.encryptor import MessageEncryptor
from aioenvelope.format.header import EncryptedDataKey, parse_header
from aioenvelope.format.signing import Signer

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
DATA_KEY = os.urandom(32)


def _message(
    plaintext: bytes,
    *,
    frame_length: int = 4096,
    edks: int = 1,
    context: dict[str, str] | None = None,
    required: dict[str, str] | None = None,
) -> bytes:
    stored = {"purpose": "test"} if context is None else context
    encryptor = MessageEncryptor(
        algorithm_suite=COMMIT,
        data_key=DATA_KEY,
        message_id=os.urandom(32),
        encrypted_data_keys=tuple(
            EncryptedDataKey(f"p{i}", os.urandom(20), os.urandom(48)) for i in range(edks)
        ),
        encryption_context=stored,
        required_encryption_context=required or {},
        frame_length=frame_length,
        signer=None,
    )
    return encryptor.encrypt_all(plaintext)


def _general(message: bytes, required: dict[str, str] | None = None) -> bytes:
    decryptor = MessageDecryptor(max_encrypted_data_keys=10)
    decryptor.receive_data(message)
    decryptor.receive_eof()
    decryptor.read_header()
    decryptor.begin_body(DATA_KEY, required_encryption_context=required or {})
    return decryptor.read_all()


@pytest.mark.parametrize("size", [0, 1, 1024, 4096])
def test_one_frame_message_opens_to_the_general_readers_plaintext(size: int) -> None:
    plaintext = os.urandom(size)
    message = _message(plaintext)
    one = read_one_frame_message(message, max_encrypted_data_keys=10)
    assert one is not None
    assert one.header == parse_header(message, max_encrypted_data_keys=10).header
    assert one.open(DATA_KEY, {}) == plaintext == _general(message)


def test_one_frame_message_authenticates_the_required_context() -> None:
    required = {"tenant": "t1"}
    message = _message(b"data", required=required)
    one = read_one_frame_message(message, max_encrypted_data_keys=10)
    assert one is not None
    assert one.open(DATA_KEY, required) == b"data" == _general(message, required)
    with pytest.raises(AuthenticationError, match="header authentication failed"):
        one.open(DATA_KEY, {"tenant": "t2"})
    with pytest.raises(AuthenticationError, match="header authentication failed"):
        one.open(DATA_KEY, {})


@pytest.mark.parametrize("edks", [1, 3])
def test_one_frame_message_hands_out_its_edks_serialization_in_place(edks: int) -> None:
    message = _message(b"data", edks=edks)
    one = read_one_frame_message(message, max_encrypted_data_keys=10)
    assert one is not None
    assert one.serialized_edks == b"".join(
        edk.serialize() for edk in one.header.encrypted_data_keys
    )


def test_one_frame_message_refuses_a_wrong_data_key_before_any_plaintext() -> None:
    message = _message(b"secret")
    one = read_one_frame_message(message, max_encrypted_data_keys=10)
    assert one is not None
    with pytest.raises(AuthenticationError, match="key commitment does not match"):
        one.open(os.urandom(32), {})


def test_other_shapes_are_left_to_the_general_reader() -> None:
    """More frames, trailing bytes, a cut message, the signing suite: None."""
    two_frames = _message(os.urandom(100), frame_length=64)
    assert read_one_frame_message(two_frames, max_encrypted_data_keys=10) is None
    whole = _message(b"x" * 100)
    assert read_one_frame_message(whole + b"\x00", max_encrypted_data_keys=10) is None
    assert read_one_frame_message(whole[:-1], max_encrypted_data_keys=10) is None
    assert read_one_frame_message(whole, max_encrypted_data_keys=0) is None  # EDK limit
    suite = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
    signer = Signer(suite)
    signed = MessageEncryptor(
        algorithm_suite=suite,
        data_key=DATA_KEY,
        message_id=os.urandom(32),
        encrypted_data_keys=(EncryptedDataKey("p", b"i", b"c"),),
        encryption_context={PUBLIC_KEY_FIELD: signer.encoded_public_key},
        frame_length=4096,
        signer=signer,
    ).encrypt_all(b"x")
    assert read_one_frame_message(signed, max_encrypted_data_keys=10) is None


def test_every_cut_of_a_message_but_the_whole_is_left_to_the_general_reader() -> None:
    message = _message(os.urandom(64))
    for cut in range(len(message)):
        assert read_one_frame_message(message[:cut], max_encrypted_data_keys=10) is None


def test_a_flipped_bit_is_either_refused_by_the_reader_or_fails_authentication() -> None:
    """Every bit of a small message: the one-frame reader gives way (the general reader
    then reports it) or the opening raises; it never returns plaintext."""
    message = _message(os.urandom(32), context={})
    for i in range(len(message)):
        for bit in range(8):
            forged = bytearray(message)
            forged[i] ^= 1 << bit
            one = read_one_frame_message(bytes(forged), max_encrypted_data_keys=10)
            if one is None:
                continue
            with pytest.raises(AuthenticationError):
                one.open(DATA_KEY, {})
