"""Async streaming: messages in and out as async iterators, at constant memory.

The engine is the sans-I/O pair ``MessageEncryptor``/``MessageDecryptor`` fed in steps of
at most :data:`STEP` bytes, so memory stays near one frame plus one step however the
source is chunked. Each step runs inline while it is short and in a worker thread when
it is not (see :class:`_Pacer`). The source is pulled only when output is needed, and
closed however iteration ends.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import inspect
import os
import secrets
import stat
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from contextlib import aclosing, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from .errors import ConfigurationError, SignedStreamRefusedError
from .format.body import LARGE_FRAME, Buffer
from .format.decryptor import EndOfMessage, MessageDecryptor
from .format.encryptor import MessageEncryptor
from .format.header import MessageHeader
from .materials import DecryptionPlan
from .stats import StatsRecorder
from .telemetry import MessageWatch

__all__ = [
    "STEP",
    "DecryptingStream",
    "EncryptingStream",
    "StreamSource",
    "file_chunks",
    "in_steps",
    "save_stream",
    "write_atomically",
    "write_atomically_at",
]

# Bytes handed to the state machines per step. 1 MiB seals in ~0.3 ms on one core with
# AES-NI, and bounds what a step allocates whatever the source's chunk sizes.
STEP = 1 << 20
# Frames smaller than this are joined into one output chunk per step, so a tiny
# frame_length does not turn into one async iteration per few bytes.
_SMALL_FRAME = 16 << 10

_BytesLike = bytes | bytearray | memoryview
_T = TypeVar("_T")


class _AsyncReader(Protocol):
    async def read(self, n: int = ..., /) -> bytes: ...


class _SyncReader(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


StreamSource = (
    _BytesLike | AsyncIterable[_BytesLike] | Iterable[_BytesLike] | _AsyncReader | _SyncReader
)
"""What the streaming methods read: bytes, an (async) iterable of bytes-like chunks, or
an object with a ``read(n)`` method (async, like aiohttp's ``StreamReader``, or a
blocking binary file, which is read in a worker thread)."""


_MIN_PIECE = 1 << 16


class _Pacer:
    """Runs one CPU-bound step inline if it should take under ``budget`` seconds, else in
    a worker thread.

    Why not always a thread: on the 2-core VMs this was measured on, a worker-thread
    round trip costs 0.2-0.3 ms of wake-up latency, about what sealing a whole 1 MiB
    step costs; prototypes that sealed every step in threads (one or two in flight)
    ran at 0.4-0.7x raw one-thread AES-GCM, against 0.7-0.85x inline (bench/stream.py
    measures the latter). A thread step also leaves the loop idle while it waits, and
    on those VMs an idle vCPU can take milliseconds to be woken, which is why large
    frames are sealed and opened a piece per step rather than whole in a thread. Why
    not always inline: a slow machine would then hold the event loop for tens of
    milliseconds. The throughput estimate is learned from inline steps, so a slow
    machine moves its work to threads.
    """

    def __init__(self, budget: float = 0.002, rate: float = 1e9, max_piece: int = STEP) -> None:
        self._budget = budget
        self._max_piece = max_piece
        self._rate = rate  # bytes per second; 1 GB/s is a cautious start for AES-GCM
        self._slow: float | None = None  # a slow step's rate, until the next step says more
        self._piece = _MIN_PIECE  # see piece_size

    def inline(self, cost: int) -> bool:
        """Whether work on ``cost`` bytes should take under the budget on the loop."""
        return cost / self._rate <= self._budget

    async def run(self, cost: int, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)``; ``cost`` is the bytes it seals or opens (0 when it only
        buffers, which is always cheap: at most one step's copy)."""
        if cost / self._rate > self._budget:
            result = await anyio.to_thread.run_sync(fn, *args)
            if cost <= STEP:
                # A step this small went to a thread only because of a slow estimate:
                # let the estimate recover so one hiccup does not stick.
                self._rate *= 1.25
            return result
        return await self.run_inline(cost, fn, *args)

    def piece_size(self) -> int:
        """How much one inline step may seal or open, from 64 KiB to ``max_piece``
        (:data:`STEP` unless told).

        It starts at 64 KiB and doubles after each step that kept within the budget,
        halving after one that did not. Why not the learned rate alone: the first
        pieces of a stream fault fresh buffer pages in, which on some VMs costs several
        milliseconds per MiB, and a rate is known only after a slow step was taken.
        """
        return max(_MIN_PIECE, min(self._piece, int(self._budget * self._rate)))

    async def run_inline(self, cost: int, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)`` on the loop, learning the rate. For work that holds the GIL
        (``cryptography``'s ``Cipher`` contexts do), where a thread would block the
        loop all the same: size it with :meth:`piece_size` instead."""
        start = time.perf_counter()
        result = fn(*args)
        await self.learn(cost, time.perf_counter() - start)
        return result

    async def learn(self, cost: int, elapsed: float) -> None:
        """Learn from an inline step that sealed or opened ``cost`` bytes in ``elapsed``
        seconds of its own work, then let other tasks run."""
        if elapsed <= self._budget:
            self._piece = min(self._max_piece, self._piece * 2)
        else:
            self._piece = max(_MIN_PIECE, self._piece // 2)
        if cost >= 1 << 16 and elapsed > 0:
            measured = cost / elapsed
            if measured >= self._rate:
                self._rate = (self._rate + measured) / 2  # speed up gradually
                self._slow = None
            elif self._slow is None:
                # One slow step can be the machine (a preempted vCPU): sending the next
                # steps to threads would then leave the loop idle for nothing. Note it.
                self._slow = measured
            else:
                # Two in a row are the work itself: believe the faster of the two.
                self._rate, self._slow = max(measured, self._slow), None
        await anyio.lowlevel.checkpoint()  # let other tasks run between steps


async def in_steps(advance: Callable[[int], bool]) -> None:
    """Call ``advance(n)`` until it returns True; each call seals or opens about ``n``
    bytes, sized and placed (inline or in a worker thread) by a :class:`_Pacer`, as a
    stream's steps are. For one-shot messages: the loop breathes between steps."""
    # Larger pieces than a stream's: the output buffer exists already, so a piece costs
    # only its AES-GCM (about 0.5 ms for 4 MiB here), and fewer steps cost fewer loop turns.
    pacer = _Pacer(max_piece=4 * STEP)
    while True:
        piece = pacer.piece_size()
        if await pacer.run(piece, advance, piece):
            return


def _as_chunk(chunk: object) -> _BytesLike:
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise ConfigurationError(
            f"the stream source yielded {type(chunk).__name__}; it must yield bytes-like "
            "chunks (encode text first)"
        )
    return flat(chunk)


def flat(data: _BytesLike) -> _BytesLike:
    """``data`` as one flat run of bytes: a memoryview of another shape or format (2-D,
    of ints, strided) is cast, or copied where it is not contiguous, so that lengths
    count bytes and slices cut bytes everywhere after this."""
    if isinstance(data, memoryview) and (
        data.ndim != 1 or data.format != "B" or not data.c_contiguous
    ):
        return data.cast("B") if data.c_contiguous else data.tobytes()
    return data


def _nbytes(chunk: _BytesLike) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


def _split(chunk: _BytesLike, size: int) -> Iterable[_BytesLike]:
    """``chunk`` in pieces of at most ``size`` bytes, without copying."""
    n = len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
    if n <= size:
        if n:
            yield chunk
        return
    view = memoryview(chunk).cast("B")
    for start in range(0, n, size):
        yield view[start : start + size]


def check_source(source: object) -> None:
    """Fail at call time, not at first iteration, for what can never be a source."""
    if isinstance(source, str):
        raise ConfigurationError("the stream source is a str; pass bytes, or open the file")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return
    if not (
        callable(getattr(source, "read", None))
        or hasattr(source, "__aiter__")
        or hasattr(source, "__iter__")
    ):
        raise ConfigurationError(
            f"the stream source must be bytes, an (async) iterable of bytes or have a "
            f"read(n) method; got {type(source).__name__}"
        )


async def _pieces(source: StreamSource, size: int) -> AsyncGenerator[_BytesLike, None]:
    """The source as pieces of at most ``size`` bytes; closes the source's iterator (not
    a reader the caller opened) however iteration ends."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        for piece in _split(flat(source), size):
            yield piece
        return
    read = getattr(source, "read", None)
    if callable(read):
        # Preferred over iteration: aiohttp's and asyncio's StreamReader iterate by line.
        is_async = inspect.iscoroutinefunction(read)
        while True:
            data = await read(size) if is_async else await anyio.to_thread.run_sync(read, size)
            if not data:
                return
            for piece in _split(_as_chunk(data), size):
                yield piece
    if hasattr(source, "__aiter__"):
        iterator: AsyncIterator[_BytesLike] = source.__aiter__()
        try:
            async for chunk in iterator:
                for piece in _split(_as_chunk(chunk), size):
                    yield piece
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        return
    sync_iterator = iter(source)  # type: ignore[arg-type]
    try:
        for chunk in sync_iterator:
            for piece in _split(_as_chunk(chunk), size):
                yield piece
            await anyio.lowlevel.checkpoint()
    finally:
        close = getattr(sync_iterator, "close", None)
        if close is not None:
            close()


async def _close_source(source: object) -> None:
    """Close a source that is itself an iterator (a generator, say), in case iteration
    never started; readers such as open files belong to the caller and stay open."""
    if callable(getattr(source, "read", None)):
        return
    aclose = getattr(source, "aclose", None)
    if aclose is not None and hasattr(source, "__anext__"):
        await aclose()
        return
    close = getattr(source, "close", None)
    if close is not None and hasattr(source, "__next__"):
        close()


async def _emitted(
    parts: list[Buffer], frame_length: int, recycle: Callable[[Buffer], None]
) -> AsyncGenerator[bytes, None]:
    """Output chunks for one step's frames: small frames joined into one chunk; a large
    frame's pooled body cut into ``bytes`` of at most :data:`STEP`, with a checkpoint
    after each (so the loop is never held for a whole large frame), then handed back to
    the machine through ``recycle`` for the next frame."""
    if frame_length < _SMALL_FRAME and len(parts) > 1:
        yield b"".join(parts)
        return
    for part in parts:
        if isinstance(part, bytes):
            yield part
            continue
        with memoryview(part) as view:
            for start in range(0, len(view), STEP):
                yield bytes(view[start : start + STEP])
                await anyio.lowlevel.checkpoint()
        recycle(part)


class _Stream:
    """Shared shell: an async iterator of ``bytes`` that is also an async context
    manager, so ``async with`` closes it (and its source) deterministically."""

    header: MessageHeader | None
    """The message header, once known (after the first chunk)."""

    _source: StreamSource

    def __init__(self) -> None:
        self.header = None
        self._started = False
        self._machine: MessageEncryptor | MessageDecryptor | None = None
        self._gen = self._run()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(header={'known' if self.header else 'pending'})"

    _watch: Callable[[], MessageWatch | None] | None = None
    # Decryption learns the encryption context from the header; encryption's watch was
    # given it when it started.
    _context_from_header = False

    def _run(self) -> AsyncGenerator[bytes, None]:
        # Without telemetry, the body itself: no generator layer per chunk.
        return self._body(None) if self._watch is None else self._watched(self._watch)

    def _body(
        self, watch: MessageWatch | None, counted: list[int] | None = None
    ) -> AsyncGenerator[bytes, None]:  # pragma: no cover - abstract
        """The stream itself; ``counted[0]``: plaintext bytes sealed or released so far,
        for a telemetry watch (a list: an async generator returns nothing)."""
        raise NotImplementedError

    async def _watched(
        self, make_watch: Callable[[], MessageWatch | None]
    ) -> AsyncGenerator[bytes, None]:
        """The body inside a telemetry span, started at the first chunk asked for."""
        watch = make_watch()
        counted = [0]
        error: BaseException | None = None
        try:
            async with aclosing(self._body(watch, counted)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            if watch is not None:
                header = self.header
                watch.finish(
                    suite_id=header.algorithm_suite.suite_id if header is not None else None,
                    frames=self.frames,
                    plaintext_bytes=counted[0],
                    error=error,
                    context=header.encryption_context
                    if header is not None and self._context_from_header
                    else None,
                )

    @property
    def frames(self) -> int:
        """Frames sealed or opened so far."""
        return self._machine.frames if self._machine is not None else 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The generator itself: ``async for`` then skips one call layer per chunk.
        return self._gen

    async def __anext__(self) -> bytes:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop early: closes the source's iterator. Safe to call more than once."""
        if not self._started:
            # A generator that never ran has no ``finally`` to run: close the source here.
            self._started = True
            await _close_source(self._source)
        await self._gen.aclose()

    async def __aenter__(self: _S) -> _S:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def read_all(self) -> bytes:
        """Everything the stream yields, joined (for tests and small objects)."""
        return b"".join([chunk async for chunk in self])


_S = TypeVar("_S", bound=_Stream)


class EncryptingStream(_Stream):
    """Ciphertext of one message, chunk by chunk: header first, then frames."""

    def __init__(
        self,
        source: StreamSource,
        start: Callable[[], Awaitable[MessageEncryptor]],
        *,
        plaintext_length: int | None,
        stats: StatsRecorder | None = None,
        watch: Callable[[], MessageWatch | None] | None = None,
    ) -> None:
        self._source = source
        self._start = start
        self._limit = plaintext_length
        self._stats = stats
        self._watch = watch
        super().__init__()

    async def _body(
        self,
        watch: MessageWatch | None,
        sealed_bytes: list[int] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The stream's body; ``sealed_bytes`` tells a telemetry watch how much it
        sealed (a list: an async generator returns nothing)."""
        self._started = True
        stats = self._stats
        pieces = _pieces(self._source, STEP)
        try:
            with watch.current() if watch is not None else nullcontext():
                encryptor = await self._start()  # the one KMS call, before any output
            self._machine = encryptor
            self.header = encryptor.header_value
            frame_length = encryptor.header_value.frame_length
            pacer = _Pacer()
            yield encryptor.header
            total = 0
            async for piece in pieces:
                size = _nbytes(piece)
                total += size
                if self._limit is not None and total > self._limit:
                    raise ConfigurationError(
                        f"the stream is longer than plaintext_length={self._limit}; pass "
                        "the true length or None"
                    )
                # Counted once accepted: a piece past the declared length is never sealed.
                if stats is not None:
                    stats.bytes_encrypted += size
                if sealed_bytes is not None:
                    sealed_bytes[0] = total
                if frame_length >= LARGE_FRAME:
                    # Large frames are sealed as they fill, a piece per inline step.
                    for part in _split(piece, pacer.piece_size()):
                        frames = await pacer.run_inline(
                            _nbytes(part), encryptor.update_frames, part
                        )
                        async with aclosing(
                            _emitted(frames, frame_length, encryptor.recycle)
                        ) as chunks:
                            async for chunk in chunks:
                                yield chunk
                    continue
                # The bytes this step seals: the whole frames it completes.
                sealed = (encryptor.pending_bytes + size - 1) // frame_length * frame_length
                if frame_length >= _SMALL_FRAME and pacer.inline(sealed):
                    # Each frame handed out as soon as it is sealed, while it is still in
                    # cache (sealing a step's frames first measured 0.65x raw AES-GCM
                    # against 0.8x); only the sealing is timed, not the consumer.
                    encryptor.feed(piece)
                    elapsed = 0.0
                    while True:
                        start = time.perf_counter()
                        frame = encryptor.next_frame()
                        elapsed += time.perf_counter() - start
                        if frame is None:
                            break
                        yield frame
                    await pacer.learn(sealed, elapsed)
                    continue
                frames = await pacer.run(sealed, encryptor.update_frames, piece)
                async with aclosing(_emitted(frames, frame_length, encryptor.recycle)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            if self._limit is not None and total != self._limit:
                raise ConfigurationError(
                    f"the stream held {total} bytes, not plaintext_length={self._limit}"
                )
            final = await pacer.run(encryptor.pending_bytes, encryptor.finalize_frames)
            if stats is not None:
                stats.messages_encrypted += 1
            # Never joined (frame_length=STEP); a large final body is cut up.
            async with aclosing(_emitted(final, STEP, encryptor.recycle)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            await pieces.aclose()
            await _close_source(self._source)


def _drain(decryptor: MessageDecryptor) -> tuple[list[Buffer], bool]:
    """All plaintext the decryptor can release now, and whether the message ended."""
    out: list[Buffer] = []
    while True:
        item = decryptor.next_plaintext()
        if item is None:
            return out, False
        if isinstance(item, EndOfMessage):
            return out, True
        if item:
            out.append(item)


class DecryptingStream(_Stream):
    """Verified plaintext of one message, frame by frame.

    Each chunk is released only after its frame's tag verified; the final frame only
    after the input ended cleanly (and, for signed messages, the signature verified).
    If iteration raises, what came before is authentic but incomplete: discard it.
    """

    _context_from_header = True

    def __init__(
        self,
        source: StreamSource,
        plan: Callable[[MessageHeader], Awaitable[DecryptionPlan]],
        *,
        max_encrypted_data_keys: int,
        allow_signed: bool,
        stats: StatsRecorder | None = None,
        watch: Callable[[], MessageWatch | None] | None = None,
    ) -> None:
        self._source = source
        self._plan = plan
        self._max_edks = max_encrypted_data_keys
        self._allow_signed = allow_signed
        self._stats = stats
        self._watch = watch
        super().__init__()

    async def _body(
        self,
        watch: MessageWatch | None,
        released: list[int] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The stream's body; ``released`` tells a telemetry watch how much plaintext it
        released (a list: an async generator returns nothing)."""
        self._started = True
        stats = self._stats
        pieces = _pieces(self._source, STEP)
        decryptor = self._machine = MessageDecryptor(max_encrypted_data_keys=self._max_edks)
        try:
            parsed = None
            async for piece in pieces:
                decryptor.receive_data(piece)
                parsed = decryptor.read_header()
                if parsed is not None:
                    break
            if parsed is None:
                decryptor.receive_eof()
                parsed = decryptor.read_header()  # raises: the input ended in the header
                assert parsed is not None
            header = parsed.header
            if header.algorithm_suite.signing and not self._allow_signed:
                raise SignedStreamRefusedError(
                    f"the message is signed ({header.algorithm_suite.name}); "
                    "decrypt_stream(allow_signed=False) refuses signed messages because "
                    "their frames are covered by the signature only at the end. Pass "
                    "allow_signed=True (the last frame is still held until the signature "
                    "verified), or use decrypt() to verify everything before any output"
                )
            with watch.current() if watch is not None else nullcontext():
                plan = await self._plan(header)
            decryptor.begin_body(
                plan.data_key,
                required_encryption_context=plan.required_context,
                verifier=plan.verifier,
            )
            self.header = header
            frame_length = header.frame_length or STEP
            # Large frames are opened as they arrive, a piece per inline step (their
            # Cipher context holds the GIL: a thread would not free the loop).
            large = header.frame_length >= LARGE_FRAME
            # What a step can open otherwise: whole frames buffered (everything at the end
            # of the input, where the final frame may be shorter; non-framed: all).
            wire_frame = header.frame_length + 32 if header.frame_length else 1
            pacer = _Pacer()
            ended = False
            backlog: collections.deque[_BytesLike] = collections.deque()
            # Frames from 16 KiB up to large ones are handed out one by one (see below).
            one_by_one = _SMALL_FRAME <= header.frame_length < LARGE_FRAME
            counted = False  # the message, in stats
            while True:
                if large:
                    parts, done = await pacer.run_inline(
                        decryptor.buffered_bytes, _drain, decryptor
                    )
                else:
                    buffered = decryptor.buffered_bytes
                    cost = buffered if ended else buffered // wire_frame * wire_frame
                    if one_by_one and pacer.inline(cost):
                        # Each frame's plaintext handed out as soon as it verified, while
                        # it is still in cache (see EncryptingStream); only the opening
                        # is timed, not the consumer.
                        parts, done = [], False
                        elapsed = 0.0
                        while True:
                            start = time.perf_counter()
                            item = decryptor.next_plaintext()
                            elapsed += time.perf_counter() - start
                            if item is None:
                                break
                            if isinstance(item, EndOfMessage):
                                done = True
                                break
                            assert isinstance(item, bytes)  # frames under LARGE_FRAME
                            size = len(item)
                            if stats is not None:
                                stats.bytes_decrypted += size
                                if decryptor.complete:  # the last: count it as before
                                    stats.messages_decrypted += 1
                                    counted = True
                            if released is not None:
                                released[0] += size
                            if size:
                                yield item
                        if done:
                            if stats is not None and not counted:
                                stats.messages_decrypted += 1
                            return
                        await pacer.learn(cost, elapsed)
                    else:
                        parts, done = await pacer.run(cost, _drain, decryptor)
                if parts and (stats is not None or released is not None):
                    size = sum(len(part) for part in parts)
                    if stats is not None:
                        stats.bytes_decrypted += size
                    if released is not None:
                        released[0] += size
                if done and stats is not None and not counted:
                    stats.messages_decrypted += 1
                if parts:
                    async with aclosing(_emitted(parts, frame_length, decryptor.recycle)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                if done:
                    return
                if not backlog:
                    try:
                        piece = await anext(pieces)
                    except StopAsyncIteration:
                        decryptor.receive_eof()
                        ended = True
                        continue
                    backlog.extend(_split(piece, pacer.piece_size()) if large else [piece])
                if backlog:
                    decryptor.receive_data(backlog.popleft())
        finally:
            await pieces.aclose()
            await _close_source(self._source)


# -- files ------------------------------------------------------------------------------


async def file_chunks(path: str | os.PathLike[str]) -> AsyncGenerator[bytes, None]:
    """A file's bytes in :data:`STEP`-sized chunks, read in a worker thread."""
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(STEP):
            yield chunk


async def write_atomically(
    destination: str | os.PathLike[str], chunks: AsyncIterator[bytes], *, overwrite: bool
) -> int:
    """Write ``chunks`` to a new file (mode 0600) in ``destination``'s directory, fsync
    it, then give it its name; on any failure nothing is left, so no partial output is
    ever seen. Returns the number of bytes written.

    Where Linux has ``O_TMPFILE`` the file has no name until it is complete, so not even
    a killed process (SIGKILL, a power cut) leaves part of it behind; elsewhere it is a
    hidden ``.NAME.*.partial`` file beside the destination, removed on failure. See
    :func:`write_atomically_at`."""
    dest = Path(destination)
    dir_fd = await anyio.to_thread.run_sync(_open_directory, dest.parent)
    try:
        return await write_atomically_at(
            dir_fd, dest.name, chunks, overwrite=overwrite, display=str(dest)
        )
    finally:
        os.close(dir_fd)


async def write_atomically_at(
    dir_fd: int,
    name: str,
    chunks: AsyncIterator[bytes],
    *,
    overwrite: bool,
    display: str | None = None,
) -> int:
    """:func:`write_atomically` into the open directory ``dir_fd`` under ``name`` (a name
    in it, not a path): whatever happens to the path that led to the directory, the
    file lands in that directory. The command line opens each output directory one
    component at a time without following symbolic links, then writes here.

    Without ``overwrite`` the name is claimed by ``link``, which fails if it exists
    (even as a dangling symbolic link): a file appearing meanwhile is never clobbered.
    With it, the complete file is linked under a hidden name and renamed over the old
    one, which replaces a symbolic link itself, never the file it points to. The one
    window: a process killed between that link and the rename leaves the complete
    file under its hidden ``.NAME.*.partial`` name. ``display`` names the destination
    in errors (default ``name``)."""
    shown = display if display is not None else name
    # Before the first chunk is asked for: no KMS call, no byte of the source read.
    with _naming(shown):
        mode = await anyio.to_thread.run_sync(_mode_at, dir_fd, name)
    if mode is not None and stat.S_ISDIR(mode):
        raise _is_directory(shown)
    if not overwrite and mode is not None:
        raise _exists(shown)
    with _naming(shown):
        temporary = await anyio.to_thread.run_sync(_Temporary, dir_fd, name)
    written = 0
    try:
        with os.fdopen(temporary.fd, "wb", closefd=False) as raw:
            pending: list[bytes] = []
            size = 0
            async for chunk in chunks:  # its own errors (the source's) are its own
                pending.append(chunk)
                size += len(chunk)
                if size >= STEP:  # one thread hop per MiB, not per frame
                    with _naming(shown):
                        await anyio.to_thread.run_sync(raw.writelines, pending)
                    written, pending, size = written + size, [], 0
            with _naming(shown):
                await anyio.to_thread.run_sync(raw.writelines, pending)
                written += size
                await anyio.to_thread.run_sync(raw.flush)
        with _naming(shown):
            await anyio.to_thread.run_sync(os.fsync, temporary.fd)
            await anyio.to_thread.run_sync(temporary.move_into_place, name, overwrite, shown)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(temporary.discard)
        raise
    temporary.close()
    return written


async def save_stream(
    stream: _Stream, destination: str | os.PathLike[str], *, overwrite: bool
) -> MessageHeader:
    """Write ``stream`` to ``destination`` atomically (see :func:`write_atomically`),
    closing it however that ends; the message header it read or wrote."""
    async with stream:
        await write_atomically(destination, stream, overwrite=overwrite)
    assert stream.header is not None
    return stream.header


_PROC_FD = "/proc/self/fd"
# open(2) reports a kernel without O_TMPFILE as EISDIR (it sees O_DIRECTORY with write
# access) and a filesystem without it as EOPNOTSUPP.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})


def _open_directory(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _mode_at(dir_fd: int, name: str) -> int | None:
    """What ``name`` is in the directory (its ``st_mode``; a link's own), or None."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _naming(shown: str) -> Iterator[None]:
    """An ``OSError`` of writing the output names the destination ``shown``: not the
    hidden file it is written to first (``.NAME.*.partial``, ``/proc/self/fd/N``, ``.``),
    which the caller never asked for and which is gone by the time they read it."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, shown) from None


def _exists_at(dir_fd: int, name: str) -> bool:
    """Whether ``name`` is taken in the directory, by anything (a link included)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _hidden_name(name: str) -> str:
    return f".{name[:200]}.{secrets.token_hex(8)}.partial"  # within NAME_MAX (255)


def _create_hidden(dir_fd: int, name: str) -> tuple[int, str]:
    """A new hidden file beside ``name`` (mode 0600), open for writing, and its name.
    ``O_EXCL``: never an existing file, nor a planted link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        hidden = _hidden_name(name)
        try:
            return os.open(hidden, flags, 0o600, dir_fd=dir_fd), hidden
        except FileExistsError:
            continue  # 64 random bits taken: try others


class _Temporary:
    """The file being written, open as ``fd``: unnamed (``O_TMPFILE``, Linux with
    ``/proc``) when the kernel and filesystem allow, so nothing needs cleaning up
    whatever kills the process; else a hidden file named ``hidden``."""

    def __init__(self, dir_fd: int, name: str) -> None:
        self.dir_fd = dir_fd
        self.hidden: str | None = None
        fd = self._open_unnamed(dir_fd)
        if fd is None:
            fd, self.hidden = _create_hidden(dir_fd, name)
        self.fd = fd
        self._closed = False

    @staticmethod
    def _open_unnamed(dir_fd: int) -> int | None:
        flag = getattr(os, "O_TMPFILE", 0)
        if not flag or not os.path.isdir(_PROC_FD):
            return None
        try:
            return os.open(".", flag | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in _NO_TMPFILE:
                return None
            raise

    def move_into_place(self, name: str, overwrite: bool, shown: str) -> None:
        """Give the complete, fsynced file ``name``, then fsync the directory so the
        name survives a crash too."""
        if self.hidden is None:
            self._link_unnamed(name, overwrite, shown)
        else:
            self._move_hidden(self.hidden, name, overwrite, shown)
            self.hidden = None
        try:
            os.fsync(self.dir_fd)
        except OSError as exc:  # a filesystem that cannot sync directories
            if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
                raise

    def _link_unnamed(self, name: str, overwrite: bool, shown: str) -> None:
        # linkat(AT_SYMLINK_FOLLOW) through /proc names an O_TMPFILE file (open(2)).
        source = f"{_PROC_FD}/{self.fd}"
        if not overwrite:
            try:
                os.link(source, name, dst_dir_fd=self.dir_fd)
            except FileExistsError:
                raise _exists(shown) from None
            return
        while True:
            hidden = _hidden_name(name)
            try:
                os.link(source, hidden, dst_dir_fd=self.dir_fd)
            except FileExistsError:
                continue
            break
        try:
            os.replace(hidden, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            os.unlink(hidden, dir_fd=self.dir_fd)
            raise

    def _move_hidden(self, hidden: str, name: str, overwrite: bool, shown: str) -> None:
        fd = self.dir_fd
        if overwrite:
            os.replace(hidden, name, src_dir_fd=fd, dst_dir_fd=fd)
            return
        try:
            os.link(hidden, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
        except FileExistsError:
            raise _exists(shown) from None
        except OSError:  # a filesystem without hard links
            if _exists_at(fd, name):
                raise _exists(shown) from None
            os.replace(hidden, name, src_dir_fd=fd, dst_dir_fd=fd)
            return
        os.unlink(hidden, dir_fd=fd)

    def discard(self) -> None:
        """After a failure: close, and remove the hidden file if there is one."""
        self.close()
        if self.hidden is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.hidden, dir_fd=self.dir_fd)
            self.hidden = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


async def check_destination(destination: str | os.PathLike[str]) -> None:
    """Refuse a ``destination`` that is a directory at once, before the source is opened
    or a key asked for (:func:`write_atomically` checks again, for one made meanwhile)."""
    try:
        mode = (await anyio.Path(destination).lstat()).st_mode
    except OSError:
        return  # absent (fine), or a problem that writing will name
    if stat.S_ISDIR(mode):
        raise _is_directory(str(destination))


def _is_directory(shown: str) -> ConfigurationError:
    return ConfigurationError(
        f"{shown} is a directory: give the path of the file to write "
        "(overwrite=True replaces a file, never a directory)"
    )


def _exists(shown: str) -> ConfigurationError:
    return ConfigurationError(f"{shown} already exists; pass overwrite=True to replace it")
