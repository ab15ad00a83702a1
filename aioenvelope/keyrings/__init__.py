"""Keyrings: where data keys come from and how they are wrapped."""

from .base import DecryptionMaterials, EncryptionMaterials, Keyring
from .kms import DiscoveryFilter, KmsDiscoveryKeyring, KmsKeyring
from .multi import MultiKeyring
from .raw_aes import RawAesKeyring
from .raw_rsa import RawRsaKeyring

__all__ = [
    "DecryptionMaterials",
    "DiscoveryFilter",
    "EncryptionMaterials",
    "Keyring",
    "KmsDiscoveryKeyring",
    "KmsKeyring",
    "MultiKeyring",
    "RawAesKeyring",
    "RawRsaKeyring",
]
