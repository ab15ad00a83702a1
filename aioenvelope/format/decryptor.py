"""The sans-I/O message reader.

Push bytes in with :meth:`MessageDecryptor.receive_data` (and
:meth:`~MessageDecryptor.receive_eof` at the end), pull results out:

1. :meth:`read_header` returns the parsed header once it is complete;
2. the caller obtains the data key (I/O: keyrings, KMS) and calls :meth:`begin_body`,
   which checks the key commitment and the header tag;
3. :meth:`next_plaintext` hands out one frame's plaintext at a time, each only after its
   tag verified. For signing suites the final frame is held until the signature
   verified, so a truncated or forged message never yields its last plaintext;
4. :meth:`read_all` is the one-shot path: everything verified, or nothing.

Every error is one of :mod:`aioenvelope.errors`; nothing here blocks or awaits.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import (
    AuthenticationError,
    ConfigurationError,
    MalformedMessageError,
    TruncatedMessageError,
)
from ._cursor import Cursor, NeedMoreData
from .body import (
    FINAL_FRAME_AAD,
    FRAME_AAD,
    MAX_FRAMES,
    MAX_NON_FRAMED_LENGTH,
    SEQUENCE_NUMBER_END,
    SINGLE_BLOCK_AAD,
    body_aad,
    frame_iv,
)
from .derivation import check_commitment, derive_keys
from .encryption_context import serialize_encryption_context
from .header import ContentType, ParsedHeader, parse_header
from .signing import Verifier

__all__ = ["END_OF_MESSAGE", "MessageDecryptor"]

_TAG = 16
_U32 = struct.Struct(">I")
_REGULAR_PREFIX = struct.Struct(">I12s")
_FINAL_PREFIX = struct.Struct(">II12sI")


class _State(enum.Enum):
    HEADER = "header"
    AWAIT_KEY = "await key"
    BODY = "body"
    FOOTER = "footer"
    TRAILER = "trailer"
    DONE = "done"


class _EndOfMessage:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = _EndOfMessage()


class MessageDecryptor:
    """Reads one message. Not reusable: make one per message."""

    def __init__(self, *, max_encrypted_data_keys: int) -> None:
        self._max_edks = max_encrypted_data_keys
        self._buf: bytes | bytearray | memoryview = b""
        self._pos = 0
        self._eof = False
        self._state = _State.HEADER
        self._parsed: ParsedHeader | None = None
        self._aead: AESGCM | None = None
        self._verifier: Verifier | None = None
        self._sequence = 1
        self._held: bytes | None = None  # final plaintext waiting for the signature

    # -- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise ConfigurationError("receive_data() after receive_eof()")
        if not data:
            return
        if self._state is _State.DONE:
            raise MalformedMessageError("unexpected bytes after the end of the message")
        buf, pos = self._buf, self._pos
        if pos == len(buf):
            # Zero-copy when nothing is pending and the bytes cannot change under us
            # (bytes, or a read-only view of bytes): whole frames then open in place.
            if isinstance(data, bytes) or (
                isinstance(data, memoryview) and isinstance(data.obj, bytes) and data.format == "B"
            ):
                self._buf = data
            else:
                self._buf = bytes(data)
        elif isinstance(buf, bytearray):
            # Our own buffer: drop what was consumed (cheap at the front of a bytearray)
            # and append, so many small chunks cost linear time, not quadratic.
            del buf[:pos]
            buf += data
        else:
            joined = bytearray(memoryview(buf)[pos:])
            joined += data
            self._buf = joined
        self._pos = 0

    @property
    def buffered_bytes(self) -> int:
        """Input received but not yet consumed (at most about one frame plus a chunk)."""
        return len(self._buf) - self._pos

    def receive_eof(self) -> None:
        self._eof = True

    @property
    def header(self) -> ParsedHeader | None:
        return self._parsed

    # -- header ----------------------------------------------------------------------

    def read_header(self) -> ParsedHeader | None:
        """The parsed header, or None until enough bytes have arrived."""
        if self._parsed is not None:
            return self._parsed
        try:
            parsed = parse_header(
                self._buf, max_encrypted_data_keys=self._max_edks, start=self._pos
            )
        except NeedMoreData:
            self._short("the message header")
            return None
        self._pos += parsed.length
        self._parsed = parsed
        self._state = _State.AWAIT_KEY
        return parsed

    def begin_body(
        self,
        data_key: bytes | bytearray,
        *,
        required_encryption_context: Mapping[str, str] | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        """Check the commitment and the header tag with this data key, then read the body.

        ``required_encryption_context`` holds the pairs that were authenticated but not
        stored in the header; they are appended to the header-auth AAD.
        """
        if self._state is not _State.AWAIT_KEY or self._parsed is None:
            raise ConfigurationError("begin_body() must follow a successful read_header()")
        parsed = self._parsed
        header = parsed.header
        suite = header.algorithm_suite
        if suite.signing != (verifier is not None):
            raise ConfigurationError("a verifier must be given exactly for signing suites")
        key, commitment = derive_keys(suite, bytes(data_key), header.message_id)
        if suite.committing:
            check_commitment(commitment, header.suite_data)
        aead = AESGCM(key)
        required = serialize_encryption_context(required_encryption_context or {})
        try:
            aead.decrypt(parsed.auth_iv, parsed.auth_tag, parsed.body_bytes + required)
        except InvalidTag:
            raise AuthenticationError(
                "header authentication failed: the header was changed, or the encryption "
                "context or data key is not the one it was written with"
            ) from None
        if verifier is not None:
            verifier.update(parsed.body_bytes)
            verifier.update(parsed.auth_iv if header.version == 1 else b"")
            verifier.update(parsed.auth_tag)
        self._aead, self._verifier = aead, verifier
        self._state = _State.BODY

    # -- body ------------------------------------------------------------------------

    def next_plaintext(self) -> bytes | _EndOfMessage | None:
        """Verified plaintext of the next frame; ``None`` while more input is needed;
        :data:`END_OF_MESSAGE` once the message is complete.

        The last frame's plaintext is held until the signature verified (signing suites)
        and the input ended with no bytes after the message, so a forged, truncated or
        extended message never releases it.
        """
        while True:
            state = self._state
            if state is _State.BODY:
                assert self._parsed is not None
                if self._parsed.header.content_type is ContentType.NON_FRAMED:
                    result = self._read_non_framed()
                else:
                    result = self._read_frame()
                if result is None or self._state is _State.BODY:
                    return result
                self._held = result
            elif state is _State.FOOTER:
                if not self._read_footer():
                    return None
            elif state is _State.TRAILER:
                if self._pos != len(self._buf):
                    raise MalformedMessageError("unexpected bytes after the end of the message")
                if not self._eof:
                    return None
                self._state = _State.DONE
                held, self._held = self._held, None
                if held:
                    return held
            elif state is _State.DONE:
                return END_OF_MESSAGE
            else:
                raise ConfigurationError(
                    "next_plaintext() needs read_header() and begin_body() first"
                )

    def read_all(self) -> bytes:
        """One shot: the whole verified plaintext, or an error and nothing."""
        if not self._eof:
            raise ConfigurationError("read_all() needs receive_eof() first")
        chunks: list[bytes] = []
        while True:
            item = self.next_plaintext()
            if item is END_OF_MESSAGE:
                return b"".join(chunks)
            assert isinstance(item, bytes)  # None is impossible after EOF: _short raises
            chunks.append(item)

    # -- internals -------------------------------------------------------------------

    def _short(self, what: str) -> None:
        """Out of input: at EOF that is a truncation; otherwise the caller waits."""
        if self._eof:
            raise TruncatedMessageError(
                f"the message is truncated: it ends inside {what}. Check that the whole "
                "ciphertext was stored and read back"
            )

    def _view(self) -> Cursor:
        return Cursor(self._buf, self._pos)

    def _open(self, iv: bytes, sealed: memoryview, aad: bytes, seq: int) -> bytes:
        assert self._aead is not None
        try:
            return self._aead.decrypt(iv, sealed, aad)
        except InvalidTag:
            what = "the message body" if seq == 0 else f"frame {seq}"
            raise AuthenticationError(
                f"{what} failed authentication: the message was changed or corrupted after "
                "it was written"
            ) from None

    def _read_frame(self) -> bytes | None:
        """One frame, verified. Lean on purpose: a 16 MiB message has 256 of them."""
        assert self._parsed is not None
        header = self._parsed.header
        buf, start, available = self._buf, self._pos, len(self._buf)
        seq = self._sequence
        if available - start < 4:
            self._short(f"frame {seq}")
            return None
        final = _U32.unpack_from(buf, start)[0] == SEQUENCE_NUMBER_END
        prefix = 24 if final else 16
        if available - start < prefix:
            self._short(f"frame {seq}")
            return None
        if final:
            _, found, iv, length = _FINAL_PREFIX.unpack_from(buf, start)
            if length > header.frame_length:
                raise MalformedMessageError(
                    f"final frame holds {length} bytes, more than the frame length "
                    f"{header.frame_length}"
                )
        else:
            found, iv = _REGULAR_PREFIX.unpack_from(buf, start)
            length = header.frame_length
            if seq >= MAX_FRAMES:
                raise MalformedMessageError("message has more than 2^32-1 frames")
        if found != seq:
            raise MalformedMessageError(
                f"frame {found} found where frame {seq} belongs: the frames are out of order"
            )
        if iv != frame_iv(seq):
            raise MalformedMessageError(f"frame {seq} has an IV that does not match it")
        body = start + prefix
        end = body + length + _TAG
        if end > available:
            self._short(f"frame {seq}")
            return None
        view = memoryview(buf)
        aad = body_aad(header.message_id, FINAL_FRAME_AAD if final else FRAME_AAD, seq, length)
        plaintext = self._open(iv, view[body:end], aad, seq)
        if self._verifier is not None:
            self._verifier.update(view[start:end])
        self._pos = end
        self._sequence = seq + 1
        if final:
            self._state = self._after_body()
        return plaintext

    def _read_non_framed(self) -> bytes | None:
        assert self._parsed is not None
        header = self._parsed.header
        c = self._view()
        start = c.pos
        try:
            iv = c.take(12)
            length = c.u64()
            if length > MAX_NON_FRAMED_LENGTH:
                raise MalformedMessageError("non-framed content is longer than the format allows")
            end = c.pos + length + _TAG
            if end > len(self._buf):
                raise NeedMoreData
        except NeedMoreData:
            self._short("the non-framed content")
            return None
        sealed = memoryview(self._buf)[c.pos : end]
        aad = body_aad(header.message_id, SINGLE_BLOCK_AAD, 1, length)
        plaintext = self._open(iv, sealed, aad, 0)
        if self._verifier is not None:
            self._verifier.update(memoryview(self._buf)[start:end])
        self._pos = end
        self._state = self._after_body()
        return plaintext

    def _read_footer(self) -> bool:
        assert self._verifier is not None
        c = self._view()
        try:
            signature = c.take(c.u16())
        except NeedMoreData:
            self._short("the signature footer")
            return False
        self._verifier.verify(signature)
        self._pos = c.pos
        self._state = _State.TRAILER
        return True

    def _after_body(self) -> _State:
        return _State.FOOTER if self._verifier is not None else _State.TRAILER
