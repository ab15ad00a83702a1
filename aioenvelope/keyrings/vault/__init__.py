"""The HashiCorp Vault / OpenBao transit keyring (on aiohttp: ``aioenvelope[vault]``)."""

from ._auth import AppRoleAuth
from .keyring import VaultTransitKeyring

__all__ = ["AppRoleAuth", "VaultTransitKeyring"]
