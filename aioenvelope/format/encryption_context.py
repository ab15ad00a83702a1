"""Encryption context: validation and the ESDK's byte-exact serialization.

Entries are sorted by the UTF-8 bytes of their keys; lengths count UTF-8 bytes.
An empty context serializes to zero bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ..errors import EncryptionContextError, MalformedMessageError
from ._cursor import Cursor, NeedMoreData

__all__ = [
    "PUBLIC_KEY_FIELD",
    "RESERVED_PREFIX",
    "deserialize_encryption_context",
    "read_context_in_order",
    "serialize_encryption_context",
    "validate_user_context",
]

RESERVED_PREFIX = "aws-crypto-"
PUBLIC_KEY_FIELD = "aws-crypto-public-key"
MAX_SERIALIZED_SIZE = 0xFFFF
_U16 = struct.Struct(">H")


# Serializations made lately, by the context's pairs in its own order: a service encrypts
# under the same few contexts again and again, and a lookup costs a fifth of serializing
# (sorting, encoding, joining). Bounded in count and in the size of each serialization,
# and emptied when full; a context seen once costs one insertion.
_SERIALIZED: dict[tuple[tuple[str, str], ...], bytes] = {}
_SERIALIZED_MAX = 256
_SERIALIZED_MAX_BYTES = 1024


def serialize_encryption_context(context: Mapping[str, str]) -> bytes:
    """Serialize as the ESDK does; raise EncryptionContextError when it cannot fit.

    On the hot path of every message, hence the memo, the single pass and one join.
    """
    if not context:
        return b""
    try:
        pairs_key = tuple(context.items())
        known = _SERIALIZED.get(pairs_key)
    except Exception:  # a key or value that does not hash: serializing says what is wrong
        return _serialize(context)
    if known is not None:
        return known
    out = _serialize(context)
    if len(out) <= _SERIALIZED_MAX_BYTES and all(
        type(key) is str and type(value) is str for key, value in pairs_key
    ):
        # Plain str only: a subclass hashes and compares as str but may encode as it
        # likes, and its bytes must not answer for a plain str's.
        if len(_SERIALIZED) >= _SERIALIZED_MAX:
            _SERIALIZED.clear()
        _SERIALIZED[pairs_key] = out
    return out


def _serialize(context: Mapping[str, str]) -> bytes:
    try:
        pairs = sorted(
            (key.encode("utf-8"), value.encode("utf-8")) for key, value in context.items()
        )
    except AttributeError:
        raise EncryptionContextError("encryption context keys and values must be str") from None
    except UnicodeEncodeError:
        raise EncryptionContextError("encryption context is not encodable as UTF-8") from None
    if len(pairs) > 0xFFFF:
        raise EncryptionContextError("encryption context has more than 65535 entries")
    parts = [len(pairs).to_bytes(2, "big")]
    for key, value in pairs:
        if len(key) > 0xFFFF or len(value) > 0xFFFF:
            raise EncryptionContextError(
                f"encryption context entry {key[:40]!r}... is longer than 65535 bytes"
            )
        parts += (_U16.pack(len(key)), key, _U16.pack(len(value)), value)
    out = b"".join(parts)
    if len(out) > MAX_SERIALIZED_SIZE:
        raise EncryptionContextError(
            f"encryption context serializes to {len(out)} bytes; the message format "
            f"allows at most {MAX_SERIALIZED_SIZE}. Store large values elsewhere."
        )
    return out


def deserialize_encryption_context(data: bytes) -> dict[str, str]:
    """Parse a serialized context, refusing duplicate keys.

    Order is not enforced on read: the header tag authenticates the bytes as written,
    and some implementations sorted by UTF-16 code units rather than UTF-8 bytes.
    """
    if not data:
        return {}
    cursor = Cursor(data)
    try:
        count = cursor.u16()
        if count == 0:
            raise MalformedMessageError("encryption context has a count of 0 but is not empty")
        context: dict[str, str] = {}
        for _ in range(count):
            key = cursor.utf8(cursor.u16(), "an encryption context key")
            value = cursor.utf8(cursor.u16(), "an encryption context value")
            if key in context:
                raise MalformedMessageError("encryption context has a duplicated key")
            context[key] = value
    except NeedMoreData as exc:
        raise MalformedMessageError("encryption context is shorter than its fields say") from exc
    if cursor.pos != len(data):
        raise MalformedMessageError("encryption context has bytes after its last entry")
    return context


def read_context_in_order(data: bytes) -> tuple[dict[str, str], bytes | None] | None:
    """The context a header's bytes hold, and those bytes again when they are what
    :func:`serialize_encryption_context` makes of it (keys in strictly rising byte
    order), else None in their place; None for bytes
    :func:`deserialize_encryption_context` refuses, which then says why.

    The header parser's one-pass path: on the small-message path the bytes it returns
    spare a reader re-serializing the context (the raw AES keyring's AAD, the decrypt
    cache key) for every message.
    """
    if not data:
        return {}, data
    size = len(data)
    if size < 2:
        return None
    count = data[0] << 8 | data[1]
    if count == 0:
        return None
    context: dict[str, str] = {}
    pos = 2
    previous = b""
    in_order = True
    for _ in range(count):
        if pos + 2 > size:
            return None
        key_end = pos + 2 + (data[pos] << 8 | data[pos + 1])
        if key_end + 2 > size:
            return None
        value_end = key_end + 2 + (data[key_end] << 8 | data[key_end + 1])
        if value_end > size:
            return None
        key_bytes = data[pos + 2 : key_end]
        try:
            key = key_bytes.decode("utf-8")
            value = data[key_end + 2 : value_end].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if key in context:
            return None
        if key_bytes <= previous:
            in_order = False  # (an empty first key too: rare, and only slower)
        previous = key_bytes
        context[key] = value
        pos = value_end
    if pos != size:
        return None
    return context, (data if in_order else None)


def validate_user_context(context: Mapping[str, str]) -> None:
    """Refuse a caller's context (encrypt side) with reserved keys, or keys or values
    that are not str: before any keyring sends it to a key service (whose client would
    fail on it in its own way) and before a cache key hashes it."""
    for key, value in context.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise EncryptionContextError(
                f"encryption context keys and values must be str; the entry for {key!r} "
                f"is a {type(key).__name__} key with a {type(value).__name__} value"
            )
        if key.startswith(RESERVED_PREFIX):
            raise EncryptionContextError(
                f"encryption context key {key!r} uses the reserved prefix {RESERVED_PREFIX!r}; "
                "choose another key name"
            )
