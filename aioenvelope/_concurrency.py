"""Run a few awaitables at once and report failures as the library's own errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

from .errors import EnvelopeError

T = TypeVar("T")


async def gather_in_order(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` concurrently and return their results in order.

    A task group re-raises failures as an ``ExceptionGroup``, which no
    ``except EnvelopeError`` catches; here the first library error is raised itself,
    after the others finished (each KMS call is bounded by its deadline). Anything that
    is not a library error (a bug, cancellation) propagates as the task group raises it.
    """
    results: list[T | None] = [None] * len(calls)
    failures: list[EnvelopeError] = []

    async def run(index: int, call: Callable[[], Awaitable[T]]) -> None:
        try:
            results[index] = await call()
        except EnvelopeError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(run, index, call)
    if failures:
        raise failures[0]
    return results  # type: ignore[return-value]  # every slot was filled
