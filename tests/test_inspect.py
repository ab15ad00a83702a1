"""``aioenvelope.inspect``: what a message says about itself (suite, context, EDKs,
frame length), read from the header alone with no key and no KMS call, and not
authenticated (it is for finding objects, e.g. those still under an old key, never for
trusting them)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from esdk_peer import esdk_encrypt, peer_keys, raw_aes_key
from kms_server import KmsKey
from moto_keyrings import KmsKeyringFactory

import aioenvelope
from aioenvelope import AlgorithmSuite, EnvelopeClient, errors

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
CONTEXT = {"tenant": "t-42", "purpose": "rotation", "schlüssel": "wert ✓"}
PLAINTEXT = bytes(range(256)) * 5 + b"tail"
KMS_PROVIDER_ID = "aws-kms"


def flip(message: bytes, offset: int) -> bytes:
    mutated = bytearray(message)
    mutated[offset] ^= 0x01
    return bytes(mutated)


def raw_aes_peer() -> Any:
    """An ESDK raw AES master key (to write legacy messages with)."""
    return peer_keys(raw_aes_key("aioenvelope-inspect", "a", os.urandom(32)))


async def test_inspect_shows_suite_id_context_edks_and_frame_length(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    keyring = make_kms_keyring(kms_key, additional_key_ids=[kms_key_2.arn])
    async with EnvelopeClient(keyring, frame_length=512) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        full = await client.decrypt_with_header(message, encryption_context=CONTEXT)
        calls, stats = dict(keyring.kms_calls), client.stats.kms_calls
        header = aioenvelope.inspect(message)
        assert keyring.kms_calls == calls
        assert client.stats.kms_calls == stats
    assert header == full.header
    assert header.algorithm_suite is COMMIT
    assert header.version == 2
    assert len(header.message_id) == 32
    assert dict(header.encryption_context) == CONTEXT
    assert header.frame_length == 512
    assert [edk.provider_id for edk in header.encrypted_data_keys] == [KMS_PROVIDER_ID] * 2
    assert [edk.provider_info for edk in header.encrypted_data_keys] == [
        kms_key.arn.encode(),
        kms_key_2.arn.encode(),
    ]


async def test_inspect_needs_only_the_header(client: EnvelopeClient) -> None:
    message = await client.encrypt(os.urandom(10_000), encryption_context=CONTEXT)
    length = aioenvelope.inspect(message).header_length
    whole = aioenvelope.inspect(message)
    for prefix in (message[:length], message[: length + 1], message[:4096]):
        assert aioenvelope.inspect(prefix) == whole
    assert aioenvelope.inspect(bytearray(message[:length])) == whole
    assert aioenvelope.inspect(memoryview(message)[:length]) == whole
    for cut in (0, 1, 3, 40, length - 17, length - 1):
        with pytest.raises(
            errors.TruncatedMessageError,
            match=r"^the bytes end inside the message header: pass more of the message$",
        ):
            aioenvelope.inspect(message[:cut])


def assert_header_ends_at(message: bytes, length: int) -> None:
    """``length`` is exactly where the header ends: one byte fewer is a truncated
    header, and those bytes alone inspect to the same header as the whole message."""
    with pytest.raises(errors.TruncatedMessageError):
        aioenvelope.inspect(message[: length - 1])
    assert aioenvelope.inspect(message[:length]) == aioenvelope.inspect(message)


@pytest.mark.parametrize("suite", list(AlgorithmSuite), ids=lambda suite: f"{suite.suite_id:04x}")
@pytest.mark.parametrize("frame_length", [0, 128], ids=["non-framed", "framed"])
def test_header_length_is_where_the_body_starts_for_every_suite_and_framing(
    suite: AlgorithmSuite, frame_length: int
) -> None:
    """The public seam for slicing a stored message (an S3 range request for the body):
    checked against ESDK-written messages, so it is not our writer agreeing with itself."""
    message, _ = esdk_encrypt(
        raw_aes_peer(),
        PLAINTEXT,
        suite_id=suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=frame_length,
    )
    header = aioenvelope.inspect(message)
    assert header.algorithm_suite is suite
    assert 0 < header.header_length < len(message)
    assert_header_ends_at(message, header.header_length)


async def test_streams_report_the_header_length_that_inspect_reads(
    client: EnvelopeClient,
) -> None:
    message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    expected = aioenvelope.inspect(message).header_length
    assert_header_ends_at(message, expected)
    async with client.encrypt_stream(PLAINTEXT, encryption_context=CONTEXT) as encrypting:
        written = b"".join([chunk async for chunk in encrypting])
        assert encrypting.header is not None
        assert encrypting.header.header_length == aioenvelope.inspect(written).header_length
        assert encrypting.header == aioenvelope.inspect(written)
    async with client.decrypt_stream(message) as decrypting:
        assert b"".join([chunk async for chunk in decrypting]) == PLAINTEXT
        assert decrypting.header == aioenvelope.inspect(message)
        assert decrypting.header.header_length == expected


@pytest.mark.parametrize("value", ["not bytes", None, [1, 2, 3], 42])
def test_inspect_refuses_what_is_not_bytes(value: Any) -> None:
    with pytest.raises(errors.ConfigurationError, match="bytes-like"):
        aioenvelope.inspect(value)


def test_inspect_refuses_garbage_as_malformed() -> None:
    with pytest.raises(
        errors.MalformedMessageError,
        match=r"^not an AWS Encryption SDK message: unknown version byte 0x07$",
    ):
        aioenvelope.inspect(b"\x07" + os.urandom(100))


async def test_inspect_reads_legacy_v1_messages_without_a_key() -> None:
    suite = AlgorithmSuite.AES_128_GCM_IV12_TAG16_NO_KDF
    old, peer = esdk_encrypt(
        raw_aes_peer(),
        b"legacy",
        suite_id=suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=0,
    )
    header = aioenvelope.inspect(old)
    assert (header.version, header.algorithm_suite, header.frame_length) == (1, suite, 0)
    assert header.message_id == peer.message_id
    assert dict(header.encryption_context) == CONTEXT


async def test_inspect_does_not_authenticate(client: EnvelopeClient) -> None:
    """It is for finding objects, not trusting them: a changed header still parses.
    Decrypt refuses it: the raw AES keyring binds the context into the data key's
    wrapping, so the key does not unwrap under the changed context."""
    message = await client.encrypt(PLAINTEXT, encryption_context={"tenant": "aaaa"})
    tampered = flip(message, message.index(b"aaaa"))
    assert aioenvelope.inspect(tampered).encryption_context["tenant"] == "`aaa"
    with pytest.raises(
        errors.NoUsableKeyError,
        match=r"could not decrypt any of the message's 1 encrypted data keys \(1 named this key\)",
    ):
        await client.decrypt(tampered)
