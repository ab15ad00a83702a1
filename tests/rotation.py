"""Keys and round trips for the re-encryption (key rotation) tests.

:class:`AesKey` is one raw AES wrapping key seen by both our keyring and the ESDK;
:class:`XorKeyring` is a test keyring that counts its lifecycle calls, wraps and unwraps,
so a test can say which keyring was opened, closed or asked for a key, and how often.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import pytest
from esdk_peer import peer_keys, raw_aes_key

import aioenvelope
from aioenvelope import (
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    MessageHeader,
    RawAesKeyring,
    ReencryptingStream,
    errors,
)
from aioenvelope.format import ParsedHeader, parse_header
from aioenvelope.runtime import Runtime

CONTEXT = {"tenant": "t-42", "purpose": "rotation", "schlüssel": "wert ✓"}
NAMESPACE = "aioenvelope-reencrypt"
PLAINTEXT = bytes(range(256)) * 5 + b"tail"  # several 64-byte frames, the last partial
KMS_PROVIDER_ID = "aws-kms"
PUBLIC_KEY_FIELD = "aws-crypto-public-key"
# What RawAesKeyring says when no EDK names it, or one does but does not unwrap (under
# another context, the AES-GCM AAD of the wrapping, it cannot).
NOT_NAMED = r"could not decrypt any of the message's \d+ encrypted data keys \(0 named this key\)"
NAMED_BUT_WRONG = r"could not decrypt any of the message's \d+ encrypted data keys \(1 named"


def parsed(message: bytes) -> ParsedHeader:
    return parse_header(message, max_encrypted_data_keys=0xFFFF)


def body(message: bytes) -> bytes:
    """Everything after the header."""
    return message[aioenvelope.inspect(message).header_length :]


def edk_arns(header: MessageHeader) -> set[str]:
    assert {edk.provider_id for edk in header.encrypted_data_keys} == {KMS_PROVIDER_ID}
    return {edk.provider_info.decode() for edk in header.encrypted_data_keys}


def flip(message: bytes, offset: int) -> bytes:
    mutated = bytearray(message)
    mutated[offset] ^= 0x01
    return bytes(mutated)


class AesKey:
    """A raw AES wrapping key as our keyring and as the ESDK's master key."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = os.urandom(32)

    def keyring(self) -> RawAesKeyring:
        return RawAesKeyring(NAMESPACE, self.name, self.key)

    def peer(self) -> Any:
        return peer_keys(raw_aes_key(NAMESPACE, self.name, self.key))


class XorKeyring(Keyring):
    """A test keyring: the EDK is the data key XOR a pad made from the keyring's name.
    Counts its lifecycle calls and every wrap (``on_encrypt``) and unwrap."""

    PROVIDER_ID = "test-xor"

    def __init__(self, name: str, *, open_delay: float = 0.0) -> None:
        self.name = name
        self._pad = hashlib.sha512(name.encode()).digest()
        self._open_delay = open_delay
        self.attached = 0
        self.opened = 0
        self.closed = 0
        self.wrapped = 0
        self.unwrapped = 0

    def __repr__(self) -> str:
        return f"XorKeyring({self.name!r})"

    def _xor(self, key: bytes) -> bytes:
        return bytes(a ^ b for a, b in zip(key, self._pad[: len(key)], strict=True))

    def attach(self, runtime: Runtime) -> None:
        self.attached += 1

    async def open(self) -> None:
        self.opened += 1
        await anyio.sleep(self._open_delay)

    async def close(self) -> None:
        self.closed += 1

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        self.wrapped += 1
        if materials.plaintext_data_key is None:
            materials = materials.generate_data_key()
        assert materials.plaintext_data_key is not None
        edk = EncryptedDataKey(
            self.PROVIDER_ID, self.name.encode(), self._xor(materials.plaintext_data_key)
        )
        return materials.with_encrypted_data_key(edk)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        for edk in encrypted_data_keys:
            if edk.provider_id == self.PROVIDER_ID and edk.provider_info == self.name.encode():
                self.unwrapped += 1
                return materials.with_data_key(self._xor(edk.ciphertext))
        raise errors.NoUsableKeyError(f"{self!r} found no EDK of its own")


async def drain_into(stream: ReencryptingStream, into: list[bytes]) -> None:
    """Read ``stream`` to the end (closing it), collecting what it yields."""
    async with stream:
        async for chunk in stream:
            into.append(chunk)


async def encrypt_with(
    keyring: Keyring,
    plaintext: bytes = PLAINTEXT,
    *,
    context: Mapping[str, str] = CONTEXT,
    **kwargs: Any,
) -> bytes:
    async with EnvelopeClient(keyring, frame_length=64) as client:
        return await client.encrypt(plaintext, encryption_context=context, **kwargs)


async def decrypt_with(
    keyring: Keyring, message: bytes, context: Mapping[str, str] | None = None
) -> bytes:
    async with EnvelopeClient(keyring) as client:
        return await client.decrypt(message, encryption_context=context)


async def assert_no_usable_key(
    keyring: Keyring, message: bytes, context: Mapping[str, str] | None = None, *, match: str
) -> None:
    """``keyring`` cannot open ``message``: none of the EDKs unwraps under it (with
    ``context`` as the AES-GCM AAD), which is NoUsableKeyError saying ``match``."""
    with pytest.raises(errors.NoUsableKeyError, match=match):
        await decrypt_with(keyring, message, context)
