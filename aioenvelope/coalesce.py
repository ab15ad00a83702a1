"""Coalescing: concurrent identical misses share one call.

The call runs in its own task, and every caller (the first included) awaits it through
``asyncio.shield``: cancelling any caller, whether by anyio, ``Task.cancel()`` or a
timeout, neither cancels the shared call nor fails or hangs the others, and takes effect
at once for that caller. A failure reaches every waiter and is not remembered: the next
request tries again. ``aclose`` cancels what is still running when the client closes.

Plain asyncio tasks rather than an anyio task group: a task group must be exited by the
task that entered it, which frameworks that open and close clients in different tasks
(test fixtures, some lifespans) do not guarantee; and aioboto3 runs only on asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, TypeVar

from .errors import ConfigurationError
from .stats import StatsRecorder

__all__ = ["Coalescer"]

T = TypeVar("T")


class Coalescer:
    def __init__(self, stats: StatsRecorder) -> None:
        self._stats = stats
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``'s result, shared with concurrent callers of the same ``key``."""
        task = self._inflight.get(key)
        if task is not None:
            self._stats.coalesced_waits += 1
        else:

            async def shared() -> T:
                return await call()

            task = asyncio.get_running_loop().create_task(shared())
            self._inflight[key] = task
            task.add_done_callback(partial(self._forget, key))
        try:
            result: T = await asyncio.shield(task)
        except asyncio.CancelledError:
            if _being_cancelled() or not task.cancelled():
                raise  # this caller was cancelled: that is its own business
            # The shared call was cancelled under a caller nobody cancelled: the client
            # closed meanwhile (aclose). A CancelledError would look like the caller's
            # own cancellation (and vanish inside a TaskGroup): say what happened.
            raise ConfigurationError(
                "the EnvelopeClient was closed while this call waited for a key service: "
                "close the client only after its requests are done"
            ) from None
        return result

    def _forget(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark it retrieved even if every waiter went away

    async def aclose(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation request pending (Python 3.11+; on
    3.10, which cannot tell, every CancelledError is taken as the caller's own)."""
    current = asyncio.current_task()
    cancelling = getattr(current, "cancelling", None)
    return cancelling is None or cancelling() > 0
