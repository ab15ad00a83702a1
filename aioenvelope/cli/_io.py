"""Moving one message's bytes for the command line: from a file or stdin, through a
library stream, to a file (atomically) or stdout, with a progress bar for people."""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from ..streams import (
    STEP,
    StreamSource,
    _exists_at,
    file_chunks,
    write_atomically,
    write_atomically_at,
)
from ._args import PROG
from ._paths import CliError, Job, check_destination, open_directory, open_source

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


_told_no_tqdm = False


def progress_bar(total: int | None, *, unit: str, desc: str | None = None) -> ProgressBar | None:
    """A tqdm bar on stderr, only for a person watching: stderr is a terminal and the
    total is known. Pipes and logs get nothing. Without tqdm (the ``cli`` extra) the
    person watching is told once per run where the bar is (``-q`` silences that too)."""
    global _told_no_tqdm
    if total is None or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        if not _told_no_tqdm:
            _told_no_tqdm = True
            print(
                f"{PROG}: no progress bar: it needs tqdm, pip install 'aioenvelope[cli]' "
                "(-q hides this note)",
                file=sys.stderr,
            )
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


async def fd_chunks(fd: int) -> AsyncGenerator[bytes, None]:
    """An open file's bytes in :data:`STEP`-sized reads, each in a worker thread (the
    caller owns ``fd`` and closes it)."""
    while chunk := await anyio.to_thread.run_sync(os.read, fd, STEP):
        yield chunk


def _stdin_size() -> int | None:
    """The bytes left to read on stdin, when it is redirected from a file."""
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

    A file destination is written by the library's ``write_atomically``: a file with no
    name (or a hidden one) given its name once complete, so nothing partial is ever
    left. A directory tree's output goes into the directory :func:`open_directory`
    opened without following links (and its input is opened the same way, unless
    ``--follow-symlinks``). stdout cannot be taken back: after a failure (non-zero
    exit) discard what was written.
    """
    tree = job.tree
    if job.destination is not None and tree is None:
        check_destination(job.destination, overwrite)
    dir_fd = source_fd = None
    try:
        if tree is not None:
            dir_fd = await anyio.to_thread.run_sync(
                functools.partial(open_directory, tree.output_root, tree.parts, create=True)
            )
            if not overwrite and _exists_at(dir_fd, tree.output_name):
                raise CliError(f"{job.destination} already exists; pass --force to replace it")
        if job.source is not None:
            source_fd = await anyio.to_thread.run_sync(open_source, job)
            info = os.fstat(source_fd)
            # Only a regular file's size is its length (a FIFO's is 0).
            size: int | None = info.st_size if stat.S_ISREG(info.st_mode) else None
            chunks = fd_chunks(source_fd)
        else:
            size, chunks = _stdin_size(), stdin_chunks()
        bar = progress_bar(size, unit="B", desc=job.label) if progress else None
        source = chunks if bar is None else _counted(chunks, bar)
        # The length lets encryption reuse a cached data key; only a file's is certain.
        stream = transform(source, size if job.source is not None else None)
        try:
            async with contextlib.aclosing(stream):
                if job.destination is None:
                    await write_stdout(stream)
                elif tree is None:
                    await write_atomically(job.destination, stream, overwrite=overwrite)
                else:
                    assert dir_fd is not None
                    await write_atomically_at(
                        dir_fd,
                        tree.output_name,
                        stream,
                        overwrite=overwrite,
                        display=str(job.destination),
                    )
        finally:
            if bar is not None:
                bar.close()
    finally:
        for fd in (source_fd, dir_fd):
            if fd is not None:
                os.close(fd)
