"""The sans-I/O message reader.

Push bytes in with :meth:`MessageDecryptor.receive_data` (and
:meth:`~MessageDecryptor.receive_eof` at the end), pull results out:

1. :meth:`read_header` returns the parsed header once it is complete;
2. the caller obtains the data key (I/O: keyrings, KMS) and calls :meth:`begin_body`,
   which checks the key commitment and the header tag;
3. :meth:`next_plaintext` hands out one frame's plaintext at a time, each only after its
   tag verified. For signing suites the final frame is held until the signature
   verified, so a truncated or forged message never yields its last plaintext;
4. :meth:`read_all` is the one-shot path: everything verified, or nothing
   (:meth:`read_all_in_steps` does it a step at a time, for large messages).

Every error is one of :mod:`aioenvelope.errors`; nothing here blocks or awaits.

Hostile input costs CPU linear in the bytes received and memory bounded by them: the
header is parsed once however it is cut (:class:`~.header.HeaderReader`), queued bytes
are counted rather than summed, and a body's plaintext buffer grows with the ciphertext
that arrived, never reserved for the length a prefix declares (frames above 2^31-1 bytes
are refused with the header). Allocation failure is :class:`MessageLimitError`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import mmap
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    Cipher,
    algorithms,
    modes,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import (
    AuthenticationError,
    ConfigurationError,
    MalformedMessageError,
    MessageLimitError,
    TruncatedMessageError,
)
from ._cursor import Cursor, NeedMoreData
from .body import (
    AAD_TAIL_STRUCT,
    FINAL_FRAME_AAD,
    FRAME_AAD,
    IV_STRUCT,
    LARGE_FRAME,
    MAX_FRAMES,
    MAX_NON_FRAMED_LENGTH,
    SEQUENCE_NUMBER_END,
    SINGLE_BLOCK_AAD,
    Buffer,
    FramePool,
    anonymous_buffer,
    body_aad,
    frame_iv,
    unshared_bytes,
)
from .encryption_context import serialize_encryption_context
from .header import (
    ContentType,
    HeaderReader,
    MessageHeader,
    ParsedHeader,
    parse_header,
    read_plain_v2,
)
from .header_auth import authenticated_key, check_header
from .signing import Verifier
from .suites import AlgorithmSuite

__all__ = [
    "END_OF_MESSAGE",
    "EndOfMessage",
    "MessageDecryptor",
    "OneFrameMessage",
    "WholePlaintext",
    "read_one_frame_message",
]

_TAG = 16
# AESGCM's one-shot calls take at most 2^31-1 bytes; a longer body is opened piece by
# piece, each piece at most _PIECE_MAX.
_ONE_SHOT_MAX = 2**31 - 1
_PIECE_MAX = 1 << 30
_U32 = struct.Struct(">I")
_REGULAR_PREFIX = struct.Struct(">I12s")
_FINAL_PREFIX = struct.Struct(">II12sI")
_ZERO_IV = b"\x00" * 12
_FIRST_IV = frame_iv(1)
_FIRST_FINAL_AAD_TAIL = FINAL_FRAME_AAD + AAD_TAIL_STRUCT.pack(1, 0)[:4]  # ... + seq 1
_U64 = struct.Struct(">Q")
# The one suite the one-frame path reads: the default, key-committing and unsigned.
_ONE_FRAME_SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY


class _State(enum.Enum):
    HEADER = "header"
    AWAIT_KEY = "await key"
    BODY = "body"
    FOOTER = "footer"
    TRAILER = "trailer"
    DONE = "done"


class EndOfMessage:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = EndOfMessage()


def _what(seq: int) -> str:
    """How errors name a frame; ``seq`` 0 is a non-framed body."""
    return "the non-framed content" if seq == 0 else f"frame {seq}"


def _forged(seq: int) -> AuthenticationError:
    """A frame's (or, for ``seq`` 0, a non-framed body's) tag did not verify."""
    what = "the message body" if seq == 0 else f"frame {seq}"
    return AuthenticationError(
        f"{what} failed authentication: the message was changed or corrupted after it was written"
    )


@dataclasses.dataclass(slots=True)
class _Opening:
    """A large frame (or non-framed body) being opened piece by piece: its AES-GCM
    context and plaintext. ``plaintext`` grows as the ciphertext arrives (see
    :meth:`MessageDecryptor._room`), up to ``length``."""

    seq: int  # 0: a non-framed body
    final: bool
    length: int
    context: AEADDecryptionContext
    plaintext: mmap.mmap
    done: int = 0


class MessageDecryptor:
    """Reads one message. Not reusable: make one per message."""

    def __init__(self, *, max_encrypted_data_keys: int) -> None:
        self._buf: bytes | bytearray | memoryview = b""
        # Chunks received but not yet needed. Only a frame that straddles chunks is copied
        # (see _ensure); the rest of each chunk is read in place.
        self._queue: collections.deque[bytes | memoryview] = collections.deque()
        self._queued = 0  # bytes in _queue: counted, never summed (input may be 1-byte chunks)
        self._pos = 0
        self._eof = False
        self._state = _State.HEADER
        self._max_edks = max_encrypted_data_keys
        self._header: HeaderReader | None = None  # made when the header comes in pieces
        self._parsed: ParsedHeader | None = None
        self._aead: AESGCM | None = None
        self._verifier: Verifier | None = None
        self._sequence = 1
        self._held: Buffer | None = None  # final plaintext waiting for the signature
        self._pool = FramePool()
        self._key = b""  # the derived message key, for opening large frames piece by piece
        # A large frame that straddles chunks is opened piece by piece as they arrive
        # (see _continue_opening), never joined: no step does more than its piece's AES.
        self._opening: _Opening | None = None
        # For the fast path of next_plaintext: the length of a regular frame that is
        # opened in one call (0: none is), and its AAD up to the sequence number.
        self._regular = 0
        self._aad_head = b""

    @property
    def frames(self) -> int:
        """Frames opened and verified so far (0 for a non-framed body)."""
        return self._sequence - 1

    @property
    def complete(self) -> bool:
        """Whether the whole message verified: the last plaintext is handed out (or was
        empty) and :meth:`next_plaintext` has only :data:`END_OF_MESSAGE` left."""
        return self._state is _State.DONE

    # -- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise ConfigurationError("receive_data() after receive_eof()")
        if not data:
            return
        if self._state is _State.DONE:
            raise MalformedMessageError("unexpected bytes after the end of the message")
        if not (
            isinstance(data, bytes)
            or (
                isinstance(data, memoryview)
                and isinstance(data.obj, bytes)
                and data.format == "B"
                and data.ndim == 1
                and data.contiguous
            )
        ):
            # The caller may reuse its buffer: keep our own copy (flat, whatever the
            # view's shape or format).
            data = data.tobytes() if isinstance(data, memoryview) else bytes(data)
        if self._pos == len(self._buf) and not self._queue:
            self._buf, self._pos = data, 0  # zero-copy: whole frames open in place
        else:
            self._queue.append(data)
            self._queued += len(data)

    @property
    def buffered_bytes(self) -> int:
        """Input received but not yet consumed (at most about one frame plus a chunk)."""
        return len(self._buf) - self._pos + self._queued

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
        reader = self._header
        if reader is None and self._eof and not self._queue:
            # The whole input in one buffer (the one-shot path): parsed in place, without
            # the bookkeeping of a reader that waits for more.
            try:
                parsed = parse_header(
                    self._buf, max_encrypted_data_keys=self._max_edks, start=self._pos
                )
            except NeedMoreData:
                raise self._truncated("the message header") from None
            self._pos += parsed.length
        else:
            if reader is None:
                reader = self._header = HeaderReader(max_encrypted_data_keys=self._max_edks)
            while reader.parsed is None:
                # Each call costs what arrived since the last, not the header so far: the
                # reader goes on where it stopped, and is not woken before its next field
                # can be read.
                if self.buffered_bytes < reader.missing:
                    self._short("the message header")
                    return None
                if self._pos == len(self._buf):
                    self._buf, self._pos = self._popleft(), 0
                self._pos += reader.feed(self._buf, self._pos)
            parsed = reader.parsed
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
        self._key, aead, _ = authenticated_key(parsed, data_key, required_encryption_context)
        if verifier is not None:
            verifier.update(parsed.body_bytes)
            verifier.update(parsed.auth_iv if header.version == 1 else b"")
            verifier.update(parsed.auth_tag)
        self._aead, self._verifier = aead, verifier
        self._state = _State.BODY
        if header.content_type is ContentType.FRAMED and header.frame_length < LARGE_FRAME:
            self._regular = header.frame_length
            self._aad_head = header.message_id + FRAME_AAD

    # -- body ------------------------------------------------------------------------

    def next_plaintext(self) -> Buffer | EndOfMessage | None:
        """Verified plaintext of the next frame (for frames of 256 KiB or more, a pooled
        buffer that may go back through :meth:`recycle` once copied out); ``None``
        while more input is needed; :data:`END_OF_MESSAGE` once the message is complete.

        The last frame's plaintext is held until the signature verified (signing suites)
        and the input ended with no bytes after the message, so a forged, truncated or
        extended message never releases it.
        """
        f = self._regular
        if f and self._state is _State.BODY:
            # Fast path: a regular frame wholly received, with the right sequence number
            # and IV. Anything else (a final frame, a short or wrong one) takes the full
            # path below, which reports it.
            buf, start, seq = self._buf, self._pos, self._sequence
            end = start + f + 32
            if len(buf) >= end and seq < MAX_FRAMES:
                found, iv = _REGULAR_PREFIX.unpack_from(buf, start)
                if found == seq and iv == IV_STRUCT.pack(seq):
                    assert self._aead is not None
                    # No ``with``: its enter and exit cost more than the rest of this
                    # path; the view goes when this call returns.
                    view = memoryview(buf)
                    try:
                        plaintext = self._aead.decrypt(
                            iv,
                            view[start + 16 : end],
                            self._aad_head + AAD_TAIL_STRUCT.pack(seq, f),
                        )
                    except InvalidTag:
                        raise _forged(seq) from None
                    if self._verifier is not None:
                        self._verifier.update(view[start:end])
                    self._pos = end
                    self._sequence = seq + 1
                    return plaintext
        while True:
            state = self._state
            if state is _State.BODY:
                assert self._parsed is not None
                result: Buffer | None
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
                if self.buffered_bytes:
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

    def recycle(self, plaintext: Buffer) -> None:
        """Hand back a large frame's plaintext buffer once its contents were
        copied out: the next large frame is opened into it (see :class:`FramePool`)."""
        self._pool.give(plaintext)

    def read_all(self) -> bytes:
        """One shot: the whole verified plaintext, or an error and nothing."""
        if not self._eof:
            raise ConfigurationError("read_all() needs receive_eof() first")
        chunks: list[Buffer] = []
        while True:
            item = self.next_plaintext()
            if item is END_OF_MESSAGE:
                return b"".join(chunks)
            assert isinstance(item, (bytes, bytearray, mmap.mmap))  # EOF was given
            chunks.append(item)

    def read_all_in_steps(self) -> WholePlaintext:
        """:meth:`read_all` a step at a time, into the ``bytes`` it returns (see
        :class:`WholePlaintext`). For a framed message with frames under 256 KiB whose
        whole input came in one buffer, after :meth:`begin_body`."""
        if not (self._eof and not self._queue and self._regular and self._state is _State.BODY):
            raise ConfigurationError(
                "read_all_in_steps() needs the whole input in one buffer, begin_body() "
                "first, and frames under 256 KiB"
            )
        return WholePlaintext(self, len(self._buf) - self._pos)

    def _open_regular_into(self, out: memoryview, pos: int, budget: int) -> int:
        """Open regular frames wholly received into ``out`` from ``pos`` until about
        ``budget`` bytes were written; returns where the plaintext ends. Stops early at
        anything else (the final frame, a wrong prefix): the full path handles those.
        ``out`` is never handed out before the whole message verified."""
        f, aead = self._regular, self._aead
        assert aead is not None
        buf, start, seq = self._buf, self._pos, self._sequence
        decrypt_into, verifier = aead.decrypt_into, self._verifier
        aad_head, aad_tail = self._aad_head, AAD_TAIL_STRUCT.pack
        iv_of, prefix_of = IV_STRUCT.pack, _REGULAR_PREFIX.unpack_from
        last = len(buf) - f - 32  # where the last frame wholly received may start
        stop = pos + max(budget, 1)
        with memoryview(buf) as view:
            while pos < stop and start <= last and seq < MAX_FRAMES:
                found, iv = prefix_of(buf, start)
                if found != seq or iv != iv_of(seq):
                    break
                end = start + f + 32
                try:
                    decrypt_into(
                        iv, view[start + 16 : end], aad_head + aad_tail(seq, f), out[pos : pos + f]
                    )
                except InvalidTag:
                    raise _forged(seq) from None
                if verifier is not None:
                    verifier.update(view[start:end])
                start, pos, seq = end, pos + f, seq + 1
                self._pos, self._sequence = start, seq
        return pos

    # -- internals -------------------------------------------------------------------

    def _short(self, what: str) -> None:
        """Out of input: at EOF that is a truncation; otherwise the caller waits."""
        if self._eof:
            raise self._truncated(what)

    @staticmethod
    def _truncated(what: str) -> TruncatedMessageError:
        return TruncatedMessageError(
            f"the message is truncated: it ends inside {what}. Check that the whole "
            "ciphertext was stored and read back"
        )

    def _popleft(self) -> bytes | memoryview:
        chunk = self._queue.popleft()
        self._queued -= len(chunk)
        return chunk

    def _ensure(self, n: int) -> bool:
        """Make ``n`` bytes available from ``_pos`` if enough were received.

        Nothing is copied until all ``n`` bytes are here; then a leftover shorter than
        ``n`` is joined once with just the bytes it lacks. So each byte is copied at most
        once, and only small frames that straddle chunks are copied at all (large ones
        are opened piece by piece instead). Callers re-read ``_buf`` and ``_pos``.
        """
        available = len(self._buf) - self._pos
        if available >= n:
            return True
        queue = self._queue
        if available + self._queued < n:
            return False
        if available == 0:
            self._buf, self._pos = self._popleft(), 0
            return self._ensure(n)
        parts: list[bytes | memoryview] = [memoryview(self._buf)[self._pos :]]
        missing = n - available
        while missing > 0:
            chunk = queue[0]
            if len(chunk) <= missing:
                parts.append(self._popleft())
                missing -= len(chunk)
            else:
                view = memoryview(chunk)
                parts.append(view[:missing])
                queue[0] = view[missing:]
                self._queued -= missing
                missing = 0
        self._buf, self._pos = b"".join(parts), 0
        return True

    def _take_received(self, limit: int) -> memoryview | None:
        """Up to ``limit`` received bytes, in place (no copy), consumed; None if none."""
        if self._pos == len(self._buf):
            if not self._queue:
                return None
            self._buf, self._pos = self._popleft(), 0
        piece = memoryview(self._buf)[self._pos : self._pos + limit]
        self._pos += len(piece)
        return piece

    def _start_opening(self, seq: int, final: bool, iv: bytes, length: int, prefix: int) -> None:
        """Consume a large frame's prefix (``seq`` 0: a non-framed body's) and set up its
        piece-by-piece opening.

        The plaintext buffer is reserved for what has arrived, not for the length the
        prefix declares, and grows with the ciphertext (:meth:`_room`): a hostile
        prefix alone reserves at most ``LARGE_FRAME`` bytes.
        """
        assert self._parsed is not None
        if self._verifier is not None:
            self._verifier.update(memoryview(self._buf)[self._pos : self._pos + prefix])
        self._pos += prefix
        context = Cipher(algorithms.AES(self._key), modes.GCM(iv)).decryptor()
        if seq == 0:
            aad = body_aad(self._parsed.header.message_id, SINGLE_BLOCK_AAD, 1, length)
        else:
            content = FINAL_FRAME_AAD if final else FRAME_AAD
            aad = body_aad(self._parsed.header.message_id, content, seq, length)
        context.authenticate_additional_data(aad)
        plaintext = self._pool.reuse(length)  # reserved earlier, when a frame arrived
        if plaintext is None:
            plaintext = self._reserve(min(length, max(LARGE_FRAME, self.buffered_bytes)), seq)
        self._opening = _Opening(seq, final, length, context, plaintext)

    def _reserve(self, size: int, seq: int) -> mmap.mmap:
        """``size`` bytes for plaintext; failing that (a memory limit such as
        RLIMIT_AS), :class:`MessageLimitError`, not a bare ``OSError``."""
        try:
            return anonymous_buffer(size)
        except (OSError, MemoryError):
            raise MessageLimitError(
                f"{_what(seq)} needs {size} bytes of memory for its plaintext, more than "
                "this process may allocate: decrypt it where more memory is available, "
                "or check where the message came from"
            ) from None

    def _room(self, opening: _Opening, end: int) -> None:
        """Grow ``opening.plaintext`` to hold ``end`` bytes: at least doubling (so the
        cost stays linear), never past the body's length."""
        old = opening.plaintext
        size = min(opening.length, max(end, 2 * len(old)))
        try:
            old.resize(size)  # Linux moves the private mapping (mremap): nothing is copied
        except (OSError, SystemError, ValueError):
            # No room (a memory limit), or no mremap (macOS: SystemError; CPython refuses
            # to grow some mappings with ValueError, see python/cpython#138204): copy.
            bigger = self._reserve(size, opening.seq)
            with memoryview(old) as kept:
                bigger[: opening.done] = kept[: opening.done]
            old.close()
            opening.plaintext = bigger

    def _continue_opening(self) -> Buffer | None:
        """Open what has arrived of the frame in progress; its plaintext once the tag
        verified, None while more is needed (nothing of it is handed out before)."""
        opening = self._opening
        assert opening is not None
        verifier = self._verifier
        while opening.done < opening.length:
            piece = self._take_received(min(opening.length - opening.done, _PIECE_MAX))
            if piece is None:
                self._short(_what(opening.seq))
                return None
            end = opening.done + len(piece)
            if end > len(opening.plaintext):
                self._room(opening, end)
            with memoryview(opening.plaintext) as out:
                opening.context.update_into(piece, out[opening.done : end])
            if verifier is not None:
                verifier.update(piece)
            opening.done = end
        if not self._ensure(_TAG):
            self._short(_what(opening.seq))
            return None
        tag = bytes(self._buf[self._pos : self._pos + _TAG])
        self._pos += _TAG
        if verifier is not None:
            verifier.update(tag)
        self._opening = None
        try:
            opening.context.finalize_with_tag(tag)
        except InvalidTag:
            self._pool.give(opening.plaintext)
            raise _forged(opening.seq) from None
        self._sequence = opening.seq + 1
        if opening.final:
            self._state = self._after_body()
        return opening.plaintext

    def _view(self) -> Cursor:
        return Cursor(self._buf, self._pos)

    def _open_large(self, iv: bytes, sealed: memoryview, aad: bytes, seq: int) -> mmap.mmap:
        """As :meth:`_open`, into a pooled buffer (see
        ``MessageEncryptor._seal_large``). It is handed out only if the tag verified."""
        assert self._aead is not None
        plaintext = self._pool.reuse(len(sealed) - _TAG)
        if plaintext is None:
            plaintext = self._reserve(len(sealed) - _TAG, seq)
        try:
            self._aead.decrypt_into(iv, sealed, aad, memoryview(plaintext))
        except InvalidTag:
            self._pool.give(plaintext)
            raise _forged(seq) from None
        return plaintext

    def _open(self, iv: bytes, sealed: memoryview, aad: bytes, seq: int) -> bytes:
        assert self._aead is not None
        try:
            return self._aead.decrypt(iv, sealed, aad)
        except InvalidTag:
            raise _forged(seq) from None

    def _read_frame(self) -> Buffer | None:
        """One frame, verified. Lean on purpose: a 256 MiB stream has 4096 of them."""
        assert self._parsed is not None
        if self._opening is not None:
            return self._continue_opening()
        header = self._parsed.header
        seq = self._sequence
        if not self._ensure(4):
            self._short(f"frame {seq}")
            return None
        final = _U32.unpack_from(self._buf, self._pos)[0] == SEQUENCE_NUMBER_END
        prefix = 24 if final else 16
        if not self._ensure(prefix):
            self._short(f"frame {seq}")
            return None
        buf, start = self._buf, self._pos
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
        if length >= LARGE_FRAME and (
            len(self._buf) - self._pos < prefix + length + _TAG or length > _ONE_SHOT_MAX - _TAG
        ):
            # Large and not all here in one piece: open it as it arrives, never joined.
            self._start_opening(seq, final, iv, length, prefix)
            return self._continue_opening()
        if not self._ensure(prefix + length + _TAG):
            self._short(f"frame {seq}")
            return None
        buf, start = self._buf, self._pos
        body = start + prefix
        end = body + length + _TAG
        view = memoryview(buf)
        aad = body_aad(header.message_id, FINAL_FRAME_AAD if final else FRAME_AAD, seq, length)
        if length >= LARGE_FRAME:
            plaintext: Buffer = self._open_large(iv, view[body:end], aad, seq)
        else:
            plaintext = self._open(iv, view[body:end], aad, seq)
        if self._verifier is not None:
            self._verifier.update(view[start:end])
        del view
        self._pos = end
        self._sequence = seq + 1
        if final:
            self._state = self._after_body()
        return plaintext

    def _read_non_framed(self) -> Buffer | None:
        assert self._parsed is not None
        if self._opening is not None:
            return self._continue_opening()
        header = self._parsed.header
        if not self._ensure(20):
            self._short("the non-framed content")
            return None
        c = self._view()
        iv = c.take(12)
        length = c.u64()
        if length > MAX_NON_FRAMED_LENGTH:
            raise MalformedMessageError(
                f"non-framed content of {length} bytes is longer than the format allows "
                f"({MAX_NON_FRAMED_LENGTH})"
            )
        if length >= LARGE_FRAME and (
            len(self._buf) - self._pos < 20 + length + _TAG or length > _ONE_SHOT_MAX - _TAG
        ):
            # As a large frame: opened as it arrives, into memory that grows with it.
            self._start_opening(0, True, iv, length, 20)
            return self._continue_opening()
        if not self._ensure(20 + length + _TAG):
            self._short("the non-framed content")
            return None
        start = self._pos
        end = start + 20 + length + _TAG
        view = memoryview(self._buf)
        aad = body_aad(header.message_id, SINGLE_BLOCK_AAD, 1, length)
        plaintext: Buffer
        if length >= LARGE_FRAME:
            plaintext = self._open_large(iv, view[start + 20 : end], aad, 0)
        else:
            plaintext = self._open(iv, view[start + 20 : end], aad, 0)
        if self._verifier is not None:
            self._verifier.update(view[start:end])
        del view
        self._pos = end
        self._state = self._after_body()
        return plaintext

    def _read_footer(self) -> bool:
        assert self._verifier is not None
        if not self._ensure(2):
            self._short("the signature footer")
            return False
        size = int.from_bytes(self._buf[self._pos : self._pos + 2], "big")
        if not self._ensure(2 + size):
            self._short("the signature footer")
            return False
        start = self._pos + 2
        signature = bytes(self._buf[start : start + size])
        self._verifier.verify(signature)
        self._pos = start + size
        self._state = _State.TRAILER
        return True

    def _after_body(self) -> _State:
        return _State.FOOTER if self._verifier is not None else _State.TRAILER


class WholePlaintext:
    """One message's plaintext opened straight into the ``bytes`` it is returned as, a
    step at a time.

    Why: the client opens a large message in pieces that each fit its loop budget (or
    go to a worker thread), as a stream would, but without a stream's per-frame
    ``bytes`` and the join of them all at the end. The buffer is sized by the ciphertext
    that arrived (no frame's plaintext is longer than it on the wire), and handed out
    only once the whole message verified: the final frame, the signature and the end of
    the input (see :func:`~.body.unshared_bytes`).
    """

    __slots__ = ("_decryptor", "_out", "_pos", "_verified", "_view")

    def __init__(self, decryptor: MessageDecryptor, capacity: int) -> None:
        self._decryptor = decryptor
        self._out = unshared_bytes(capacity)
        self._view = self._out.getbuffer()
        self._pos = 0
        self._verified = False

    def advance(self, budget: int) -> bool:
        """Open about ``budget`` more bytes (at least one frame); True once the whole
        message verified."""
        decryptor, view = self._decryptor, self._view
        start = self._pos
        pos = decryptor._open_regular_into(view, start, budget)
        while pos - start < budget:  # the final frame, footer and end, or their error
            item = decryptor.next_plaintext()
            if isinstance(item, EndOfMessage):
                self._verified = True
                break
            assert item is not None  # the whole input is here: never waits
            with memoryview(item) as plaintext:
                view[pos : pos + len(plaintext)] = plaintext
            pos += len(item)
        self._pos = pos
        return self._verified

    def plaintext(self) -> bytes:
        """The whole plaintext, once :meth:`advance` returned True. The buffer is handed
        over, not copied: no view of it is left."""
        if not self._verified:
            raise ConfigurationError("plaintext() before advance() verified the message")
        self._view.release()
        out = self._out
        out.truncate(self._pos)
        plaintext = out.getvalue()
        out.close()
        return plaintext


class OneFrameMessage:
    """A whole message of the commonest small shape, read straight from its buffer: a
    v2 header of the default suite (0x0478: key-committing, unsigned), then one final
    frame (sequence number 1) that ends exactly where the input ends.

    Why: for a 1 KiB message the state machine's bookkeeping (input queue, states,
    per-frame checks, the header's copies) cost about as much as the cryptography.
    Here the header and the frame are offsets into the caller's ``bytes``; the header
    tag is checked over a view of it.

    :func:`read_one_frame_message` makes one only for input the general reader would
    read the same way; for anything else (another suite, v1, more frames, a non-framed
    body, truncation, bytes after the message) it returns None and the caller runs
    :class:`MessageDecryptor`, which reports what is wrong exactly as always. So every
    failure here is one the general reader has too, with the same type and message:
    the commitment, the header tag, the frame tag.
    """

    __slots__ = ("_body_end", "_buf", "_frame", "_header_end", "edks_end", "edks_start", "header")

    def __init__(
        self,
        buf: bytes,
        header: MessageHeader,
        edks_start: int,
        body_end: int,
        header_end: int,
    ) -> None:
        self._buf = buf
        self.header = header
        #: Where the header's encrypted data keys are (their serialization, in place):
        #: the decrypt cache key's input, with no re-serialization.
        self.edks_start = edks_start
        # Then come the content type (1), the frame length (4) and the suite data.
        self.edks_end = body_end - 5 - len(header.suite_data)
        self._body_end = body_end
        self._header_end = header_end

    @property
    def serialized_edks(self) -> bytes:
        """The header's encrypted data keys as :meth:`EncryptedDataKey.serialize` makes
        them, one after another, in the header's order."""
        return self._buf[self.edks_start : self.edks_end]

    @property
    def edks(self) -> tuple[bytes, int, int]:
        """Where :attr:`serialized_edks` are, for a reader that slices them only if it
        needs them (the decrypt cache key): the buffer, start and end."""
        return self._buf, self.edks_start, self.edks_end

    def open(self, data_key: bytes | bytearray, required: Mapping[str, str]) -> bytes:
        """The plaintext, once the key commitment, the header tag (with the serialized
        ``required`` pairs appended, as :meth:`MessageDecryptor.begin_body` does) and
        then the frame's tag verified; :class:`AuthenticationError` otherwise."""
        buf, body_end, header_end = self._buf, self._body_end, self._header_end
        header = self.header
        view = memoryview(buf)
        if required:
            authenticated: bytes | memoryview = buf[:body_end] + serialize_encryption_context(
                required
            )
        else:
            authenticated = view[:body_end]
        _, aead = check_header(header, data_key, authenticated, _ZERO_IV, view[body_end:header_end])
        length = len(buf) - header_end - 40  # final frame prefix (24) and tag (16)
        try:
            return aead.decrypt(
                _FIRST_IV,
                view[header_end + 24 :],
                header.message_id + _FIRST_FINAL_AAD_TAIL + _U64.pack(length),
            )
        except InvalidTag:
            raise _forged(1) from None


def read_one_frame_message(buf: bytes, *, max_encrypted_data_keys: int) -> OneFrameMessage | None:
    """``buf`` as a :class:`OneFrameMessage` if it is one, well-formed; None otherwise
    (the caller then reads it with :class:`MessageDecryptor`). Reads each byte of the
    header at most once and nothing of the frame but its 24-byte prefix."""
    read = read_plain_v2(buf, 0, max_encrypted_data_keys)
    if read is None:
        return None
    header, edks_start, body_end, header_end = read
    if header.algorithm_suite is not _ONE_FRAME_SUITE or header.content_type is not (
        ContentType.FRAMED
    ):
        return None
    if len(buf) - header_end < 40:
        return None
    marker, seq, iv, length = _FINAL_PREFIX.unpack_from(buf, header_end)
    if (
        marker != SEQUENCE_NUMBER_END
        or seq != 1
        or iv != _FIRST_IV
        or length > header.frame_length
        or header_end + 40 + length != len(buf)
    ):
        return None
    return OneFrameMessage(buf, header, edks_start, body_end, header_end)
