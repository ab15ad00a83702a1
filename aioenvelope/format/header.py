"""Message header: parse and serialize, byte-exact with the ESDK format (v1 and v2)."""

from __future__ import annotations

import enum
import struct
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import ConfigurationError, MalformedMessageError, MessageLimitError
from ._cursor import Cursor, NeedMoreData
from .encryption_context import (
    deserialize_encryption_context,
    read_context_in_order,
    serialize_encryption_context,
)
from .suites import AlgorithmSuite

__all__ = [
    "ContentType",
    "EncryptedDataKey",
    "HeaderReader",
    "MessageHeader",
    "ParsedHeader",
    "header_body_bytes",
    "parse_header",
    "read_plain_v2",
    "serialize_header_auth",
    "serialize_header_body",
    "stored_context_bytes",
]

_V1_TYPE = 0x80
_U16 = struct.Struct(">H")
_V1_LEAD = struct.Struct(">BBH")
_V2_LEAD = struct.Struct(">BH")
_V1_TAIL = struct.Struct(">BIBI")
_V2_TAIL = struct.Struct(">BI")
# A v2 header up to its encryption context: version, suite, message ID, context length.
_V2_HEAD = struct.Struct(">BH32sH")
_V2_AUTH_IV = b"\x00" * 12
# AlgorithmSuite.from_id without the classmethod call (one per message read).
_SUITES_BY_ID = {suite.suite_id: suite for suite in AlgorithmSuite}
# Contexts read_plain_v2 read lately, by their bytes: a service reads the same few
# contexts over and over, and their parse (UTF-8 decoding, order and duplicate checks)
# was a quarter of the header's. The dicts here are never handed out: each header gets
# a read-only view of its own copy. Bounded in count and in the size of each context,
# and emptied when full: hostile input churns it at O(1) a header.
_READ_CONTEXTS: dict[bytes, tuple[dict[str, str], bytes | None]] = {}
_READ_CONTEXTS_MAX = 256
_READ_CONTEXT_MAX_BYTES = 1024
MAX_FRAME_LENGTH = 2**31 - 1  # the ESDK's own bound (Python); fits every implementation


class ContentType(enum.IntEnum):
    NON_FRAMED = 1
    FRAMED = 2


@dataclass(frozen=True)
class EncryptedDataKey:
    """A data key wrapped by one keyring: who wrapped it, under what, and the blob.

    Frozen, and its byte fields are meant to be ``bytes``: :meth:`serialize` keeps the
    serialization it makes (a reused data key's EDK goes into every message under it)."""

    provider_id: str
    provider_info: bytes
    ciphertext: bytes = field(repr=False)

    def __getstate__(self) -> dict[str, object]:
        """The fields only: the serialization :meth:`serialize` keeps is not pickled."""
        return {
            "provider_id": self.provider_id,
            "provider_info": self.provider_info,
            "ciphertext": self.ciphertext,
        }

    @classmethod
    def _of(cls, provider_id: str, provider_info: bytes, ciphertext: bytes) -> EncryptedDataKey:
        """``EncryptedDataKey(...)`` without the frozen ``__init__``'s per-field setattr,
        for a caller whose fields are already the right types (a keyring's own)."""
        edk: EncryptedDataKey = object.__new__(cls)
        edk.__dict__.update(
            provider_id=provider_id, provider_info=provider_info, ciphertext=ciphertext
        )
        return edk

    def serialize(self) -> bytes:
        """The EDK as the header holds it. Kept once made: a reused data key's EDK is
        written into every message under it (the fields are frozen, so it never goes
        stale; equality and ``repr`` look at the fields only)."""
        known: bytes | None = self.__dict__.get("_serialized")
        if known is not None:
            return known
        pid = self.provider_id.encode("utf-8")
        info, blob = self.provider_info, self.ciphertext
        if max(len(pid), len(info), len(blob)) > 0xFFFF:
            raise ConfigurationError(
                "an encrypted data key field is longer than the format's 65535 bytes"
            )
        out = b"".join(
            (_U16.pack(len(pid)), pid, _U16.pack(len(info)), info, _U16.pack(len(blob)), blob)
        )
        self.__dict__["_serialized"] = out
        return out


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
    #: Bytes the header takes at the start of the message, its authentication included:
    #: the body starts here (for slicing a stored object, or an S3 range request).
    header_length: int = 0
    #: The header's context bytes when they are exactly what
    #: :func:`serialize_encryption_context` makes of ``encryption_context`` (entries in
    #: key order), so a reader need not serialize the context again per message. Not
    #: copied by ``dataclasses.replace`` (a replaced context would not match it).
    _serialized_context: bytes | None = field(default=None, init=False, repr=False, compare=False)

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
    return header_body_bytes(
        header.version,
        header.algorithm_suite,
        header.message_id,
        serialize_encryption_context(header.encryption_context)
        if serialized_context is None
        else serialized_context,
        header.encrypted_data_keys,
        header.content_type,
        header.frame_length,
        header.suite_data,
    )


def header_body_bytes(
    version: int,
    suite: AlgorithmSuite,
    message_id: bytes,
    serialized_context: bytes,
    encrypted_data_keys: Sequence[EncryptedDataKey],
    content_type: ContentType,
    frame_length: int,
    suite_data: bytes,
) -> bytes:
    """:func:`serialize_header_body` from the fields themselves: a writer needs the bytes
    before (or instead of) a :class:`MessageHeader` value, which costs microseconds per
    message to build."""
    count = len(encrypted_data_keys)
    if version == 1:
        lead = _V1_LEAD.pack(1, _V1_TYPE, suite.suite_id)
        tail = _V1_TAIL.pack(int(content_type), 0, suite.info.iv_length, frame_length)
    else:
        tail = _V2_TAIL.pack(int(content_type), frame_length) + suite_data
        if count == 1 and len(message_id) == 32:  # the usual case: one pack, one join
            head = _V2_HEAD.pack(2, suite.suite_id, message_id, len(serialized_context))
            edk = encrypted_data_keys[0].serialize()
            return b"".join((head, serialized_context, b"\x00\x01", edk, tail))
        lead = _V2_LEAD.pack(2, suite.suite_id)
    return b"".join(
        (
            lead,
            message_id,
            _U16.pack(len(serialized_context)),
            serialized_context,
            _U16.pack(count),
            *[edk.serialize() for edk in encrypted_data_keys],
            tail,
        )
    )


def stored_context_bytes(header: MessageHeader) -> bytes:
    """``serialize_encryption_context(header.encryption_context)``: the header's own
    context bytes when the parser found them in that form already (the usual case),
    else serialized now."""
    known = header._serialized_context
    if known is None:
        return serialize_encryption_context(header.encryption_context)
    return known


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
    parsed = _read_plain_v2(buf, start, max_encrypted_data_keys)
    if parsed is not None:
        return parsed
    steps = _header_steps(Cursor(buf, start), max_encrypted_data_keys)
    step = next(steps)
    if isinstance(step, ParsedHeader):
        return step
    steps.close()
    raise NeedMoreData


class HeaderReader:
    """Reads a header from pieces as they arrive, each field parsed once.

    Why not :func:`parse_header` on everything received so far, again for each piece:
    re-parsing from the start costs the whole header per piece, quadratic in a header
    sent slowly (a never-finished 1.3 MB header in 1 KiB pieces took 6 s of CPU). Here
    the parser waits, where it stopped, for the bytes the length fields read so far
    require (:attr:`missing`), and is not resumed before they are all there.

    A header that arrives whole in one piece is parsed in place, copying nothing;
    otherwise its bytes are kept in one buffer that grows by what arrives.
    """

    __slots__ = ("_buf", "_cursor", "_error", "_max_edks", "_needed", "_steps", "parsed")

    def __init__(self, *, max_encrypted_data_keys: int) -> None:
        self._max_edks = max_encrypted_data_keys
        self._buf = bytearray()  # the header's bytes so far, once it spans pieces
        self._cursor: Cursor | None = None
        self._steps: _Steps | None = None
        self._needed = 1  # header bytes the parser needs before it can go on
        self._error: MalformedMessageError | None = None
        self.parsed: ParsedHeader | None = None
        """The header, once complete."""

    @property
    def missing(self) -> int:
        """Bytes still to come before parsing can go on (0 once the header is read)."""
        return 0 if self.parsed is not None else self._needed - len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview, start: int = 0) -> int:
        """Read header bytes from ``data[start:]``; return how many belonged to the
        header (all of them until it ends). Raises :class:`MalformedMessageError` (or
        :class:`MessageLimitError`, also when memory runs out) at the first bad field,
        and again on later calls."""
        if self._error is not None:
            raise self._error
        if self.parsed is not None:
            return 0
        try:
            try:
                if self._steps is None:
                    return self._first(data, start)
                return self._more(data, start)
            except MemoryError:
                # A header may legally run to gigabytes (65535 EDKs of 3 x 64 KiB); what
                # this process cannot hold is the message's doing, not a crash.
                raise MessageLimitError(
                    "the message header is larger than this process may allocate: lower "
                    "max_encrypted_data_keys, or check where the message came from"
                ) from None
        except MalformedMessageError as exc:
            self._error = exc
            raise

    def _first(self, data: bytes | bytearray | memoryview, start: int) -> int:
        parsed = _read_plain_v2(data, start, self._max_edks)
        if parsed is not None:
            self.parsed = parsed
            return parsed.length
        cursor = Cursor(data, start)
        steps = _header_steps(cursor, self._max_edks)
        needed = next(steps)
        if isinstance(needed, ParsedHeader):
            self.parsed = needed
            return cursor.pos - start
        # The header goes on past this piece: keep its start and parse on from there.
        with memoryview(data) as view:
            self._buf += view[start:]
        cursor.rebase(self._buf)
        self._cursor, self._steps, self._needed = cursor, steps, needed - start
        return len(data) - start

    def _more(self, data: bytes | bytearray | memoryview, start: int) -> int:
        assert self._cursor is not None
        assert self._steps is not None
        buf, cursor = self._buf, self._cursor
        offered = len(data) - start
        with memoryview(data) as view:
            buf += view[start:]  # whole: the fields in it are then read in one resumption
        cursor.end = len(buf)
        if len(buf) < self._needed:
            return offered
        step = next(self._steps)
        if isinstance(step, ParsedHeader):
            self.parsed = step
            unused = len(buf) - cursor.pos  # bytes after the header: the body's
            self._buf, self._cursor, self._steps = bytearray(), None, None
            return offered - unused
        self._needed = step
        return offered


def _read_plain_v2(
    buf: bytes | bytearray | memoryview, start: int, max_edks: int
) -> ParsedHeader | None:
    """A whole, well-formed v2 header read in one pass with ``struct``; None for anything
    else (v1, a header that ends past ``buf``, any field :func:`_header_steps` refuses).

    Why: the checked parser's per-field cursor calls were a third of a small message's
    decryption. This path only ever accepts: every check of :func:`_header_steps` is
    made here too (:func:`read_plain_v2`), and on the first one that fails the caller
    runs the checked parser from the start, which raises its own error for the same
    byte.
    """
    read = read_plain_v2(buf, start, max_edks)
    if read is None:
        return None
    header, _, body_end, header_end = read
    return ParsedHeader(
        header,
        bytes(buf[start:body_end]),
        _V2_AUTH_IV,
        bytes(buf[body_end:header_end]),
        header_end - start,
    )


def read_plain_v2(
    buf: bytes | bytearray | memoryview, start: int, max_edks: int
) -> tuple[MessageHeader, int, int, int] | None:
    """A whole, well-formed v2 header from ``buf[start:]``: the header, where its
    encrypted data keys start, where its body ends (the header tag follows) and where
    the header ends; None for anything else, as :func:`_read_plain_v2` says.

    Offsets rather than copies, so that a reader holding the whole message (the
    one-frame path of :mod:`.decryptor`) authenticates the header in place. Each byte
    is read at most twice (here, then by the checked parser if this gives way), so
    hostile input still costs linear time, and nothing is allocated before the bytes
    its length field announces are seen to be there.
    """
    end = len(buf)
    if end - start < _V2_HEAD.size or buf[start] != 2:
        return None
    _, suite_id, message_id, ec_length = _V2_HEAD.unpack_from(buf, start)
    suite = _SUITES_BY_ID.get(suite_id)
    if suite is None or suite.message_version != 2:
        return None
    pos = start + _V2_HEAD.size
    ec_end = pos + ec_length
    if ec_end + 2 > end:
        return None
    context_bytes = bytes(buf[pos:ec_end])
    known = _READ_CONTEXTS.get(context_bytes)
    if known is None:
        read = read_context_in_order(context_bytes)
        if read is None:
            return None
        if ec_length <= _READ_CONTEXT_MAX_BYTES:
            if len(_READ_CONTEXTS) >= _READ_CONTEXTS_MAX:
                _READ_CONTEXTS.clear()
            _READ_CONTEXTS[context_bytes] = (dict(read[0]), read[1])
        context, serialized_context = read
    else:
        # Each header's view is over its own copy: a view hands its dict to the other
        # operand of ``|`` and ``==``, so a shared one could be changed for every header.
        context, serialized_context = dict(known[0]), known[1]
    encryption_context = MappingProxyType(context)
    (edk_count,) = _U16.unpack_from(buf, ec_end)
    if edk_count == 0 or edk_count > max_edks:
        return None
    edks_start = pos = ec_end + 2
    edks = []
    unpack_u16 = _U16.unpack_from
    new = object.__new__
    for _ in range(edk_count):
        if pos + 2 > end:
            return None
        (n,) = unpack_u16(buf, pos)
        id_end = pos + 2 + n
        if id_end + 2 > end:
            return None
        try:
            provider_id = str(buf[pos + 2 : id_end], "utf-8")
        except UnicodeDecodeError:
            return None
        (n,) = unpack_u16(buf, id_end)
        info_end = id_end + 2 + n
        if info_end + 2 > end:
            return None
        (n,) = unpack_u16(buf, info_end)
        pos = info_end + 2 + n
        if pos > end:
            return None
        # As EncryptedDataKey(...) makes it, without the frozen __init__'s setattrs.
        edk = new(EncryptedDataKey)
        edk.__dict__.update(
            provider_id=provider_id,
            provider_info=bytes(buf[id_end + 2 : info_end]),
            ciphertext=bytes(buf[info_end + 2 : pos]),
        )
        edks.append(edk)
    if pos + _V2_TAIL.size > end:
        return None
    content_type_byte, frame_length = _V2_TAIL.unpack_from(buf, pos)
    if content_type_byte == 2:
        content_type = ContentType.FRAMED
        if frame_length == 0 or frame_length > MAX_FRAME_LENGTH:
            return None
    elif content_type_byte == 1 and frame_length == 0:
        content_type = ContentType.NON_FRAMED
    else:
        return None
    info = suite.info
    body_end = pos + _V2_TAIL.size + info.suite_data_length
    header_end = body_end + info.tag_length
    if header_end > end:
        return None
    # Made as MessageHeader(...) would make it, without the generated __init__'s
    # per-field frozen setattr and the context copy (the dict is this call's own): the
    # dataclass machinery was a quarter of this function.
    header = new(MessageHeader)
    header.__dict__.update(
        version=2,
        algorithm_suite=suite,
        message_id=message_id,
        encryption_context=encryption_context,
        encrypted_data_keys=tuple(edks),
        content_type=content_type,
        frame_length=frame_length,
        suite_data=bytes(buf[pos + _V2_TAIL.size : body_end]),
        header_length=header_end - start,
        _serialized_context=serialized_context,
    )
    return header, edks_start, body_end, header_end


_Steps = Generator[int | ParsedHeader, None, None]


def _header_steps(c: Cursor, max_edks: int) -> _Steps:
    """The header parser, as a generator that yields the buffer length it needs to go on
    (see :meth:`Cursor.wait`), and last the header (yielded, not returned: catching a
    ``StopIteration`` for every header is measurably slower on the one-shot path).

    Each field is checked as soon as its bytes are there. No buffer position is kept
    across a ``yield``: the driver may move the bytes (:meth:`Cursor.rebase`).
    """
    if c.lacks(1):
        yield from c.wait(1)
    version = c.u8()
    if version not in (1, 2):
        raise MalformedMessageError(
            f"not an AWS Encryption SDK message: unknown version byte 0x{version:02x}"
        )
    if version == 1:
        if c.lacks(1):
            yield from c.wait(1)
        if (kind := c.u8()) != _V1_TYPE:
            raise MalformedMessageError(f"unknown message type 0x{kind:02x} (expected 0x80)")
    if c.lacks(2):
        yield from c.wait(2)
    suite_id = c.u16()
    suite = AlgorithmSuite.from_id(suite_id)
    if suite is None:
        raise MalformedMessageError(f"unknown algorithm suite 0x{suite_id:04x}")
    if suite.message_version != version:
        raise MalformedMessageError(
            f"algorithm suite 0x{suite_id:04x} is not valid in a version {version} message"
        )
    id_length = 16 if version == 1 else 32
    if c.lacks(id_length + 2):
        yield from c.wait(id_length + 2)
    message_id = c.take(id_length)
    ec_length = c.u16()
    if c.lacks(ec_length + 2):
        yield from c.wait(ec_length + 2)
    encryption_context = deserialize_encryption_context(c.take(ec_length))
    edk_count = c.u16()
    if edk_count == 0:
        raise MalformedMessageError("message has no encrypted data keys")
    if edk_count > max_edks:
        raise MessageLimitError(
            f"message has {edk_count} encrypted data keys; this client accepts at most "
            f"{max_edks} (raise max_encrypted_data_keys if that is expected)"
        )
    edks = []
    for _ in range(edk_count):
        if c.lacks(2):
            yield from c.wait(2)
        n = c.u16()
        if c.lacks(n + 2):
            yield from c.wait(n + 2)
        provider_id = c.utf8(n, "a key provider ID")
        n = c.u16()
        if c.lacks(n + 2):
            yield from c.wait(n + 2)
        provider_info = c.take(n)
        n = c.u16()
        if c.lacks(n):
            yield from c.wait(n)
        edks.append(EncryptedDataKey(provider_id, provider_info, c.take(n)))
    if c.lacks(1):
        yield from c.wait(1)
    content_type_byte = c.u8()
    try:
        content_type = ContentType(content_type_byte)
    except ValueError:
        raise MalformedMessageError(f"unknown content type 0x{content_type_byte:02x}") from None
    if version == 1:
        if c.lacks(5):
            yield from c.wait(5)
        if c.take(4) != b"\x00\x00\x00\x00":
            raise MalformedMessageError("reserved header field is not zero")
        if (iv_length := c.u8()) != suite.info.iv_length:
            raise MalformedMessageError(f"header IV length {iv_length} does not match the suite")
    if c.lacks(4):
        yield from c.wait(4)
    frame_length = c.u32()
    if content_type is ContentType.FRAMED and frame_length == 0:
        raise MalformedMessageError("framed message has a frame length of 0")
    if content_type is ContentType.NON_FRAMED and frame_length != 0:
        raise MalformedMessageError("non-framed message has a non-zero frame length")
    if frame_length > MAX_FRAME_LENGTH:
        raise MessageLimitError(
            f"message declares frames of {frame_length} bytes; the AWS Encryption SDK "
            f"writes and reads at most {MAX_FRAME_LENGTH}, so no conforming encrypter "
            "wrote it"
        )
    auth_length = (suite.info.iv_length if version == 1 else 0) + suite.info.tag_length
    if c.lacks(suite.info.suite_data_length + auth_length):
        yield from c.wait(suite.info.suite_data_length + auth_length)
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
        header_length=c.pos - c.origin,
    )
    yield ParsedHeader(header, c.slice(c.origin, body_end), auth_iv, auth_tag, c.pos - c.origin)
