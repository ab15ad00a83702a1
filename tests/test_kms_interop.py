"""KMS interop with the AWS Encryption SDK, both directions, against one moto KMS.

Byte compatibility with raw keys (``test_interop_esdk.py``) says nothing about KMS
EDKs: the provider ID, the provider info (the key ARN KMS returned) and the encryption
context sent to KMS must match too, or a message written by one library cannot be
unwrapped by the other. Here the ESDK's ``StrictAwsKmsMasterKeyProvider`` and our KMS
keyrings talk to the same moto server (the ESDK's through conftest's ``esdk_kms``); each
case checks the plaintext, the context, and that both parsers see the same encrypted
data keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aws_encryption_sdk
import pytest
from esdk_peer import PeerHeader, esdk_decrypt, esdk_encrypt
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_discovery_keyring, moto_kms_keyring

from aioenvelope import (
    AlgorithmSuite,
    DiscoveryFilter,
    EnvelopeClient,
    KmsDiscoveryKeyring,
    KmsKeyring,
    MessageHeader,
)

PROVIDER_ID = "aws-kms"
FRAME_LENGTH = 4096
PLAINTEXT = bytes(range(256)) * 40  # a few frames, the last one partial
# Non-ASCII on both sides of the pairs: the context is serialized into the header *and*
# sent to KMS, where it must match byte for byte on decrypt.
CONTEXT = {"tenant": "t-42", "schlüssel": "wert ✓", "ключ": "значение", "🔐": "日本語"}
SUITES = [
    pytest.param(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, id="0x0478"),
    pytest.param(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384, id="0x0578"),
]


def esdk_provider(*keys: KmsKey) -> Any:
    """The ESDK's strict KMS master key provider for these keys (by ARN)."""
    return aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[k.arn for k in keys])


def edk_set(header: MessageHeader) -> frozenset[tuple[str, bytes, bytes]]:
    return frozenset(
        (edk.provider_id, edk.provider_info, edk.ciphertext) for edk in header.encrypted_data_keys
    )


def assert_same_header(ours: MessageHeader, peer: PeerHeader, context: Mapping[str, str]) -> None:
    """Both parsers read the same suite, context and EDKs from the message."""
    assert ours.algorithm_suite.suite_id == peer.suite_id
    assert ours.message_id == peer.message_id
    assert dict(ours.encryption_context) == peer.encryption_context
    assert peer.user_context == dict(context)
    assert edk_set(ours) == peer.encrypted_data_keys


def edk_key_arns(header: MessageHeader) -> set[str]:
    assert {edk.provider_id for edk in header.encrypted_data_keys} == {PROVIDER_ID}
    return {edk.provider_info.decode("utf-8") for edk in header.encrypted_data_keys}


def our_decrypting_keyring(
    kind: str, moto: MotoKms, key: KmsKey
) -> KmsKeyring | KmsDiscoveryKeyring:
    if kind == "strict":
        return moto_kms_keyring(moto, key.arn)
    discovery_filter = DiscoveryFilter([key.account]) if kind == "discovery-filtered" else None
    return moto_kms_discovery_keyring(moto, discovery_filter=discovery_filter)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("kind", ["strict", "discovery", "discovery-filtered"])
async def test_esdk_kms_message_decrypts_with_our_kms_keyrings(
    esdk_kms: MotoKms, kms_key: KmsKey, suite: AlgorithmSuite, kind: str
) -> None:
    """A message the ESDK wrote under a KMS key opens with our strict keyring naming
    that key and with our discovery keyring, which trusts the ARN in the EDK."""
    blob, peer_header = esdk_encrypt(
        esdk_provider(kms_key),
        PLAINTEXT,
        suite_id=suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=FRAME_LENGTH,
    )
    keyring = our_decrypting_keyring(kind, esdk_kms, kms_key)
    async with EnvelopeClient(keyring) as client:
        result = await client.decrypt_with_header(blob, encryption_context=CONTEXT)
    assert result.plaintext == PLAINTEXT
    assert result.header.algorithm_suite is suite
    assert_same_header(result.header, peer_header, CONTEXT)
    assert edk_key_arns(result.header) == {kms_key.arn}
    assert keyring.kms_calls["Decrypt"] == 1


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("esdk_key", ["generator", "additional"])
async def test_our_kms_message_decrypts_with_the_esdk_naming_either_key(
    esdk_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey, suite: AlgorithmSuite, esdk_key: str
) -> None:
    """Every key our keyring wraps under yields an EDK the ESDK can use on its own: the
    generator's from GenerateDataKey and the additional key's from Encrypt."""
    keyring = moto_kms_keyring(esdk_kms, kms_key.arn, additional_key_ids=[kms_key_2.arn])
    async with EnvelopeClient(keyring, frame_length=FRAME_LENGTH) as client:
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT, algorithm_suite=suite)
        ours = await client.decrypt_with_header(blob, encryption_context=CONTEXT)
    assert edk_key_arns(ours.header) == {kms_key.arn, kms_key_2.arn}
    reader = kms_key if esdk_key == "generator" else kms_key_2
    plaintext, peer_header = esdk_decrypt(esdk_provider(reader), blob)
    assert plaintext == PLAINTEXT
    assert peer_header.suite_id == suite.suite_id
    assert_same_header(ours.header, peer_header, CONTEXT)


def test_esdk_is_pointed_at_moto_not_aws(esdk_kms: MotoKms, kms_key: KmsKey) -> None:
    """Guard for the fixture: the ESDK's client must really use moto's endpoint, or the
    interop tests above would be reaching for real AWS (and failing for that reason)."""
    provider = esdk_provider(kms_key)
    master_key = provider.master_key(kms_key.arn)
    assert master_key.config.client.meta.endpoint_url == esdk_kms.endpoint_url
