"""Raw AES keyring: wraps data keys locally with AES-GCM, ESDK-compatible."""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigurationError, NoUsableKeyError
from ..format import nonce_log
from ..format.header import EncryptedDataKey
from ._naming import check_raw_names
from .base import DecryptionMaterials, EncryptionMaterials, Keyring, _evolve, shown_name

__all__ = ["RawAesKeyring"]

_TAG_BITS = 128
_IV_LENGTH = 12


def _wrong_key_type(wrapping_key: object) -> str:
    """What to say when the key is no bytes; never the value, which may be the key."""
    what = type(wrapping_key).__name__
    if isinstance(wrapping_key, str):
        return (
            "wrapping_key must be bytes, not str: load a key file (as `aioenvelope keygen` "
            "writes it) with RawAesKeyring.from_key_file(path), or decode a key held as "
            "text first (for example base64.b64decode(text) or bytes.fromhex(text))"
        )
    return f"wrapping_key must be bytes (16, 24 or 32 of them), not {what}"


class RawAesKeyring(Keyring):
    """Wraps with a local AES-128/192/256 key; the encryption context is the GCM AAD.

    The EDK's provider ID is ``key_namespace``; its provider info is the key name,
    the tag length in bits, the IV length and the IV, exactly as the ESDK writes it.
    """

    def __init__(self, key_namespace: str, key_name: str, wrapping_key: bytes) -> None:
        check_raw_names(key_namespace, key_name)
        if not isinstance(wrapping_key, (bytes, bytearray)):
            raise ConfigurationError(_wrong_key_type(wrapping_key))
        if len(wrapping_key) not in (16, 24, 32):
            raise ConfigurationError(
                f"wrapping_key must be 16, 24 or 32 bytes (AES-128/192/256), not "
                f"{len(wrapping_key)} bytes"
            )
        self.key_namespace = key_namespace
        self.key_name = key_name
        self._bits = len(wrapping_key) * 8
        self._aead = AESGCM(bytes(wrapping_key))
        self._fingerprint = nonce_log.fingerprint(wrapping_key)  # for the (key, IV) seam
        self._info_prefix = (
            key_name.encode("utf-8") + _TAG_BITS.to_bytes(4, "big") + _IV_LENGTH.to_bytes(4, "big")
        )
        self._info_length = len(self._info_prefix) + _IV_LENGTH  # an EDK's provider info

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> RawAesKeyring:
        """The keyring of a raw AES key file, as ``aioenvelope keygen`` writes it (the
        format: :mod:`aioenvelope.keyrings.key_file`). Errors name the file, never the
        key; read it once at start-up and keep the keyring."""
        from .key_file import read_raw_key  # key_file imports this module

        return read_raw_key(path).keyring()

    def __repr__(self) -> str:
        return (
            f"RawAesKeyring(key_namespace={self.key_namespace!r}, key_name={self.key_name!r}, "
            f"wrapping_key=<AES-{self._bits}>)"
        )

    @property
    def _description(self) -> str:
        return f"the raw AES keyring {shown_name(self.key_namespace)}/{shown_name(self.key_name)}"

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        data_key = materials.plaintext_data_key
        generated = data_key is None
        if data_key is None:
            data_key = os.urandom(materials.algorithm_suite.key_length)
        iv = os.urandom(_IV_LENGTH)  # random 96-bit IVs: sound for 2^32 wraps per key
        if nonce_log.observers:
            nonce_log.report(self._fingerprint, iv)
        wrapped = self._aead.encrypt(iv, data_key, materials.serialized_encryption_context)
        edk = EncryptedDataKey._of(self.key_namespace, self._info_prefix + iv, wrapped)
        if generated:  # one copy of the materials instead of two
            return materials._with_key_and_edk(data_key, edk)
        return materials.with_encrypted_data_key(edk)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        key_length = materials.algorithm_suite.key_length
        matched = 0
        for edk in encrypted_data_keys:
            info = edk.provider_info
            if (
                edk.provider_id != self.key_namespace
                or len(info) != self._info_length
                or not info.startswith(self._info_prefix)
                or len(edk.ciphertext) != key_length + 16
            ):
                continue
            matched += 1
            aad = materials.serialized_encryption_context
            try:
                data_key = self._aead.decrypt(info[-_IV_LENGTH:], edk.ciphertext, aad)
            except InvalidTag:
                continue
            # ``with_data_key`` without its checks: the slot is empty (tested above) and
            # the key has the suite's length (the ciphertext's length was).
            return _evolve(materials, plaintext_data_key=data_key)
        why = (
            "wrong key, or the encryption context differs from the one used to encrypt"
            if matched
            else "the message was not encrypted for this key"
        )
        raise NoUsableKeyError(
            f"{self._description} could not decrypt any of the message's "
            f"{len(encrypted_data_keys)} encrypted data keys ({matched} named this key): {why}"
        )
