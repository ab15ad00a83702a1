"""Run one async operation over many objects: bounded concurrency, progress, and a
result per object, so that one failure never stops or loses the rest."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import anyio
import anyio.lowlevel

from .errors import ConfigurationError

__all__ = ["BatchFailure", "BatchProgress", "BatchResult", "BatchSuccess", "run_batch"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchSuccess(Generic[T, R]):
    """An object whose operation returned ``value``. ``ok`` is ``True`` and ``error``
    ``None``, typed as such, so that ``if result.ok`` narrows a :data:`BatchResult`."""

    item: T
    value: R = field(repr=False)  # values stay out of logs

    @property
    def ok(self) -> Literal[True]:
        return True

    @property
    def error(self) -> None:
        return None


@dataclass(frozen=True)
class BatchFailure(Generic[T]):
    """An object whose operation raised ``error``. ``ok`` is ``False`` and ``value``
    ``None``."""

    item: T
    error: Exception

    @property
    def ok(self) -> Literal[False]:
        return False

    @property
    def value(self) -> None:
        return None


BatchResult = BatchSuccess[T, R] | BatchFailure[T]
"""One object's outcome: a :class:`BatchSuccess` or a :class:`BatchFailure`, both with
``.item``, ``.value``, ``.error`` and ``.ok``. Test ``ok`` and the type checker knows
which: ``[r.value for r in results if r.ok]`` is a ``list[R]``, and
``[r.error for r in results if not r.ok]`` a ``list[Exception]``."""


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
        rotated = [r.value for r in results if r.ok]  # a list[bytes] to the type checker
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
            results[index] = BatchSuccess(item, await operation(item))
        except Exception as exc:
            results[index] = BatchFailure(item, exc)
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
