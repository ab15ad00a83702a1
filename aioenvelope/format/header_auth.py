"""Checking a header's key commitment and tag, before any frame is opened."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import AuthenticationError
from .derivation import check_commitment, derive_keys
from .encryption_context import serialize_encryption_context
from .header import MessageHeader, ParsedHeader

__all__ = ["authenticated_key", "check_header"]


def authenticated_key(
    parsed: ParsedHeader,
    data_key: bytes | bytearray,
    required_encryption_context: Mapping[str, str] | None,
) -> tuple[bytes, AESGCM, bytes]:
    """The derived key's bytes (for a reader that opens large frames piece by piece with
    a ``Cipher`` context), the message's AES-GCM key and the serialized required context,
    once the commitment and the header tag check out with ``data_key``; raises otherwise.

    ``required_encryption_context`` holds the pairs that were authenticated but not
    stored in the header; they are appended to the header-auth AAD. Opening only: a
    header is tagged once, by the encryptor that wrote it, and never re-tagged.
    """
    required = serialize_encryption_context(required_encryption_context or {})
    key, aead = check_header(
        parsed.header,
        data_key,
        parsed.body_bytes + required if required else parsed.body_bytes,
        parsed.auth_iv,
        parsed.auth_tag,
    )
    return key, aead, required


def check_header(
    header: MessageHeader,
    data_key: bytes | bytearray,
    authenticated: bytes | memoryview,
    auth_iv: bytes,
    auth_tag: bytes | memoryview,
) -> tuple[bytes, AESGCM]:
    """:func:`authenticated_key`'s checks on the header tag's inputs as they are at
    hand: ``authenticated`` is the header body followed by the serialized required
    context (a view of a whole message's buffer when none is required, so the
    one-frame path copies nothing). Returns the derived key's bytes and its AES-GCM.
    """
    suite = header.algorithm_suite
    key, commitment = derive_keys(suite, bytes(data_key), header.message_id)
    if suite.committing:
        check_commitment(commitment, header.suite_data)
    aead = AESGCM(key)
    try:
        aead.decrypt(auth_iv, auth_tag, authenticated)
    except InvalidTag:
        raise AuthenticationError(
            "header authentication failed: the header was changed, or the encryption "
            "context or data key is not the one it was written with"
        ) from None
    return key, aead
