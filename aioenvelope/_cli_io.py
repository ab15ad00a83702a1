"""Moving one message's bytes for the command line: from a file or stdin, through a
library stream, to a file (atomically) or stdout, with a progress bar for people."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from ._cli_paths import Job, check_destination
from .streams import STEP, StreamSource, file_chunks, write_atomically

__all__ = [
    "MessageStream",
    "ProgressBar",
    "Transform",
    "input_chunks",
    "progress_bar",
    "run_job",
]


class MessageStream(Protocol):
    """What the client's ``*_stream`` methods return: chunks, and ``aclose`` to stop."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...


Transform = Callable[[StreamSource, "int | None"], MessageStream]
"""Makes the output stream from a source and, when known, the source's length."""


class ProgressBar(Protocol):
    def update(self, n: float | None = 1, /) -> bool | None: ...

    def close(self) -> None: ...


def progress_bar(total: int | None, *, unit: str, desc: str | None = None) -> ProgressBar | None:
    """A tqdm bar on stderr, only for a person watching: stderr is a terminal and the
    total is known. Pipes and logs get nothing, and without tqdm (the ``cli`` extra)
    there is simply no bar."""
    if total is None or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


async def stdin_chunks() -> AsyncGenerator[bytes, None]:
    """stdin in 1 MiB reads, each in a worker thread, so a slow pipe never blocks the
    event loop (and memory stays at one read)."""
    stream = sys.stdin.buffer
    while chunk := await anyio.to_thread.run_sync(stream.read, STEP, abandon_on_cancel=True):
        yield chunk


def input_chunks(source: Path | None) -> AsyncGenerator[bytes, None]:
    return file_chunks(source) if source is not None else stdin_chunks()


def _input_size(source: Path | None) -> int | None:
    """The bytes left to read, when knowable: a file's size, or stdin redirected from one."""
    if source is not None:
        return source.stat().st_size
    try:
        fd = sys.stdin.fileno()
        info = os.fstat(fd)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return max(info.st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)


async def _counted(
    chunks: AsyncGenerator[bytes, None], bar: ProgressBar
) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            bar.update(len(chunk))
            yield chunk


async def write_stdout(chunks: AsyncIterator[bytes]) -> None:
    """Write to stdout about 1 MiB at a time from a worker thread (one thread hop per
    MiB, not per frame), then flush."""
    out = sys.stdout.buffer
    pending: list[bytes] = []
    size = 0
    async for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size >= STEP:
            await anyio.to_thread.run_sync(out.writelines, pending)
            pending, size = [], 0
    await anyio.to_thread.run_sync(out.writelines, pending)
    await anyio.to_thread.run_sync(out.flush)


async def run_job(job: Job, transform: Transform, *, overwrite: bool, progress: bool) -> None:
    """Stream one input through ``transform`` into its destination.

    A file destination is written by the library's ``write_atomically``: a temporary file
    renamed into place once complete, removed on any failure. stdout cannot be taken
    back: after a failure (non-zero exit) discard what was written.
    """
    if job.destination is not None:
        check_destination(job.destination, overwrite)
    size = _input_size(job.source)
    bar = progress_bar(size, unit="B", desc=job.label) if progress else None
    chunks = input_chunks(job.source)
    source = chunks if bar is None else _counted(chunks, bar)
    # The length lets encryption reuse a cached data key; only a file's is certain.
    stream = transform(source, size if job.source is not None else None)
    try:
        async with contextlib.aclosing(stream):
            if job.destination is None:
                await write_stdout(stream)
            else:
                await write_atomically(job.destination, stream, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()
