"""Backpressure, early stop and cancellation: a stream pulls its source only as fast
as it is consumed, closes it however iteration ends, and leaves no task behind; an
error from the source reaches the consumer unchanged.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest
from chunkers import (
    ClosableChunks,
    agen,
    fixed_chunks,
)
from frame_layout import REGULAR_OVERHEAD
from stream_outcome import assert_verified_prefix
from suites import KIB, MIB
from task_leaks import other_tasks, settle

from aioenvelope import (
    DecryptingStream,
    EncryptingStream,
    EnvelopeClient,
    RawAesKeyring,
    StreamSource,
)

CONTEXT = {"tenant": "t1", "purpose": "streams"}

# -- 4. backpressure, early stop, cancellation -------------------------------------------


async def payload_for(client: EnvelopeClient, direction: str, data: bytes) -> bytes:
    """What a stream of ``direction`` reads: the plaintext, or a message of it."""
    return data if direction == "encrypt" else await client.encrypt(data)


def open_stream(
    client: EnvelopeClient, direction: str, source: StreamSource
) -> EncryptingStream | DecryptingStream:
    """``client.encrypt_stream(source)`` or ``client.decrypt_stream(source)``."""
    if direction == "encrypt":
        return client.encrypt_stream(source)
    return client.decrypt_stream(source)


class CountingSource:
    """An async generator of ``count`` chunks that counts what it handed out."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0
        self.closed = False

    async def gen(self) -> AsyncIterator[bytes]:
        try:
            for chunk in self.chunks:
                self.pulled += 1
                yield chunk
        finally:
            self.closed = True


async def test_encrypt_stream_pulls_the_source_only_as_fast_as_it_is_consumed(
    aes_keyring: RawAesKeyring,
) -> None:
    source = CountingSource([os.urandom(64 * KIB)] * 64)
    async with EnvelopeClient(aes_keyring, frame_length=64 * KIB) as client:
        stream = client.encrypt_stream(source.gen())
        assert source.pulled == 0
        async with stream:
            await anext(stream)  # the header
            assert source.pulled <= 1
            for frames in range(1, 11):
                chunk = await anext(stream)
                assert len(chunk) == 64 * KIB + REGULAR_OVERHEAD
                assert source.pulled <= frames + 2
            assert not source.closed
    assert source.closed
    assert source.pulled <= 12


async def test_decrypt_stream_pulls_the_source_only_as_fast_as_it_is_consumed(
    aes_keyring: RawAesKeyring,
) -> None:
    data = os.urandom(4 * MIB)
    async with EnvelopeClient(aes_keyring, frame_length=64 * KIB) as client:
        blob = await client.encrypt(data)
        source = CountingSource(fixed_chunks(blob, 64 * KIB))
        received = 0
        async with client.decrypt_stream(source.gen()) as stream:
            for _ in range(10):
                chunk = await anext(stream)
                assert chunk == data[received : received + len(chunk)]
                received += len(chunk)
                frames = received // (64 * KIB)
                assert source.pulled <= frames + 2
            assert not source.closed
    assert source.closed
    assert source.pulled <= 12 < len(source.chunks)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
@pytest.mark.parametrize("how", ["async-with", "aclose"])
async def test_stopping_early_closes_the_source(
    client: EnvelopeClient, direction: str, how: str
) -> None:
    data = os.urandom(64 * 20)
    payload = await payload_for(client, direction, data)
    source = CountingSource(fixed_chunks(payload, 100))
    stream = open_stream(client, direction, source.gen())
    if how == "async-with":
        async with stream:
            await anext(stream)
            await anext(stream)
    else:
        await anext(stream)
        await anext(stream)
        await stream.aclose()
        await stream.aclose()  # idempotent
    assert source.closed
    assert source.pulled < len(source.chunks)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_sync_generator_source_is_closed_when_stopping_early(
    client: EnvelopeClient, direction: str
) -> None:
    data = os.urandom(64 * 20)
    payload = await payload_for(client, direction, data)
    closed: list[bool] = []

    def source() -> Iterator[bytes]:
        try:
            yield from fixed_chunks(payload, 100)
        finally:
            closed.append(True)

    stream = open_stream(client, direction, source())
    async with stream:
        await anext(stream)
        await anext(stream)
        assert closed == []
    assert closed == [True]


@pytest.mark.parametrize("how", ["async-with", "aclose"])
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_closing_a_stream_before_iterating_closes_a_started_generator_source(
    client: EnvelopeClient, direction: str, how: str
) -> None:
    """``async with`` / ``aclose()`` close the source however iteration ends, including
    never having started: a generator the caller already started gets its ``finally``
    run (it may hold a resource)."""
    payload = await payload_for(client, direction, b"p" * 100)
    closed: list[bool] = []

    async def source() -> AsyncIterator[bytes]:
        try:
            yield b""  # primed by the caller below
            yield payload
        finally:
            closed.append(True)

    primed = source()
    assert await anext(primed) == b""
    stream = open_stream(client, direction, primed)
    if how == "async-with":
        async with stream:
            pass
    else:
        await stream.aclose()
    assert closed == [True]


@pytest.mark.parametrize("iterate", [True, False], ids=["after-two-chunks", "before-iterating"])
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_closing_a_stream_calls_aclose_on_an_iterator_source(
    client: EnvelopeClient, direction: str, iterate: bool
) -> None:
    data = os.urandom(64 * 10)
    payload = await payload_for(client, direction, data)
    source = ClosableChunks(fixed_chunks(payload, 100))
    stream = open_stream(client, direction, source)
    async with stream:
        if iterate:
            await anext(stream)
            await anext(stream)
        assert not source.closed
    assert source.closed


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_closing_a_stream_before_iterating_closes_an_unstarted_generator_source(
    client: EnvelopeClient, direction: str
) -> None:
    """The source cannot be read after the stream that owns it was closed."""
    payload = await payload_for(client, direction, b"p" * 100)
    generator = agen([payload])
    stream = open_stream(client, direction, generator)
    async with stream:
        pass
    with pytest.raises(StopAsyncIteration):
        await anext(generator)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_cancelling_the_consumer_closes_the_source_and_leaves_no_tasks(
    client: EnvelopeClient, direction: str
) -> None:
    data = os.urandom(64 * 10)
    payload = await payload_for(client, direction, data)
    waiting = asyncio.Event()
    closed: list[bool] = []
    received: list[bytes] = []

    async def stalling_source() -> AsyncIterator[bytes]:
        try:
            yield payload[: len(payload) // 2]
            waiting.set()
            await asyncio.Event().wait()  # never set: the producer stalls
            yield payload[len(payload) // 2 :]
        finally:
            closed.append(True)

    before = other_tasks()
    stream = open_stream(client, direction, stalling_source())

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(waiting.wait(), 5)
    await settle(lambda: len(received) >= 1, "a first chunk")
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert closed == [True]
    await asyncio.sleep(0)
    assert other_tasks() - before == set()
    if direction == "decrypt":
        assert_verified_prefix(b"".join(received), data, 64)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_cancelling_a_consumer_between_chunks_closes_the_source_via_async_with(
    client: EnvelopeClient, direction: str
) -> None:
    data = os.urandom(64 * 10)
    payload = await payload_for(client, direction, data)
    source = CountingSource(fixed_chunks(payload, 70))
    got_one = asyncio.Event()
    stream = open_stream(client, direction, source.gen())

    async def consume() -> None:
        async with stream:
            async for _chunk in stream:
                if source.pulled:  # the source is started (not so at the header)
                    got_one.set()
                    await asyncio.Event().wait()  # a slow consumer, busy elsewhere

    before = other_tasks()
    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 5)
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert source.closed
    await asyncio.sleep(0)
    assert other_tasks() - before == set()


async def test_an_error_from_the_source_reaches_the_consumer_unchanged(
    client: EnvelopeClient,
) -> None:
    class Boom(Exception):
        pass

    message = await client.encrypt(b"a" * 500)
    for direction, prefix in (("encrypt", b"a" * 200), ("decrypt", message[:200])):
        closed: list[bool] = []

        async def failing(
            prefix: bytes = prefix, closed: list[bool] = closed
        ) -> AsyncIterator[bytes]:
            try:
                yield prefix
                raise Boom("disk on fire")
            finally:
                closed.append(True)

        stream = open_stream(client, direction, failing())
        with pytest.raises(Boom, match="disk on fire"):
            await stream.read_all()
        assert closed == [True]
