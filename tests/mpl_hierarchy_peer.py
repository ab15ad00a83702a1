"""The peer for hierarchical keyring interop: the AWS Encryption SDK (4.x) with the
Material Providers Library's ``AwsKmsHierarchicalKeyring`` and ``KeyStore``, on boto3
clients pointed at the session's moto server (DynamoDB and KMS), on the same table and
logical key store name as ``make_branch_key_store``'s stores.

Everything here is synchronous, as the MPL is: async tests call it through
``anyio.to_thread.run_sync``. Also: where a hierarchy EDK's fields lie, to tamper with
them in a serialized message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aws_encryption_sdk
import boto3
from aws_cryptographic_material_providers.keystore import KeyStore
from aws_cryptographic_material_providers.keystore.config import KeyStoreConfig
from aws_cryptographic_material_providers.keystore.models import (
    CreateKeyInput,
    KMSConfigurationKmsKeyArn,
    VersionKeyInput,
)
from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
from aws_cryptographic_material_providers.mpl.models import (
    CacheTypeDefault,
    CreateAwsKmsHierarchicalKeyringInput,
    DefaultCache,
)
from aws_cryptographic_material_providers.smithygenerated.aws_cryptography_materialproviders.errors import (
    KeyStore as MplKeyStoreError,
)
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from kms_server import MotoKms

from aioenvelope import AlgorithmSuite, inspect

__all__ = [
    "EDK_REGIONS",
    "FRAME_LENGTH",
    "LOGICAL_NAME",
    "EdkSpan",
    "MplKeyStoreError",
    "MplPeer",
    "edk_at",
    "edk_region",
]

LOGICAL_NAME = "aioenvelope-test-store"  # make_branch_key_store's default
FRAME_LENGTH = 128  # several frames per message (the ESDK wants a multiple of 128)

# The hierarchy EDK ciphertext: salt | IV | branch key version (raw UUID) | wrapped data
# key (AES-256 suites) | tag, as (start, end) per region.
EDK_REGIONS = {
    "salt": (0, 16),
    "iv": (16, 28),
    "version": (28, 44),
    "wrapped key": (44, 76),
    "tag": (76, 92),
}


@dataclass(frozen=True)
class EdkSpan:
    """Where one EDK lies in a serialized message: the whole serialized EDK and, inside
    it, its ciphertext."""

    start: int
    end: int
    ciphertext_start: int


def edk_at(message: bytes, index: int = 0) -> EdkSpan:
    """The span of the message's ``index``-th EDK, found by its serialization (header
    read with the public ``inspect``)."""
    edk = inspect(message).encrypted_data_keys[index]
    serialized = edk.serialize()
    start = message.index(serialized)
    end = start + len(serialized)
    return EdkSpan(start, end, end - len(edk.ciphertext))


def edk_region(message: bytes, region: str) -> tuple[int, int]:
    """The absolute byte range of ``region`` (a key of ``EDK_REGIONS``) of the first
    EDK's ciphertext in ``message``."""
    span = edk_at(message)
    start, end = EDK_REGIONS[region]
    return span.ciphertext_start + start, span.ciphertext_start + end


class MplPeer:
    """The ESDK + MPL on one moto server and key store table: a ``KeyStore`` to create
    and version branch keys, hierarchical keyrings per branch key (each a fresh cache,
    so a rotation made elsewhere is seen by the next keyring made), and the ESDK client
    requiring key commitment."""

    def __init__(self, moto_kms: MotoKms, kms_key_arn: str, table_name: str) -> None:
        def client(service: str) -> Any:
            return boto3.client(
                service, region_name=moto_kms.region, endpoint_url=moto_kms.endpoint_url
            )

        self.key_store = KeyStore(
            KeyStoreConfig(
                ddb_table_name=table_name,
                logical_key_store_name=LOGICAL_NAME,
                kms_configuration=KMSConfigurationKmsKeyArn(kms_key_arn),
                ddb_client=client("dynamodb"),
                kms_client=client("kms"),
            )
        )
        self._mpl = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())
        self._esdk = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        )

    def create_key(self, branch_key_id: str, context: Mapping[str, str] | None = None) -> str:
        """``KeyStore.create_key`` with this ID (and custom context); returns the ID."""
        out = self.key_store.create_key(
            CreateKeyInput(
                branch_key_identifier=branch_key_id, encryption_context=dict(context or {})
            )
        )
        return str(out.branch_key_identifier)

    def version_key(self, branch_key_id: str) -> None:
        """``KeyStore.version_key``: the MPL's rotation."""
        self.key_store.version_key(VersionKeyInput(branch_key_identifier=branch_key_id))

    def keyring(self, branch_key_id: str) -> Any:
        """A fresh ``AwsKmsHierarchicalKeyring`` (its own cache) on ``branch_key_id``."""
        return self._mpl.create_aws_kms_hierarchical_keyring(
            CreateAwsKmsHierarchicalKeyringInput(
                key_store=self.key_store,
                branch_key_id=branch_key_id,
                ttl_seconds=60,
                cache=CacheTypeDefault(DefaultCache(entry_capacity=10)),
            )
        )

    def encrypt(
        self,
        branch_key_id: str,
        plaintext: bytes,
        context: Mapping[str, str],
        suite: AlgorithmSuite,
        keyring: Any = None,
    ) -> bytes:
        """One message by the ESDK under ``keyring``, by default a fresh one on
        ``branch_key_id``."""
        ciphertext, _header = self._esdk.encrypt(
            source=plaintext,
            keyring=self.keyring(branch_key_id) if keyring is None else keyring,
            encryption_context=dict(context),
            algorithm=Algorithm.get_by_id(suite.suite_id),
            frame_length=FRAME_LENGTH,
        )
        return bytes(ciphertext)

    def decrypt(
        self,
        branch_key_id: str,
        message: bytes,
        context: Mapping[str, str] | None = None,
        keyring: Any = None,
    ) -> bytes:
        """The ESDK's decrypt under ``keyring``, by default a fresh one on
        ``branch_key_id``; ``context``, when given, is checked against the message's
        (the ESDK's reproduced context)."""
        kwargs: dict[str, Any] = {} if context is None else {"encryption_context": dict(context)}
        plaintext, _header = self._esdk.decrypt(
            source=message,
            keyring=self.keyring(branch_key_id) if keyring is None else keyring,
            **kwargs,
        )
        return bytes(plaintext)
