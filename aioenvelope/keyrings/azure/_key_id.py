"""Key Vault key URLs: ``https://NAME.vault.azure.net/keys/KEY[/VERSION]``.

A key is named by its URL without a version (the vault and the key); a version is one
of its key pairs. The URL is parsed strictly, so that nothing from a message (an EDK's
provider info) can ever name a host, a path or a version of its own choosing.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from ...errors import ConfigurationError

__all__ = ["VERSION", "KeyUrl", "parse_key_url"]

# Key Vault's key names: 1-127 letters, digits and '-'. Versions are 32 hex digits in
# practice; any 1-64 letters and digits are accepted (never '/', '.', '%' or '?').
_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
VERSION = re.compile(r"[0-9A-Za-z]{1,64}")
_HOST = re.compile(r"[0-9A-Za-z.-]{1,253}")


@dataclass(frozen=True)
class KeyUrl:
    vault_url: str  # https://host[:port], lower-case host, no :443, no trailing slash
    name: str
    version: str | None  # a pinned version, or None for the key's current one

    @property
    def versionless(self) -> str:
        """The key's URL without a version: how it is named in errors and EDKs."""
        return f"{self.vault_url}/keys/{self.name}"

    def with_version(self, version: str) -> str:
        """The EDK provider info for ``version`` of this key (Key Vault's own ``kid``)."""
        return f"{self.versionless}/{version}"


def parse_key_url(key_id: object) -> KeyUrl:
    """A configured key URL, or :class:`ConfigurationError` saying what is wrong."""
    example = "'https://NAME.vault.azure.net/keys/KEY' (optionally '/VERSION')"
    if not isinstance(key_id, str):
        raise ConfigurationError(
            f"a Key Vault key ID must be a str URL like {example}, not {type(key_id).__name__}"
        )
    shown = key_id if len(key_id) <= 200 else key_id[:200] + "..."
    try:
        parts = urllib.parse.urlsplit(key_id)
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"{shown!r} is not a Key Vault key URL like {example}") from None
    host = (parts.hostname or "").lower()
    if (
        parts.scheme.lower() != "https"
        or not _HOST.fullmatch(host)
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
    ):
        raise ConfigurationError(
            f"{shown!r} is not a Key Vault key URL like {example} (https, a host, no "
            "user, query or fragment)"
        )
    segments = parts.path.rstrip("/").split("/")
    if (
        len(segments) not in (3, 4)
        or segments[0] != ""
        or segments[1] != "keys"
        or not _NAME.fullmatch(segments[2])
        or (len(segments) == 4 and not VERSION.fullmatch(segments[3]))
    ):
        raise ConfigurationError(
            f"{shown!r} is not a Key Vault key URL like {example}: the path must be "
            "/keys/NAME or /keys/NAME/VERSION (a key, not a secret or certificate)"
        )
    # https's own port is dropped, so that the key is named one way (Key Vault's kid has
    # no port): an EDK made with ':443' matches the same key configured without it.
    vault_url = f"https://{host}" + (f":{port}" if port not in (None, 443) else "")
    return KeyUrl(vault_url, segments[2], segments[3] if len(segments) == 4 else None)
