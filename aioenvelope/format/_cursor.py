"""A bounds-checked reader over a buffer: every read checks what is there first.

Running out of bytes raises :class:`NeedMoreData`, which a streaming caller turns into
"wait for more" and a one-shot caller into :class:`TruncatedMessageError`. No length
field is trusted before the bytes it announces are present, so a hostile length never
makes us allocate or wait for more than the message holds.
"""

from __future__ import annotations

from ..errors import MalformedMessageError


class NeedMoreData(Exception):
    """The buffer ends before the structure being read."""


class Cursor:
    __slots__ = ("_buf", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._buf = memoryview(buf)
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self._buf):
            raise NeedMoreData
        out = bytes(self._buf[self.pos : end])
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def utf8(self, n: int, what: str) -> str:
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError(f"{what} is not valid UTF-8") from None
