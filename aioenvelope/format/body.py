"""Body framing: frame IVs, the body AAD, and frame layouts (ESDK format section 2)."""

from __future__ import annotations

import io
import mmap
import struct

__all__ = [
    "AAD_TAIL_STRUCT",
    "FINAL_FRAME_AAD",
    "FRAME_AAD",
    "IV_STRUCT",
    "LARGE_FRAME",
    "SEQUENCE_NUMBER_END",
    "SINGLE_BLOCK_AAD",
    "Buffer",
    "FramePool",
    "anonymous_buffer",
    "body_aad",
    "frame_iv",
    "unshared_bytes",
]

FRAME_AAD = b"AWSKMSEncryptionClient Frame"
FINAL_FRAME_AAD = b"AWSKMSEncryptionClient Final Frame"
SINGLE_BLOCK_AAD = b"AWSKMSEncryptionClient Single Block"
SEQUENCE_NUMBER_END = 0xFFFFFFFF
MAX_FRAMES = 0xFFFFFFFF
MAX_NON_FRAMED_LENGTH = 2**36 - 32
# From this size on a frame's body is sealed/opened into a pooled buffer and handed out
# apart from its prefix: cryptography would allocate and zero it holding the GIL.
LARGE_FRAME = 256 << 10


_PRIVATE = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}

Buffer = bytes | bytearray | mmap.mmap
"""What the machines hand out for a frame: ``bytes``, or for large frames a pooled
``mmap`` the caller copies out and may hand back (see :class:`FramePool`)."""


def anonymous_buffer(size: int) -> mmap.mmap:
    """``size`` writable bytes whose pages the kernel zeroes lazily, on first touch.

    Why not ``bytearray(size)``: that zero-fills and page-faults every page while the
    allocating thread holds the GIL, about 1 ms per MiB on the VMs this was measured
    on, which stalls the event loop even from a worker thread. An anonymous mapping
    costs nothing up front; its pages fault in when first written, a piece at a time
    (or inside a one-shot AEAD call, with the GIL released), and a pooled buffer only
    once per stream.

    The mapping is private (where the platform has ``MAP_PRIVATE``): a forked child
    does not share the plaintext, and the decryptor can grow it in place with
    ``resize`` (Linux's mremap). A shared anonymous mapping cannot grow that way: its
    new pages have no backing and the first write to them is a SIGBUS.
    """
    return mmap.mmap(-1, size, **_PRIVATE)


class FramePool:
    """A few large-frame buffers kept for reuse, matched by exact length.

    A buffer the caller handed back, after copying its contents out, is overwritten in
    full by the next frame of the same length, so its pages fault in once per stream,
    not once per frame. At most ``keep`` buffers are held.
    """

    __slots__ = ("_free", "_keep")

    def __init__(self, keep: int = 2) -> None:
        self._free: list[mmap.mmap] = []
        self._keep = keep

    def take(self, size: int) -> mmap.mmap:
        """A buffer of ``size`` bytes with undefined contents (the caller overwrites it)."""
        kept = self.reuse(size)
        return anonymous_buffer(size) if kept is None else kept  # never size 0

    def reuse(self, size: int) -> mmap.mmap | None:
        """A kept buffer of exactly ``size`` bytes (contents undefined), or None."""
        free = self._free
        for i, buf in enumerate(free):
            if len(buf) == size:
                return free.pop(i)
        return None

    def give(self, buf: Buffer) -> None:
        """Take back a buffer from :meth:`take`; the caller keeps no reference to it."""
        if (
            isinstance(buf, mmap.mmap)
            and len(self._free) < self._keep
            and all(b is not buf for b in self._free)
        ):
            self._free.append(buf)


def unshared_bytes(size: int) -> io.BytesIO:
    """A ``size``-byte buffer to write through ``getbuffer()`` and hand out as ``bytes``
    with ``getvalue()``, without copying it.

    Why: frames and whole messages are sealed (and opened) with ``encrypt_into`` or
    ``decrypt_into``, which need a writable buffer, but callers get immutable ``bytes``;
    copying a ``bytearray`` into ``bytes`` is a second pass over every byte, which cost
    10-40% of AES-GCM's own time here. CPython's ``BytesIO`` made from a ``bytes`` that
    nothing else holds writes into it in place, and ``getvalue()`` returns that very
    object when no view of the buffer is left (bpo-22003). While a view is alive
    ``getvalue()`` copies instead, and once handed out the object is shared, so a later
    write would copy too: the ``bytes`` a caller gets can never change under it. An
    implementation without this optimization copies: slower, never wrong.

    Release every view (``with buf.getbuffer() as view``; slices are views too) before
    ``getvalue()``.
    """
    return io.BytesIO(bytes(size))


IV_STRUCT = struct.Struct(">8xI")  # the hot loops pack with these directly
AAD_TAIL_STRUCT = struct.Struct(">IQ")


def frame_iv(sequence_number: int) -> bytes:
    """Eight zero bytes then the big-endian sequence number."""
    return IV_STRUCT.pack(sequence_number)


def body_aad(message_id: bytes, content: bytes, sequence_number: int, length: int) -> bytes:
    return message_id + content + AAD_TAIL_STRUCT.pack(sequence_number, length)
