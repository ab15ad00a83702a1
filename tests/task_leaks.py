"""Checks that a cancelled or abandoned stream leaves no task of its own behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def other_tasks() -> set[asyncio.Task[Any]]:
    """Every task on the loop but the one asking (take it before, compare after)."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def settle(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``predicate()`` holds (no clock: a bounded number of turns)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")
