"""aioenvelope: async envelope encryption, byte-compatible with the AWS Encryption SDK.

The public surface is what ``__all__`` lists (plus :mod:`aioenvelope.errors`);
every other module is private and may change.
"""

from . import errors
from .batch import BatchFailure, BatchProgress, BatchResult, BatchSuccess, run_batch
from .client import DecryptResult, EnvelopeClient
from .config import CacheConfig, CircuitBreakerConfig, RateLimit
from .format.header import EncryptedDataKey, MessageHeader
from .format.suites import AlgorithmSuite, CommitmentPolicy
from .inspection import inspect
from .keyrings import (
    AppRoleAuth,
    AzureKeyVaultKeyring,
    BranchKeyStore,
    DecryptionMaterials,
    DiscoveryFilter,
    EncryptionMaterials,
    GcpKmsKeyring,
    HierarchicalKeyring,
    Keyring,
    KmsDiscoveryKeyring,
    KmsKeyring,
    MultiKeyring,
    RawAesKeyring,
    RawRsaKeyring,
    VaultTransitKeyring,
)
from .reencrypt import ReencryptingStream
from .stats import ClientStats
from .streams import DecryptingStream, EncryptingStream, StreamSource
from .telemetry import Telemetry

__all__ = [
    "AlgorithmSuite",
    "AppRoleAuth",
    "AzureKeyVaultKeyring",
    "BatchFailure",
    "BatchProgress",
    "BatchResult",
    "BatchSuccess",
    "BranchKeyStore",
    "CacheConfig",
    "CircuitBreakerConfig",
    "ClientStats",
    "CommitmentPolicy",
    "DecryptResult",
    "DecryptingStream",
    "DecryptionMaterials",
    "DiscoveryFilter",
    "EncryptedDataKey",
    "EncryptingStream",
    "EncryptionMaterials",
    "EnvelopeClient",
    "GcpKmsKeyring",
    "HierarchicalKeyring",
    "Keyring",
    "KmsDiscoveryKeyring",
    "KmsKeyring",
    "MessageHeader",
    "MultiKeyring",
    "RateLimit",
    "RawAesKeyring",
    "RawRsaKeyring",
    "ReencryptingStream",
    "StreamSource",
    "Telemetry",
    "VaultTransitKeyring",
    "errors",
    "inspect",
    "run_batch",
]
__version__ = "0.1.0"
