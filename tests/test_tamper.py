"""Any change to a message is refused with a library error and no plaintext.

These go through the public API: flip every bit, cut at every byte, append, swap frames,
and decrypt with the wrong context or key.
"""

from __future__ import annotations

import os
import re

import pytest
from frame_layout import header_length
from message_fields import body_fields, expected_refusal, flipped, header_checks

from aioenvelope import AlgorithmSuite, EnvelopeClient, RawAesKeyring, RawRsaKeyring, errors

SUITES = [
    AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
    AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
]
CONTEXT = {"tenant": "t1", "purpose": "test"}
FRAME = 64  # the conftest client's frame length
# What a flip elsewhere in the header (lengths, context, EDK names, content type, frame
# length) can give, by the value the field now holds: each exactly one of these leaves.
HEADER_REFUSALS = {
    errors.MalformedMessageError,
    errors.TruncatedMessageError,
    errors.MessageLimitError,
    errors.NoUsableKeyError,
    errors.AuthenticationError,
}


async def refusal(client: EnvelopeClient, message: bytes) -> errors.EnvelopeError:
    """The library error decrypting ``message`` raises; a return, or any other
    exception, fails the test."""
    with pytest.raises(errors.EnvelopeError) as caught:
        await client.decrypt(message)
    return caught.value


async def assert_refused(
    client: EnvelopeClient, message: bytes, kind: type[errors.EnvelopeError], pattern: str
) -> None:
    """The decrypt raises exactly ``kind`` (not a subclass), saying ``pattern``."""
    exc = await refusal(client, message)
    assert type(exc) is kind, exc
    assert re.search(pattern, str(exc)), exc


@pytest.fixture(params=SUITES, ids=lambda s: s.name)
async def sealed(request: pytest.FixtureRequest, client: EnvelopeClient) -> bytes:
    """Three frames of 64 bytes plus a short final frame."""
    suite: AlgorithmSuite = request.param
    plaintext = os.urandom(3 * 64 + 5)
    message = await client.encrypt(plaintext, encryption_context=CONTEXT, algorithm_suite=suite)
    assert await client.decrypt(message) == plaintext
    return message


async def test_flipping_any_single_bit_is_refused_with_the_error_of_the_field_it_lands_in(
    client: EnvelopeClient, sealed: bytes
) -> None:
    """Behind the header each field's error is exact (see ``message_fields``); in the
    header the version byte, message ID, wrapped data key, commitment and tag each have
    their one check; any other header flip is exactly one of HEADER_REFUSALS."""
    length = header_length(sealed)
    suite = (await client.decrypt_with_header(sealed)).header.algorithm_suite
    body = body_fields(sealed, length, frame_length=FRAME, signing=suite.signing)
    checks = header_checks(sealed, length)
    for index in range(len(sealed)):
        for bit in range(8):
            mutant = flipped(sealed, index, bit)
            if index >= length:
                at = next(f for f in body if index in f)
                await assert_refused(client, mutant, *expected_refusal(mutant, at, FRAME))
                continue
            check = next(((k, p) for f, k, p in checks if index in f), None)
            if check is not None:
                await assert_refused(client, mutant, *check)
            else:
                assert type(await refusal(client, mutant)) in HEADER_REFUSALS


async def test_truncating_at_any_byte_is_refused_as_truncation(
    client: EnvelopeClient, sealed: bytes
) -> None:
    length = header_length(sealed)
    for cut in range(len(sealed)):
        where = "the message header" if cut < length else r"(frame \d+|the signature footer)\."
        await assert_refused(
            client, sealed[:cut], errors.TruncatedMessageError, f"it ends inside {where}"
        )


async def test_truncation_is_reported_as_truncation(client: EnvelopeClient, sealed: bytes) -> None:
    with pytest.raises(errors.TruncatedMessageError, match="truncated"):
        await client.decrypt(sealed[:-1])


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 17])
async def test_appending_bytes_is_refused(
    client: EnvelopeClient, sealed: bytes, extra: bytes
) -> None:
    with pytest.raises(errors.MalformedMessageError, match="after the end"):
        await client.decrypt(sealed + extra)


async def test_swapping_two_frames_is_refused(client: EnvelopeClient) -> None:
    message = await client.encrypt(os.urandom(3 * 64 + 5))
    header = await client.decrypt_with_header(message)
    frame = 4 + 12 + 64 + 16
    body_start = len(message) - 3 * frame - (4 + 4 + 12 + 4 + 5 + 16)
    assert header.header.frame_length == 64
    f1 = message[body_start : body_start + frame]
    f2 = message[body_start + frame : body_start + 2 * frame]
    swapped = message[:body_start] + f2 + f1 + message[body_start + 2 * frame :]
    await assert_refused(
        client, swapped, errors.MalformedMessageError, "^frame 2 found where frame 1 belongs"
    )


async def test_wrong_context_value_is_refused(client: EnvelopeClient, sealed: bytes) -> None:
    with pytest.raises(errors.EncryptionContextMismatchError, match="'tenant'"):
        await client.decrypt(sealed, encryption_context={"tenant": "t2"})


async def test_extra_context_pair_fails_the_aes_keyrings_aad(
    client: EnvelopeClient, sealed: bytes
) -> None:
    """A pair the message does not hold is taken as required context; raw AES binds the
    whole context to the wrapped key, so unwrapping already fails."""
    with pytest.raises(errors.NoUsableKeyError):
        await client.decrypt(sealed, encryption_context={**CONTEXT, "extra": "x"})


async def test_extra_context_pair_fails_the_header_tag(rsa_private_key: object) -> None:
    """RSA binds nothing to the wrapped key, so the header tag is what refuses it."""
    keyring = RawRsaKeyring("ns", "rsa", private_key=rsa_private_key)  # type: ignore[arg-type]
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(b"secret", encryption_context=CONTEXT)
        with pytest.raises(errors.AuthenticationError, match="header authentication"):
            await client.decrypt(message, encryption_context={**CONTEXT, "extra": "x"})


async def test_wrong_aes_key_is_refused(sealed: bytes) -> None:
    other = RawAesKeyring("test-namespace", "test-key", os.urandom(32))
    async with EnvelopeClient(other) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(sealed)


async def test_keyring_with_another_name_is_refused(sealed: bytes) -> None:
    async with EnvelopeClient(RawAesKeyring("test-namespace", "other", os.urandom(32))) as c:
        with pytest.raises(errors.NoUsableKeyError, match="0 named this key"):
            await c.decrypt(sealed)


async def test_rsa_keyring_cannot_decrypt_an_aes_wrapped_message(
    sealed: bytes, rsa_private_key: object
) -> None:
    keyring = RawRsaKeyring("test-namespace", "test-key", private_key=rsa_private_key)  # type: ignore[arg-type]
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(sealed)
