"""Coalescing: concurrent identical misses share one call.

The request that finds no call in flight makes it, inside a shielded cancel scope, so
cancelling that request does not cancel the shared call nor fail or hang the others;
its own cancellation takes effect once the call returns (within the KMS deadline). A
task owned by the client would avoid that delay, but a task group must be exited by the
task that entered it, which frameworks that open and close clients in different tasks
(test fixtures, some lifespans) do not guarantee.

A failure reaches every waiter and is not remembered: the next request tries again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import anyio

from .stats import StatsRecorder

__all__ = ["Coalescer"]

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: Exception | None = None


class Coalescer:
    def __init__(self, stats: StatsRecorder) -> None:
        self._stats = stats
        self._inflight: dict[Hashable, _Flight[Any]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``'s result, shared with concurrent callers of the same ``key``."""
        flight: _Flight[T] | None = self._inflight.get(key)
        if flight is not None:
            self._stats.coalesced_waits += 1
            await flight.done.wait()
        else:
            flight = self._inflight[key] = _Flight()
            try:
                with anyio.CancelScope(shield=True):
                    flight.result = await call()
            except Exception as exc:
                flight.error = exc
            finally:
                del self._inflight[key]
                flight.done.set()
        if flight.error is not None:
            raise flight.error
        return flight.result  # type: ignore[return-value]  # set whenever error is None
