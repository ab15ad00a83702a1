"""Run one async operation over many objects: bounded concurrency, progress, and a
result per object, so that one failure never stops or loses the rest."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

from .errors import ConfigurationError

__all__ = ["BatchProgress", "BatchResult", "run_batch"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchResult(Generic[T, R]):
    """One object's outcome: ``value`` when it succeeded, ``error`` when it did not."""

    item: T
    value: R | None = field(default=None, repr=False)
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class BatchProgress:
    """Counts so far, passed to ``on_progress`` after each object."""

    done: int
    failed: int
    total: int | None  # None when the items are an iterator of unknown length


async def _slot(limiter: anyio.Semaphore) -> None:
    """Take a slot, then make sure the batch was not cancelled meanwhile: a slot freed by
    a task that was being cancelled is no go-ahead to start another item."""
    await limiter.acquire()
    await anyio.lowlevel.checkpoint_if_cancelled()


async def run_batch(
    items: Iterable[T] | AsyncIterable[T],
    operation: Callable[[T], Awaitable[R]],
    *,
    concurrency: int = 8,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> list[BatchResult[T, R]]:
    """Apply ``operation`` to every item, at most ``concurrency`` at once; results come
    back in the items' order. An ``Exception`` from one item is recorded in its result
    and the others go on; cancellation (and other ``BaseException``s) stop the batch.

    For example, to re-encrypt every object of a table under a new key::

        results = await run_batch(
            rows, lambda row: client.reencrypt(row.blob, to_keyring=new_keyring), concurrency=16
        )
        failed = [r for r in results if not r.ok]
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError("concurrency must be a positive int")
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    results: list[BatchResult[T, R] | None] = []
    done = failed = 0
    limiter = anyio.Semaphore(concurrency)

    async def one(index: int, item: T) -> None:
        nonlocal done, failed
        try:
            results[index] = BatchResult(item, value=await operation(item))
        except Exception as exc:
            results[index] = BatchResult(item, error=exc)
            failed += 1
        done += 1
        if on_progress is not None:
            on_progress(BatchProgress(done, failed, total))
        # Only a finished item frees its slot: one ended by a BaseException (which stops
        # the batch) must not let the loop below start another item meanwhile.
        limiter.release()

    async with anyio.create_task_group() as tg:
        index = 0
        if isinstance(items, AsyncIterable):
            async for item in items:
                await _slot(limiter)  # backpressure: never more than `concurrency` pending
                results.append(None)
                tg.start_soon(one, index, item)
                index += 1
        else:
            for item in items:
                await _slot(limiter)
                results.append(None)
                tg.start_soon(one, index, item)
                index += 1
    return [r for r in results if r is not None]
