"""Data keys wrapped under branch keys, byte for byte as the MPL's hierarchical keyring.

Pure functions: no await, no I/O, no clock. The keyring fetches branch keys; this
module only turns (branch key, data key, context) into an EDK ciphertext and back.

EDK (provider ID :data:`PROVIDER_ID`, provider info = UTF-8 of the branch key ID)::

    salt (16) | iv (12) | branch key version, UUID bytes (16) | AES-GCM(data key) | tag (16)

- wrapping key = one 32-byte block of NIST SP 800-108 counter-mode KDF with
  HMAC-SHA256 (``cryptography``'s ``KBKDFHMAC``): key = branch key, label =
  ``aws-kms-hierarchy``, context = the salt;
- AAD = ``aws-kms-hierarchy`` | UTF-8(branch key ID) | version UUID bytes |
  the canonical encryption context (the message format's own serialization: u16 count,
  pairs sorted by UTF-8 key bytes; an empty context is empty bytes). The context is the
  materials' full one: for signing suites it holds ``aws-crypto-public-key``.

Every EDK-level failure (wrong length for the suite, another version than the key
given, a failed tag) is a :class:`~aioenvelope.errors.NoUsableKeyError`: a
``KeyringError``, so a ``MultiKeyring`` goes on to its next child, as it does when the
raw AES keyring cannot use an EDK. Misuse by the caller (a branch key that is not 32
bytes, a version that is not a UUID string) is a ``ConfigurationError``. No message
carries key bytes.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from ...errors import ConfigurationError, NoUsableKeyError
from ...format import nonce_log
from ...format.encryption_context import serialize_encryption_context

__all__ = [
    "BRANCH_KEY_LENGTH",
    "EDK_OVERHEAD",
    "PROVIDER_ID",
    "branch_key_version_of",
    "edk_length",
    "unwrap_data_key",
    "wrap_data_key",
]

PROVIDER_ID = "aws-kms-hierarchy"
BRANCH_KEY_LENGTH = 32
SALT_LENGTH = 16
IV_LENGTH = 12
VERSION_LENGTH = 16
TAG_LENGTH = 16
_IV_START = SALT_LENGTH
_VERSION_START = SALT_LENGTH + IV_LENGTH  # 28
_CIPHERTEXT_START = _VERSION_START + VERSION_LENGTH  # 44
EDK_OVERHEAD = _CIPHERTEXT_START + TAG_LENGTH
"""Bytes of an EDK ciphertext besides the wrapped data key: 60."""

_DATA_KEY_LENGTHS = (16, 24, 32)  # the ESDK suites' data keys
_LABEL = PROVIDER_ID.encode("ascii")
_WRAPPING_KEY_LENGTH = 32
_VERSIONS_CACHED = 256  # version strings <-> UUID bytes memoized, 16-36 bytes each
_IDS_CACHED = 256  # branch key IDs -> UTF-8 memoized (a keyring uses one, or one a tenant)
# The KDF's constant arguments, built once: per call they cost ~0.6 us of ~3.6 us.
_SHA256 = hashes.SHA256()
_COUNTER_MODE = Mode.CounterMode
_BEFORE_FIXED = CounterLocation.BeforeFixed


def edk_length(key_length: int) -> int:
    """The EDK ciphertext length for a suite whose data key is ``key_length`` bytes
    (92 for the AES-256 suites)."""
    return EDK_OVERHEAD + key_length


def _wrapping_key(branch_key: bytes | bytearray, salt: bytes) -> bytes:
    """``KBKDFHMAC`` computes HMAC-SHA256(branch key, 00000001 | label | 00 | salt |
    00000100): one block, counter before the fixed input, 32-bit counter and length.

    Arguments by position (keywords cost ~0.3 us a call on this per-message path), in
    the signature's order: algorithm, mode, length, rlen, llen, location, label,
    context, fixed."""
    kdf = KBKDFHMAC(
        _SHA256, _COUNTER_MODE, _WRAPPING_KEY_LENGTH, 4, 4, _BEFORE_FIXED, _LABEL, salt, None
    )
    return kdf.derive(branch_key)  # a bytearray as is: no immutable copy of the key


def _serialized(encryption_context: Mapping[str, str] | bytes) -> bytes:
    """The context as the AAD holds it: given serialized, or serialized now."""
    if isinstance(encryption_context, bytes):
        return encryption_context
    return serialize_encryption_context(encryption_context)


def _aad(id_bytes: bytes, version_bytes: bytes, serialized_context: bytes) -> bytes:
    return b"".join((_LABEL, id_bytes, version_bytes, serialized_context))


def _check_branch_key(branch_key: bytes | bytearray, branch_key_id: str) -> None:
    if not isinstance(branch_key, (bytes, bytearray)) or len(branch_key) != BRANCH_KEY_LENGTH:
        raise ConfigurationError(
            f"a branch key is {BRANCH_KEY_LENGTH} bytes (bytes or bytearray); the one given "
            f"for branch key {branch_key_id!r} is not"
        )


def _branch_key_id_bytes(branch_key_id: str) -> bytes:
    """The UTF-8 of a branch key ID, checked (the AAD holds it)."""
    if not isinstance(branch_key_id, str) or not branch_key_id:
        raise ConfigurationError("a branch key ID is a non-empty str")
    return _encoded_id(branch_key_id)


@functools.lru_cache(maxsize=_IDS_CACHED)
def _encoded_id(branch_key_id: str) -> bytes:
    """Cached: a keyring passes the same ID (or one per tenant) on every message. IDs
    come from the keyring's configuration, not from messages."""
    try:
        return branch_key_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError("a branch key ID must be encodable as UTF-8") from None


def _version_bytes(branch_key_version: str) -> bytes:
    """The 16 bytes of a version given as the key store names it (lower-case UUID)."""
    if not isinstance(branch_key_version, str):
        raise ConfigurationError(
            f"a branch key version is a lower-case UUID string, not a "
            f"{type(branch_key_version).__name__}"
        )
    return _parsed_version(branch_key_version)


@functools.lru_cache(maxsize=_VERSIONS_CACHED)
def _parsed_version(branch_key_version: str) -> bytes:
    """Cached: a keyring passes the same few versions on every message, and parsing
    one costs ~2.5 us."""
    try:
        parsed = uuid.UUID(branch_key_version)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != branch_key_version:
        raise ConfigurationError(
            "a branch key version is a lower-case UUID string such as "
            f"'8090d5cd-ee0c-4973-ad79-dfd08644a128', not {branch_key_version[:64]!r}"
        )
    return parsed.bytes


@functools.lru_cache(maxsize=_VERSIONS_CACHED)
def _version_string(version_bytes: bytes) -> str:
    """Cached as :func:`_parsed_version` (~5 us uncached); hostile EDKs can only churn
    this bounded cache."""
    return str(uuid.UUID(bytes=version_bytes))


def wrap_data_key(
    branch_key: bytes | bytearray,
    branch_key_id: str,
    branch_key_version: str,
    data_key: bytes | bytearray,
    encryption_context: Mapping[str, str] | bytes,
) -> bytes:
    """The EDK ciphertext of ``data_key`` under that version of the branch key.

    A fresh 16-byte salt and 12-byte IV come from ``os.urandom`` on every call, and the
    wrapping key is derived from the branch key and that salt. So each EDK is sealed
    under its own wrapping key: a (key, IV) pair repeats only if a 128-bit salt and a
    96-bit IV both repeat, whatever number of data keys a branch key wraps. The seal is
    still reported through :mod:`aioenvelope.format.nonce_log`, as every AES-GCM seal is.

    ``encryption_context`` is the materials' full context, or its canonical
    serialization as bytes (``materials.serialized_encryption_context``, which the
    header reuses: serializing it again here costs ~1.5 us a message).
    """
    id_bytes = _branch_key_id_bytes(branch_key_id)
    _check_branch_key(branch_key, branch_key_id)
    version_bytes = _version_bytes(branch_key_version)
    if not isinstance(data_key, (bytes, bytearray)) or len(data_key) not in _DATA_KEY_LENGTHS:
        raise ConfigurationError("a data key is 16, 24 or 32 bytes (bytes or bytearray)")
    serialized = _serialized(encryption_context)
    return _seal(branch_key, id_bytes, version_bytes, data_key, serialized)


def _seal(
    branch_key: bytes | bytearray,
    id_bytes: bytes,
    version_bytes: bytes,
    data_key: bytes | bytearray,
    serialized_context: bytes,
) -> bytes:
    """:func:`wrap_data_key` once its arguments are known to be right: the keyring's
    per-message path, whose branch key was checked when it was fetched, whose ID and
    version bytes come from the memos here, and whose data key it drew itself."""
    salt_iv = os.urandom(SALT_LENGTH + IV_LENGTH)  # one draw: two random fields
    iv = salt_iv[_IV_START:]
    wrapping_key = _wrapping_key(branch_key, salt_iv[:_IV_START])
    nonce_log.sealing(wrapping_key, iv)
    sealed = AESGCM(wrapping_key).encrypt(
        iv, data_key, _aad(id_bytes, version_bytes, serialized_context)
    )
    return b"".join((salt_iv, version_bytes, sealed))


def branch_key_version_of(edk_ciphertext: bytes) -> str:
    """The branch key version an EDK ciphertext names (bytes 28-44), as a lower-case
    UUID string: the version the keyring must fetch to unwrap it.

    Any 16 bytes are a UUID, and the MPL reads them as one (``uuid.UUID(bytes=...)``),
    so the only malformation refused here is a ciphertext too short to hold them; the
    full length is checked against the suite by :func:`unwrap_data_key`.
    """
    if not isinstance(edk_ciphertext, (bytes, bytearray, memoryview)):
        raise NoUsableKeyError(
            f"a {PROVIDER_ID} EDK ciphertext is bytes, not {type(edk_ciphertext).__name__}"
        )
    if len(edk_ciphertext) < _CIPHERTEXT_START:
        raise NoUsableKeyError(
            f"a {PROVIDER_ID} EDK ciphertext of {len(edk_ciphertext)} bytes is too short to "
            f"name a branch key version (salt, IV and version take {_CIPHERTEXT_START} bytes): "
            "the EDK is malformed"
        )
    return _version_string(bytes(edk_ciphertext[_VERSION_START:_CIPHERTEXT_START]))


def unwrap_data_key(
    branch_key: bytes | bytearray,
    branch_key_id: str,
    branch_key_version: str,
    edk_ciphertext: bytes,
    encryption_context: Mapping[str, str] | bytes,
    *,
    key_length: int,
) -> bytes:
    """The data key in ``edk_ciphertext``, for a suite whose data key is ``key_length``
    bytes (``AlgorithmSuite.key_length``).

    ``branch_key`` must be the version the EDK names (see :func:`branch_key_version_of`);
    ``branch_key_id`` is the one the EDK's provider info names. A malformed EDK, another
    version, or a failed tag (another branch key or ID, another context, a changed byte)
    raises :class:`~aioenvelope.errors.NoUsableKeyError`. ``encryption_context`` as for
    :func:`wrap_data_key`: the mapping or its canonical serialization.
    """
    id_bytes = _branch_key_id_bytes(branch_key_id)
    _check_branch_key(branch_key, branch_key_id)
    version_bytes = _version_bytes(branch_key_version)
    if type(key_length) is not int or key_length not in _DATA_KEY_LENGTHS:
        raise ConfigurationError("key_length is a suite's data key length: 16, 24 or 32")
    if not isinstance(edk_ciphertext, (bytes, bytearray, memoryview)):
        raise NoUsableKeyError(
            f"a {PROVIDER_ID} EDK ciphertext is bytes, not {type(edk_ciphertext).__name__}"
        )
    expected = edk_length(key_length)
    if len(edk_ciphertext) != expected:
        raise NoUsableKeyError(
            f"the {PROVIDER_ID} EDK for branch key {branch_key_id!r} version "
            f"{branch_key_version} is {len(edk_ciphertext)} bytes; a "
            f"{key_length}-byte data key's is {expected}: the EDK is malformed or belongs "
            "to another suite"
        )
    edk = bytes(edk_ciphertext)
    if edk[_VERSION_START:_CIPHERTEXT_START] != version_bytes:
        raise NoUsableKeyError(
            f"the {PROVIDER_ID} EDK names version {branch_key_version_of(edk)} of branch key "
            f"{branch_key_id!r}, not version {branch_key_version}: fetch the version the "
            "EDK names"
        )
    data_key = _open(branch_key, id_bytes, version_bytes, edk, _serialized(encryption_context))
    if data_key is None:
        raise NoUsableKeyError(
            f"the {PROVIDER_ID} EDK does not authenticate under branch key "
            f"{branch_key_id!r} version {branch_key_version}: the encryption "
            "context differs from the one it was wrapped with, the EDK was changed, or it "
            "was wrapped under another branch key"
        )
    return data_key


def _open(
    branch_key: bytes | bytearray,
    id_bytes: bytes,
    version_bytes: bytes,
    edk: bytes,
    serialized_context: bytes,
) -> bytes | None:
    """:func:`unwrap_data_key` once its arguments are known to be right (the EDK of the
    suite's length, naming the version of ``branch_key``); None if the tag fails."""
    wrapping_key = _wrapping_key(branch_key, edk[:_IV_START])
    aad = _aad(id_bytes, version_bytes, serialized_context)
    try:
        return AESGCM(wrapping_key).decrypt(
            edk[_IV_START:_VERSION_START], edk[_CIPHERTEXT_START:], aad
        )
    except InvalidTag:
        return None
