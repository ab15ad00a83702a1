"""``inspect``: what a message says about itself, with no key and no KMS call."""

from __future__ import annotations

from .errors import ConfigurationError, TruncatedMessageError
from .format._cursor import NeedMoreData
from .format.header import MessageHeader, parse_header

__all__ = ["inspect"]

INSPECT_MAX_EDKS = 0xFFFF  # the format's own bound: inspecting decrypts nothing
TRUNCATED_HEADER = "the bytes end inside the message header: pass more of the message"


def inspect(
    message: bytes | bytearray | memoryview, *, max_encrypted_data_keys: int = INSPECT_MAX_EDKS
) -> MessageHeader:
    """The header of ``message``: suite, message ID, encryption context, encrypted data
    keys (provider IDs and, for KMS, key ARNs) and frame length.

    Only the header is read, so the first bytes of a message are enough, and nothing is
    authenticated: use it to find objects (say, those still wrapped under an old key),
    never to trust them. It is read once, in place (a reader fed chunk by chunk uses
    :class:`~aioenvelope.format.header.HeaderReader` instead of calling this per chunk).
    """
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"message must be bytes-like, not {type(message).__name__}")
    try:
        return parse_header(message, max_encrypted_data_keys=max_encrypted_data_keys).header
    except NeedMoreData:
        raise TruncatedMessageError(TRUNCATED_HEADER) from None
