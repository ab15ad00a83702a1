"""The keyring interface: small enough that a user can write their own.

A keyring gets materials and returns new materials: on encrypt it generates a data key
(if none yet) and/or adds an encrypted data key; on decrypt it tries to recover the data
key from the message's EDKs. Materials are immutable; a keyring returns a copy.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from ..format.encryption_context import serialize_encryption_context
from ..format.header import EncryptedDataKey
from ..format.suites import AlgorithmSuite

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["DecryptionMaterials", "EncryptionMaterials", "Keyring", "describe_encrypted_data_keys"]


_M = TypeVar("_M", bound="_Materials")


def _frozen(context: Mapping[str, str]) -> Mapping[str, str]:
    # A read-only view over a private copy; an existing view is already that.
    return context if isinstance(context, MappingProxyType) else MappingProxyType(dict(context))


def _evolve(materials: _M, **changes: Any) -> _M:
    """A copy with some fields changed. ``dataclasses.replace`` re-runs ``__init__`` and
    costs microseconds per call on the per-message path; the fields here are already
    validated, so a shallow copy is enough (and keeps the cached serialized context)."""
    new = object.__new__(type(materials))
    new.__dict__.update(materials.__dict__)
    new.__dict__.update(changes)
    return new


class _SerializedContext:
    """``functools.cached_property`` for :attr:`_Materials.serialized_encryption_context`
    without its lock (Python 3.11 takes an ``RLock`` on every first read: a third of a
    microsecond on each message's path). The value is a pure function of the frozen
    context, so two threads racing to fill it store equal bytes."""

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        value = serialize_encryption_context(obj.encryption_context)
        obj.__dict__["serialized_encryption_context"] = value
        return value


class _Materials:
    """What both kinds of materials share: a frozen context, its serialization, and
    the data key slot that a keyring fills exactly once."""

    algorithm_suite: AlgorithmSuite
    encryption_context: Mapping[str, str]
    plaintext_data_key: bytes | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "encryption_context", _frozen(self.encryption_context))

    if TYPE_CHECKING:

        @property
        def serialized_encryption_context(self) -> bytes:
            """The context as the message format serializes it (the raw AES keyring's
            AAD), made on first use and kept."""
            ...

    else:
        serialized_encryption_context = _SerializedContext()

    def _known_serialization(self, serialized: bytes) -> None:
        """Fill :attr:`serialized_encryption_context` with ``serialized``, which the
        caller knows to be it (say, the very bytes of a message's header): spares the
        per-message serialization. Only before the materials are handed to anyone."""
        self.__dict__["serialized_encryption_context"] = serialized

    def with_data_key(self: _M, data_key: bytes) -> _M:
        if self.plaintext_data_key is not None:
            raise ValueError("these materials already have a data key")
        if len(data_key) != self.algorithm_suite.key_length:
            raise ValueError("data key length does not match the algorithm suite")
        return _evolve(self, plaintext_data_key=bytes(data_key))


@dataclass(frozen=True)
class EncryptionMaterials(_Materials):
    """What a message is encrypted with. ``plaintext_data_key`` never shows in a repr."""

    algorithm_suite: AlgorithmSuite
    encryption_context: Mapping[str, str]
    encrypted_data_keys: tuple[EncryptedDataKey, ...] = ()
    plaintext_data_key: bytes | None = field(default=None, repr=False)
    required_encryption_context_keys: frozenset[str] = frozenset()

    @classmethod
    def _of_own_copy(
        cls, suite: AlgorithmSuite, context: dict[str, str], required: frozenset[str]
    ) -> EncryptionMaterials:
        """Fresh materials over ``context``, a dict no one else holds (so no second
        copy), without the dataclass ``__init__``: ~1 us less per message."""
        new = object.__new__(cls)
        new.__dict__.update(
            algorithm_suite=suite,
            encryption_context=MappingProxyType(context),
            encrypted_data_keys=(),
            plaintext_data_key=None,
            required_encryption_context_keys=required,
        )
        return new

    def with_encrypted_data_key(self, edk: EncryptedDataKey) -> EncryptionMaterials:
        if not isinstance(edk, EncryptedDataKey):
            raise TypeError("edk must be an EncryptedDataKey")
        return _evolve(self, encrypted_data_keys=(*self.encrypted_data_keys, edk))

    def _with_key_and_edk(self, data_key: bytes, edk: EncryptedDataKey) -> EncryptionMaterials:
        """:meth:`with_data_key` then :meth:`with_encrypted_data_key` in one copy, for a
        keyring that generated ``data_key`` (of the suite's length) and wrapped it."""
        if self.plaintext_data_key is not None:
            raise ValueError("these materials already have a data key")
        return _evolve(
            self,
            plaintext_data_key=data_key,
            encrypted_data_keys=(*self.encrypted_data_keys, edk),
        )

    def generate_data_key(self) -> EncryptionMaterials:
        """Materials with a fresh random data key of the suite's length."""
        return self.with_data_key(os.urandom(self.algorithm_suite.key_length))


@dataclass(frozen=True)
class DecryptionMaterials(_Materials):
    """What a keyring needs to decrypt, and the data key once a keyring found it."""

    algorithm_suite: AlgorithmSuite
    encryption_context: Mapping[str, str]
    plaintext_data_key: bytes | None = field(default=None, repr=False)
    required_encryption_context_keys: frozenset[str] = frozenset()


# EDKs described in an error message, at most: a message may carry 65535.
EDKS_SHOWN = 10
_NAME_LIMIT = 128  # characters of a name, ARN or provider info, each
# The raw AES keyring's provider info: key name | tag bits (u32) | IV length (u32) | IV.
_AES_INFO_TAIL = (128).to_bytes(4, "big") + (12).to_bytes(4, "big")
# The hierarchical keyring's EDK ciphertext: salt (16) | IV (12) | version UUID (16) | ...
_HIERARCHY_VERSION = slice(28, 44)


def shown_name(text: str, limit: int = _NAME_LIMIT) -> str:
    """A name for an error message; it may come from a message's header, i.e. from
    whoever wrote it: cut to ``limit`` characters, and quoted (control characters and
    all escaped) unless it is plainly printable without spaces."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    if cut and cut.isprintable() and " " not in cut and "'" not in cut:
        return cut
    return repr(cut)


def _shown_info(info: bytes) -> str:
    try:
        return shown_name(info.decode("utf-8"))
    except UnicodeDecodeError:
        cut = info[: _NAME_LIMIT // 2]
        return "0x" + cut.hex() + ("..." if len(info) > len(cut) else "")


def _shown_arn(info: bytes) -> str:
    """An ``aws-kms`` EDK's key ARN: whole when it looks like one, but each of its
    ``:`` fields cut to 64 characters (a region or account of a forged message)."""
    try:
        text = info.decode("utf-8")
    except UnicodeDecodeError:
        return _shown_info(info)
    fields = text.split(":", 5)
    cut = ":".join(f[:64] + ("..." if len(f) > 64 else "") for f in fields)
    return shown_name(cut, limit=2 * _NAME_LIMIT)


def _describe_edk(edk: EncryptedDataKey) -> str:
    """Who wrapped ``edk``, under which key: never its ciphertext (beyond the
    hierarchical keyring's branch key version, which is not secret)."""
    provider, info = edk.provider_id, edk.provider_info
    if provider == "aws-kms":
        return f"AWS KMS key {_shown_arn(info)}"
    if provider == "aws-kms-hierarchy":
        raw_version = edk.ciphertext[_HIERARCHY_VERSION]
        version = str(uuid.UUID(bytes=raw_version)) if len(raw_version) == 16 else "(unreadable)"
        return f"branch key {_shown_info(info)} version {version} (hierarchical keyring)"
    shown_provider = shown_name(provider)
    if len(info) >= len(_AES_INFO_TAIL) + 12 and info[-20:-12] == _AES_INFO_TAIL:
        return f"raw AES key {shown_provider}/{_shown_info(info[:-20])}"
    if not provider.startswith("aws-"):
        # A raw RSA keyring's info is its key name; another provider's may be anything.
        return f"key {shown_provider}/{_shown_info(info)}"
    return f"provider {shown_provider} key {_shown_info(info)}"


def describe_encrypted_data_keys(
    encrypted_data_keys: Sequence[EncryptedDataKey], limit: int = EDKS_SHOWN
) -> str:
    """The keys a message's EDKs name, for an error message: for each, its provider and
    key (raw: namespace/name; AWS KMS: the key ARN; hierarchical: the branch key ID and
    version; another provider: its ID and info, printable and cut short), the first
    ``limit`` of them. No key material and no ciphertext."""
    if not encrypted_data_keys:
        return "none"
    shown = [_describe_edk(edk) for edk in encrypted_data_keys[:limit]]
    more = len(encrypted_data_keys) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


class Keyring:
    """Base class for keyrings. Override :meth:`on_encrypt` and :meth:`on_decrypt`.

    ``open``/``close`` bracket the keyring's life inside an ``EnvelopeClient``; keyrings
    that hold resources (KMS clients) use them, local ones need not.
    """

    #: Whether the client's key manager may reuse this keyring's data keys across
    #: messages (``CacheConfig``) and cache the data keys it recovers. Keyrings whose
    #: every wrap and unwrap is local and cheap (the hierarchical keyring) say False:
    #: then every message gets its own data key and none is held after its message.
    caches_data_keys: bool = True

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        raise NotImplementedError

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        """Return materials with the data key, or raise a ``KeyringError`` explaining why not."""
        raise NotImplementedError

    def attach(self, runtime: Runtime) -> None:
        """Receive the owning client's clock, counters and circuit breakers (before
        :meth:`open`). Keyrings that call remote services use them; others need not."""

    async def open(self) -> None:
        """Acquire resources; called when the owning client is entered."""

    async def close(self) -> None:
        """Release resources; called when the owning client exits."""
