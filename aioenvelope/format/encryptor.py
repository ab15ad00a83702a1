"""The sans-I/O message writer.

Feed it plaintext, take bytes out: ``header`` first, then whatever ``update`` returns
(or, frame by frame, ``feed`` then ``next_frame`` until None), then ``finalize()``.
``encrypt_all`` (and ``encrypt_in_steps`` for large messages) is the one-shot fast path
and produces the same bytes for the same inputs. No I/O, no clock: the caller supplies the message ID, the
data key and the EDKs, which is also the seam that makes output reproducible in tests.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping, Sequence
from types import MappingProxyType

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
    unshared_bytes,
)
from .derivation import derive_keys
from .encryption_context import serialize_encryption_context
from .header import (
    MAX_FRAME_LENGTH,
    ContentType,
    EncryptedDataKey,
    MessageHeader,
    header_body_bytes,
    serialize_header_auth,
)
from .signing import Signer
from .suites import AlgorithmSuite

__all__ = ["MessageEncryptor", "WholeMessage"]

_TAG = 16
_REGULAR_OVERHEAD = 4 + 12 + _TAG
_FINAL_OVERHEAD = 4 + 4 + 12 + 4 + _TAG
_MAX_SIGNATURE = 2 + 2 + 2 * 72  # footer length field plus the longest P-384 DER
_FINAL_PREFIX = struct.Struct(">II12sI")
_REGULAR_PREFIX = struct.Struct(">I12s")
_HEADER_IV = bytes(12)
_FIRST_IV = frame_iv(1)
# A message's only frame: the final-frame marker, sequence number 1, its IV; its length.
_FIRST_FINAL_PREFIX = struct.pack(">II12s", SEQUENCE_NUMBER_END, 1, _FIRST_IV)
_U32 = struct.Struct(">I")
_NOTHING = memoryview(b"")


class MessageEncryptor:
    """Writes one message. Not reusable: make one per message.

    Lean to make: a 1 KiB message spends about as long here as in AES-GCM and HKDF.
    State only the streaming paths use starts as class-level defaults (immutable ones,
    replaced on first use), and :attr:`header_value` is built only when asked for.
    """

    # Streaming state, until the first feed()/update_frames() (see those).
    _pending: bytearray | memoryview = memoryview(b"")  # held-back plaintext (a copy, or
    # a view of an immutable ``bytes`` the caller gave: see feed)
    _src = memoryview(b"")  # input fed and not yet sealed into frames (see next_frame)
    _src_pos = 0
    _src_immutable = False
    # Large frames gather their plaintext in reused buffers instead (see _update_large):
    # a growing bytearray reallocates and page-faults on every piece.
    _fill: mmap.mmap | None = None
    _filled = 0
    _spare: mmap.mmap | None = None  # the other plaintext buffer, once free
    # A full large frame known to be regular, sealed a piece at a time while the next
    # one fills (see _update_large).
    _sealing: _LargeSeal | None = None
    _sequence = 1
    _finalized = False
    _pool_value: FramePool | None = None

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
        encrypted_data_keys = tuple(encrypted_data_keys)
        if not isinstance(encryption_context, MappingProxyType):
            # Snapshot now: header_value, built later, must show what was written.
            encryption_context = MappingProxyType(dict(encryption_context))
        key, commitment = derive_keys(algorithm_suite, bytes(data_key), message_id)
        context_bytes = (
            serialize_encryption_context(encryption_context)
            if serialized_encryption_context is None
            else serialized_encryption_context
        )
        body = header_body_bytes(
            version,
            algorithm_suite,
            message_id,
            context_bytes,
            encrypted_data_keys,
            ContentType.FRAMED,
            frame_length,
            commitment,
        )
        aead = AESGCM(key)
        # The header's IV is fixed (all zero in v2): this is the one seal under this
        # message's key with it, as the key is new with each message ID.
        if nonce_log.observers:
            nonce_log.sealing(key, _HEADER_IV)
        if required_encryption_context:
            tag = aead.encrypt(
                _HEADER_IV, b"", body + serialize_encryption_context(required_encryption_context)
            )
        else:
            tag = aead.encrypt(_HEADER_IV, b"", body)
        self.header = body + tag if version == 2 else body + serialize_header_auth(version, tag)
        self._aead = aead
        self._key = key  # for large frames sealed piece by piece, and nonce_log
        self._suite = algorithm_suite
        self._message_id = message_id
        self._fields = (encryption_context, encrypted_data_keys, commitment, context_bytes)
        self._header_value: MessageHeader | None = None
        self._frame_length = frame_length
        self._signer = signer
        if signer is not None:
            signer.update(self.header)
        self._aad_head = message_id + FRAME_AAD

    @property
    def header_value(self) -> MessageHeader:
        """The header written, as a value (built on first use: the one-shot path of a
        small message seldom needs it)."""
        header = self._header_value
        if header is None:
            context, edks, commitment, _ = self._fields
            suite = self._suite
            header = MessageHeader(
                version=suite.message_version,
                algorithm_suite=suite,
                message_id=self._message_id,
                encryption_context=context,
                encrypted_data_keys=edks,
                content_type=ContentType.FRAMED,
                frame_length=self._frame_length,
                suite_data=commitment,
                header_length=len(self.header),
            )
            self._header_value = header
        return header

    @property
    def algorithm_suite(self) -> AlgorithmSuite:
        return self._suite

    @property
    def _pool(self) -> FramePool:
        """Large-frame buffers (made on first use: small messages never need one)."""
        pool = self._pool_value
        if pool is None:
            pool = self._pool_value = FramePool()
        return pool

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
            return len(self._pending) + len(self._src) - self._src_pos
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
        if self._frame_length >= LARGE_FRAME:
            if self._finalized:
                raise ConfigurationError("update() after finalize()")
            return self._update_large(memoryview(data).cast("B"))
        self.feed(data)
        frames: list[Buffer] = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take plaintext to seal with :meth:`next_frame` (frames under 256 KiB only).

        Feed again only once :meth:`next_frame` returned None: the stream seals and hands
        out one frame at a time, so each frame's bytes are consumed while still in cache.
        A tail held back (it may be the final frame) is copied, unless ``data`` is
        immutable ``bytes`` (or a view of them), which is then held in place.
        """
        if self._finalized:
            raise ConfigurationError("update() after finalize()")
        if self._frame_length >= LARGE_FRAME:
            raise ConfigurationError("feed() is for frames under 256 KiB; use update_frames()")
        if self._src_pos < len(self._src):
            raise ConfigurationError("feed() before next_frame() sealed the previous input")
        self._src = memoryview(data).cast("B")
        self._src_pos = 0
        self._src_immutable = isinstance(data, bytes) or (
            isinstance(data, memoryview) and isinstance(data.obj, bytes)
        )

    def next_frame(self) -> bytes | None:
        """The next regular frame of what was fed, sealed; None once the rest must wait.

        The last ``frame_length`` bytes are always held back, because the final frame
        must carry the message's last 1..frame_length bytes. Whole frames are sealed
        straight from the input; only a partial frame is copied and held.
        """
        src, pos, f = self._src, self._src_pos, self._frame_length
        left = len(src) - pos
        pending = self._pending
        if pending:
            need = f - len(pending)
            if left <= need:  # still at most one frame held: it may be the final one
                if left:
                    if not isinstance(pending, bytearray):
                        pending = self._pending = bytearray(pending)
                    pending += src[pos:]
                self._src, self._src_pos = _NOTHING, 0
                return None
            if need:
                if not isinstance(pending, bytearray):
                    pending = bytearray(pending)
                pending += src[pos : pos + need]
                self._src_pos = pos + need
            self._pending = bytearray()
            return self._seal_frame(pending)  # full, and more follows: a regular frame
        if left > f:
            self._src_pos = pos + f
            return self._seal_frame(src[pos : pos + f])
        if left:
            tail = src[pos:]
            self._pending = tail if self._src_immutable else bytearray(tail)
        self._src, self._src_pos = _NOTHING, 0
        return None

    def _seal_frame(self, chunk: bytearray | memoryview) -> bytes:
        """One regular frame as its own ``bytes``, sealed in place after its prefix (see
        :func:`~.body.unshared_bytes`: no copy of the body, no join). Lean: it runs once
        per frame of a stream."""
        seq = self._sequence
        if seq >= MAX_FRAMES:  # a final frame must still follow this one
            self._check_frame_budget(seq + 1)
        iv = IV_STRUCT.pack(seq)
        if nonce_log.observers:
            nonce_log.sealing(self._key, iv)
        n = len(chunk)
        frame = unshared_bytes(n + _REGULAR_OVERHEAD)
        # release() rather than ``with`` (whose enter and exit cost more than the rest of
        # this method): if sealing raises, the frame is dropped unfinished anyway.
        out = frame.getbuffer()
        _REGULAR_PREFIX.pack_into(out, 0, seq, iv)
        self._aead.encrypt_into(iv, chunk, self._aad_head + AAD_TAIL_STRUCT.pack(seq, n), out[16:])
        out.release()
        self._sequence = seq + 1
        sealed = frame.getvalue()
        if self._signer is not None:
            self._signer.update(sealed)
        return sealed

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
        if self._src_pos < len(self._src):
            raise ConfigurationError("finalize() before next_frame() sealed all input fed")
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
        """The whole message for ``plaintext``, sealed straight into one buffer.

        For small messages (the client's path under 1 MiB): one ``bytearray`` and one
        copy out cost less here than :class:`WholeMessage`'s setup."""
        if self._finalized or self._pending or self._src or self._sequence != 1:
            raise ConfigurationError("encrypt_all() needs a fresh encryptor")
        self._finalized = True
        src = memoryview(plaintext).cast("B")
        f, n = self._frame_length, len(src)
        if n <= f and self._signer is None:
            # One (final) frame: its sealed bytes joined to the header cost less than
            # the buffer the general path fills.
            iv = _FIRST_IV
            if nonce_log.observers:
                nonce_log.sealing(self._key, iv)
            self._sequence = 2
            aad = self._message_id + FINAL_FRAME_AAD + AAD_TAIL_STRUCT.pack(1, n)
            return b"".join(
                (self.header, _FIRST_FINAL_PREFIX + _U32.pack(n), self._aead.encrypt(iv, src, aad))
            )
        regular = (n - 1) // f if n else 0
        self._check_frame_budget(regular + 1)
        final_len = n - regular * f
        header_len = len(self.header)
        size = header_len + regular * (f + _REGULAR_OVERHEAD) + _FINAL_OVERHEAD + final_len
        out = bytearray(size + (_MAX_SIGNATURE if self._signer else 0))
        view = memoryview(out)
        view[:header_len] = self.header
        pos = self._seal_regular_into(view, header_len, src, 0, regular * f)
        pos = self._seal_final(view, pos, src[regular * f :])
        view.release()
        return self._finish(out, header_len, pos)

    def encrypt_in_steps(self, plaintext: bytes | bytearray | memoryview) -> WholeMessage:
        """:meth:`encrypt_all` a step at a time, for large messages (see
        :class:`WholeMessage`); the same bytes."""
        if self._finalized or self.pending_bytes or self._sequence != 1:
            raise ConfigurationError("encrypt_all() needs a fresh encryptor")
        self._finalized = True
        return WholeMessage(self, memoryview(plaintext).cast("B"))

    # -- internals -----------------------------------------------------------------

    def _check_frame_budget(self, frames: int) -> None:
        if frames > MAX_FRAMES:
            raise ConfigurationError(
                "the plaintext needs more than 2^32-1 frames; use a larger frame_length"
            )

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

    def _seal_regular_into(
        self, out: memoryview, pos: int, src: memoryview, start: int, stop: int
    ) -> int:
        """Seal ``src[start:stop]`` (whole frames) as regular frames into ``out`` from
        ``pos``; returns where they end. Flat, with its lookups hoisted: it runs once per
        frame of a large one-shot message."""
        f = self._frame_length
        seq = self._sequence
        encrypt_into = self._aead.encrypt_into
        aad_head, aad_tail = self._aad_head, AAD_TAIL_STRUCT.pack
        iv_of, prefix_into = IV_STRUCT.pack, _REGULAR_PREFIX.pack_into
        log, key = nonce_log.observers, self._key
        for offset in range(start, stop, f):
            iv = iv_of(seq)
            if log:
                nonce_log.sealing(key, iv)
            prefix_into(out, pos, seq, iv)
            body = pos + 16
            pos = body + f + _TAG
            encrypt_into(iv, src[offset : offset + f], aad_head + aad_tail(seq, f), out[body:pos])
            seq += 1
        self._sequence = seq
        return pos

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


class WholeMessage:
    """One message sealed straight into the ``bytes`` it is returned as, a step at a time.

    Why steps: the client seals a large message in pieces that each fit its loop budget
    (or go to a worker thread), as a stream would, but without a stream's per-frame
    ``bytes`` and the join of them all at the end: every frame is sealed in place into
    the message's own buffer (see :func:`~.body.unshared_bytes`), each byte written once.
    For signing suites each step's sealed bytes go to the signer as they are written.
    """

    __slots__ = (
        "_done",
        "_encryptor",
        "_finished",
        "_out",
        "_pos",
        "_signed",
        "_src",
        "_stop",
        "_view",
    )

    def __init__(self, encryptor: MessageEncryptor, src: memoryview) -> None:
        f, n = encryptor._frame_length, len(src)
        regular = (n - 1) // f if n else 0
        encryptor._check_frame_budget(regular + 1)
        header = encryptor.header
        size = len(header) + regular * (f + _REGULAR_OVERHEAD) + _FINAL_OVERHEAD + n
        size -= regular * f
        signed = encryptor._signer is not None
        self._encryptor = encryptor
        self._src = src
        self._out = unshared_bytes(size + (_MAX_SIGNATURE if signed else 0))
        self._view = self._out.getbuffer()
        self._view[: len(header)] = header
        self._pos = self._signed = len(header)
        self._done = 0  # plaintext bytes sealed so far
        self._finished = False
        self._stop = regular * f  # where the regular frames end and the final one starts

    @property
    def remaining(self) -> int:
        """Plaintext bytes not sealed yet."""
        return len(self._src) - self._done

    def advance(self, budget: int) -> bool:
        """Seal about ``budget`` more plaintext bytes (at least one frame); True once the
        whole body is sealed."""
        if self._finished:
            return True
        encryptor, view = self._encryptor, self._view
        f = encryptor._frame_length
        stop = min(self._stop, self._done + max(f, budget - budget % f))
        pos = encryptor._seal_regular_into(view, self._pos, self._src, self._done, stop)
        self._done = stop
        finished = stop == self._stop
        if finished and not self._finished:
            pos = encryptor._seal_final(view, pos, self._src[stop:])
            self._done = len(self._src)
            self._finished = True
        if encryptor._signer is not None:
            encryptor._signer.update(view[self._signed : pos])
            self._signed = pos
        self._pos = pos
        return finished

    def message(self) -> bytes:
        """The message (the footer appended for signing suites), once :meth:`advance`
        returned True. The buffer is handed over, not copied: no view of it is left."""
        encryptor, end = self._encryptor, self._pos
        if not self._finished:
            raise ConfigurationError("message() before advance() sealed the whole body")
        view = self._view
        if encryptor._signer is not None:
            signature = encryptor._signer.finalize()
            footer = len(signature).to_bytes(2, "big") + signature
            view[end : end + len(footer)] = footer
            end += len(footer)
        view.release()
        out = self._out
        out.truncate(end)
        message = out.getvalue()
        out.close()
        return message


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
