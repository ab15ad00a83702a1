"""Keyrings: where data keys come from and how they are wrapped."""

from .azure import AzureKeyVaultKeyring
from .base import DecryptionMaterials, EncryptionMaterials, Keyring
from .gcp import GcpKmsKeyring
from .hierarchy import BranchKeyStore, HierarchicalKeyring
from .kms import DiscoveryFilter, KmsDiscoveryKeyring, KmsKeyring
from .multi import MultiKeyring
from .raw_aes import RawAesKeyring
from .raw_rsa import RawRsaKeyring
from .vault import AppRoleAuth, VaultTransitKeyring

__all__ = [
    "AppRoleAuth",
    "AzureKeyVaultKeyring",
    "BranchKeyStore",
    "DecryptionMaterials",
    "DiscoveryFilter",
    "EncryptionMaterials",
    "GcpKmsKeyring",
    "HierarchicalKeyring",
    "Keyring",
    "KmsDiscoveryKeyring",
    "KmsKeyring",
    "MultiKeyring",
    "RawAesKeyring",
    "RawRsaKeyring",
    "VaultTransitKeyring",
]
