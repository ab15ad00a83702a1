"""Raw AES key files: what ``aioenvelope keygen`` writes and
:meth:`RawAesKeyring.from_key_file` reads.

The format is a small JSON object, so that the namespace and name that every message
records beside its wrapped data key travel with the key itself (any ESDK given the same
three values reads what was written)::

    {
      "type": "aioenvelope-raw-aes",
      "namespace": "aioenvelope",
      "name": "3f2a9c0d1e7b6a55",
      "key": "<the 16, 24 or 32 key bytes in standard base64>"
    }

``type`` must be exactly that string; ``namespace`` and ``name`` are the ESDK's key
namespace and key name (non-empty); other members are ignored. Files are written with
mode 0600, never replacing an existing key unless forced, and atomically.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigurationError
from .raw_aes import RawAesKeyring

__all__ = ["DEFAULT_NAMESPACE", "RAW_KEY_TYPE", "RawKey", "read_raw_key", "write_raw_key"]

RAW_KEY_TYPE = "aioenvelope-raw-aes"
DEFAULT_NAMESPACE = "aioenvelope"


@dataclass(frozen=True)
class RawKey:
    """A raw AES wrapping key and the names the ESDK format records for it."""

    namespace: str
    name: str
    key: bytes = field(repr=False)

    @classmethod
    def generate(cls, namespace: str = DEFAULT_NAMESPACE, name: str | None = None) -> RawKey:
        """A fresh 256-bit key; the default name is random so two keys never share one
        (a reader picks the key to try by name)."""
        return cls(namespace, name or secrets.token_hex(8), secrets.token_bytes(32))

    def keyring(self) -> RawAesKeyring:
        return RawAesKeyring(self.namespace, self.name, self.key)

    def to_json(self) -> str:
        return json.dumps(
            {
                "type": RAW_KEY_TYPE,
                "namespace": self.namespace,
                "name": self.name,
                "key": base64.b64encode(self.key).decode("ascii"),
            },
            indent=2,
        )


def write_raw_key(path: Path, key: RawKey, *, force: bool) -> None:
    """Write ``key`` readable by its owner only (0600).

    Without ``force`` the file is created with ``O_EXCL``, so an existing key (whose loss
    would make every message under it unreadable) is never replaced, not even in a race.
    With ``force`` it is written beside the target and renamed over it, so a crash never
    leaves half a key.
    """
    data = (key.to_json() + "\n").encode("utf-8")
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"{path} already exists; pass --force to replace it (messages wrapped under "
                "the old key can then no longer be decrypted)"
            ) from None
        _write_fd(fd, data, path)
        return
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        _write_fd(fd, data, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_fd(fd: int, data: bytes, path: Path) -> None:
    """Write, fsync and close ``fd``; on failure remove ``path`` (which we just created)."""
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def read_raw_key(path: str | os.PathLike[str]) -> RawKey:
    """Load a key file written by :func:`write_raw_key`; errors name the file, never the key."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigurationError(f"{path} is not a raw key file (not JSON)") from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read raw key file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    if not isinstance(document, dict) or document.get("type") != RAW_KEY_TYPE:
        raise ConfigurationError(
            f"{path} is not a raw key file (expected type {RAW_KEY_TYPE!r}; make one with "
            "`aioenvelope keygen`)"
        )
    namespace, name = _text(document, "namespace", path), _text(document, "name", path)
    try:
        key = base64.b64decode(_text(document, "key", path), validate=True)
    except binascii.Error:
        raise ConfigurationError(f"{path}: the key is not valid base64") from None
    if len(key) not in (16, 24, 32):
        raise ConfigurationError(f"{path}: the key must be 16, 24 or 32 bytes, not {len(key)}")
    return RawKey(namespace, name, key)


def _text(document: dict[str, object], name: str, path: Path) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{path}: {name!r} must be a non-empty string")
    return value
