"""The AWS Encryption SDK as a reference implementation.

Its raw AES master key provider is built to match ``RawAesKeyring(namespace, name, key)``
exactly (same provider ID, key name, AES-256-GCM wrapping), so either side decrypts the
other's messages: benchmarks check that, which proves the comparison is like for like.
No caching materials manager is used, as in aioenvelope.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import aws_encryption_sdk
from aws_encryption_sdk.identifiers import (
    Algorithm,
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

from aioenvelope import AlgorithmSuite

from .common import BenchError

__all__ = ["ESDK_LABEL", "VERSION", "EsdkReference"]

VERSION = importlib.metadata.version("aws-encryption-sdk")
ESDK_LABEL = f"ESDK {VERSION}"


def _raw_aes_provider(namespace: str, key_name: str, key: bytes) -> Any:
    """A one-key ``RawMasterKeyProvider`` (the ESDK's API wants a subclass per provider ID)."""

    class _Provider(RawMasterKeyProvider):  # type: ignore[misc]  # the ESDK has no type hints
        provider_id = namespace

        def _get_raw_key(self, key_id: bytes) -> Any:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=key,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = _Provider()
    provider.add_master_key(key_name.encode("utf-8"))
    return provider


class EsdkReference:
    """``EncryptionSDKClient`` one-shot encrypt/decrypt with a raw AES-256 key."""

    def __init__(self, namespace: str, key_name: str, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the reference uses AES-256 wrapping: the key must be 32 bytes")
        self._client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        )
        self._provider = _raw_aes_provider(namespace, key_name, key)

    def encrypt(
        self,
        data: bytes,
        *,
        suite: AlgorithmSuite,
        encryption_context: Mapping[str, str],
        frame_length: int,
    ) -> bytes:
        ciphertext, _header = self._client.encrypt(
            source=data,
            key_provider=self._provider,
            encryption_context=dict(encryption_context),
            algorithm=Algorithm.get_by_id(suite.suite_id),
            frame_length=frame_length,
        )
        return bytes(ciphertext)

    def decrypt_with_header(self, blob: bytes) -> tuple[bytes, Any]:
        plaintext, header = self._client.decrypt(source=blob, key_provider=self._provider)
        return bytes(plaintext), header

    def decrypt(self, blob: bytes, *, encryption_context: Mapping[str, str]) -> bytes:
        """Decrypt and check the context, as ``EnvelopeClient.decrypt`` does.

        Without the material providers library the ESDK refuses a context on decrypt,
        so the comparison is done on the returned header (a dict lookup: negligible).
        """
        plaintext, header = self.decrypt_with_header(blob)
        stored = header.encryption_context
        for key, value in encryption_context.items():
            if stored.get(key) != value:
                raise BenchError(f"ESDK: encryption context mismatch for {key!r}")
        return plaintext
