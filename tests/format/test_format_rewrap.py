"""Sans-I/O rewrapping: ``rewrapped_header`` with the data key in hand. No event loop, no
keyring: messages come from the sans-I/O writer and are read back by the decryptor."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from messages import DUMMY_EDK, build_encryptor, encryption_contexts

from aioenvelope.errors import AuthenticationError, ConfigurationError
from aioenvelope.format import (
    AlgorithmSuite,
    EncryptedDataKey,
    MessageDecryptor,
    ParsedHeader,
    parse_header,
)
from aioenvelope.format.encryption_context import PUBLIC_KEY_FIELD
from aioenvelope.format.rewrap import rewrapped_header
from aioenvelope.format.signing import Verifier

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
UNSIGNED_SUITES = [
    pytest.param(suite, id=f"0x{suite.suite_id:04x}")
    for suite in AlgorithmSuite
    if not suite.signing
]
SIGNED_SUITES = [
    pytest.param(suite, id=f"0x{suite.suite_id:04x}") for suite in AlgorithmSuite if suite.signing
]
CONTEXT = {"tenant": "t1", "purpose": "rewrap"}
NEW_EDKS = (
    EncryptedDataKey("new-provider", b"new-key", b"\x02" * 40),
    EncryptedDataKey("other-provider", "ключ".encode(), b"\x03" * 7),
)


def parse(message: bytes) -> ParsedHeader:
    return parse_header(message, max_encrypted_data_keys=0xFFFF)


def read(
    message: bytes,
    data_key: bytes,
    *,
    required: Mapping[str, str] | None = None,
) -> bytes:
    """Decrypt ``message`` with the data key in hand (verifying a signature if any)."""
    decryptor = MessageDecryptor(max_encrypted_data_keys=0xFFFF)
    decryptor.receive_data(message)
    decryptor.receive_eof()
    parsed = decryptor.read_header()
    assert parsed is not None
    header = parsed.header
    verifier = None
    if header.algorithm_suite.signing:
        verifier = Verifier(header.algorithm_suite, header.encryption_context[PUBLIC_KEY_FIELD])
    decryptor.begin_body(data_key, required_encryption_context=required, verifier=verifier)
    return decryptor.read_all()


def sealed(
    suite: AlgorithmSuite,
    plaintext: bytes,
    *,
    frame_length: int = 16,
    context: Mapping[str, str] = CONTEXT,
    required: Mapping[str, str] | None = None,
) -> tuple[bytes, bytes]:
    """A message and its data key."""
    data_key = os.urandom(suite.key_length)
    encryptor = build_encryptor(
        suite, data_key=data_key, context=context, required=required, frame_length=frame_length
    )
    return encryptor.encrypt_all(plaintext), data_key


def rewrap(
    message: bytes,
    data_key: bytes,
    edks: tuple[EncryptedDataKey, ...] = NEW_EDKS,
    *,
    required: Mapping[str, str] | None = None,
) -> bytes:
    parsed = parse(message)
    header = rewrapped_header(parsed, data_key, edks, required_encryption_context=required)
    return header + message[parsed.length :]


@pytest.mark.parametrize("suite", UNSIGNED_SUITES)
@pytest.mark.parametrize("size", [0, 1, 16, 16 * 3 + 5])
def test_rewrapped_header_replaces_edks_and_keeps_everything_else(
    suite: AlgorithmSuite, size: int
) -> None:
    """Every unsigned suite, v1 and v2: only the EDK list (and the tag) changes; the body
    after the header is reused as is and still opens with the same data key."""
    plaintext = os.urandom(size)
    message, data_key = sealed(suite, plaintext)
    new = rewrap(message, data_key)
    old_parsed, new_parsed = parse(message), parse(new)
    old, fresh = old_parsed.header, new_parsed.header
    assert fresh.encrypted_data_keys == NEW_EDKS
    assert old.encrypted_data_keys == (DUMMY_EDK,)
    for name in ("version", "algorithm_suite", "message_id", "content_type", "frame_length"):
        assert getattr(fresh, name) == getattr(old, name)
    assert fresh.suite_data == old.suite_data
    assert dict(fresh.encryption_context) == dict(old.encryption_context)
    assert new[new_parsed.length :] == message[old_parsed.length :]
    assert read(new, data_key) == plaintext


@pytest.mark.parametrize("suite", UNSIGNED_SUITES)
def test_rewrapping_with_the_same_edks_reproduces_the_header_byte_for_byte(
    suite: AlgorithmSuite,
) -> None:
    """The tag key and IV are those of the original, so the same EDKs give the same bytes:
    the re-authentication is the writer's own, v1 header IV included."""
    message, data_key = sealed(suite, b"same bytes" * 5)
    parsed = parse(message)
    again = rewrapped_header(parsed, data_key, parsed.header.encrypted_data_keys)
    assert again == message[: parsed.length]


@pytest.mark.parametrize("suite", UNSIGNED_SUITES)
def test_v1_header_keeps_its_iv_field_and_v2_has_none(suite: AlgorithmSuite) -> None:
    message, data_key = sealed(suite, b"x")
    new = rewrapped_header(parse(message), data_key, NEW_EDKS)
    parsed = parse(new)
    assert parsed.length == len(new)
    authentication = new[len(parsed.body_bytes) :]
    if suite.message_version == 1:
        assert authentication == parsed.auth_iv + parsed.auth_tag
        assert parsed.auth_iv == parse(message).auth_iv
    else:
        assert authentication == parsed.auth_tag


@pytest.mark.parametrize("suite", SIGNED_SUITES)
def test_signed_messages_are_refused_pointing_at_reencrypt(suite: AlgorithmSuite) -> None:
    message, data_key = sealed(suite, b"signed")
    with pytest.raises(ConfigurationError, match="reencrypt_stream"):
        rewrapped_header(parse(message), data_key, NEW_EDKS)


def test_an_empty_edk_list_is_refused() -> None:
    message, data_key = sealed(COMMIT, b"data")
    with pytest.raises(ConfigurationError, match="at least one encrypted data key"):
        rewrapped_header(parse(message), data_key, ())


@pytest.mark.parametrize("suite", UNSIGNED_SUITES)
def test_a_wrong_data_key_is_refused_not_re_authenticated(suite: AlgorithmSuite) -> None:
    message, _ = sealed(suite, b"data")
    with pytest.raises(AuthenticationError):
        rewrapped_header(parse(message), os.urandom(suite.key_length), NEW_EDKS)


def _header_field_offsets(message: bytes) -> dict[str, int]:
    """One byte inside each header field worth tampering with (v2 messages)."""
    parsed = parse(message)
    header = parsed.header
    body = parsed.body_bytes
    edk = header.encrypted_data_keys[0]
    context_value = next(iter(header.encryption_context.values())).encode()
    return {
        "message-id": 3 + 5,
        "context": body.index(context_value),
        "edk-provider-id": body.index(edk.provider_id.encode()),
        "edk-ciphertext": body.index(edk.ciphertext) + len(edk.ciphertext) - 1,
        "frame-length": len(body) - len(header.suite_data) - 1,
        "commitment": len(body) - 1,
        "tag": parsed.length - 1,
    }


@pytest.mark.parametrize(
    "field",
    [
        "message-id",
        "context",
        "edk-provider-id",
        "edk-ciphertext",
        "frame-length",
        "commitment",
        "tag",
    ],
)
def test_a_tampered_header_is_refused_never_re_authenticated(field: str) -> None:
    """Rewrapping must never bless a changed header with a fresh tag."""
    message, data_key = sealed(COMMIT, b"data" * 10)
    offset = _header_field_offsets(message)[field]
    tampered = bytearray(message)
    tampered[offset] ^= 0x01
    with pytest.raises(AuthenticationError):
        rewrapped_header(parse(bytes(tampered)), data_key, NEW_EDKS)


def test_required_context_is_needed_to_rewrap_and_stays_required() -> None:
    required = {"secret": "s3"}
    message, data_key = sealed(COMMIT, b"payload" * 4, required=required)
    assert "secret" not in parse(message).header.encryption_context
    with pytest.raises(AuthenticationError):
        rewrapped_header(parse(message), data_key, NEW_EDKS)
    with pytest.raises(AuthenticationError):
        rewrapped_header(
            parse(message), data_key, NEW_EDKS, required_encryption_context={"secret": "nope"}
        )
    new = rewrap(message, data_key, required=required)
    assert "secret" not in parse(new).header.encryption_context
    assert read(new, data_key, required=required) == b"payload" * 4
    with pytest.raises(AuthenticationError):
        read(new, data_key)


@settings(max_examples=50, deadline=None)
@given(
    context=encryption_contexts,
    plaintext=st.binary(max_size=200),
    frame_length=st.integers(1, 64),
    edks=st.lists(
        st.builds(
            EncryptedDataKey,
            st.text(min_size=1, max_size=10),
            st.binary(max_size=20),
            st.binary(min_size=1, max_size=60),
        ),
        min_size=1,
        max_size=4,
    ).map(tuple),
)
def test_any_rewrap_keeps_the_body_and_opens_with_the_same_key(
    context: dict[str, str],
    plaintext: bytes,
    frame_length: int,
    edks: tuple[EncryptedDataKey, ...],
) -> None:
    message, data_key = sealed(COMMIT, plaintext, frame_length=frame_length, context=context)
    new = rewrap(message, data_key, edks)
    new_parsed = parse(new)
    assert new_parsed.header.encrypted_data_keys == edks
    assert new_parsed.header.message_id == parse(message).header.message_id
    assert new[new_parsed.length :] == message[parse(message).length :]
    assert read(new, data_key) == plaintext
    # Rewrapping back to the original EDK gives the original message, byte for byte.
    assert rewrap(new, data_key, (DUMMY_EDK,)) == message
