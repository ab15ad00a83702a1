"""Azure Key Vault (and Managed HSM) keys: wrap and unwrap data keys remotely."""

from .keyring import AzureKeyVaultKeyring

__all__ = ["AzureKeyVaultKeyring"]
