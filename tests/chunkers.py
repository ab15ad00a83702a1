"""Stream sources for tests: a message cut into chunks, and readers that return short reads.

Streaming bugs live where a frame boundary or a header falls between two reads, so the
stream tests feed the same bytes cut many ways: fixed sizes, seeded random sizes, at
chosen offsets, and through ``async read(n)`` / blocking ``read(n)`` objects whose reads
come back short, as a socket's do.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import AsyncIterator, Callable, Sequence

import anyio.lowlevel

BytesLike = bytes | bytearray | memoryview


def fixed_chunks(data: bytes, size: int) -> list[bytes]:
    """``data`` in pieces of ``size`` bytes (the last one shorter)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def random_chunks(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    """``data`` cut into pieces of 1..``largest`` bytes (random sizes)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, largest)
        out.append(data[pos : pos + n])
        pos += n
    return out


def mixed_chunks(data: bytes, rng: random.Random, largest: int) -> list[BytesLike]:
    """``data`` as chunks of 1..``largest`` bytes, with the odd empty chunk, each one
    randomly ``bytes``, ``bytearray`` or a ``memoryview`` (all are bytes-like)."""
    chunks: list[BytesLike] = []
    pos = 0
    while pos < len(data):
        if rng.random() < 0.05:
            chunks.append(b"")
            continue
        n = rng.randint(1, largest)
        piece = data[pos : pos + n]
        kind = rng.randrange(3)
        chunks.append(piece if kind == 0 else bytearray(piece) if kind == 1 else memoryview(piece))
        pos += n
    return chunks


def cut_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` split at the given offsets (clamped, sorted; repeats give empty chunks)."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


async def agen(chunks: Sequence[BytesLike]) -> AsyncIterator[BytesLike]:
    """The chunks as an async generator that yields to the event loop before each one."""
    for chunk in chunks:
        await anyio.lowlevel.checkpoint()
        yield chunk


class _ShortReads:
    """The bytes ``data`` handed out in reads no longer than ``sizes()`` says."""

    def __init__(self, data: bytes, sizes: Callable[[], int]) -> None:
        self._data = data
        self._pos = 0
        self._sizes = sizes

    def _take(self, n: int) -> bytes:
        limit = len(self._data) - self._pos if n < 0 else n
        chunk = self._data[self._pos : self._pos + min(limit, self._sizes())]
        self._pos += len(chunk)
        return chunk


class AsyncShortReader(_ShortReads):
    """An object with ``async read(n)`` (like aiohttp's ``StreamReader``) that returns
    short reads: at most ``sizes()`` bytes a call."""

    async def read(self, n: int = -1, /) -> bytes:
        await anyio.lowlevel.checkpoint()
        return self._take(n)


class BlockingShortReader(_ShortReads, io.RawIOBase):
    """A blocking binary reader whose ``read(n)`` returns at most ``sizes()`` bytes."""

    def __init__(self, data: bytes, sizes: Callable[[], int]) -> None:
        _ShortReads.__init__(self, data, sizes)
        io.RawIOBase.__init__(self)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        return self._take(n)


def up_to(limit: int) -> Callable[[], int]:
    """Read sizes for a short reader: always ``limit``."""
    return lambda: limit


def random_up_to(rng: random.Random, largest: int) -> Callable[[], int]:
    """Read sizes for a short reader: 1..``largest``, seeded."""
    return lambda: rng.randint(1, largest)


class ClosableChunks:
    """A class-based async iterator that holds a resource until ``aclose()`` (like an
    HTTP response body), and records that it was closed."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = list(chunks)
        self.closed = False

    def __aiter__(self) -> ClosableChunks:
        return self

    async def __anext__(self) -> bytes:
        if self.closed or not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def aclose(self) -> None:
        self.closed = True
