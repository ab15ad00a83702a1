"""Absolute latency figures the tests judge only against controls: loop lag and fail-fast.

- Loop lag: a 1 ms ticker beside ``encrypt_stream``/``decrypt_stream`` of 256 MiB (32 MiB
  with ``--quick``, 64 KiB frames) in this process; the worst and 99th-percentile lateness
  of its wake-ups, and the most CPU the loop's thread spent between two of them. Beside
  it, a control: the same ticker next to 0.5 ms busy steps. Target: worst under 10 ms
  (``tests/test_stream_resources.py`` holds the CPU figure to it and the lateness to the
  control, so a noisy machine cannot fail the tests; this is where the wall figure lives).
- Fail fast: the median time for a call refused by an open circuit breaker (the KMS
  endpoint is a closed local port, so five calls fail and open it). Target: under 1 ms.

Printed above the table, informational like every target here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import aioboto3
import anyio.lowlevel

from aioenvelope import EnvelopeClient, KmsKeyring, RawAesKeyring, errors

from .common import MIB, Case, Settings, check

__all__ = ["collect"]

LAG_TARGET_MS = 10.0
REFUSAL_TARGET_MS = 1.0
FRAME_LENGTH = 64 * 1024
CLOSED_PORT_KMS = "http://127.0.0.1:9"  # discard port: nothing listens, the call fails at once
KEY_ARN = "arn:aws:kms:us-west-2:111122223333:key/00000000-0000-4000-8000-000000000000"


class _Ticker:
    """Sleeps 1 ms at a time; per wake-up, how late (wall) and the loop thread's CPU."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.held: list[float] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            start, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - start - 0.001)
            self.held.append(time.thread_time() - cpu)

    def line(self, label: str) -> str:
        lags = sorted(self.lags)
        p99 = lags[int(0.99 * (len(lags) - 1))]
        verdict = "PASS" if lags[-1] * 1e3 < LAG_TARGET_MS else "MISS"
        return (
            f"  {label}: worst {lags[-1] * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, most CPU held "
            f"{max(self.held) * 1e3:.1f} ms, {len(lags)} ticks; target < {LAG_TARGET_MS:g} ms: "
            f"{verdict}"
        )


async def _beside_ticker(work: Callable[[], AsyncIterator[bytes]]) -> tuple[_Ticker, int]:
    ticker = _Ticker()
    task = asyncio.create_task(ticker.run())
    await asyncio.sleep(0.01)
    total = 0
    async for chunk in work():
        total += len(chunk)
    ticker.running = False
    await task
    return ticker, total


async def _control(seconds: float) -> _Ticker:
    ticker = _Ticker()
    task = asyncio.create_task(ticker.run())
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step_end = time.perf_counter() + 0.0005
        while time.perf_counter() < step_end:
            pass
        await anyio.lowlevel.checkpoint()
    ticker.running = False
    await task
    return ticker


async def _chunks(data: bytes) -> AsyncIterator[memoryview]:
    view = memoryview(data)
    for pos in range(0, len(view), MIB):
        yield view[pos : pos + MIB]


async def _loop_lag(size: int) -> list[str]:
    data = os.urandom(size)
    keyring = RawAesKeyring("bench", "lag", os.urandom(32))
    async with EnvelopeClient(keyring, frame_length=FRAME_LENGTH) as client:
        ciphertext = b"".join([c async for c in client.encrypt_stream(_chunks(data))])
        started = time.perf_counter()
        encrypt, sealed = await _beside_ticker(lambda: client.encrypt_stream(_chunks(data)))
        decrypt, opened = await _beside_ticker(lambda: client.decrypt_stream(_chunks(ciphertext)))
        seconds = time.perf_counter() - started
    check(opened == size and sealed == len(ciphertext), "loop-lag round trip lost data")
    control = await _control(seconds / 2)
    mib = size // MIB
    return [
        encrypt.line(f"encrypt_stream {mib} MiB"),
        decrypt.line(f"decrypt_stream {mib} MiB"),
        control.line("control (0.5 ms busy steps, same duration)"),
    ]


async def _refusal_ms(calls: int) -> float:
    session = aioboto3.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-west-2"
    )
    keyring = KmsKeyring(
        KEY_ARN, session=session, endpoint_url=CLOSED_PORT_KMS, check_keys=False, max_attempts=1
    )
    logger = logging.getLogger("aioenvelope")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # the five outages and the breaker's opening are expected
    try:
        return await _time_refusals(keyring, calls)
    finally:
        logger.setLevel(level)


async def _time_refusals(keyring: KmsKeyring, calls: int) -> float:
    async with EnvelopeClient(keyring, cache=None) as client:
        for i in range(5):  # the default threshold: five outages open the breaker
            try:
                await client.encrypt(b"x", encryption_context={"n": str(i)})
            except errors.CircuitOpenError:
                break
            except errors.KMSError as exc:
                check(exc.transient, f"a closed port should be an outage, got {exc}")
        times = []
        for i in range(calls):
            started = time.perf_counter()
            try:
                await client.encrypt(b"x", encryption_context={"refused": str(i)})
            except errors.CircuitOpenError:
                times.append(time.perf_counter() - started)
    check(len(times) == calls, f"only {len(times)} of {calls} calls were refused by the breaker")
    return statistics.median(times) * 1e3


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Measure and print the figures now (no table rows: they are latencies, not rates)."""
    del stack
    lines = await _loop_lag(32 * MIB if settings.quick else 256 * MIB)
    refusal = await _refusal_ms(100 if settings.quick else 1000)
    verdict = "PASS" if refusal < REFUSAL_TARGET_MS else "MISS"
    print("Loop lag: a 1 ms ticker beside a stream in this process (64 KiB frames):")
    print("\n".join(lines))
    print(
        f"Breaker: a call refused by the open circuit breaker, median {refusal * 1e3:.0f} us; "
        f"target < {REFUSAL_TARGET_MS:g} ms: {verdict}",
        flush=True,
    )
    return []
