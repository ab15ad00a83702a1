"""The sans-I/O message writer.

Feed it plaintext, take bytes out: ``header`` first, then whatever ``update`` returns,
then ``finalize()``. ``encrypt_all`` is the one-shot fast path and produces the same
bytes for the same inputs. No I/O, no clock: the caller supplies the message ID, the
data key and the EDKs, which is also the seam that makes output reproducible in tests.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.ciphers import (
    AEADEncryptionContext,
    Cipher,
    algorithms,
    modes,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigurationError
from . import nonce_log
from .body import (
    AAD_TAIL_STRUCT,
    FINAL_FRAME_AAD,
    FRAME_AAD,
    IV_STRUCT,
    LARGE_FRAME,
    MAX_FRAMES,
    SEQUENCE_NUMBER_END,
    Buffer,
    FramePool,
    anonymous_buffer,
    body_aad,
    frame_iv,
)
from .derivation import derive_keys
from .encryption_context import serialize_encryption_context
from .header import (
    MAX_FRAME_LENGTH,
    ContentType,
    EncryptedDataKey,
    MessageHeader,
    serialize_header_auth,
    serialize_header_body,
)
from .signing import Signer
from .suites import AlgorithmSuite

__all__ = ["MessageEncryptor"]

_TAG = 16
_REGULAR_OVERHEAD = 4 + 12 + _TAG
_FINAL_OVERHEAD = 4 + 4 + 12 + 4 + _TAG
_MAX_SIGNATURE = 2 + 2 + 2 * 72  # footer length field plus the longest P-384 DER
_FINAL_PREFIX = struct.Struct(">II12sI")
_REGULAR_PREFIX = struct.Struct(">I12s")
_HEADER_IV = bytes(12)


class MessageEncryptor:
    """Writes one message. Not reusable: make one per message."""

    def __init__(
        self,
        *,
        algorithm_suite: AlgorithmSuite,
        data_key: bytes | bytearray,
        message_id: bytes,
        encrypted_data_keys: Sequence[EncryptedDataKey],
        encryption_context: Mapping[str, str],
        required_encryption_context: Mapping[str, str] | None = None,
        frame_length: int,
        signer: Signer | None = None,
        serialized_encryption_context: bytes | None = None,
    ) -> None:
        """``serialized_encryption_context``, when given, must be the serialization of
        ``encryption_context`` (it saves serializing it again per message)."""
        if not 1 <= frame_length <= MAX_FRAME_LENGTH:
            raise ConfigurationError(
                f"frame_length must be between 1 and {MAX_FRAME_LENGTH}; got {frame_length}"
            )
        if algorithm_suite.signing != (signer is not None):
            raise ConfigurationError("a signer must be given exactly for signing suites")
        version = algorithm_suite.message_version
        if len(message_id) != (32 if version == 2 else 16):
            raise ConfigurationError("message_id has the wrong length for the suite's version")
        if not encrypted_data_keys:
            raise ConfigurationError("a message needs at least one encrypted data key")
        key, commitment = derive_keys(algorithm_suite, bytes(data_key), message_id)
        self.header_value = MessageHeader(
            version=version,
            algorithm_suite=algorithm_suite,
            message_id=message_id,
            encryption_context=encryption_context,
            encrypted_data_keys=tuple(encrypted_data_keys),
            content_type=ContentType.FRAMED,
            frame_length=frame_length,
            suite_data=commitment,
        )
        self._aead = AESGCM(key)
        self._key = key  # for large frames sealed piece by piece, and nonce_log
        body = serialize_header_body(self.header_value, serialized_encryption_context)
        required = serialize_encryption_context(required_encryption_context or {})
        # The header's IV is fixed (all zero in v2): this is the one seal under this
        # message's key with it, as the key is new with each message ID.
        nonce_log.sealing(key, _HEADER_IV)
        tag = self._aead.encrypt(_HEADER_IV, b"", body + required)
        self.header = body + serialize_header_auth(version, tag)
        # Known only once serialized; set before the header is handed to anyone (as
        # MessageHeader.__post_init__ sets its own field). dataclasses.replace would
        # build a second header, ~4 us per message on the small-message path.
        object.__setattr__(self.header_value, "header_length", len(self.header))
        self._message_id = message_id
        self._frame_length = frame_length
        self._signer = signer
        if signer is not None:
            signer.update(self.header)
        self._pending = bytearray()
        # Large frames gather their plaintext in reused buffers instead (see
        # _update_large): a growing bytearray reallocates and page-faults on every piece.
        self._fill: mmap.mmap | None = None
        self._filled = 0
        self._spare: mmap.mmap | None = None  # the other plaintext buffer, once free
        # A full large frame known to be regular, sealed a piece at a time while the
        # next one fills (see _update_large).
        self._sealing: _LargeSeal | None = None
        self._sequence = 1
        self._finalized = False
        self._pool = FramePool()

    # -- streaming -----------------------------------------------------------------

    @property
    def frames(self) -> int:
        """Frames sealed so far (the final frame included once finalized)."""
        return self._sequence - 1

    @property
    def pending_bytes(self) -> int:
        """Plaintext taken but not yet sealed (at most ``frame_length``): what the next
        frame, or :meth:`finalize_frames`, has left to seal."""
        if self._fill is None and self._sealing is None:
            return len(self._pending)
        sealing = self._sealing
        return self._filled + (sealing.remaining if sealing is not None else 0)

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take plaintext; return the frames it completed (possibly b"")."""
        return b"".join(self.update_frames(data))

    def finalize(self) -> bytes:
        """Return the final frame and, for signing suites, the footer."""
        return b"".join(self.finalize_frames())

    def update_frames(self, data: bytes | bytearray | memoryview) -> list[Buffer]:
        """Take plaintext; return each frame it completed, one ``bytes`` per frame (a
        frame of 256 KiB or more as two: its prefix, then its sealed body in a pooled
        buffer, which saves allocating and copying the body under the GIL; hand it to
        :meth:`recycle` once copied out).

        The last ``frame_length`` bytes are always held back, because the final frame
        must carry the message's last 1..frame_length bytes. Whole frames are sealed
        straight from ``data`` (no copy); only a partial frame is copied and held.
        """
        if self._finalized:
            raise ConfigurationError("update() after finalize()")
        src = memoryview(data).cast("B")
        f = self._frame_length
        if f >= LARGE_FRAME:
            return self._update_large(src)
        pending = self._pending
        sources: list[bytes | bytearray | memoryview] = []
        if pending:
            take = min(f - len(pending), len(src))
            pending += src[:take]
            src = src[take:]
            if not src:
                return []  # pending holds at most one frame: it may be the final one
            sources.append(pending)  # full, and more follows: a regular frame
            self._pending = bytearray()
        count = (len(src) - 1) // f if src else 0
        sources.extend(src[i * f : (i + 1) * f] for i in range(count))
        if src:
            self._pending = bytearray(src[count * f :])
        if not sources:
            return []
        self._check_frame_budget(self._sequence + len(sources))
        frames: list[Buffer] = list(self._seal_regular_frames(sources))
        if self._signer is not None:
            for frame in frames:
                self._signer.update(frame)
        return frames

    def _update_large(self, src: memoryview) -> list[Buffer]:
        """:meth:`update_frames` for large frames, doing AES over about what each call
        was given (no call seals a whole large frame it only completed).

        Whole frames are sealed straight from ``src`` when more follows them in it. The
        rest is copied into a frame-sized buffer. A frame's kind (regular or final) is
        in its AAD, which GCM takes before any plaintext, and is known only once the
        frame is full and one more byte arrives; so a frame is never sealed before that
        (sealing on a guess and again when the guess fails would use its IV twice).
        Then it is sealed a piece at a time, as much per call as the next frame
        receives, into a pooled output buffer; the two plaintext buffers alternate.
        """
        f = self._frame_length
        frames: list[Buffer] = []
        while len(src):
            if self._filled == f:  # a full frame, and more follows: it is a regular one
                frames += self._seal_remaining()  # done by now (it kept pace); for order
                self._start_sealing()
            if self._filled == 0 and self._sealing is None and len(src) > f:
                frames += self._seal_large_frame(src[:f])
                src = src[f:]
                continue
            if self._fill is None:
                self._fill = self._spare or anonymous_buffer(f)
                self._spare = None
            take = min(f - self._filled, len(src))
            self._fill[self._filled : self._filled + take] = src[:take]
            src = src[take:]
            self._filled += take
            frames += self._seal_some(take)
        if self._signer is not None:
            for frame in frames:
                self._signer.update(frame)
        return frames

    def _start_sealing(self) -> None:
        """The full frame in the fill buffer is regular: begin sealing it, and fill the
        other buffer meanwhile."""
        assert self._fill is not None
        self._check_frame_budget(self._sequence + 1)
        seq = self._sequence
        self._sequence = seq + 1
        out = self._pool.take(self._frame_length + _TAG)
        self._sealing = _LargeSeal(self._key, seq, self._message_id, self._fill, out)
        self._fill, self._filled = self._spare, 0
        self._spare = None

    def _seal_some(self, n: int) -> list[Buffer]:
        """Seal up to ``n`` more bytes of the frame being sealed; the frame once done."""
        sealing = self._sealing
        if sealing is None or not sealing.advance(n):
            return []
        return self._sealed(sealing)

    def _seal_remaining(self) -> list[Buffer]:
        sealing = self._sealing
        if sealing is None:
            return []
        sealing.advance(sealing.remaining)
        return self._sealed(sealing)

    def _sealed(self, sealing: _LargeSeal) -> list[Buffer]:
        self._sealing = None
        self._spare = sealing.plaintext  # free for the frame after the filling one
        return [_REGULAR_PREFIX.pack(sealing.seq, frame_iv(sealing.seq)), sealing.out]

    def finalize_frames(self) -> list[Buffer]:
        """The final frame (in two parts from 256 KiB, as in :meth:`update_frames`) and,
        for signing suites, the footer, as separate ``bytes``."""
        if self._finalized:
            raise ConfigurationError("finalize() called twice")
        self._finalized = True
        earlier = self._seal_remaining()  # the last regular frame, if still being sealed
        self._check_frame_budget(self._sequence)
        if self._fill is not None:
            chunk: bytes | bytearray | memoryview = memoryview(self._fill)[: self._filled]
        else:
            chunk, self._pending = self._pending, bytearray()
        seq = self._sequence
        self._sequence = seq + 1
        iv = frame_iv(seq)
        aad = body_aad(self._message_id, FINAL_FRAME_AAD, seq, len(chunk))
        prefix = _FINAL_PREFIX.pack(SEQUENCE_NUMBER_END, seq, iv, len(chunk))
        parts: list[Buffer]
        if len(chunk) < LARGE_FRAME:
            nonce_log.sealing(self._key, iv)
            parts = [prefix + self._aead.encrypt(iv, chunk, aad)]
        else:
            parts = [prefix, self._seal_large(iv, chunk, aad)]
        self._fill, self._filled, self._spare = None, 0, None
        parts = [*earlier, *parts]
        if self._signer is None:
            return parts
        for part in parts:
            self._signer.update(part)
        signature = self._signer.finalize()
        return [*parts, len(signature).to_bytes(2, "big") + signature]

    # -- one shot ------------------------------------------------------------------

    def encrypt_all(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The whole message for ``plaintext``, sealed straight into one buffer."""
        if self._finalized or self._pending or self._sequence != 1:
            raise ConfigurationError("encrypt_all() needs a fresh encryptor")
        self._finalized = True
        src = memoryview(plaintext).cast("B")
        f, n = self._frame_length, len(src)
        regular = (n - 1) // f if n else 0
        self._check_frame_budget(regular + 1)
        final_len = n - regular * f
        header_len = len(self.header)
        size = header_len + regular * (f + _REGULAR_OVERHEAD) + _FINAL_OVERHEAD + final_len
        out = bytearray(size + (_MAX_SIGNATURE if self._signer else 0))
        view = memoryview(out)
        view[:header_len] = self.header
        pos = header_len
        for i in range(regular):
            pos = self._seal_regular(view, pos, src[i * f : (i + 1) * f])
        pos = self._seal_final(view, pos, src[regular * f :])
        view.release()
        return self._finish(out, header_len, pos)

    # -- internals -----------------------------------------------------------------

    def _check_frame_budget(self, frames: int) -> None:
        if frames > MAX_FRAMES:
            raise ConfigurationError(
                "the plaintext needs more than 2^32-1 frames; use a larger frame_length"
            )

    def _seal_regular_frames(self, chunks: list[bytes | bytearray | memoryview]) -> list[bytes]:
        """Each chunk as one regular frame, its own ``bytes``: ``encrypt`` allocates the
        ciphertext and the prefix join copies it while it is still in cache, which
        measured faster than sealing a batch into one buffer and copying that out. The
        loop is flat with its lookups hoisted: it runs once per frame of a stream."""
        seq = self._sequence
        encrypt = self._aead.encrypt
        aad_head = self._message_id + FRAME_AAD
        iv_of, aad_tail, prefix_of = IV_STRUCT.pack, AAD_TAIL_STRUCT.pack, _REGULAR_PREFIX.pack
        frames = []
        log, key = nonce_log.observers, self._key
        for chunk in chunks:
            iv = iv_of(seq)
            if log:
                nonce_log.sealing(key, iv)
            aad = aad_head + aad_tail(seq, len(chunk))
            frames.append(prefix_of(seq, iv) + encrypt(iv, chunk, aad))
            seq += 1
        self._sequence = seq
        return frames

    def _seal_large_frame(self, chunk: memoryview) -> list[Buffer]:
        self._check_frame_budget(self._sequence + 1)
        seq = self._sequence
        iv = frame_iv(seq)
        aad = body_aad(self._message_id, FRAME_AAD, seq, len(chunk))
        self._sequence = seq + 1
        return [_REGULAR_PREFIX.pack(seq, iv), self._seal_large(iv, chunk, aad)]

    def _seal_large(
        self, iv: bytes, chunk: bytes | bytearray | memoryview, aad: bytes
    ) -> mmap.mmap:
        """A large body sealed into a pooled buffer (see :func:`anonymous_buffer`):
        ``encrypt`` would allocate its output, zeroing and page-faulting it while holding
        the GIL. ``encrypt_into`` fills the buffer with the GIL released."""
        body = self._pool.take(len(chunk) + _TAG)
        nonce_log.sealing(self._key, iv)
        self._aead.encrypt_into(iv, chunk, aad, memoryview(body))
        return body

    def recycle(self, body: Buffer) -> None:
        """Hand back a large frame's sealed buffer once its contents were copied
        out: the next large frame is sealed into it (see :class:`FramePool`)."""
        self._pool.give(body)

    def _seal_regular(self, out: memoryview, pos: int, chunk: memoryview) -> int:
        seq = self._sequence
        iv = frame_iv(seq)
        out[pos : pos + 16] = _REGULAR_PREFIX.pack(seq, iv)
        pos += 16
        end = pos + len(chunk) + _TAG
        aad = body_aad(self._message_id, FRAME_AAD, seq, len(chunk))
        nonce_log.sealing(self._key, iv)
        self._aead.encrypt_into(iv, chunk, aad, out[pos:end])
        self._sequence = seq + 1
        return end

    def _seal_final(self, out: memoryview, pos: int, chunk: memoryview) -> int:
        seq = self._sequence
        iv = frame_iv(seq)
        out[pos : pos + 24] = _FINAL_PREFIX.pack(SEQUENCE_NUMBER_END, seq, iv, len(chunk))
        pos += 24
        end = pos + len(chunk) + _TAG
        aad = body_aad(self._message_id, FINAL_FRAME_AAD, seq, len(chunk))
        nonce_log.sealing(self._key, iv)
        self._aead.encrypt_into(iv, chunk, aad, out[pos:end])
        self._sequence = seq + 1
        return end

    def _finish(self, out: bytearray, unsigned_from: int, end: int) -> bytes:
        """Sign ``out[unsigned_from:end]``, append the footer, return the message bytes."""
        view = memoryview(out)
        try:
            if self._signer is not None:
                self._signer.update(view[unsigned_from:end])
                signature = self._signer.finalize()
                footer = len(signature).to_bytes(2, "big") + signature
                view[end : end + len(footer)] = footer
                end += len(footer)
            return bytes(view[:end])
        finally:
            view.release()


class _LargeSeal:
    """One large regular frame being sealed piece by piece with a ``Cipher`` context:
    its plaintext (kept until done), its output buffer, how far it has got."""

    __slots__ = ("_context", "done", "out", "plaintext", "seq")

    def __init__(
        self, key: bytes, seq: int, message_id: bytes, plaintext: mmap.mmap, out: mmap.mmap
    ) -> None:
        iv = frame_iv(seq)
        nonce_log.sealing(key, iv)
        context = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
        context.authenticate_additional_data(body_aad(message_id, FRAME_AAD, seq, len(plaintext)))
        self._context: AEADEncryptionContext = context
        self.seq, self.plaintext, self.out, self.done = seq, plaintext, out, 0

    @property
    def remaining(self) -> int:
        return len(self.plaintext) - self.done

    def advance(self, n: int) -> bool:
        """Seal up to ``n`` more bytes; True once the whole frame and its tag are in
        ``out`` (body then tag, as :meth:`MessageEncryptor._seal_large` lays them)."""
        end = min(self.done + n, len(self.plaintext))
        if end > self.done:
            self._context.update_into(
                memoryview(self.plaintext)[self.done : end],
                memoryview(self.out)[self.done : end],
            )
            self.done = end
        if self.done < len(self.plaintext):
            return False
        self._context.finalize()
        self.out[self.done :] = self._context.tag
        return True
