"""``run_batch``: one async operation over many items, at most ``concurrency`` at once,
results in item order, one result per item whatever happens to the others."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel
import pytest

import aioenvelope
from aioenvelope import (
    BatchProgress,
    BatchResult,
    EnvelopeClient,
    RawAesKeyring,
    errors,
    run_batch,
)
from aioenvelope.batch import BatchFailure, BatchSuccess


class Tracker:
    """Counts operations in flight and remembers the most seen at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[int] = []
        self.finished: list[int] = []

    async def op(self, item: int) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        self.started.append(item)
        try:
            # Uneven durations, so completions come out of order.
            await anyio.sleep(random.Random(item).random() * 0.005)
            if item % 7 == 3:
                raise ValueError(f"item {item} is bad")
            return item * 10
        finally:
            self.running -= 1
            self.finished.append(item)


async def test_results_come_back_in_item_order_with_errors_recorded() -> None:
    tracker = Tracker()
    items = list(range(30))
    results = await run_batch(items, tracker.op, concurrency=5)
    assert [r.item for r in results] == items
    assert sorted(tracker.finished) == items
    assert tracker.finished != items  # they did complete out of order
    for result in results:
        if result.item % 7 == 3:
            assert not result.ok
            assert isinstance(result.error, ValueError)
            assert str(result.error) == f"item {result.item} is bad"
            assert result.value is None
        else:
            assert result.ok
            assert result.error is None
            assert result.value == result.item * 10


@pytest.mark.parametrize("concurrency", [1, 3, 8, 50])
async def test_never_more_than_concurrency_operations_at_once(concurrency: int) -> None:
    tracker = Tracker()
    results = await run_batch(range(40), tracker.op, concurrency=concurrency)
    assert [(r.item, r.value) for r in results if r.ok] == [
        (i, i * 10) for i in range(40) if i % 7 != 3
    ]
    assert [r.item for r in results if not r.ok] == [i for i in range(40) if i % 7 == 3]
    assert tracker.running == 0
    assert tracker.most <= concurrency
    if concurrency == 1:
        assert tracker.started == list(range(40))  # one at a time, in order


@pytest.mark.parametrize("concurrency", [2, 5])
async def test_the_limit_is_used_when_operations_are_slow(concurrency: int) -> None:
    running = most = 0

    async def op(item: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await anyio.sleep(0.005)
        running -= 1
        return item

    await run_batch(range(20), op, concurrency=concurrency)
    assert most == concurrency


async def test_progress_is_reported_once_per_item() -> None:
    seen: list[BatchProgress] = []
    items = list(range(25))
    results = await run_batch(items, Tracker().op, concurrency=4, on_progress=seen.append)
    assert len(seen) == len(items)
    assert [p.done for p in seen] == list(range(1, 26))
    assert all(p.total == 25 for p in seen)
    assert seen[-1].done == seen[-1].total
    assert seen[-1].failed == sum(1 for r in results if not r.ok) == 4
    failed = [p.failed for p in seen]
    assert failed == sorted(failed)  # never goes down


async def test_async_iterable_input_has_no_total() -> None:
    async def items() -> AsyncIterator[int]:
        for i in range(12):
            await anyio.lowlevel.checkpoint()
            yield i

    seen: list[BatchProgress] = []
    results = await run_batch(items(), Tracker().op, concurrency=3, on_progress=seen.append)
    assert [r.item for r in results] == list(range(12))
    assert [r.value for r in results if r.ok] == [i * 10 for i in range(12) if i % 7 != 3]
    assert {p.total for p in seen} == {None}
    assert seen[-1].done == 12


async def test_sync_iterator_input_has_no_total() -> None:
    def items() -> Iterator[int]:
        yield from range(6)

    seen: list[BatchProgress] = []
    results = await run_batch(items(), Tracker().op, on_progress=seen.append)
    assert [r.item for r in results] == list(range(6))
    assert {p.total for p in seen} == {None}


async def test_async_input_is_pulled_only_as_capacity_frees() -> None:
    """Backpressure: a large (or endless) source is not read far ahead of the work."""
    pulled = 0
    done = 0
    ahead: list[int] = []

    async def items() -> AsyncIterator[int]:
        nonlocal pulled
        for i in range(40):
            pulled += 1
            ahead.append(pulled - done)
            yield i

    async def op(item: int) -> int:
        nonlocal done
        await anyio.sleep(0.001)
        done += 1
        return item

    await run_batch(items(), op, concurrency=4)
    assert max(ahead) <= 4 + 1  # the running ones plus the one waiting for a slot


async def test_empty_input_gives_no_results_and_no_progress() -> None:
    seen: list[BatchProgress] = []
    assert await run_batch([], Tracker().op, on_progress=seen.append) == []
    assert seen == []


@pytest.mark.parametrize("concurrency", [0, -1, True, 1.5, "2", None])
async def test_concurrency_must_be_a_positive_int(concurrency: object) -> None:
    called: list[int] = []

    async def op(item: int) -> int:
        called.append(item)
        return item

    with pytest.raises(errors.ConfigurationError, match="concurrency"):
        await run_batch([1, 2], op, concurrency=concurrency)  # type: ignore[arg-type]
    assert called == []


def test_batch_result_ok_follows_error() -> None:
    succeeded: BatchResult[str, int] = BatchSuccess("x", 1)
    assert (succeeded.ok, succeeded.value, succeeded.error) == (True, 1, None)
    error = RuntimeError("no")
    failed: BatchResult[str, int] = BatchFailure("x", error)
    assert (failed.ok, failed.value, failed.error) == (False, None, error)
    assert "value" not in repr(BatchSuccess("x", b"secret"))  # values stay out of logs


async def test_cancellation_stops_the_batch_and_leaves_no_task_running() -> None:
    started: list[int] = []
    cancelled: list[int] = []
    finished: list[int] = []
    release = anyio.Event()

    async def op(item: int) -> int:
        started.append(item)
        try:
            await release.wait()  # never set: only cancellation ends these
        except anyio.get_cancelled_exc_class():
            cancelled.append(item)
            raise
        finished.append(item)
        return item

    tasks_before = asyncio.all_tasks()
    with anyio.move_on_after(0.05) as scope:
        await run_batch(range(100), op, concurrency=6)
        pytest.fail("run_batch returned though its operations never finish")
    assert scope.cancelled_caught
    assert sorted(started) == list(range(6))  # no new work once the slots were full
    assert sorted(cancelled) == sorted(started)
    assert finished == []
    await anyio.lowlevel.checkpoint()
    assert asyncio.all_tasks() == tasks_before


async def test_cancelling_from_outside_propagates_through_an_async_source() -> None:
    async def items() -> AsyncIterator[int]:
        i = 0
        while True:  # endless: only cancellation stops the batch
            yield i
            i += 1

    async def op(item: int) -> int:
        await anyio.sleep(0.001)
        return item

    tasks_before = asyncio.all_tasks()
    async with anyio.create_task_group() as tg:

        async def runner() -> None:
            await run_batch(items(), op, concurrency=4)

        tg.start_soon(runner)
        await anyio.sleep(0.03)
        tg.cancel_scope.cancel()
    await anyio.lowlevel.checkpoint()
    assert asyncio.all_tasks() == tasks_before


async def test_a_base_exception_stops_the_batch_and_starts_no_further_item() -> None:
    """Only ``Exception``s are per-item results; anything else (here a custom
    ``BaseException``, raised by item 2 while items 0 and 1 wait) ends the whole batch:
    the waiting items are cancelled, no further item starts (the raising item's slot is
    no go-ahead), and the task group's ``BaseExceptionGroup`` holds just that exception."""

    class Stop(BaseException):
        pass

    started: list[int] = []
    cancelled: list[int] = []
    never = anyio.Event()

    async def op(item: int) -> int:
        started.append(item)
        if item == 2:
            raise Stop
        try:
            await never.wait()
        except anyio.get_cancelled_exc_class():
            cancelled.append(item)
            raise
        return item

    tasks_before = asyncio.all_tasks()
    with pytest.raises(BaseException) as info:  # noqa: PT011 - the group's type is checked below
        await run_batch(range(50), op, concurrency=3)
    # The builtin on 3.11+, the exceptiongroup backport (anyio's dependency) on 3.10.
    assert type(info.value).__name__ == "BaseExceptionGroup"
    assert [type(e) for e in getattr(info.value, "exceptions", ())] == [Stop]
    assert started == [0, 1, 2]
    assert sorted(cancelled) == [0, 1]
    await anyio.lowlevel.checkpoint()
    assert asyncio.all_tasks() == tasks_before


async def test_batch_reencrypt_of_fifty_messages_reports_exactly_the_corrupted_ones() -> None:
    """Rotation verifies every old message to its end, so damage in the body (a cut, a
    flipped tag byte, bytes after the message) fails its item as header damage does; a
    signed message is re-encrypted like any other. Every other item is rotated."""
    key_a, key_b = os.urandom(32), os.urandom(32)
    old_keyring = RawAesKeyring("batch", "a", key_a)
    new_keyring = RawAesKeyring("batch", "b", key_b)
    context = {"job": "rotate"}
    signed_suite = aioenvelope.AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
    async with EnvelopeClient(old_keyring, frame_length=128) as client:
        blobs = [
            await client.encrypt(os.urandom(i * 37), encryption_context=context) for i in range(50)
        ]
        signed = await client.encrypt(
            b"signed", encryption_context=context, algorithm_suite=signed_suite
        )
        plaintexts = [await client.decrypt(blob) for blob in blobs]
        plaintexts[40] = b"signed"
        tag_offset = aioenvelope.inspect(blobs[11]).header_length - 1
        corrupted = {
            3: blobs[3][:40],  # ends inside the header
            11: bytes(b ^ 1 if i == tag_offset else b for i, b in enumerate(blobs[11])),  # tag
            15: blobs[15][:-10],  # ends inside the final frame
            27: b"\x09" + blobs[27][1:],  # not a message at all
            33: blobs[33][:-1] + bytes([blobs[33][-1] ^ 1]),  # the final frame's tag
            45: blobs[45] + b"\x00",  # a byte after the message
        }
        items = [corrupted.get(i, blob) for i, blob in enumerate(blobs)]
        items[40] = signed  # re-encrypted like the others
        seen: list[BatchProgress] = []

        async def rotate(blob: bytes) -> bytes:
            return await client.reencrypt(blob, to_keyring=new_keyring)

        results = await run_batch(items, rotate, concurrency=8, on_progress=seen.append)

    assert [r.item for r in results] == items
    failures = {i: r.error for i, r in enumerate(results) if not r.ok}
    assert set(failures) == {3, 11, 15, 27, 33, 45}
    assert isinstance(failures[3], errors.TruncatedMessageError)
    assert isinstance(failures[11], errors.AuthenticationError)
    assert isinstance(failures[15], errors.TruncatedMessageError)
    assert isinstance(failures[27], errors.MalformedMessageError)
    assert isinstance(failures[33], errors.AuthenticationError)
    assert isinstance(failures[45], errors.MalformedMessageError)
    assert (seen[-1].done, seen[-1].failed, seen[-1].total) == (50, 6, 50)
    rotated = {i: r.value for i, r in enumerate(results) if r.value is not None}
    assert set(rotated) == set(range(50)) - set(failures)
    assert aioenvelope.inspect(rotated[40]).algorithm_suite is signed_suite
    async with EnvelopeClient(new_keyring) as reader:
        for i, value in rotated.items():
            assert aioenvelope.inspect(value).message_id != aioenvelope.inspect(items[i]).message_id
            assert await reader.decrypt(value, encryption_context=context) == plaintexts[i]
    async with EnvelopeClient(old_keyring) as old_reader:
        with pytest.raises(errors.NoUsableKeyError):
            await old_reader.decrypt(rotated[0])
