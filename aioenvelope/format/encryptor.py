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
        self._key = key  # for sealing large frames piece by piece (see _update_large)
        body = serialize_header_body(self.header_value, serialized_encryption_context)
        required = serialize_encryption_context(required_encryption_context or {})
        tag = self._aead.encrypt(b"\x00" * 12, b"", body + required)
        self.header = body + serialize_header_auth(version, tag)
        self._message_id = message_id
        self._frame_length = frame_length
        self._signer = signer
        if signer is not None:
            signer.update(self.header)
        self._pending = bytearray()
        # Large frames gather their plaintext in one reused buffer instead (see
        # _update_large): a growing bytearray reallocates and page-faults on every piece.
        self._fill: mmap.mmap | None = None
        self._filled = 0
        # The frame being filled, sealed as it fills on the guess that it is a regular
        # frame (its AAD must come first); a guess that EOF proves wrong is redone.
        self._guess: AEADEncryptionContext | None = None
        self._guess_out: mmap.mmap | None = None
        self._sequence = 1
        self._finalized = False
        self._pool = FramePool()

    # -- streaming -----------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Plaintext held back, waiting to become a frame (at most ``frame_length``)."""
        return self._filled if self._fill is not None else len(self._pending)

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
        """:meth:`update_frames` for large frames: whole frames are sealed straight from
        ``src``; the rest is copied into one frame-sized buffer, reused for every frame,
        and sealed as it arrives, so each call does AES over about what it was given
        (no call seals a whole large frame it only completed). A full frame is known to
        be regular only when more data follows; if the message ends instead, it is the
        final frame, whose AAD differs, and :meth:`finalize_frames` seals it again."""
        f = self._frame_length
        frames: list[Buffer] = []
        while len(src):
            if self._filled == f:  # a full frame, and more follows: it is a regular one
                frames += self._finish_guess()
                self._filled = 0
            if self._filled == 0 and len(src) > f:
                frames += self._seal_large_frame(src[:f])
                src = src[f:]
                continue
            if self._fill is None:
                self._fill = anonymous_buffer(f)
            take = min(f - self._filled, len(src))
            piece, src = src[:take], src[take:]
            self._fill[self._filled : self._filled + take] = piece
            self._guess_piece(piece)
            self._filled += take
        if self._signer is not None:
            for frame in frames:
                self._signer.update(frame)
        return frames

    def _guess_piece(self, piece: memoryview) -> None:
        """Seal ``piece`` as the next bytes of the current frame, guessed regular."""
        if self._guess is None:
            seq = self._sequence
            context = Cipher(algorithms.AES(self._key), modes.GCM(frame_iv(seq))).encryptor()
            context.authenticate_additional_data(
                body_aad(self._message_id, FRAME_AAD, seq, self._frame_length)
            )
            # Body and tag in one buffer, as _seal_large makes them: the two kinds of
            # frame then share the pool.
            self._guess = context
            self._guess_out = self._pool.take(self._frame_length + _TAG)
        assert self._guess_out is not None
        end = self._filled + len(piece)
        self._guess.update_into(piece, memoryview(self._guess_out)[self._filled : end])

    def _finish_guess(self) -> list[Buffer]:
        """The full frame sealed by guessing, now known to be regular: prefix, then
        body and tag in one buffer."""
        assert self._guess is not None
        assert self._guess_out is not None
        self._check_frame_budget(self._sequence + 1)
        self._guess.finalize()
        body = self._guess_out
        body[self._frame_length :] = self._guess.tag
        seq = self._sequence
        self._sequence = seq + 1
        self._guess, self._guess_out = None, None
        return [_REGULAR_PREFIX.pack(seq, frame_iv(seq)), body]

    def finalize_frames(self) -> list[Buffer]:
        """The final frame (in two parts from 256 KiB, as in :meth:`update_frames`) and,
        for signing suites, the footer, as separate ``bytes``."""
        if self._finalized:
            raise ConfigurationError("finalize() called twice")
        self._finalized = True
        self._check_frame_budget(self._sequence)
        if self._guess_out is not None:  # the last frame was guessed regular: it is final
            self._pool.give(self._guess_out)
            self._guess, self._guess_out = None, None
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
            parts = [prefix + self._aead.encrypt(iv, chunk, aad)]
        else:
            parts = [prefix, self._seal_large(iv, chunk, aad)]
        self._fill, self._filled = None, 0
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
        for chunk in chunks:
            iv = iv_of(seq)
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
