"""How the Vault transit keyring gets its token: a fixed one, or an AppRole login."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConfigurationError

__all__ = ["AppRoleAuth"]


@dataclass(frozen=True)
class AppRoleAuth:
    """Log in with Vault's AppRole auth method (``POST auth/<mount>/login``).

    The keyring logs in on its first call, renews the token (``renew-self``) once two
    thirds of its lease have passed, and logs in again when it cannot be renewed any
    further. Concurrent calls share one login and its outcome; a failed login is also
    the answer of the calls made within a second after it. After a 403 the token is
    asked about itself (``auth/token/lookup-self``, allowed by the default policy): only
    a dead one (expired or revoked) costs one login and one retry (never more, for one
    call); a live one's 403 is the policy's answer. Neither ``secret_id`` nor
    ``role_id`` shows in a repr, a log line or an error.
    """

    role_id: str = field(repr=False)
    secret_id: str = field(repr=False)
    mount: str = "approle"

    def __post_init__(self) -> None:
        for name in ("role_id", "secret_id", "mount"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip("/"):
                raise ConfigurationError(f"AppRoleAuth needs a non-empty {name}")
        object.__setattr__(self, "mount", self.mount.strip("/"))

    def __repr__(self) -> str:
        return f"AppRoleAuth(mount={self.mount!r})"

    @property
    def login_path(self) -> str:
        return f"auth/{self.mount}/login"

    def login_body(self) -> dict[str, str]:
        return {"role_id": self.role_id, "secret_id": self.secret_id}
