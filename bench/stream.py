"""``encrypt_stream``/``decrypt_stream`` against raw AES-GCM per frame and the ESDK's stream.

256 MiB (32 MiB with ``--quick``) in 64 KiB frames. Our source is an async generator over
pre-made 1 MiB ``bytes`` chunks (the ciphertext, for decryption, likewise) and the
consumer only counts bytes. The references, timed in the same interleaved rounds:

- raw ``AESGCM`` sealing (opening) the same frames one call per frame on one thread, with
  a distinct IV and an AAD of the format's size per frame: what a single-threaded stream
  could reach with no format code at all. ours/raw is the headline (target >= 0.8x).
- the same calls split over two plain threads (half the frames each; each call releases
  the GIL while it seals): the two-thread ceiling of this machine (cores, memory, and the
  GIL hand-offs between calls). Its ratio to one thread is printed above the table, next
  to the ">= 1.3x raw single-thread when frames are sealed on two threads" target it bounds.
- the ESDK's ``stream()`` with a raw AES key, the same suite, frame length and context,
  read one frame (64 KiB) at a time: its fastest read size here (``read(1 MiB)`` measured
  1.5-2x slower: it grows its output buffer by ``bytes +=``).

Setup is the warm-up: it runs every subject once on the full message (so glibc's malloc
has raised its mmap threshold before anything is timed) and verifies each round trip,
that we read the ESDK's message, and the suite and frame length both sides wrote.
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any

import aws_encryption_sdk
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aioenvelope import DecryptingStream, EncryptingStream, EnvelopeClient, RawAesKeyring

from .common import (
    KIB,
    MIB,
    BenchError,
    Case,
    Reference,
    Runner,
    Settings,
    Subject,
    Timing,
    check,
)
from .esdk import ESDK_LABEL, _raw_aes_provider
from .oneshot import CONTEXT, DEFAULT_SUITE, FRAME_LENGTH, KEY_NAME, NAMESPACE

__all__ = ["collect"]

SIZE, QUICK_SIZE = 256 * MIB, 32 * MIB
CHUNK = MIB  # the sources' chunk size, plaintext and ciphertext alike
ESDK_READ = FRAME_LENGTH  # the ESDK's fastest read size here (see the module docstring)
RAW_TARGET = 0.8
TWO_THREAD_TARGET = 1.3  # the target for ours with frames sealed on two threads
# The format's regular-frame AAD: message ID, content string, sequence number, length.
_FRAME_AAD = b"AWSKMSEncryptionClient Frame"

RAW_LABEL = "raw AESGCM per frame, 1 thread"
RAW_2T_LABEL = "raw AESGCM per frame, 2 threads"
ESDK_STREAM_LABEL = f"{ESDK_LABEL} stream, read({ESDK_READ // KIB} KiB)"


# -- aioenvelope --------------------------------------------------------------------------


async def _source(chunks: Sequence[bytes]) -> AsyncGenerator[bytes, None]:
    for chunk in chunks:
        yield chunk


async def _drain(
    stream: EncryptingStream | DecryptingStream, sink: Callable[[bytes], object] | None = None
) -> int:
    """Bytes the stream yields (each chunk also to ``sink``, when verifying)."""
    total = 0
    async with stream:
        async for chunk in stream:
            total += len(chunk)
            if sink is not None:
                sink(chunk)
    return total


def _ours(
    open_stream: Callable[[], EncryptingStream | DecryptingStream], expected: int, what: str
) -> Subject:
    async def run(n: int) -> None:
        for _ in range(n):
            got = await _drain(open_stream())
            check(got == expected, f"aioenvelope's {what} yielded {got} bytes, not {expected}")

    return Subject("aioenvelope", run)


# -- raw AES-GCM, frame by frame ------------------------------------------------------------


class RawFrames:
    """The message's frames as views into the plaintext chunks (no copy), each with its
    own IV (its sequence number, as in the format) and a 72-byte AAD like the format's;
    plus the sealed frames, for opening. IVs and AADs are made here, not timed."""

    def __init__(self, aead: AESGCM, chunks: Sequence[bytes]) -> None:
        message_id = os.urandom(32)
        self.plaintext = [
            memoryview(chunk)[i : i + FRAME_LENGTH]
            for chunk in chunks
            for i in range(0, len(chunk), FRAME_LENGTH)
        ]
        self.ivs = [seq.to_bytes(12, "big") for seq in range(1, len(self.plaintext) + 1)]
        self.aads = [
            message_id + _FRAME_AAD + seq.to_bytes(4, "big") + len(frame).to_bytes(8, "big")
            for seq, frame in enumerate(self.plaintext, 1)
        ]
        # The sealed frames as views into one buffer: thousands of 64 KiB ``bytes`` held
        # for the whole run shift glibc's heap under the other modules' cases (oneshot's
        # 16 MiB encrypt fell from ~1,100 to ~430 MB/s, its page faults per op 1,366 to
        # 6,811); one large buffer is mmapped on its own and disturbs nothing.
        sealed = [
            aead.encrypt(*args) for args in zip(self.ivs, self.plaintext, self.aads, strict=True)
        ]
        blob = memoryview(b"".join(sealed))
        ends = list(accumulate(map(len, sealed)))
        del sealed
        self.sealed = [blob[start:end] for start, end in pairwise([0, *ends])]
        check(
            all(
                aead.decrypt(iv, sealed, aad) == frame
                for iv, sealed, aad, frame in zip(
                    self.ivs, self.sealed, self.aads, self.plaintext, strict=True
                )
            ),
            "raw AES-GCM round trip lost data",
        )
        self.count = len(self.plaintext)
        self.sealed_bytes = sum(map(len, self.sealed))
        self.plaintext_bytes = sum(map(len, self.plaintext))

    def seal(self, aead: AESGCM, lo: int, hi: int) -> int:
        """Seal frames ``lo:hi``, counting the output bytes (then dropped, as ours are)."""
        plaintext, ivs, aads = self.plaintext, self.ivs, self.aads
        total = 0
        for i in range(lo, hi):
            total += len(aead.encrypt(ivs[i], plaintext[i], aads[i]))
        return total

    def open(self, aead: AESGCM, lo: int, hi: int) -> int:
        """Open (verify and decrypt) frames ``lo:hi``, counting the plaintext bytes."""
        sealed, ivs, aads = self.sealed, self.ivs, self.aads
        total = 0
        for i in range(lo, hi):
            total += len(aead.decrypt(ivs[i], sealed[i], aads[i]))
        return total


FrameWork = Callable[[AESGCM, int, int], int]


def _one_thread(work: FrameWork, aead: AESGCM, count: int, expected: int) -> Runner:
    """All frames on the loop's thread, where ours runs its steps."""

    async def run(n: int) -> None:
        for _ in range(n):
            check(work(aead, 0, count) == expected, "raw AES-GCM lost frames")

    return run


def _on_two_threads(work: FrameWork, aeads: tuple[AESGCM, AESGCM], count: int) -> int:
    """Half the frames on each of two new threads (the caller's thread just waits)."""
    spans = ((0, count // 2), (count // 2, count))
    results: list[int | Exception] = [0, 0]

    def target(slot: int) -> None:
        try:
            results[slot] = work(aeads[slot], *spans[slot])
        except Exception as exc:  # re-raised on the caller's thread below
            results[slot] = exc

    threads = [threading.Thread(target=target, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = 0
    for result in results:
        if isinstance(result, Exception):
            raise BenchError(f"raw AES-GCM on two threads failed: {result!r}") from result
        total += result
    return total


def _two_threads(
    work: FrameWork, aeads: tuple[AESGCM, AESGCM], count: int, expected: int
) -> Runner:
    async def run(n: int) -> None:
        for _ in range(n):
            check(_on_two_threads(work, aeads, count) == expected, "raw AES-GCM lost frames")

    return run


# -- the ESDK's stream API ------------------------------------------------------------------


class EsdkStream:
    """``EncryptionSDKClient.stream`` over ``io.BytesIO``, with the raw AES master key
    provider ``esdk.EsdkReference`` uses (it matches our ``RawAesKeyring``)."""

    def __init__(self, key: bytes) -> None:
        self._client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        )
        self._provider = _raw_aes_provider(NAMESPACE, KEY_NAME, key)

    @staticmethod
    def _pump(stream: Any, sink: Callable[[bytes], object] | None) -> int:
        total = 0
        while chunk := stream.read(ESDK_READ):
            total += len(chunk)
            if sink is not None:
                sink(chunk)
        return total

    def encrypt(self, data: bytes, sink: Callable[[bytes], object] | None = None) -> int:
        with self._client.stream(
            mode="e",
            source=io.BytesIO(data),
            key_provider=self._provider,
            encryption_context=dict(CONTEXT),
            algorithm=Algorithm.get_by_id(DEFAULT_SUITE.suite_id),
            frame_length=FRAME_LENGTH,
        ) as stream:
            return self._pump(stream, sink)

    def decrypt(self, blob: bytes, sink: Callable[[bytes], object] | None = None) -> int:
        """Decrypt and check the context, as ours does (see ``esdk.EsdkReference.decrypt``)."""
        with self._client.stream(
            mode="d", source=io.BytesIO(blob), key_provider=self._provider
        ) as stream:
            total = self._pump(stream, sink)
            stored = stream.header.encryption_context
        for key, value in CONTEXT.items():
            check(stored.get(key) == value, f"ESDK: encryption context mismatch for {key!r}")
        return total


def _esdk(op: Callable[[bytes], int], source: bytes, expected: int, what: str) -> Runner:
    async def run(n: int) -> None:
        for _ in range(n):
            got = op(source)
            check(got == expected, f"the ESDK's {what} yielded {got} bytes, not {expected}")

    return run


# -- verification (also the warm-up) --------------------------------------------------------


def _split(blob: bytes) -> list[bytes]:
    return [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)]


class _Matcher:
    """A sink checking that the chunks it is given spell ``expected``, in order (no join:
    joining 256 MiB costs ~0.3 s of fresh pages here)."""

    def __init__(self, expected: bytes) -> None:
        self._expected = expected
        self._pos = 0
        self._same = True

    def __call__(self, chunk: bytes) -> None:
        end = self._pos + len(chunk)
        self._same = self._same and self._expected[self._pos : end] == chunk
        self._pos = end

    @property
    def matched(self) -> bool:
        return self._same and self._pos == len(self._expected)


async def _verify(
    client: EnvelopeClient, esdk: EsdkStream, chunks: list[bytes], data: bytes
) -> tuple[list[bytes], bytes]:
    """Our ciphertext (in chunks) and the ESDK's for ``data``: each decrypted by us (which
    also reads back the suite and frame length each side wrote: a like-for-like check),
    the ESDK's by the ESDK. (That the ESDK reads our streamed messages is checked by
    oneshot's 16 MiB case, which goes through the same streaming engine.)"""
    parts: list[bytes] = []
    await _drain(client.encrypt_stream(_source(chunks), encryption_context=CONTEXT), parts.append)
    ours = _split(b"".join(parts))
    parts = []
    esdk.encrypt(data, parts.append)
    theirs = b"".join(parts)
    del parts
    size = f"{len(data)} bytes"
    for name, blob_chunks in (("aioenvelope", ours), ("ESDK", _split(theirs))):
        match = _Matcher(data)
        stream = client.decrypt_stream(_source(blob_chunks), encryption_context=CONTEXT)
        await _drain(stream, match)
        check(
            match.matched,
            f"aioenvelope's decrypt_stream did not give back the plaintext of the {name} "
            f"stream ({size})",
        )
        header = stream.header
        check(header is not None, f"no header after decrypting the {name} stream")
        assert header is not None
        check(
            header.algorithm_suite is DEFAULT_SUITE and header.frame_length == FRAME_LENGTH,
            f"the {name} stream is {header.algorithm_suite.name} with frame length "
            f"{header.frame_length}; the bench asked for {DEFAULT_SUITE.name} and "
            f"{FRAME_LENGTH}",
        )
    match = _Matcher(data)
    esdk.decrypt(theirs, match)
    check(match.matched, f"the ESDK's stream did not give back its plaintext ({size})")
    return ours, theirs


# -- the two-thread ceiling, printed above the table ----------------------------------------


@dataclass
class _Tally:
    """Each batch one runner timed: rate, wall and CPU seconds."""

    label: str
    batches: list[tuple[float, float, float]] = field(default_factory=list)

    def rounds(self, repeats: int) -> Timing | None:
        """The timed rounds: ``common.measure`` calibrates every subject first, then
        times one batch per round, so they are the last ``repeats`` batches (the table's
        figures, give or take its ``gc.collect``). None if this subject was not timed."""
        if len(self.batches) <= repeats:  # filtered out by --only, or a failure
            return None
        timing = Timing(self.label, 1)
        for rate, wall, cpu in self.batches[-repeats:]:
            timing.rates.append(rate)
            timing.wall_seconds += wall
            timing.cpu_seconds += cpu
        return timing


def _recorded(run: Runner, work_per_op: float, tally: _Tally) -> Runner:
    async def recorded(n: int) -> None:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await run(n)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        tally.batches.append((n * work_per_op / wall, wall, cpu))

    return recorded


def _report_ceiling(
    settings: Settings, group: str, pairs: Sequence[tuple[str, _Tally, _Tally]]
) -> None:
    repeats, stat = settings.repeats, settings.stat
    lines = []
    for op, one_tally, two_tally in pairs:
        one, two = one_tally.rounds(repeats), two_tally.rounds(repeats)
        if one is None or two is None:
            continue
        ceiling = two.value(stat) / one.value(stat)
        per_round = [b / a for a, b in zip(one.rates, two.rates, strict=True)]
        verdict = (
            f"a {TWO_THREAD_TARGET:g}x target is {TWO_THREAD_TARGET / ceiling:.0%} of it"
            if ceiling >= TWO_THREAD_TARGET
            else f"a {TWO_THREAD_TARGET:g}x target is above it"
        )
        lines.append(
            f"  {group} {op}: {ceiling:.2f}x ({stat} of {repeats} rounds; per round "
            f"{min(per_round):.2f}-{max(per_round):.2f}x; the 2 threads used "
            f"{two.cores:.2f} cores); {verdict}"
        )
        if two.cores < 1.5:
            lines.append(
                "    (under 1.5 cores: another process held a CPU, or the threads waited "
                "on each other; rerun on a quiet machine before trusting this ceiling)"
            )
    if not lines:
        return
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < 2:
        lines.append("  (the process is pinned to one CPU, so two threads cannot beat one)")
    print("Two-thread ceiling: raw AES-GCM per frame on 2 threads / on 1 thread, same rounds:")
    print("\n".join(lines), flush=True)


# -- cases ----------------------------------------------------------------------------------


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Build, verify and warm up the streaming cases (``--quick``: a 32 MiB message)."""
    size = QUICK_SIZE if settings.quick else SIZE
    key = os.urandom(32)
    # No key manager cache, as in oneshot: the ESDK reference has none either (with a raw
    # AES key a data key costs microseconds, nothing next to a 256 MiB message).
    client = await stack.enter_async_context(
        EnvelopeClient(
            RawAesKeyring(NAMESPACE, KEY_NAME, key), frame_length=FRAME_LENGTH, cache=None
        )
    )
    check(
        client.algorithm_suite is DEFAULT_SUITE,
        f"EnvelopeClient's default suite is {client.algorithm_suite}, not 0x0478",
    )
    esdk = EsdkStream(key)
    # Pseudo-random plaintext: AES-GCM's speed does not depend on it, and os.urandom
    # takes ~10 ms per MiB in this VM.
    rng = random.Random(size)
    chunks = [rng.randbytes(CHUNK) for _ in range(size // CHUNK)]
    data = b"".join(chunks)  # the ESDK's source: one buffer behind io.BytesIO
    ours_chunks, esdk_blob = await _verify(client, esdk, chunks, data)
    aead = AESGCM(key)
    frames = RawFrames(aead, chunks)
    aeads = (aead, AESGCM(key))  # one AESGCM per thread: nothing shared
    for work, expected in (
        (frames.seal, frames.sealed_bytes),
        (frames.open, frames.plaintext_bytes),
    ):
        check(
            _on_two_threads(work, aeads, frames.count) == expected,
            "raw AES-GCM on two threads lost frames",
        )

    group = f"{size // MIB} MiB 0x{DEFAULT_SUITE.suite_id:04X} 64K frames, stream"
    mb = size / 1e6
    ct_length = sum(map(len, ours_chunks))
    esdk_ct_length = len(esdk_blob)
    pairs: list[tuple[str, _Tally, _Tally]] = []
    cases: list[Case] = []
    for op, ours, work, expected, esdk_run in (
        (
            "encrypt",
            _ours(
                lambda: client.encrypt_stream(_source(chunks), encryption_context=CONTEXT),
                ct_length,
                "encrypt_stream",
            ),
            frames.seal,
            frames.sealed_bytes,
            _esdk(esdk.encrypt, data, esdk_ct_length, "encrypting stream"),
        ),
        (
            "decrypt",
            _ours(
                lambda: client.decrypt_stream(_source(ours_chunks), encryption_context=CONTEXT),
                size,
                "decrypt_stream",
            ),
            frames.open,
            size,
            _esdk(esdk.decrypt, esdk_blob, size, "decrypting stream"),
        ),
    ):
        one_tally, two_tally = _Tally(RAW_LABEL), _Tally(RAW_2T_LABEL)
        pairs.append((op, one_tally, two_tally))
        references = (
            Reference(
                RAW_LABEL,
                _recorded(_one_thread(work, aead, frames.count, expected), mb, one_tally),
                target=RAW_TARGET,
            ),
            Reference(
                RAW_2T_LABEL,
                _recorded(_two_threads(work, aeads, frames.count, expected), mb, two_tally),
            ),
            Reference(ESDK_STREAM_LABEL, esdk_run),
        )
        cases.append(Case(group, op, "MB/s", mb, ours, references))
    stack.callback(_report_ceiling, settings, group, pairs)
    return cases
