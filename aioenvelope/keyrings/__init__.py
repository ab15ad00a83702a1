"""Keyrings: where data keys come from and how they are wrapped."""

from .base import DecryptionMaterials, EncryptionMaterials, Keyring
from .multi import MultiKeyring
from .raw_aes import RawAesKeyring
from .raw_rsa import RawRsaKeyring

__all__ = [
    "DecryptionMaterials",
    "EncryptionMaterials",
    "Keyring",
    "MultiKeyring",
    "RawAesKeyring",
    "RawRsaKeyring",
]
