"""The streaming engine's pacing: short steps inline, long ones in a worker thread."""

from __future__ import annotations

import threading

from aioenvelope.streams import STEP, _Pacer


def _thread_id() -> int:
    return threading.get_ident()


async def test_a_short_step_runs_inline_on_the_event_loop_thread() -> None:
    pacer = _Pacer()
    assert await pacer.run(1024, _thread_id) == threading.get_ident()


async def test_a_step_predicted_over_budget_runs_in_a_worker_thread() -> None:
    pacer = _Pacer(budget=0.002, rate=1e9)
    # 64 MiB at 1 GB/s is ~67 ms: far over a 2 ms budget.
    assert await pacer.run(64 * STEP, _thread_id) != threading.get_ident()


def slow() -> int:
    """Busy for ~20 ms on a step that claims 1 MiB: far below 1 MiB per 2 ms."""
    threading.Event().wait(0.02)
    return threading.get_ident()


def fast() -> int:
    return threading.get_ident()


async def test_two_slow_inline_steps_in_a_row_move_the_next_ones_to_a_thread() -> None:
    pacer = _Pacer(budget=0.002, rate=1e12)
    assert await pacer.run(STEP, slow) == threading.get_ident()
    assert await pacer.run(STEP, slow) == threading.get_ident()  # one could be a hiccup
    assert await pacer.run(STEP, slow) != threading.get_ident()  # two are the machine


async def test_one_slow_inline_step_between_fast_ones_keeps_work_inline() -> None:
    """A single stall (the VM preempted the loop's vCPU mid-step) must not send the
    next steps to threads, where the loop would sit idle waiting for them."""
    pacer = _Pacer(budget=0.002, rate=1e9)  # a no-op "fast" step measures far above it
    for step in (slow, fast, slow, fast, slow):
        assert await pacer.run(STEP, step) == threading.get_ident()
    assert await pacer.run(STEP, fast) == threading.get_ident()


async def test_an_offloaded_small_step_lets_the_estimate_recover() -> None:
    pacer = _Pacer(budget=0.002, rate=1e8)  # 1 MiB predicted at ~10 ms: offloaded
    offloaded = 0
    for _ in range(20):
        if await pacer.run(STEP, _thread_id) != threading.get_ident():
            offloaded += 1
        else:
            break
    assert 0 < offloaded < 20  # it came back inline after a few steps


async def test_piece_size_starts_small_grows_on_fast_steps_and_halves_on_a_slow_one() -> None:
    """A stream's first pieces fault fresh buffers in (slow on some VMs): they start at
    64 KiB and grow only while steps stay within the budget."""
    pacer = _Pacer(budget=0.002, rate=1e12)
    assert pacer.piece_size() == 64 << 10
    sizes = []
    for _ in range(6):
        await pacer.run_inline(pacer.piece_size(), fast)
        sizes.append(pacer.piece_size())
    assert sizes == [128 << 10, 256 << 10, 512 << 10, STEP, STEP, STEP]
    await pacer.run_inline(STEP, slow)
    assert pacer.piece_size() == STEP // 2
