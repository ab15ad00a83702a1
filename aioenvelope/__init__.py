"""aioenvelope: async envelope encryption, byte-compatible with the AWS Encryption SDK.

The public surface is what ``__all__`` lists (plus :mod:`aioenvelope.errors`);
every other module is private and may change.
"""

from . import errors
from .client import DecryptResult, EnvelopeClient
from .config import CacheConfig, CircuitBreakerConfig, RateLimit
from .format.header import EncryptedDataKey, MessageHeader
from .format.suites import AlgorithmSuite, CommitmentPolicy
from .keyrings import (
    DecryptionMaterials,
    DiscoveryFilter,
    EncryptionMaterials,
    Keyring,
    KmsDiscoveryKeyring,
    KmsKeyring,
    MultiKeyring,
    RawAesKeyring,
    RawRsaKeyring,
)
from .stats import ClientStats
from .streams import DecryptingStream, EncryptingStream, StreamSource

__all__ = [
    "AlgorithmSuite",
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
    "Keyring",
    "KmsDiscoveryKeyring",
    "KmsKeyring",
    "MessageHeader",
    "MultiKeyring",
    "RateLimit",
    "RawAesKeyring",
    "RawRsaKeyring",
    "StreamSource",
    "errors",
]
__version__ = "0.1.0"
