"""The HashiCorp Vault / OpenBao transit keyring, over aiohttp (a core dependency)."""

from ._auth import AppRoleAuth
from .keyring import VaultTransitKeyring

__all__ = ["AppRoleAuth", "VaultTransitKeyring"]
