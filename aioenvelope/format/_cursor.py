"""A bounds-checked reader over a buffer: every read checks what is there first.

Running out of bytes raises :class:`NeedMoreData`, which a streaming caller turns into
"wait for more" and a one-shot caller into :class:`TruncatedMessageError`. No length
field is trusted before the bytes it announces are present, so a hostile length never
makes us allocate or wait for more than the message holds.

A parser written as a generator can instead wait: ``if c.lacks(n): yield from c.wait(n)``
hands its driver the buffer length it needs and resumes where it stopped once that many
bytes are there, so a structure that arrives in pieces is still read once.
"""

from __future__ import annotations

import struct
from collections.abc import Generator

from ..errors import MalformedMessageError

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class NeedMoreData(Exception):
    """The buffer ends before the structure being read."""


class Cursor:
    """Reads from ``buf`` starting at ``pos``; ``end`` bounds what may be read.

    ``buf`` is sliced directly (``bytes`` slices are cheap and already ``bytes``), so
    headers parse without a memoryview round trip on every field. ``origin`` is where
    reading started.
    """

    __slots__ = ("_buf", "end", "origin", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._buf = buf
        self.pos = pos
        self.origin = pos
        self.end = len(buf)

    def rebase(self, buf: bytearray) -> None:
        """Go on reading from ``buf``, which holds the bytes from ``origin`` on (and is
        extended in place as more arrive): positions shift so that ``origin`` is 0."""
        self._buf = buf
        self.pos -= self.origin
        self.origin = 0
        self.end = len(buf)

    def lacks(self, n: int) -> bool:
        """Whether fewer than ``n`` bytes are left to read."""
        return self.pos + n > self.end

    def wait(self, n: int) -> Generator[int, None, None]:
        """Yield the buffer length that holds the next ``n`` bytes until ``end`` reaches
        it (the driver moves ``end`` as bytes arrive)."""
        while self.pos + n > self.end:
            yield self.pos + n

    def _advance(self, n: int) -> int:
        start = self.pos
        end = start + n
        if end > self.end:
            raise NeedMoreData
        self.pos = end
        return start

    def take(self, n: int) -> bytes:
        start = self._advance(n)
        return bytes(self._buf[start : start + n])

    def slice(self, start: int, end: int) -> bytes:
        """Bytes already read, from ``start`` to ``end``."""
        return bytes(self._buf[start:end])

    def u8(self) -> int:
        return self._buf[self._advance(1)]

    def u16(self) -> int:
        return int(_U16.unpack_from(self._buf, self._advance(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self._buf, self._advance(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self._buf, self._advance(8))[0])

    def utf8(self, n: int, what: str) -> str:
        start = self._advance(n)
        try:
            return str(self._buf[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError(f"{what} is not valid UTF-8") from None
