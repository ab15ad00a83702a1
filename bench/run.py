"""Run the benchmarks and print one table: ``python bench/run.py [--quick]``.

``--quick`` is CI's smoke run (same cases, short timing, < 20 s): it proves the bench
still runs, its figures are rough. Targets are informational; the exit status is
non-zero only on real errors (a round trip that loses data, a crash).

New benchmark modules add their ``collect`` function to ``COLLECTORS``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``bench`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend

import aioenvelope
from bench import (
    common,
    esdk,
    hierarchy,
    kms_cache,
    latency,
    oneshot,
    reencrypt,
    stream,
    telemetry,
)

Collector = Callable[[common.Settings, AsyncExitStack], Awaitable[list[common.Case]]]
COLLECTORS: tuple[Collector, ...] = (
    oneshot.collect,
    kms_cache.collect,
    hierarchy.collect,
    stream.collect,
    reencrypt.collect,
    latency.collect,
    telemetry.collect,
)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (CI)")
    parser.add_argument("--repeats", type=int, help="timed rounds per subject")
    parser.add_argument("--batch-seconds", type=float, help="target length of one round")
    parser.add_argument(
        "--stat", choices=("median", "best"), default="median", help="statistic of the rounds"
    )
    parser.add_argument("--only", help="run only cases whose 'case op' contains this text")
    parser.add_argument("--cpu", type=int, help="pin the process to this CPU (Linux)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.batch_seconds is not None and args.batch_seconds <= 0:
        parser.error("--batch-seconds must be positive")
    return args


def _versions(*distributions: str) -> str:
    """``name version`` of each distribution, or ``name not installed``."""
    found = []
    for name in distributions:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def _environment(settings: common.Settings) -> str:
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return "\n".join(
        [
            f"aioenvelope {aioenvelope.__version__}, {esdk.ESDK_LABEL}, "
            f"cryptography {cryptography.__version__} ({backend.openssl_version_text()})",
            _versions("opentelemetry-api", "opentelemetry-sdk"),
            f"{platform.python_implementation()} {platform.python_version()} on "
            f"{platform.machine()}, {os.cpu_count()} CPUs, affinity {affinity}",
            f"mode: {'quick (smoke run: rough figures)' if settings.quick else 'full'}",
        ]
    )


async def _run(settings: common.Settings, only: str | None) -> list[common.Result]:
    results: list[common.Result] = []
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        cases: list[common.Case] = []
        for collect in COLLECTORS:
            cases += await collect(settings, stack)
        if only is not None:
            cases = [c for c in cases if only.lower() in f"{c.group} {c.op}".lower()]
            common.check(bool(cases), f"--only {only!r} matches no case")
        for case in cases:
            print(
                f"[{time.perf_counter() - started:6.1f} s] {case.group} {case.op}",
                file=sys.stderr,
                flush=True,
            )
            results.append(await common.measure(case, settings))
    print(f"[{time.perf_counter() - started:6.1f} s] done", file=sys.stderr, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    settings = common.Settings.make(
        quick=args.quick, repeats=args.repeats, batch_seconds=args.batch_seconds, stat=args.stat
    )
    print(_environment(settings), flush=True)
    try:
        results = asyncio.run(_run(settings, args.only))
    except common.BenchError as exc:
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        return 1
    print()
    print(common.render(results, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
