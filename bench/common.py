"""Timing, comparison and the report table, shared by every benchmark module.

Shared 2-core machines are noisy, so a case never quotes a figure alone: it times its own
subject and its references in interleaved rounds (the same noise hits every side), repeats
the round, and compares one statistic (median by default, or best) of the per-round rates.
Targets are informational: a MISS is printed, never asserted.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "KIB",
    "MIB",
    "BenchError",
    "Case",
    "Reference",
    "Result",
    "Runner",
    "Settings",
    "Stat",
    "Subject",
    "Timing",
    "check",
    "measure",
    "render",
]

Stat = Literal["median", "best"]
Runner = Callable[[int], Awaitable[None]]
"""Performs the operation ``n`` times; awaited, so async APIs run on the real event loop."""

KIB = 1024
MIB = 1024 * 1024


class BenchError(Exception):
    """A real failure (a round trip that loses data, a misconfigured reference).

    Unlike a missed target, this makes ``run.py`` exit non-zero.
    """


def check(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O``: benchmarks must not time broken code."""
    if not condition:
        raise BenchError(message)


@dataclass(frozen=True)
class Settings:
    """How long to time: quick runs only prove the bench still works, figures are rough."""

    quick: bool
    repeats: int
    batch_seconds: float
    stat: Stat = "median"

    @classmethod
    def make(
        cls,
        *,
        quick: bool,
        repeats: int | None = None,
        batch_seconds: float | None = None,
        stat: Stat = "median",
    ) -> Settings:
        return cls(
            quick=quick,
            repeats=repeats if repeats is not None else (3 if quick else 11),
            batch_seconds=batch_seconds if batch_seconds is not None else (0.02 if quick else 0.2),
            stat=stat,
        )


@dataclass(frozen=True)
class Subject:
    """One implementation of a case's operation."""

    label: str
    run: Runner


@dataclass(frozen=True)
class Reference(Subject):
    """Something to compare ours against; ``target`` is the minimum ours/reference ratio."""

    target: float | None = None  # None: shown for information only


@dataclass(frozen=True)
class Case:
    """One row group of the table: our subject against its references, same work per op."""

    group: str  # e.g. "one-shot 1 KiB 0x0478"
    op: str  # e.g. "encrypt"
    unit: str  # "msg/s" or "MB/s"
    work_per_op: float  # how much of ``unit``'s numerator one op does: 1 message, 16.8 MB
    ours: Subject
    references: tuple[Reference, ...]


@dataclass
class Timing:
    """Per-round rates of one subject, plus what the machine did meanwhile.

    CPU time shows the subject stayed on one core (or lost the CPU to other processes);
    page faults show when a large case measured the allocator more than the cipher.
    """

    label: str
    batch: int
    rates: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    page_faults: int = 0

    def value(self, stat: Stat) -> float:
        return max(self.rates) if stat == "best" else statistics.median(self.rates)

    @property
    def spread(self) -> float:
        """(max - min) / median across rounds: how noisy this figure was."""
        median = statistics.median(self.rates)
        return (max(self.rates) - min(self.rates)) / median if median else 0.0

    @property
    def cores(self) -> float:
        """Process CPU time over wall time while timed: about 1.0 means one busy core."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def faults_per_op(self) -> float:
        ops = self.batch * len(self.rates)
        return self.page_faults / ops if ops else 0.0


@dataclass(frozen=True)
class Result:
    case: Case
    ours: Timing
    references: tuple[Timing, ...]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


async def _batch(run: Runner, n: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and page faults of ``n`` ops, starting with no garbage."""
    gc.collect()
    faults0 = _minor_faults()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await run(n)
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    return t1 - t0, cpu1 - cpu0, _minor_faults() - faults0


async def _calibrate(run: Runner, batch_seconds: float) -> int:
    """Ops per batch so one batch takes about ``batch_seconds``; also serves as warm-up."""
    n = 1
    while True:
        wall, _, _ = await _batch(run, n)
        if wall >= batch_seconds / 2:
            return max(1, round(n * batch_seconds / wall))
        predicted = n * batch_seconds / wall if wall > 0 else n * 10
        n = int(max(2 * n, min(10 * n, predicted)))


async def measure(case: Case, settings: Settings) -> Result:
    """Time ``case``: calibrate (warm-up) each subject, then interleaved rounds.

    The round order rotates so no subject always runs right after the same neighbour.
    """
    subjects = [case.ours, *case.references]
    timings = [Timing(s.label, await _calibrate(s.run, settings.batch_seconds)) for s in subjects]
    for round_no in range(settings.repeats):
        for k in range(len(subjects)):
            i = (k + round_no) % len(subjects)
            timing = timings[i]
            wall, cpu, faults = await _batch(subjects[i].run, timing.batch)
            timing.rates.append(timing.batch * case.work_per_op / wall)
            timing.wall_seconds += wall
            timing.cpu_seconds += cpu
            timing.page_faults += faults
    return Result(case, timings[0], tuple(timings[1:]))


# -- report ---------------------------------------------------------------------------


def _fmt_rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 1000 else f"{value:,.1f} {unit}"


_HEADERS = (
    "case",
    "op",
    "subject",
    "rate",
    "±",
    "cores",
    "faults/op",
    "ours/ref",
    "target",
    "result",
)
_RIGHT = {3, 4, 5, 6, 7}


def _subject_cells(timing: Timing, unit: str, stat: Stat) -> list[str]:
    return [
        timing.label,
        _fmt_rate(timing.value(stat), unit),
        f"{timing.spread:.0%}",
        f"{timing.cores:.2f}",
        f"{timing.faults_per_op:,.0f}",
    ]


def _rows(results: Sequence[Result], stat: Stat) -> tuple[list[list[str]], int, int]:
    """One line per subject: ours first, then each reference with its ratio and verdict."""
    rows: list[list[str]] = []
    passed = missed = 0
    for result in results:
        case, ours = result.case, result.ours
        ours_value = ours.value(stat)
        rows.append([case.group, case.op, *_subject_cells(ours, case.unit, stat), "", "", ""])
        for ref, timing in zip(case.references, result.references, strict=True):
            ratio = ours_value / timing.value(stat)
            if ref.target is None:
                target, verdict = "-", "info"
            else:
                target = f">= {ref.target:g}x"
                verdict = "PASS" if ratio >= ref.target else "MISS"
                passed += verdict == "PASS"
                missed += verdict == "MISS"
            rows.append(
                ["", "", *_subject_cells(timing, case.unit, stat), f"{ratio:.3g}x", target, verdict]
            )
    return rows, passed, missed


def render(results: Sequence[Result], settings: Settings) -> str:
    """The table, its legend and the PASS/MISS tally."""
    rows, passed, missed = _rows(results, settings.stat)
    widths = [max(len(r[i]) for r in [list(_HEADERS), *rows]) for i in range(len(_HEADERS))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in _RIGHT else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    out = [line(_HEADERS), rule]
    for row in rows:
        if row[0] and len(out) > 2:
            out.append("")
        out.append(line(row))
    contended = sum(t.cores < 0.9 for r in results for t in (r.ours, *r.references))
    out += [
        rule,
        f"rate: {settings.stat} of {settings.repeats} interleaved rounds of "
        f"~{settings.batch_seconds:g} s each, after a calibration warm-up (time.perf_counter);",
        "  MB = 10^6 bytes of plaintext.  ±: (max - min) / median of the rounds.",
        "cores: process CPU time / wall time (~1.0: one busy core; lower: the CPU was taken "
        "by other processes).",
        "faults/op: minor page faults per op (fresh memory; costly in VMs).",
        f"targets: {passed} PASS, {missed} MISS (informational: the exit status ignores them).",
    ]
    if contended:
        out.append(
            f"note: {contended} subject(s) ran below 0.9 cores: the machine was busy, rerun "
            "for steadier figures (ratios suffer less: rounds are interleaved)."
        )
    return "\n".join(out)
