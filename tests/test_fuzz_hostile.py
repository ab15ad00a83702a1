"""A fuzzing pass over every reader, with real keys: only library errors, linear time,
bounded memory.

The corpus holds messages of all 11 suites, framed and non-framed, that our keyrings
can open: the reference ESDK writes them (raw AES keys; raw RSA for the signed and the
v1 HKDF suites), and our client writes the large-frame one. Hypothesis mutates them
(bit flips, bytes set, length-sized fields set to edge values, cuts, deletions,
insertions, duplicated and spliced ranges), often behind the header only, so the body,
the non-framed content and the footer are reached with a header that verifies.

Each target -- ``decrypt``, ``decrypt_stream`` in 1-byte and in random chunks,
``inspect``, ``reencrypt`` -- must: raise only :class:`EnvelopeError` subclasses;
return exactly the original plaintext when it succeeds (a mutation that leaves the
message valid can only be a no-op); and, streaming, release only a prefix of the
original before failing.

The pass runs in a child Python, under an address-space limit (1 GiB over what the
corpus needs) and a CPU limit, and checks each example's CPU time against a budget
linear in the chunks and bytes it was fed (about 10x what it costs), so a path that
allocates for a declared length or re-reads what it was given fails here.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from child_process import cap, linux_only, run_child
from cryptography.hazmat.primitives.asymmetric import rsa
from esdk_peer import RsaWrapping, esdk_encrypt, peer_keys, raw_aes_key, raw_rsa_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from message_fields import INPUT_REFUSALS, body_fields

import aioenvelope
from aioenvelope import (
    AlgorithmSuite,
    CommitmentPolicy,
    EnvelopeClient,
    Keyring,
    MessageHeader,
    RawAesKeyring,
    RawRsaKeyring,
    errors,
    inspect,
)
from aioenvelope.format.body import LARGE_FRAME

NAMESPACE = "fuzz"
KEY_NAME = "key-1"
CONTEXT = {"purpose": "fuzz", "ключ": "値"}
SMALL_FRAME = 128  # the ESDK takes multiples of 128 only
MiB = 1 << 20

# -- the corpus ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    suite: AlgorithmSuite
    frame_length: int  # 0: non-framed
    size: int
    writer: str = "esdk"  # or "ours"

    @property
    def kind(self) -> str:
        """Raw RSA for the signed and the v1 HKDF suites, raw AES for the others."""
        hkdf_v1 = self.suite.message_version == 1 and "NO_KDF" not in self.suite.name
        return "rsa" if self.suite.signing or hkdf_v1 else "aes"

    @property
    def small(self) -> bool:
        return self.size < 4096


SPECS = [
    *(Spec(suite, framing, 300) for suite in AlgorithmSuite for framing in (SMALL_FRAME, 0)),
    Spec(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, SMALL_FRAME, 0),
    Spec(AlgorithmSuite.AES_128_GCM_IV12_TAG16_HKDF_SHA256, 0, 0),
    Spec(
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384, SMALL_FRAME, 2 * SMALL_FRAME
    ),
    # Large enough to be opened piece by piece (frame) and as a large non-framed body.
    Spec(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, LARGE_FRAME, LARGE_FRAME + 999, "ours"),
    Spec(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, 0, LARGE_FRAME + 999),
]
SMALL = [i for i, spec in enumerate(SPECS) if spec.small]


@dataclass(frozen=True)
class Sample:
    spec: Spec
    message: bytes = field(repr=False)
    plaintext: bytes = field(repr=False)
    header_length: int
    fields: tuple[int, ...] = field(repr=False)  # offsets of length and number fields


def field_offsets(message: bytes, spec: Spec, header_length: int) -> tuple[int, ...]:
    """Where the message's length, count and sequence fields start: the EC length, the
    EDK count and lengths, the frame length; each frame's sequence number, IV and final
    length (or the non-framed IV and length); the signature length."""
    suite = spec.suite
    at = 20 if suite.message_version == 1 else 35
    ec_length = int.from_bytes(message[at : at + 2], "big")
    fields = [at, at + 2 + ec_length]
    at += 4 + ec_length
    for _ in range(int.from_bytes(message[at - 2 : at], "big")):
        for _ in range(3):
            fields.append(at)
            at += 2 + int.from_bytes(message[at : at + 2], "big")
    auth = (12 if suite.message_version == 1 else 0) + 16
    fields += [at, header_length - auth - suite.info.suite_data_length - 4]
    at = header_length
    if spec.frame_length == 0:
        fields += [at, at + 12]
        at += 36 + spec.size
    else:
        while message[at : at + 4] != b"\xff\xff\xff\xff":
            fields += [at, at + 4]
            at += 32 + spec.frame_length
        fields += [at, at + 4, at + 8, at + 20]
        at += 40 + int.from_bytes(message[at + 20 : at + 24], "big")
    if suite.signing:
        fields.append(at)
    return tuple(fields)


@dataclass(frozen=True)
class Case:
    """A sample and its mutated bytes, shown in full only when short (hypothesis prints
    failing examples; its database replays them)."""

    sample: Sample
    message: bytes

    def __iter__(self) -> Iterator[Any]:
        return iter((self.sample, self.message))

    def __repr__(self) -> str:
        shown = self.message.hex() if len(self.message) <= 2048 else f"<{len(self.message)} bytes>"
        return f"Case({self.sample!r}, message={shown})"


@dataclass(frozen=True)
class Keys:
    aes: bytes
    rsa: rsa.RSAPrivateKey
    target: bytes  # reencrypt's target keyring

    def keyring(self, kind: str) -> Keyring:
        if kind == "aes":
            return RawAesKeyring(NAMESPACE, KEY_NAME, self.aes)
        return RawRsaKeyring(
            NAMESPACE, KEY_NAME, private_key=self.rsa, padding=RsaWrapping.OAEP_SHA256.padding()
        )

    def target_keyring(self) -> Keyring:
        return RawAesKeyring(NAMESPACE, "target", self.target)


@functools.cache
def keys() -> Keys:
    return Keys(
        os.urandom(32),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        os.urandom(32),
    )


def _client(keyring: Keyring, **kwargs: Any) -> EnvelopeClient:
    return EnvelopeClient(
        keyring, commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT, **kwargs
    )


def _write(spec: Spec, plaintext: bytes) -> bytes:
    if spec.writer == "ours":

        async def seal() -> bytes:
            async with _client(keys().keyring(spec.kind), frame_length=spec.frame_length) as c:
                return await c.encrypt(
                    plaintext, encryption_context=CONTEXT, algorithm_suite=spec.suite
                )

        return asyncio.run(seal())

    if spec.kind == "aes":
        master = raw_aes_key(NAMESPACE, KEY_NAME, keys().aes)
    else:
        master = raw_rsa_key(NAMESPACE, KEY_NAME, RsaWrapping.OAEP_SHA256, private_key=keys().rsa)
    message, _ = esdk_encrypt(
        peer_keys(master),
        plaintext,
        suite_id=spec.suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=spec.frame_length,
    )
    return message


@functools.cache
def corpus() -> tuple[Sample, ...]:
    samples = []
    for spec in SPECS:
        plaintext = os.urandom(spec.size)
        message = _write(spec, plaintext)
        length = aioenvelope.inspect(message).header_length
        fields = field_offsets(message, spec, length)
        samples.append(Sample(spec, message, plaintext, length, fields))
    return tuple(samples)


# -- mutations ------------------------------------------------------------------------------

EDGE_VALUES = [0, 1, 0x7F, 0xFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**36 - 31, 2**64 - 1]
OPS = ["flip", "set", "u16", "u32", "u64", "delete", "insert", "cut", "duplicate", "splice"]
REGIONS = ["anywhere", "behind the header", "at the end", "a field"]


@st.composite
def mutated(draw: st.DrawFn, indices: list[int]) -> Case:
    """A corpus sample and up to three mutations of it. Positions are drawn as integers
    and taken modulo the length (hypothesis needs draws that do not depend on earlier
    ones): anywhere, behind the header, in the last 160 bytes (the footer of signed
    messages, the final frame, the non-framed tag), or at the start of a length, count
    or sequence field (see :func:`field_offsets`), a quarter each."""
    sample = corpus()[draw(st.sampled_from(indices))]
    message = bytearray(sample.message)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(OPS))
        region = draw(st.sampled_from(REGIONS))
        where = draw(st.integers(0, 2**20))
        if region == "a field":
            at = min(sample.fields[where % len(sample.fields)], len(message))
        else:
            lo = {"anywhere": 0, "behind the header": sample.header_length}.get(
                region,
                len(message) - 160,  # the footer, the final frame (or the content's end)
            )
            lo = max(min(lo, len(message)), 0)
            at = lo + where % (len(message) - lo + 1)
        span = draw(st.integers(1, 64))
        value = draw(st.sampled_from(EDGE_VALUES))
        noise = draw(st.binary(min_size=1, max_size=24))
        if op == "flip" and at < len(message):
            message[at] ^= 1 << (value % 8)
        elif op == "set" and at < len(message):
            message[at] = noise[0]
        elif op in ("u16", "u32", "u64"):
            width = int(op[1:]) // 8
            message[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
        elif op == "delete":
            del message[at : at + span]
        elif op == "insert":
            message[at:at] = noise
        elif op == "cut":
            del message[at:]
        elif op == "duplicate":
            message[at:at] = message[at : at + span * 8]
        elif op == "splice":
            other = corpus()[draw(st.sampled_from(indices))].message
            start = draw(st.integers(0, 2**20)) % len(other)
            message[at : at + span] = other[start : start + span * 8]
    return Case(sample, bytes(message))


def chunked(message: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(c % (len(message) + 1) for c in cuts)
    bounds = [0, *points, len(message)]
    return [message[a:b] for a, b in itertools.pairwise(bounds)]


# -- the outcome rules -------------------------------------------------------------------


def within_budget(chunks: int, size: int, run: Callable[[], None]) -> None:
    """Run one example; its CPU time must stay linear: 0.5 s, plus 200 us per chunk fed
    (a decrypt_stream step is ~20 us), plus 50 ns per byte (~10x AES-GCM and copies)."""
    start = time.process_time()
    run()
    spent = time.process_time() - start
    budget = 0.5 + 200e-6 * chunks + 50e-9 * size
    assert spent < budget, f"{spent:.3f} s of CPU for {chunks} chunks, {size} bytes"


# With the header bytes intact (so it parsed, its EDK unwrapped and its tag verified),
# only the body or the footer can be at fault.
BODY_REFUSALS = INPUT_REFUSALS - {errors.NoUsableKeyError}
# inspect reads the header and decrypts nothing.
HEADER_READ_REFUSALS = {
    errors.MalformedMessageError,
    errors.TruncatedMessageError,
    errors.MessageLimitError,
}


def header_intact(sample: Sample, message: bytes) -> bool:
    return message[: sample.header_length] == sample.message[: sample.header_length]


def assert_refused_for_its_bytes(sample: Sample, message: bytes, exc: errors.EnvelopeError) -> None:
    """A refusal is of a changed message, exactly one of INPUT_REFUSALS, and with the
    header intact one of BODY_REFUSALS that does not blame the header."""
    assert message != sample.message, f"the unchanged message was refused: {exc!r}"
    assert type(exc) in INPUT_REFUSALS, repr(exc)
    if header_intact(sample, message):
        assert type(exc) in BODY_REFUSALS, repr(exc)
        assert "header" not in str(exc), repr(exc)


def decrypted_or_refused(sample: Sample, message: bytes, run: Callable[[], bytes]) -> None:
    try:
        plaintext = run()
    except errors.EnvelopeError as exc:
        assert_refused_for_its_bytes(sample, message, exc)
        return
    assert plaintext == sample.plaintext


async def _stream(client: EnvelopeClient, chunks: list[bytes], out: list[bytes]) -> None:
    async def source() -> Any:
        for chunk in chunks:
            yield chunk

    async with client.decrypt_stream(source()) as stream:
        async for piece in stream:
            out.append(piece)


def assert_verified_prefix(sample: Sample, released: bytes) -> None:
    """What a refused stream released is the plaintext's first bytes, in whole regular
    frames, none of the final frame (the ESDK's may be empty: then every regular frame
    may go out); of non-framed content, nothing."""
    spec = sample.spec
    assert released == sample.plaintext[: len(released)], "released bytes are not plaintext"
    if not spec.frame_length:
        assert released == b"", "non-framed content released before it verified"
        return
    fields = body_fields(
        sample.message,
        sample.header_length,
        frame_length=spec.frame_length,
        signing=spec.suite.signing,
    )
    final = next(f for f in fields if f.name == "final length")
    final_length = int.from_bytes(sample.message[final.start : final.end], "big")
    assert len(released) % spec.frame_length == 0, "released up to the middle of a frame"
    assert len(released) <= len(sample.plaintext) - final_length, "the final frame was released"


def streamed_prefix_or_all(sample: Sample, chunks: list[bytes]) -> None:
    """Success releases exactly the plaintext; failure a verified prefix of it (whole
    frames, none of the final frame; nothing of non-framed content), then one of
    INPUT_REFUSALS (anything else propagates and fails the example)."""
    out: list[bytes] = []

    async def main() -> None:
        async with _client(keys().keyring(sample.spec.kind)) as client:
            await _stream(client, chunks, out)

    try:
        asyncio.run(main())
    except errors.EnvelopeError as exc:
        assert_refused_for_its_bytes(sample, b"".join(chunks), exc)
        assert_verified_prefix(sample, b"".join(out))
        return
    assert b"".join(out) == sample.plaintext


# Examples per fuzzer; AIOENVELOPE_FUZZ_SCALE multiplies them for a longer local run.
_SCALE = float(os.environ.get("AIOENVELOPE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, round(examples * _SCALE)),
        deadline=None,  # time is bounded per example by within_budget, in CPU seconds
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@fuzz(300)
@given(case=mutated(list(range(len(SPECS)))))
def fuzz_decrypt(case: Case) -> None:
    sample, message = case

    async def main() -> bytes:
        async with _client(keys().keyring(sample.spec.kind)) as client:
            return await client.decrypt(message)

    within_budget(
        1, len(message), lambda: decrypted_or_refused(sample, message, lambda: asyncio.run(main()))
    )


@fuzz(300)
@given(case=mutated(SMALL))
def fuzz_decrypt_stream_one_byte_at_a_time(case: Case) -> None:
    sample, message = case
    chunks = [message[i : i + 1] for i in range(len(message))]
    within_budget(len(chunks), len(message), lambda: streamed_prefix_or_all(sample, chunks))


@fuzz(300)
@given(case=mutated(list(range(len(SPECS)))), cuts=st.lists(st.integers(0, 2**20), max_size=24))
def fuzz_decrypt_stream_in_random_chunks(case: Case, cuts: list[int]) -> None:
    sample, message = case
    chunks = chunked(message, cuts)
    within_budget(len(chunks), len(message), lambda: streamed_prefix_or_all(sample, chunks))


def inspected(data: bytes) -> MessageHeader | errors.EnvelopeError:
    """The header ``inspect`` reads from ``data``, or the library error it raises."""
    try:
        return inspect(data)
    except errors.EnvelopeError as exc:
        return exc


@fuzz(500)
@given(case=mutated(list(range(len(SPECS)))), cut=st.integers(0, 2**20))
def fuzz_inspect(case: Case, cut: int) -> None:
    """inspect reads the header only: any bytes, or any prefix of them, give a header or
    exactly one of HEADER_READ_REFUSALS; bytes that start with the sample's header give
    that header, and a prefix cut inside it is a truncation."""
    sample, message = case
    original = inspect(sample.message)

    def run() -> None:
        for data in (message, message[: cut % (len(message) + 1)]):
            intact = header_intact(sample, data)
            header = inspected(data)
            if isinstance(header, errors.EnvelopeError):
                assert type(header) in HEADER_READ_REFUSALS, repr(header)
                assert not intact, repr(header)
                if sample.message.startswith(data):
                    assert type(header) is errors.TruncatedMessageError, repr(header)
                continue
            assert header.encrypted_data_keys
            if intact:
                assert header == original

    within_budget(2, 2 * len(message), run)


@fuzz(200)
@given(case=mutated(list(range(len(SPECS)))))
def fuzz_reencrypt(case: Case) -> None:
    """reencrypt: a library error, or a new message that the target keyring opens to
    exactly the original plaintext."""
    sample, message = case

    async def main() -> bytes:
        async with _client(keys().keyring(sample.spec.kind)) as client:
            new = await client.reencrypt(message, to_keyring=keys().target_keyring())
        async with _client(keys().target_keyring()) as target:
            return await target.decrypt(new)

    within_budget(
        2,
        2 * len(message),
        lambda: decrypted_or_refused(sample, message, lambda: asyncio.run(main())),
    )


FUZZERS: dict[str, Callable[[], None]] = {
    "decrypt": fuzz_decrypt,
    "decrypt_stream, 1-byte chunks": fuzz_decrypt_stream_one_byte_at_a_time,
    "decrypt_stream, random chunks": fuzz_decrypt_stream_in_random_chunks,
    "inspect": fuzz_inspect,
    "reencrypt": fuzz_reencrypt,
}

# -- the child and the parent ------------------------------------------------------------


def child(name: str, cpu_budget: float, address_space: int) -> None:
    """Build the corpus, cap address space and CPU time, run one fuzzer."""
    corpus()
    cap(cpu_budget, address_space)
    FUZZERS[name]()


def fuzz_in_child(name: str, *, cpu_budget: float = 60.0) -> None:
    code = f"import test_fuzz_hostile as t; t.child({name!r}, {cpu_budget!r}, {1 << 30})"
    run_child(
        f"fuzzing {name}",
        code,
        cpu_budget=cpu_budget,
        # Worker threads' malloc arenas would reserve 64 MiB of address space each.
        extra_env={"MALLOC_ARENA_MAX": "2"},
        cwd=Path(aioenvelope.__file__).parent.parent,
        stderr_tail=12000,
    )


CLAIMS = {
    "decrypt": "only library errors and the original plaintext",
    "decrypt_stream, 1-byte chunks": "only library errors and a verified prefix",
    "decrypt_stream, random chunks": "only library errors and a verified prefix",
    "inspect": "only library errors and the original header",
    "reencrypt": "only library errors and the original plaintext",
}


@linux_only
@pytest.mark.parametrize("name", list(FUZZERS), ids=[f"{n}: {CLAIMS[n]}" for n in FUZZERS])
def test_fuzzing_finds_only_library_errors_and_the_original_or_a_verified_prefix(
    name: str,
) -> None:
    """One fuzzer per reader, each in its own child (see the module docstring); the
    id says what that fuzzer's examples assert."""
    fuzz_in_child(name)
