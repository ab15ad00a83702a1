"""The Google Cloud KMS keyring, on google-cloud-kms's async client (the ``[gcp]`` extra,
imported when the keyring opens)."""

from .keyring import GcpKmsKeyring

__all__ = ["GcpKmsKeyring"]
