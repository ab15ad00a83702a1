"""Message header: parse and serialize, byte-exact with the ESDK format (v1 and v2)."""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import ConfigurationError, MalformedMessageError, MessageLimitError
from ._cursor import Cursor
from .encryption_context import deserialize_encryption_context, serialize_encryption_context
from .suites import AlgorithmSuite

__all__ = [
    "ContentType",
    "EncryptedDataKey",
    "MessageHeader",
    "ParsedHeader",
    "parse_header",
    "serialize_header_auth",
    "serialize_header_body",
]

_V1_TYPE = 0x80
_U16 = struct.Struct(">H")
_V1_LEAD = struct.Struct(">BBH")
_V2_LEAD = struct.Struct(">BH")
_V1_TAIL = struct.Struct(">BIBI")
_V2_TAIL = struct.Struct(">BI")
MAX_FRAME_LENGTH = 2**31 - 1  # the ESDK's own bound (Python); fits every implementation


class ContentType(enum.IntEnum):
    NON_FRAMED = 1
    FRAMED = 2


@dataclass(frozen=True)
class EncryptedDataKey:
    """A data key wrapped by one keyring: who wrapped it, under what, and the blob."""

    provider_id: str
    provider_info: bytes
    ciphertext: bytes = field(repr=False)

    def serialize(self) -> bytes:
        pid = self.provider_id.encode("utf-8")
        info, blob = self.provider_info, self.ciphertext
        if max(len(pid), len(info), len(blob)) > 0xFFFF:
            raise ConfigurationError(
                "an encrypted data key field is longer than the format's 65535 bytes"
            )
        return b"".join(
            (_U16.pack(len(pid)), pid, _U16.pack(len(info)), info, _U16.pack(len(blob)), blob)
        )


@dataclass(frozen=True)
class MessageHeader:
    """What a message says about itself; returned to callers who want to look."""

    version: int
    algorithm_suite: AlgorithmSuite
    message_id: bytes
    encryption_context: Mapping[str, str]
    encrypted_data_keys: tuple[EncryptedDataKey, ...]
    content_type: ContentType
    frame_length: int
    suite_data: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "encryption_context", MappingProxyType(dict(self.encryption_context))
        )


@dataclass(frozen=True)
class ParsedHeader:
    """A header as read: the value, the exact bytes the tag covers, and the tag."""

    header: MessageHeader
    body_bytes: bytes
    auth_iv: bytes
    auth_tag: bytes
    length: int  # bytes consumed, header body plus authentication


def serialize_header_body(header: MessageHeader, serialized_context: bytes | None = None) -> bytes:
    """The header body bytes; ``serialized_context`` saves re-serializing a known context."""
    suite = header.algorithm_suite
    ec = (
        serialize_encryption_context(header.encryption_context)
        if serialized_context is None
        else serialized_context
    )
    edks = header.encrypted_data_keys
    if header.version == 1:
        lead = _V1_LEAD.pack(1, _V1_TYPE, suite.suite_id)
        tail = _V1_TAIL.pack(int(header.content_type), 0, suite.info.iv_length, header.frame_length)
    else:
        lead = _V2_LEAD.pack(2, suite.suite_id)
        tail = _V2_TAIL.pack(int(header.content_type), header.frame_length) + header.suite_data
    return b"".join(
        (
            lead,
            header.message_id,
            _U16.pack(len(ec)),
            ec,
            _U16.pack(len(edks)),
            *(edk.serialize() for edk in edks),
            tail,
        )
    )


def serialize_header_auth(version: int, tag: bytes) -> bytes:
    """v1 writes the all-zero IV before the tag; v2 writes the tag alone."""
    return (b"\x00" * 12 + tag) if version == 1 else tag


def parse_header(
    buf: bytes | bytearray | memoryview, *, max_encrypted_data_keys: int, start: int = 0
) -> ParsedHeader:
    """Parse a header from ``buf[start:]``.

    Raises ``NeedMoreData`` when ``buf`` ends first, :class:`MalformedMessageError`
    as soon as a field is wrong (so garbage is refused at its first bad byte).
    """
    c = Cursor(buf, start)
    version = c.u8()
    if version not in (1, 2):
        raise MalformedMessageError(
            f"not an AWS Encryption SDK message: unknown version byte 0x{version:02x}"
        )
    if version == 1 and (kind := c.u8()) != _V1_TYPE:
        raise MalformedMessageError(f"unknown message type 0x{kind:02x} (expected 0x80)")
    suite_id = c.u16()
    suite = AlgorithmSuite.from_id(suite_id)
    if suite is None:
        raise MalformedMessageError(f"unknown algorithm suite 0x{suite_id:04x}")
    if suite.message_version != version:
        raise MalformedMessageError(
            f"algorithm suite 0x{suite_id:04x} is not valid in a version {version} message"
        )
    message_id = c.take(16 if version == 1 else 32)
    ec_length = c.u16()
    encryption_context = deserialize_encryption_context(c.take(ec_length))
    edk_count = c.u16()
    if edk_count == 0:
        raise MalformedMessageError("message has no encrypted data keys")
    if edk_count > max_encrypted_data_keys:
        raise MessageLimitError(
            f"message has {edk_count} encrypted data keys; this client accepts at most "
            f"{max_encrypted_data_keys} (raise max_encrypted_data_keys if that is expected)"
        )
    edks = []
    for _ in range(edk_count):
        provider_id = c.utf8(c.u16(), "a key provider ID")
        provider_info = c.take(c.u16())
        edks.append(EncryptedDataKey(provider_id, provider_info, c.take(c.u16())))
    content_type_byte = c.u8()
    try:
        content_type = ContentType(content_type_byte)
    except ValueError:
        raise MalformedMessageError(f"unknown content type 0x{content_type_byte:02x}") from None
    if version == 1:
        if c.take(4) != b"\x00\x00\x00\x00":
            raise MalformedMessageError("reserved header field is not zero")
        if (iv_length := c.u8()) != suite.info.iv_length:
            raise MalformedMessageError(f"header IV length {iv_length} does not match the suite")
    frame_length = c.u32()
    if content_type is ContentType.FRAMED and frame_length == 0:
        raise MalformedMessageError("framed message has a frame length of 0")
    if content_type is ContentType.NON_FRAMED and frame_length != 0:
        raise MalformedMessageError("non-framed message has a non-zero frame length")
    suite_data = c.take(suite.info.suite_data_length)
    body_end = c.pos
    auth_iv = c.take(suite.info.iv_length) if version == 1 else b"\x00" * 12
    auth_tag = c.take(suite.info.tag_length)
    header = MessageHeader(
        version=version,
        algorithm_suite=suite,
        message_id=message_id,
        encryption_context=encryption_context,
        encrypted_data_keys=tuple(edks),
        content_type=content_type,
        frame_length=frame_length,
        suite_data=suite_data,
    )
    return ParsedHeader(header, bytes(buf[start:body_end]), auth_iv, auth_tag, c.pos - start)
