"""A bounds-checked reader over a buffer: every read checks what is there first.

Running out of bytes raises :class:`NeedMoreData`, which a streaming caller turns into
"wait for more" and a one-shot caller into :class:`TruncatedMessageError`. No length
field is trusted before the bytes it announces are present, so a hostile length never
makes us allocate or wait for more than the message holds.
"""

from __future__ import annotations

import struct

from ..errors import MalformedMessageError

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class NeedMoreData(Exception):
    """The buffer ends before the structure being read."""


class Cursor:
    """Reads from ``buf`` starting at ``pos``; ``end`` bounds what may be read.

    ``buf`` is sliced directly (``bytes`` slices are cheap and already ``bytes``), so
    headers parse without a memoryview round trip on every field.
    """

    __slots__ = ("_buf", "end", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._buf = buf
        self.pos = pos
        self.end = len(buf)

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
