"""Rewrapping: new encrypted data keys on an existing message, body untouched.

The header tag covers the EDKs, so a new EDK list needs a new tag; the tag key is
derived from the data key and the message ID, both unchanged, so the commitment and
every frame stay byte-identical. Pure functions: the caller supplies the data key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigurationError
from .header import EncryptedDataKey, MessageHeader, ParsedHeader, serialize_header_body
from .header_auth import authenticated_message_key

__all__ = ["check_rewrappable", "reauthenticated_header", "rewrapped_header"]


def rewrapped_header(
    parsed: ParsedHeader,
    data_key: bytes | bytearray,
    encrypted_data_keys: Sequence[EncryptedDataKey],
    *,
    required_encryption_context: Mapping[str, str] | None = None,
) -> bytes:
    """The serialized header of ``parsed`` with ``encrypted_data_keys`` in place of its
    own, authenticated with ``data_key``.

    The old header is checked first (commitment and tag): a header changed in transit is
    refused, never re-authenticated. Signed messages are refused.
    """
    check_rewrappable(parsed)
    if not encrypted_data_keys:
        raise ConfigurationError("a message needs at least one encrypted data key")
    aead, required = authenticated_message_key(parsed, data_key, required_encryption_context)
    return reauthenticated_header(parsed, aead, required, encrypted_data_keys)[0]


def check_rewrappable(parsed: ParsedHeader) -> None:
    """Signed messages cannot be rewrapped: the signature covers the header and its
    private key is gone."""
    suite = parsed.header.algorithm_suite
    if suite.signing:
        raise ConfigurationError(
            f"a signed message ({suite.name}) cannot be rewrapped: its signature covers the "
            "header, and the signing key was not kept. Re-encrypt it instead "
            "(EnvelopeClient.reencrypt_stream)"
        )


def reauthenticated_header(
    parsed: ParsedHeader,
    aead: AESGCM,
    serialized_required_context: bytes,
    encrypted_data_keys: Sequence[EncryptedDataKey],
) -> tuple[bytes, MessageHeader]:
    """The header bytes (and value) with new EDKs, tagged with ``aead``: the message key
    :func:`authenticated_message_key` returned after checking the old header."""
    if not encrypted_data_keys:
        raise ConfigurationError("a message needs at least one encrypted data key")
    new = dataclasses.replace(parsed.header, encrypted_data_keys=tuple(encrypted_data_keys))
    body = serialize_header_body(new)
    tag = aead.encrypt(parsed.auth_iv, b"", body + serialized_required_context)
    # v1 stores its header IV before the tag (the ESDK writes zeros); v2 has none.
    return body + (parsed.auth_iv + tag if new.version == 1 else tag), new
