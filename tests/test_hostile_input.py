"""Hostile input costs linear CPU and memory bounded by what arrived: measured.

Each case runs in a child Python (so a quadratic path cannot hang the suite, and its
limits touch nothing else): the message is built first, then the child caps its own CPU
time (``RLIMIT_CPU``: a path that blows the budget is killed by SIGXCPU) and, for the
memory cases, its address space (``RLIMIT_AS``), and runs the shape. It reports the CPU
time and peak-RSS growth of the shape alone and how it ended.

Budgets are about 10x what a linear reader costs on a slow, busy 2-core VM, and far
below what the quadratic paths these tests pin cost (the figures are in each case).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from child_process import cap, cpu_seconds, linux_only, run_child

from aioenvelope import AlgorithmSuite, EnvelopeClient, RawAesKeyring, errors
from aioenvelope.format import MessageDecryptor
from aioenvelope.format.body import frame_iv
from aioenvelope.format.header import MAX_FRAME_LENGTH

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
NAMESPACE = "hostile"
KEY_NAME = "key-1"
KEY = bytes(range(32))  # fixed: the child and the parent build the same keyring
MiB = 1 << 20
TRUNCATED_IN_HEADER = "the message is truncated: it ends inside the message header. "


# -- the child -------------------------------------------------------------------------


def _outcome(run: Callable[[], object]) -> tuple[str, str]:
    """How the shape ended: ('ok', ''), or the library error's exact class name and what
    it says (the parent pins both); anything not ours is reported as escaped."""
    try:
        run()
    except errors.EnvelopeError as exc:
        return type(exc).__name__, str(exc)
    except Exception as exc:  # reported: the parent fails on anything not ours
        return f"escaped {type(exc).__name__}", str(exc)
    return "ok", ""


def child(name: str, cpu_budget: float, address_space: int | None) -> dict[str, Any]:
    """Entry point of the child process: prepare the shape, cap, run, report."""
    run = SHAPES[name]()
    cap(cpu_budget, address_space, grace=1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = cpu_seconds()
    outcome, said = _outcome(run)
    cpu = cpu_seconds() - start
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return {"cpu": cpu, "outcome": outcome, "said": said, "rss_growth": rss_growth}


# -- shapes: each returns the run, its message already built -----------------------------


def _never_finished_header() -> bytes:
    """A v2 header declaring 65535 encrypted data keys of 18 bytes each (1.3 MB), cut
    before its end: no key is needed to make a reader parse it."""
    edk = struct.pack(">H1sH1sH12s", 1, b"p", 1, b"i", 12, b"c" * 12)
    lead = b"\x02" + struct.pack(">H", COMMIT.suite_id) + bytes(32) + b"\x00\x00\xff\xff"
    return (lead + edk * 0xFFFF)[:-100]


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def _header_in_1_kib_chunks() -> Callable[[], object]:
    data = _never_finished_header()

    def run() -> None:
        decryptor = MessageDecryptor(max_encrypted_data_keys=0xFFFF)
        for chunk in _pieces(data, 1024):
            decryptor.receive_data(chunk)
            assert decryptor.read_header() is None
        decryptor.receive_eof()
        decryptor.read_header()

    return run


def _client(**kwargs: Any) -> EnvelopeClient:
    return EnvelopeClient(RawAesKeyring(NAMESPACE, KEY_NAME, KEY), **kwargs)


def _streamed(message: bytes, chunk: int, **kwargs: Any) -> Callable[[], object]:
    """decrypt_stream over ``message`` in ``chunk``-byte pieces; checks nothing released
    is wrong by returning the joined output (the caller compares)."""

    async def main() -> bytes:
        async with _client(**kwargs) as client:
            stream = client.decrypt_stream(_pieces(message, chunk))
            return await stream.read_all()

    return lambda: asyncio.run(main())


def _header_stream_in_1_kib_chunks() -> Callable[[], object]:
    return _streamed(_never_finished_header(), 1024, max_encrypted_data_keys=0xFFFF)


def _one_frame_of_64_kib_one_byte_at_a_time() -> Callable[[], object]:
    sys.path.insert(0, str(Path(__file__).parent))
    from messages import build_encryptor

    data_key = os.urandom(32)
    plaintext = os.urandom(64 << 10)
    encryptor = build_encryptor(COMMIT, data_key=data_key, frame_length=64 << 10)
    message = encryptor.encrypt_all(plaintext)

    def run() -> None:
        decryptor = MessageDecryptor(max_encrypted_data_keys=10)
        released = []
        for i in range(len(message)):
            decryptor.receive_data(message[i : i + 1])
            if decryptor.read_header() is not None:
                break
        decryptor.begin_body(data_key)
        for i in range(len(encryptor.header), len(message)):
            decryptor.receive_data(message[i : i + 1])
            assert decryptor.next_plaintext() is None  # the one frame is the final one
        decryptor.receive_eof()
        released.append(decryptor.read_all())
        assert b"".join(released) == plaintext

    return run


def _non_framed_64_kib_stream_one_byte_at_a_time() -> Callable[[], object]:
    """A non-framed message written by the reference ESDK, streamed in 1-byte chunks."""
    sys.path.insert(0, str(Path(__file__).parent))
    from esdk_peer import esdk_encrypt, peer_keys, raw_aes_key

    plaintext = os.urandom(64 << 10)
    message, header = esdk_encrypt(
        peer_keys(raw_aes_key(NAMESPACE, KEY_NAME, KEY)),
        plaintext,
        suite_id=COMMIT.suite_id,
        encryption_context={"purpose": "hostile"},
        frame_length=0,
    )
    assert not header.framed
    stream = _streamed(message, 1)

    def run() -> None:
        assert stream() == plaintext

    return run


def _hostile_frame_prefix(frame_length: int) -> bytes:
    """A message whose authenticated header declares ``frame_length`` (the encrypter
    holds the key), then frame 1's prefix: all that a hostile writer must send."""

    async def main() -> bytes:
        async with _client(frame_length=frame_length) as client:
            return await client.encrypt(b"x")

    message = asyncio.run(main())
    header_length = len(message) - (4 + 4 + 12 + 4 + 1 + 16)  # one final frame of 1 byte
    return message[:header_length] + struct.pack(">I", 1) + frame_iv(1)


def _declared_2_gib_frame_with_1_mib_sent() -> Callable[[], object]:
    message = _hostile_frame_prefix(MAX_FRAME_LENGTH) + bytes(MiB)
    return _streamed(message, 64 << 10)


def _frame_larger_than_the_memory_limit_arriving() -> Callable[[], object]:
    """A 1 GiB frame whose bytes really arrive (512 MiB of them) under a 384 MiB
    address-space allowance: the reader's buffer cannot grow, and says so."""
    prefix = _hostile_frame_prefix(1 << 30)
    zeros = bytes(MiB)

    def source() -> Iterator[bytes]:
        yield prefix
        for _ in range(512):
            yield zeros

    async def main() -> None:
        async with _client() as client:
            await client.decrypt_stream(source()).read_all()

    return lambda: asyncio.run(main())


def _header_larger_than_the_memory_limit() -> Callable[[], object]:
    """A header that really arrives, 512 MiB of it (65535 EDKs of 3 x 64 KiB would make
    12.9 GB), fed 1 MiB at a time under a 256 MiB address-space allowance."""
    field = struct.pack(">H", 0xFFFF) + bytes(0xFFFF)
    edk = struct.pack(">H", 1) + b"p" + field + field  # provider ID, info, ciphertext
    lead = b"\x02" + struct.pack(">H", COMMIT.suite_id) + bytes(32) + b"\x00\x00\xff\xff"
    chunk = lead + edk * (MiB // len(edk))

    def run() -> None:
        decryptor = MessageDecryptor(max_encrypted_data_keys=0xFFFF)
        decryptor.receive_data(chunk)
        rest = chunk[len(lead) :]
        for _ in range(512):
            assert decryptor.read_header() is None
            decryptor.receive_data(rest)

    return run


SHAPES: dict[str, Callable[[], Callable[[], object]]] = {
    "header in 1 KiB chunks": _header_in_1_kib_chunks,
    "header stream in 1 KiB chunks": _header_stream_in_1_kib_chunks,
    "64 KiB frame one byte at a time": _one_frame_of_64_kib_one_byte_at_a_time,
    "non-framed 64 KiB stream one byte at a time": _non_framed_64_kib_stream_one_byte_at_a_time,
    "2 GiB frame declared, 1 MiB sent": _declared_2_gib_frame_with_1_mib_sent,
    "1 GiB frame arriving past the memory limit": _frame_larger_than_the_memory_limit_arriving,
    "header arriving past the memory limit": _header_larger_than_the_memory_limit,
}


# -- the parent ------------------------------------------------------------------------


def measure(name: str, *, cpu_budget: float, address_space: int | None = None) -> dict[str, Any]:
    """Run shape ``name`` in a child Python; its report. Fails if the child died (over
    its CPU budget: SIGXCPU) or printed no report."""
    code = (
        "import json, test_hostile_input as t; "
        f"print(json.dumps(t.child({name!r}, {cpu_budget!r}, {address_space!r})))"
    )
    stdout = run_child(name, code, cpu_budget=cpu_budget)
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return report


@linux_only
def test_a_never_finished_header_in_1_kib_chunks_costs_linear_cpu() -> None:
    """1.3 MB of header (65535 small EDKs) that never ends, fed 1 KiB at a time: each
    field is parsed once. Re-parsing from the start per chunk cost 6.3 s (~5 ms a chunk)
    on the reviewer's machine; linear is ~0.3 s."""
    report = measure("header in 1 KiB chunks", cpu_budget=4.0)
    assert report["outcome"] == "TruncatedMessageError"
    assert report["said"].startswith(TRUNCATED_IN_HEADER)
    assert report["cpu"] < 4.0
    assert report["rss_growth"] < 64 * MiB  # the header once, plus its parsed keys


@linux_only
def test_a_never_finished_header_streamed_in_1_kib_chunks_costs_linear_cpu() -> None:
    report = measure("header stream in 1 KiB chunks", cpu_budget=6.0)
    assert report["outcome"] == "TruncatedMessageError"
    assert report["said"].startswith(TRUNCATED_IN_HEADER)
    assert report["cpu"] < 6.0
    assert report["rss_growth"] < 64 * MiB


@linux_only
def test_a_64_kib_frame_fed_one_byte_at_a_time_costs_linear_cpu() -> None:
    """Summing the queued chunks on every call made this quadratic: 94 s of CPU."""
    report = measure("64 KiB frame one byte at a time", cpu_budget=3.0)
    assert (report["outcome"], report["said"]) == ("ok", "")
    assert report["cpu"] < 3.0


@linux_only
def test_a_non_framed_body_streamed_one_byte_at_a_time_costs_linear_cpu() -> None:
    report = measure("non-framed 64 KiB stream one byte at a time", cpu_budget=15.0)
    assert (report["outcome"], report["said"]) == ("ok", "")
    assert report["cpu"] < 15.0


@linux_only
def test_a_declared_2_gib_frame_reserves_memory_only_for_what_arrived() -> None:
    """The prefix of a frame of 2^31-1 bytes, then 1 MiB, then the end: under a 512 MiB
    address-space allowance the message is simply truncated. Reserving the declared
    frame at its prefix took 2 GiB of address space (an OSError under the limit)."""
    report = measure("2 GiB frame declared, 1 MiB sent", cpu_budget=5.0, address_space=512 * MiB)
    assert report["outcome"] == "TruncatedMessageError"
    assert report["said"].startswith("the message is truncated: it ends inside frame 1. ")
    assert report["rss_growth"] < 64 * MiB


@linux_only
def test_a_frame_that_outgrows_the_memory_limit_is_a_message_limit_error() -> None:
    """Allocation failure (RLIMIT_AS here) is a library error, not a bare OSError or
    MemoryError, and it comes only once the bytes have arrived."""
    report = measure(
        "1 GiB frame arriving past the memory limit", cpu_budget=10.0, address_space=384 * MiB
    )
    assert report["outcome"] == "MessageLimitError"
    assert re.match(
        r"frame 1 needs \d+ bytes of memory for its plaintext, more than this process may "
        "allocate",
        report["said"],
    )


@linux_only
def test_a_header_that_outgrows_the_memory_limit_is_a_message_limit_error() -> None:
    report = measure(
        "header arriving past the memory limit", cpu_budget=10.0, address_space=256 * MiB
    )
    assert report["outcome"] == "MessageLimitError"
    assert report["said"].startswith(
        "the message header is larger than this process may allocate: lower max_encrypted_data_keys"
    )
