"""Run one of our one-shot operations in a loop, for a profiler to watch.

The benchmark itself interleaves references, which would pollute a profile; this runs
only aioenvelope, the same way the bench does::

    pyinstrument bench/hotloop.py encrypt --size 1024
    py-spy record -o enc.svg -- python bench/hotloop.py decrypt --size 16777216
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``bench`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aioenvelope import AlgorithmSuite, EnvelopeClient, RawAesKeyring
from bench.common import check
from bench.oneshot import CONTEXT, FRAME_LENGTH, KEY_NAME, NAMESPACE


async def _loop(op: str, size: int, suite: AlgorithmSuite, seconds: float) -> tuple[int, float]:
    keyring = RawAesKeyring(NAMESPACE, KEY_NAME, os.urandom(32))
    data = os.urandom(size)
    async with EnvelopeClient(
        keyring, algorithm_suite=suite, frame_length=FRAME_LENGTH, cache=None
    ) as c:
        blob = await c.encrypt(data, encryption_context=CONTEXT)
        check(await c.decrypt(blob, encryption_context=CONTEXT) == data, "round trip lost data")
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(16):
                if op == "encrypt":
                    await c.encrypt(data, encryption_context=CONTEXT)
                else:
                    await c.decrypt(blob, encryption_context=CONTEXT)
            n += 16
        return n, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=("encrypt", "decrypt"))
    parser.add_argument("--size", type=int, default=1024, help="plaintext bytes")
    parser.add_argument("--suite", choices=("0478", "0578"), default="0478")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    suite = AlgorithmSuite(int(args.suite, 16))
    n, elapsed = asyncio.run(_loop(args.op, args.size, suite, args.seconds))
    print(
        f"{args.op} {args.size} B {suite.name}: {n} ops in {elapsed:.2f} s = {n / elapsed:,.0f}/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
