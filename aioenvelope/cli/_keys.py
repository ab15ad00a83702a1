"""The command line's keys: raw AES key files (``keygen``) and the keyring the key options
add up to.

A raw key file is a small JSON object, so that the namespace and name that every message
records beside its wrapped data key travel with the key itself: any ESDK given the same
three values reads what we wrote.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aioboto3

from ..errors import ConfigurationError
from ..keyrings import (
    BranchKeyStore,
    DiscoveryFilter,
    HierarchicalKeyring,
    Keyring,
    KmsDiscoveryKeyring,
    KmsKeyring,
    MultiKeyring,
    RawAesKeyring,
)
from ..keyrings.kms_arn import parse_arn

__all__ = [
    "RAW_KEY_TYPE",
    "HierarchyOptions",
    "KeyOptions",
    "KmsOptions",
    "RawKey",
    "branch_key_store",
    "build_keyring",
    "is_key_arn",
    "read_raw_key",
    "write_raw_key",
]

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


def read_raw_key(path: Path) -> RawKey:
    """Load a key file written by :func:`write_raw_key`; errors name the file, never the key."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigurationError(f"{path} is not a raw key file (not JSON)") from None
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


@dataclass(frozen=True)
class KmsOptions:
    """How to reach KMS: shared by every KMS keyring of one command. ``check_keys``
    False (``--no-check-keys``) skips the DescribeKey each KMS key gets on start, for a
    caller allowed to use a key but not to describe it."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    check_keys: bool = True

    def session(self) -> aioboto3.Session | None:
        """A session for ``--profile``; None lets each keyring use the default chain."""
        return aioboto3.Session(profile_name=self.profile) if self.profile else None


@dataclass(frozen=True)
class HierarchyOptions:
    """A hierarchical keyring's branch key and the key store that holds it."""

    branch_key_id: str
    table: str
    name: str
    kms_key: str


@dataclass(frozen=True)
class KeyOptions:
    """One side's keys: a branch key (hierarchical keyring), KMS keys, raw key files, and
    discovery (decrypt only). The first of them generates the data key."""

    kms_keys: Sequence[str] = ()
    raw_key_files: Sequence[Path] = ()
    discovery: bool = False
    discovery_accounts: Sequence[str] = ()
    discovery_partition: str = "aws"
    hierarchy: HierarchyOptions | None = None

    def __bool__(self) -> bool:
        return bool(
            self.kms_keys or self.raw_key_files or self.discovery or self.hierarchy is not None
        )


def is_key_arn(text: str) -> bool:
    """Whether ``text`` is a KMS key ARN, which a key store needs (it records the ARN in
    every item and compares it on every read; an alias could be repointed)."""
    arn = parse_arn(text)
    return arn is not None and arn.resource_type == "key"


def branch_key_store(
    table: str,
    name: str,
    kms_key: str,
    kms: KmsOptions,
    session: aioboto3.Session | None = None,
) -> BranchKeyStore:
    """The key store, reached as KMS is: ``--region`` is the table's region (default: the
    profile's or environment's, else the KMS key ARN's), ``--endpoint-url`` serves both."""
    return BranchKeyStore(
        table,
        logical_key_store_name=name,
        kms_key_id=kms_key,
        session=session,
        region_name=kms.region,
        endpoint_url=kms.endpoint_url,
    )


def build_keyring(
    keys: KeyOptions, kms: KmsOptions, session: aioboto3.Session | None = None
) -> Keyring:
    """One keyring for all of ``keys``: several combine into a :class:`MultiKeyring` whose
    generator is the first, so any one of them decrypts. The branch key comes first
    (the generator, and the first tried on decrypt: after one fetch it unwraps locally,
    where a KMS key costs a call per message), then KMS keys, raw keys, discovery."""
    keyrings: list[Keyring] = []
    if keys.hierarchy is not None:
        store = branch_key_store(
            keys.hierarchy.table, keys.hierarchy.name, keys.hierarchy.kms_key, kms, session
        )
        keyrings.append(HierarchicalKeyring(store, branch_key_id=keys.hierarchy.branch_key_id))
    if keys.kms_keys:
        generator, *additional = keys.kms_keys
        keyrings.append(
            KmsKeyring(
                generator,
                additional_key_ids=additional,
                session=session,
                region_name=kms.region,
                endpoint_url=kms.endpoint_url,
                check_keys=kms.check_keys,
            )
        )
    keyrings.extend(read_raw_key(path).keyring() for path in keys.raw_key_files)
    if keys.discovery:
        discovery_filter = (
            DiscoveryFilter(keys.discovery_accounts, keys.discovery_partition)
            if keys.discovery_accounts
            else None
        )
        keyrings.append(
            KmsDiscoveryKeyring(
                discovery_filter=discovery_filter,
                session=session,
                region_name=kms.region,
                endpoint_url=kms.endpoint_url,
            )
        )
    if not keyrings:
        raise ConfigurationError("no key given")
    return keyrings[0] if len(keyrings) == 1 else MultiKeyring(keyrings[0], keyrings[1:])
