"""The streaming API: encrypt_stream, decrypt_stream, encrypt_file, decrypt_file.

Round trips over every source kind and chunking; byte-identical output to the one-shot
writer (through the ``EncryptingStream`` seam); KMS calls against the moto server;
backpressure, early stop and cancellation; tampering (the final frame is never
released from a bad message); allow_signed; files; and bad sources.
"""

from __future__ import annotations

import array
import asyncio
import io
import itertools
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from kms_server import KmsKey, MotoKms
from messages import build_encryptor

from aioenvelope import (
    AlgorithmSuite,
    DecryptingStream,
    EncryptingStream,
    EnvelopeClient,
    KmsKeyring,
    MessageHeader,
    RawAesKeyring,
    StreamSource,
    errors,
)
from aioenvelope.format import MessageDecryptor, MessageEncryptor
from aioenvelope.format.encryption_context import PUBLIC_KEY_FIELD
from aioenvelope.format.header import parse_header
from aioenvelope.format.signing import Signer, Verifier

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
SUITES = [COMMIT, COMMIT_SIGN]
CONTEXT = {"tenant": "t1", "purpose": "streams"}
KIB = 1024
MIB = 1024 * KIB
REGULAR_OVERHEAD = 4 + 12 + 16
FINAL_OVERHEAD = 4 + 4 + 12 + 4 + 16


# -- helpers -----------------------------------------------------------------------------


def random_chunks(data: bytes, rng: random.Random, max_size: int) -> list[bytes]:
    """``data`` cut into pieces of 1..max_size bytes (random sizes)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_size)
        out.append(data[pos : pos + n])
        pos += n
    return out


def fixed_chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def cut_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` split at the given offsets (clamped, sorted; repeats give empty chunks)."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


async def agen(
    chunks: Sequence[bytes | bytearray | memoryview],
) -> AsyncIterator[bytes | bytearray | memoryview]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


class ShortReader:
    """An object with ``async read(n)`` that returns at most ``limit`` bytes a call."""

    def __init__(self, data: bytes, limit: int) -> None:
        self._data = data
        self._pos = 0
        self._limit = limit
        self.reads = 0

    async def read(self, n: int = -1, /) -> bytes:
        self.reads += 1
        await asyncio.sleep(0)
        size = self._limit if n < 0 else min(n, self._limit)
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out


SOURCE_KINDS = [
    "bytes",
    "bytearray",
    "memoryview",
    "async-generator",
    "sync-list",
    "sync-generator",
    "async-read",
    "asyncio-streamreader",
    "blocking-file",
]


def make_source(kind: str, data: bytes, chunks: list[bytes]) -> StreamSource:
    """``data`` as a source of the given kind (``chunks`` are its pieces, joined = data)."""
    assert b"".join(chunks) == data
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "async-generator":
        return agen(chunks)
    if kind == "sync-list":
        return list(chunks)
    if kind == "sync-generator":
        return (c for c in chunks)
    if kind == "async-read":
        return ShortReader(data, max(1, max((len(c) for c in chunks), default=1)))
    if kind == "asyncio-streamreader":
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        return reader
    if kind == "blocking-file":
        return io.BytesIO(data)
    raise AssertionError(kind)


@dataclass
class Received:
    plaintext: bytes
    error: errors.EnvelopeError | None


async def drain(stream: DecryptingStream | EncryptingStream) -> Received:
    """Everything the stream yields until it ends or raises one of the library's errors."""
    pieces: list[bytes] = []
    try:
        async with stream:
            async for chunk in stream:
                assert isinstance(chunk, bytes)
                pieces.append(chunk)
    except errors.EnvelopeError as exc:
        return Received(b"".join(pieces), exc)
    return Received(b"".join(pieces), None)


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def settle(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {name: n for name, n in counts.items() if n}


def header_length(message: bytes) -> int:
    return parse_header(message, max_encrypted_data_keys=10).length


def body_end(message: bytes, frame_length: int, plaintext_length: int) -> int:
    """Offset where the final frame ends (the footer starts, for signed messages)."""
    n = plaintext_length
    regular = (n - 1) // frame_length if n else 0
    final = n - regular * frame_length
    return (
        header_length(message)
        + regular * (frame_length + REGULAR_OVERHEAD)
        + (FINAL_OVERHEAD + final)
    )


def fresh_aes_keyring() -> RawAesKeyring:
    return RawAesKeyring("test-namespace", "test-key", os.urandom(32))


# -- 1. round trips ----------------------------------------------------------------------

FRAME_LENGTHS = [64, 4096, 65536]
EDGE_SIZES: dict[str, Callable[[int], int]] = {
    "empty": lambda f: 0,
    "one-byte": lambda f: 1,
    "frame-minus-one": lambda f: f - 1,
    "one-frame": lambda f: f,
    "frame-plus-one": lambda f: f + 1,
    "several-frames": lambda f: 3 * f + 7,
}


@pytest.mark.parametrize("frame_length", FRAME_LENGTHS)
@pytest.mark.parametrize("shape", list(EDGE_SIZES))
async def test_streams_round_trip_at_frame_edges_with_random_chunking(
    aes_keyring: RawAesKeyring, frame_length: int, shape: str
) -> None:
    """Stream encrypt -> stream decrypt, stream encrypt -> one-shot decrypt and one-shot
    encrypt -> stream decrypt all give the plaintext back, with sources chunked at random
    sizes that straddle frame boundaries."""
    size = EDGE_SIZES[shape](frame_length)
    rng = random.Random(f"{frame_length}-{size}")
    data = rng.randbytes(size)
    async with EnvelopeClient(aes_keyring, frame_length=frame_length) as client:
        stream = client.encrypt_stream(
            agen(random_chunks(data, rng, 2 * frame_length + 3)), encryption_context=CONTEXT
        )
        blob = await stream.read_all()
        assert stream.header is not None
        assert stream.header.frame_length == frame_length
        assert dict(stream.header.encryption_context) == CONTEXT

        decrypted = client.decrypt_stream(
            agen(random_chunks(blob, rng, 2 * frame_length + 50)), encryption_context=CONTEXT
        )
        assert await decrypted.read_all() == data
        assert decrypted.header is not None
        assert decrypted.header.message_id == stream.header.message_id

        assert await client.decrypt(blob, encryption_context=CONTEXT) == data

        one_shot = await client.encrypt(data, encryption_context=CONTEXT)
        again = client.decrypt_stream(agen(random_chunks(one_shot, rng, 3 * frame_length)))
        assert await again.read_all() == data


@settings(max_examples=30, deadline=None)
@given(
    data=st.binary(max_size=300),
    encrypt_cuts=st.lists(st.integers(0, 300), max_size=10),
    decrypt_cuts=st.lists(st.integers(0, 1000), max_size=10),
)
async def test_any_chunking_of_either_stream_round_trips(
    data: bytes, encrypt_cuts: list[int], decrypt_cuts: list[int]
) -> None:
    """Arbitrary chunk boundaries, empty chunks included, on both sides (frame 64)."""
    async with EnvelopeClient(fresh_aes_keyring(), frame_length=64) as client:
        blob = await client.encrypt_stream(agen(cut_at(data, encrypt_cuts))).read_all()
        assert await client.decrypt(blob) == data
        assert await client.decrypt_stream(agen(cut_at(blob, decrypt_cuts))).read_all() == data
        one_shot = await client.encrypt(data)
        assert await client.decrypt_stream(agen(cut_at(one_shot, decrypt_cuts))).read_all() == data


@pytest.mark.parametrize("size", [0, 65, 3 * 64 + 5])
@pytest.mark.parametrize("kind", SOURCE_KINDS)
async def test_encrypt_stream_reads_every_source_kind(
    client: EnvelopeClient, kind: str, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    source = make_source(kind, data, fixed_chunks(data, 50))
    blob = await client.encrypt_stream(source, encryption_context=CONTEXT).read_all()
    assert await client.decrypt(blob, encryption_context=CONTEXT) == data


@pytest.mark.parametrize("size", [0, 65, 3 * 64 + 5])
@pytest.mark.parametrize("kind", SOURCE_KINDS)
async def test_decrypt_stream_reads_every_source_kind(
    client: EnvelopeClient, kind: str, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    blob = await client.encrypt(data, encryption_context=CONTEXT)
    source = make_source(kind, blob, fixed_chunks(blob, 41))
    assert await client.decrypt_stream(source, encryption_context=CONTEXT).read_all() == data


async def test_chunks_may_mix_bytes_bytearray_and_memoryview(client: EnvelopeClient) -> None:
    data = os.urandom(500)
    chunks: list[bytes | bytearray | memoryview] = [
        data[:10],
        bytearray(data[10:200]),
        memoryview(data)[200:450],
        b"",
        memoryview(bytearray(data[450:])),
    ]
    blob = await client.encrypt_stream(agen(chunks)).read_all()
    assert await client.decrypt(blob) == data
    back: list[bytes | bytearray | memoryview] = [
        blob[:100],
        bytearray(blob[100:300]),
        memoryview(blob)[300:],
    ]
    assert await client.decrypt_stream(agen(back)).read_all() == data


async def test_memoryview_of_wide_items_is_read_as_its_bytes(client: EnvelopeClient) -> None:
    """A memoryview over 4-byte items counts bytes, not items."""
    words = array.array("I", range(1000))
    expected = words.tobytes()
    blob = await client.encrypt_stream(memoryview(words)).read_all()
    assert await client.decrypt(blob) == expected
    chunked = await client.encrypt_stream(
        agen([memoryview(words)[:300], memoryview(words)[300:]])
    ).read_all()
    assert await client.decrypt(chunked) == expected


async def test_real_files_as_sources_are_read_and_left_open(
    client: EnvelopeClient, tmp_path: Path
) -> None:
    """Blocking and anyio async files work as sources; they belong to the caller, so the
    stream does not close them."""
    data = os.urandom(10_000)
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    with plain.open("rb") as blocking:
        blob = await client.encrypt_stream(blocking).read_all()
        assert not blocking.closed
    (tmp_path / "blob").write_bytes(blob)
    async with await anyio.open_file(tmp_path / "blob", "rb") as async_file:
        assert await client.decrypt_stream(async_file).read_all() == data
        assert await async_file.read() == b""  # still open, and read to the end
    with (tmp_path / "blob").open("rb") as blocking:
        assert await client.decrypt_stream(blocking).read_all() == data
        assert not blocking.closed


async def test_header_is_none_until_the_first_chunk(client: EnvelopeClient) -> None:
    data = os.urandom(200)
    stream = client.encrypt_stream(data, encryption_context=CONTEXT)
    assert stream.header is None
    async with stream:
        first = await anext(stream)
        assert isinstance(stream.header, MessageHeader)
        assert header_length(first) == len(first)  # the first chunk is the header
        rest = b"".join([c async for c in stream])
    blob = first + rest

    decrypting = client.decrypt_stream(agen(fixed_chunks(blob, 30)))
    assert decrypting.header is None
    async with decrypting:
        chunk = await anext(decrypting)
        assert decrypting.header == stream.header
        assert data.startswith(chunk)


async def test_stream_objects_are_async_context_managers_and_iterators(
    client: EnvelopeClient,
) -> None:
    data = os.urandom(300)
    async with client.encrypt_stream(data) as stream:
        assert isinstance(stream, EncryptingStream)
        blob = b"".join([chunk async for chunk in stream])
    async with client.decrypt_stream(blob) as decrypting:
        assert isinstance(decrypting, DecryptingStream)
        assert b"".join([chunk async for chunk in decrypting]) == data


# -- 2. byte-identical output ------------------------------------------------------------


@dataclass
class Twins:
    """Makes encryptors with the same key, message ID, EDKs, context (and signing key),
    so two of them write the same message (up to the ECDSA signature)."""

    suite: AlgorithmSuite
    frame_length: int
    data_key: bytes
    message_id: bytes
    signing_key: ec.EllipticCurvePrivateKey | None

    @classmethod
    def new(cls, suite: AlgorithmSuite = COMMIT, frame_length: int = 64) -> Twins:
        key = ec.generate_private_key(ec.SECP384R1()) if suite.signing else None
        return cls(suite, frame_length, os.urandom(suite.key_length), os.urandom(32), key)

    def make(self) -> MessageEncryptor:
        signer = Signer(self.suite, self.signing_key) if self.signing_key is not None else None
        return build_encryptor(
            self.suite,
            data_key=self.data_key,
            message_id=self.message_id,
            context=CONTEXT,
            frame_length=self.frame_length,
            signer=signer,
        )

    def stream(self, source: StreamSource) -> EncryptingStream:
        async def start() -> MessageEncryptor:
            return self.make()

        return EncryptingStream(source, start, plaintext_length=None)

    def read(self, message: bytes) -> bytes:
        """Decrypt with the sans-I/O reader (the EDK is a dummy: no keyring can)."""
        decryptor = MessageDecryptor(max_encrypted_data_keys=10)
        decryptor.receive_data(message)
        decryptor.receive_eof()
        parsed = decryptor.read_header()
        assert parsed is not None
        verifier = None
        if self.suite.signing:
            verifier = Verifier(self.suite, parsed.header.encryption_context[PUBLIC_KEY_FIELD])
        decryptor.begin_body(self.data_key, verifier=verifier)
        return decryptor.read_all()


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=400),
    frame_length=st.sampled_from([1, 16, 64]),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
async def test_stream_output_is_byte_identical_to_encrypt_all(
    data: bytes, frame_length: int, cuts: list[int]
) -> None:
    twins = Twins.new(COMMIT, frame_length)
    streamed = await twins.stream(agen(cut_at(data, cuts))).read_all()
    assert streamed == twins.make().encrypt_all(data)
    assert twins.read(streamed) == data


@pytest.mark.parametrize(
    ("frame_length", "size", "max_chunk"),
    [
        (4096, 5 * 4096 + 1, 9000),
        (65536, 3 * 65536 + 17, 150_000),
        (5000, 2 * MIB + 321, 3 * MIB),  # one chunk larger than a step, steps not frame-aligned
        (65536, 2 * MIB, 2 * MIB),  # frame-aligned, exactly two steps
    ],
)
async def test_large_frames_and_chunks_are_byte_identical_to_encrypt_all(
    frame_length: int, size: int, max_chunk: int
) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    twins = Twins.new(COMMIT, frame_length)
    streamed = await twins.stream(agen(random_chunks(data, rng, max_chunk))).read_all()
    assert streamed == twins.make().encrypt_all(data)
    assert await twins.stream(data).read_all() == streamed


async def test_frames_larger_than_a_step_are_byte_identical_to_encrypt_all() -> None:
    """Frames of several MiB: steps too big to run inline go to a worker thread."""
    frame_length = 3 * MIB + 1
    rng = random.Random(7)
    data = rng.randbytes(7 * MIB + 11)
    twins = Twins.new(COMMIT, frame_length)
    streamed = await twins.stream(agen(random_chunks(data, rng, 2 * MIB))).read_all()
    assert streamed == twins.make().encrypt_all(data)


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_frames_larger_than_a_step_round_trip_through_both_streams(
    aes_keyring: RawAesKeyring, suite: AlgorithmSuite
) -> None:
    rng = random.Random(8)
    data = rng.randbytes(5 * MIB + 3)
    async with EnvelopeClient(aes_keyring, frame_length=2 * MIB + 5) as client:
        blob = await client.encrypt_stream(
            agen(random_chunks(data, rng, MIB)), algorithm_suite=suite
        ).read_all()
        assert await client.decrypt(blob) == data
        stream = client.decrypt_stream(agen(random_chunks(blob, rng, 3 * MIB)))
        assert await stream.read_all() == data


@pytest.mark.parametrize("size", [0, 1, 64, 3 * 64 + 5])
async def test_signed_stream_matches_encrypt_all_up_to_the_signature(size: int) -> None:
    """ECDSA signatures are randomized, so only the header and frames can be identical;
    both footers must verify."""
    data = os.urandom(size)
    twins = Twins.new(COMMIT_SIGN, 64)
    streamed = await twins.stream(agen(fixed_chunks(data, 23))).read_all()
    one_shot = twins.make().encrypt_all(data)
    end = body_end(one_shot, 64, size)
    assert streamed[:end] == one_shot[:end]
    for message in (streamed, one_shot):
        footer = message[end:]
        assert int.from_bytes(footer[:2], "big") == len(footer) - 2
        assert 100 <= len(footer) - 2 <= 104  # a P-384 DER signature
        assert twins.read(message) == data


# -- 3. KMS calls (moto) -----------------------------------------------------------------

_sessions: list[Any] = []


def kms_keyring(moto_kms: MotoKms, key_arn: str) -> KmsKeyring:
    """A keyring on the moto server, without the start-up DescribeKey, so the only KMS
    calls are the data-key calls under test."""
    if not _sessions:
        _sessions.append(aioboto3.Session())
    return KmsKeyring(
        key_arn,
        endpoint_url=moto_kms.endpoint_url,
        region_name=moto_kms.region,
        session=_sessions[0],
        check_keys=False,
    )


@pytest.fixture
def writer_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    return kms_keyring(moto_kms, kms_key.arn)


@pytest.fixture
def reader_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    return kms_keyring(moto_kms, kms_key.arn)


async def test_encrypt_stream_calls_generate_data_key_once_on_first_pull_not_at_call(
    writer_keyring: KmsKeyring,
) -> None:
    data = os.urandom(3 * 65536 + 1)
    async with EnvelopeClient(writer_keyring) as client:
        stream = client.encrypt_stream(agen(fixed_chunks(data, 10_000)), encryption_context=CONTEXT)
        await asyncio.sleep(0.01)
        assert writer_keyring.kms_calls == {}
        assert nonzero(client.stats.kms_calls) == {}
        async with stream:
            first = await anext(stream)
            assert writer_keyring.kms_calls == {"GenerateDataKey": 1}
            assert header_length(first) == len(first)
            rest = b"".join([chunk async for chunk in stream])
        assert writer_keyring.kms_calls == {"GenerateDataKey": 1}
        assert nonzero(client.stats.kms_calls) == {"GenerateDataKey": 1}
        assert await client.decrypt(first + rest, encryption_context=CONTEXT) == data


async def test_decrypt_stream_calls_decrypt_once_and_a_second_stream_hits_the_cache(
    writer_keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    data = os.urandom(100_000)
    async with EnvelopeClient(writer_keyring) as writer:
        blob = await writer.encrypt(data, encryption_context=CONTEXT)
    async with EnvelopeClient(reader_keyring) as reader:
        stream = reader.decrypt_stream(agen(fixed_chunks(blob, 7000)), encryption_context=CONTEXT)
        await asyncio.sleep(0.01)
        assert reader_keyring.kms_calls == {}
        assert await stream.read_all() == data
        assert reader_keyring.kms_calls == {"Decrypt": 1}
        again = reader.decrypt_stream(agen(fixed_chunks(blob, 9000)), encryption_context=CONTEXT)
        assert await again.read_all() == data
        stats = reader.stats
    assert reader_keyring.kms_calls == {"Decrypt": 1}
    assert nonzero(stats.kms_calls) == {"Decrypt": 1}
    assert stats.decrypt_cache_hits == 1


async def test_streams_with_a_known_length_and_one_context_share_one_generate_data_key(
    writer_keyring: KmsKeyring,
) -> None:
    first, second = os.urandom(5000), os.urandom(7000)
    async with EnvelopeClient(writer_keyring) as client:
        blob1 = await client.encrypt_stream(
            agen(fixed_chunks(first, 999)), encryption_context=CONTEXT, plaintext_length=5000
        ).read_all()
        blob2 = await client.encrypt_stream(
            agen(fixed_chunks(second, 999)), encryption_context=CONTEXT, plaintext_length=7000
        ).read_all()
        assert writer_keyring.kms_calls == {"GenerateDataKey": 1}
        assert await client.decrypt(blob1, encryption_context=CONTEXT) == first
        assert await client.decrypt(blob2, encryption_context=CONTEXT) == second
    h1, h2 = (parse_header(b, max_encrypted_data_keys=10).header for b in (blob1, blob2))
    assert h1.encrypted_data_keys == h2.encrypted_data_keys
    assert h1.message_id != h2.message_id


async def test_streams_without_a_length_each_get_a_fresh_data_key(
    writer_keyring: KmsKeyring,
) -> None:
    async with EnvelopeClient(writer_keyring) as client:
        for _ in range(2):
            await client.encrypt_stream(b"x" * 100, encryption_context=CONTEXT).read_all()
    assert writer_keyring.kms_calls == {"GenerateDataKey": 2}


async def test_two_encrypt_files_with_one_context_share_one_generate_data_key(
    writer_keyring: KmsKeyring, tmp_path: Path
) -> None:
    """encrypt_file knows the file's size, so it can reuse the cached data key."""
    (tmp_path / "a").write_bytes(os.urandom(3000))
    (tmp_path / "b").write_bytes(os.urandom(4000))
    async with EnvelopeClient(writer_keyring) as client:
        for name in ("a", "b"):
            await client.encrypt_file(
                tmp_path / name, tmp_path / f"{name}.enc", encryption_context=CONTEXT
            )
        for name in ("a", "b"):
            blob = (tmp_path / f"{name}.enc").read_bytes()
            assert await client.decrypt(blob) == (tmp_path / name).read_bytes()
    assert writer_keyring.kms_calls["GenerateDataKey"] == 1


async def test_kms_failure_on_encrypt_surfaces_at_first_pull_and_closes_the_source(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    missing = kms_key.arn.replace(kms_key.key_id, "00000000-0000-4000-8000-000000000000")
    keyring = kms_keyring(moto_kms, missing)
    started: list[bool] = []

    async def source() -> AsyncIterator[bytes]:
        started.append(True)
        yield b"never encrypted"

    generator = source()
    async with EnvelopeClient(keyring) as client:
        stream = client.encrypt_stream(generator, encryption_context=CONTEXT)
        received = await drain(stream)
    assert isinstance(received.error, errors.KeyringError)
    assert received.plaintext == b""  # not even a header
    assert started == []  # nothing was read before the data key existed
    with pytest.raises(StopAsyncIteration):  # and the source was closed
        await anext(generator)
    assert started == []


@pytest.mark.parametrize("declared", [99, 101, 0])
async def test_wrong_plaintext_length_is_a_configuration_error(
    client: EnvelopeClient, declared: int
) -> None:
    """A stream that turns out shorter or longer than declared fails, and what it wrote
    is not a complete message."""
    data = os.urandom(100)
    stream = client.encrypt_stream(agen(fixed_chunks(data, 30)), plaintext_length=declared)
    received = await drain(stream)
    assert isinstance(received.error, errors.ConfigurationError)
    assert "plaintext_length" in str(received.error)
    with pytest.raises(errors.TruncatedMessageError):
        await client.decrypt(received.plaintext)


@pytest.mark.parametrize("size", [0, 100])
async def test_exact_plaintext_length_is_accepted(client: EnvelopeClient, size: int) -> None:
    data = os.urandom(size)
    blob = await client.encrypt_stream(
        agen(fixed_chunks(data, 30)), plaintext_length=size
    ).read_all()
    assert await client.decrypt(blob) == data


@pytest.mark.parametrize("bad", [-1, True, 1.5, "100"])
def test_invalid_plaintext_length_is_refused_at_call_time(
    client: EnvelopeClient, bad: object
) -> None:
    with pytest.raises(errors.ConfigurationError):
        client.encrypt_stream(b"data", plaintext_length=bad)  # type: ignore[arg-type]


# -- 4. backpressure, early stop, cancellation -------------------------------------------


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
    payload = data if direction == "encrypt" else await client.encrypt(data)
    source = CountingSource(fixed_chunks(payload, 100))
    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(source.gen())
        if direction == "encrypt"
        else client.decrypt_stream(source.gen())
    )
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
    payload = data if direction == "encrypt" else await client.encrypt(data)
    closed: list[bool] = []

    def source() -> Iterator[bytes]:
        try:
            yield from fixed_chunks(payload, 100)
        finally:
            closed.append(True)

    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(source())
        if direction == "encrypt"
        else client.decrypt_stream(source())
    )
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
    payload = b"p" * 100 if direction == "encrypt" else await client.encrypt(b"p" * 100)
    closed: list[bool] = []

    async def source() -> AsyncIterator[bytes]:
        try:
            yield b""  # primed by the caller below
            yield payload
        finally:
            closed.append(True)

    primed = source()
    assert await anext(primed) == b""
    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(primed) if direction == "encrypt" else client.decrypt_stream(primed)
    )
    if how == "async-with":
        async with stream:
            pass
    else:
        await stream.aclose()
    assert closed == [True]


class ClosableChunks:
    """A class-based async iterator that holds a resource until ``aclose()`` (like an
    HTTP response body)."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = list(chunks)
        self.closed = False

    def __aiter__(self) -> ClosableChunks:
        return self

    async def __anext__(self) -> bytes:
        if self.closed or not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("iterate", [True, False], ids=["after-two-chunks", "before-iterating"])
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_closing_a_stream_calls_aclose_on_an_iterator_source(
    client: EnvelopeClient, direction: str, iterate: bool
) -> None:
    data = os.urandom(64 * 10)
    payload = data if direction == "encrypt" else await client.encrypt(data)
    source = ClosableChunks(fixed_chunks(payload, 100))
    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(source) if direction == "encrypt" else client.decrypt_stream(source)
    )
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
    payload = b"p" * 100 if direction == "encrypt" else await client.encrypt(b"p" * 100)
    generator = agen([payload])
    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(generator)
        if direction == "encrypt"
        else client.decrypt_stream(generator)
    )
    async with stream:
        pass
    with pytest.raises(StopAsyncIteration):
        await anext(generator)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_cancelling_the_consumer_closes_the_source_and_leaves_no_tasks(
    client: EnvelopeClient, direction: str
) -> None:
    data = os.urandom(64 * 10)
    payload = data if direction == "encrypt" else await client.encrypt(data)
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
    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(stalling_source())
        if direction == "encrypt"
        else client.decrypt_stream(stalling_source())
    )

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
        assert data.startswith(b"".join(received))
        assert len(b"".join(received)) < len(data)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
async def test_cancelling_a_consumer_between_chunks_closes_the_source_via_async_with(
    client: EnvelopeClient, direction: str
) -> None:
    data = os.urandom(64 * 10)
    payload = data if direction == "encrypt" else await client.encrypt(data)
    source = CountingSource(fixed_chunks(payload, 70))
    got_one = asyncio.Event()
    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(source.gen())
        if direction == "encrypt"
        else client.decrypt_stream(source.gen())
    )

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

        stream: EncryptingStream | DecryptingStream = (
            client.encrypt_stream(failing())
            if direction == "encrypt"
            else client.decrypt_stream(failing())
        )
        with pytest.raises(Boom, match="disk on fire"):
            await stream.read_all()
        assert closed == [True]


# -- 5. tampering ------------------------------------------------------------------------

FRAME = 64
REGULAR_PLAINTEXT = 3 * FRAME
FINAL_CONTENT = b"<<the final frame: only once the message is whole>>"
assert len(FINAL_CONTENT) < FRAME


@dataclass
class Sealed:
    message: bytes
    plaintext: bytes
    suite: AlgorithmSuite

    @property
    def header_end(self) -> int:
        return header_length(self.message)

    @property
    def body_end(self) -> int:
        return body_end(self.message, FRAME, len(self.plaintext))

    def frame(self, i: int) -> tuple[int, int]:
        """Start and end of regular frame ``i`` (0-based)."""
        start = self.header_end + i * (FRAME + REGULAR_OVERHEAD)
        return start, start + FRAME + REGULAR_OVERHEAD

    @property
    def frame_boundaries(self) -> list[int]:
        ends = [self.header_end + i * (FRAME + REGULAR_OVERHEAD) for i in range(4)]
        return [*ends, self.body_end]


@pytest.fixture(params=SUITES, ids=lambda s: s.name)
async def sealed(request: pytest.FixtureRequest, client: EnvelopeClient) -> Sealed:
    """Three regular frames of random bytes, then a distinctive final frame."""
    suite: AlgorithmSuite = request.param
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, encryption_context=CONTEXT, algorithm_suite=suite)
    sealed = Sealed(message, plaintext, suite)
    assert (sealed.body_end == len(message)) == (suite is COMMIT)
    return sealed


async def assert_stream_refused(
    client: EnvelopeClient,
    message: bytes,
    plaintext: bytes,
    *,
    chunk: int | None = 37,
    error: type[errors.EnvelopeError] = errors.EnvelopeError,
) -> Received:
    """decrypt_stream raises ``error``; what came before is a strict prefix of the
    plaintext, in whole frames, without any of the final frame."""
    source: StreamSource = message if chunk is None else agen(fixed_chunks(message, chunk))
    received = await drain(client.decrypt_stream(source))
    assert received.error is not None, "a tampered message was accepted"
    assert isinstance(received.error, error), received.error
    got = received.plaintext
    assert plaintext.startswith(got)
    assert len(got) < len(plaintext)
    assert len(got) <= REGULAR_PLAINTEXT
    assert FINAL_CONTENT not in got
    assert len(got) % FRAME == 0
    return received


async def test_untampered_message_streams_in_full(client: EnvelopeClient, sealed: Sealed) -> None:
    for chunk in (7, 37, 1000):
        received = await drain(client.decrypt_stream(agen(fixed_chunks(sealed.message, chunk))))
        assert received.error is None
        assert received.plaintext == sealed.plaintext


@pytest.mark.parametrize("chunk", [None, 7, 37], ids=["whole", "7", "37"])
async def test_truncating_at_a_frame_boundary_never_releases_the_final_frame(
    client: EnvelopeClient, sealed: Sealed, chunk: int | None
) -> None:
    cuts = [0, *sealed.frame_boundaries, sealed.body_end + 1, len(sealed.message) - 1]
    for cut in sorted(set(cuts)):
        if cut >= len(sealed.message):
            continue
        received = await assert_stream_refused(
            client, sealed.message[:cut], sealed.plaintext, chunk=chunk
        )
        assert isinstance(received.error, errors.TruncatedMessageError), cut


async def test_truncating_at_any_offset_never_releases_the_final_frame(
    client: EnvelopeClient, sealed: Sealed
) -> None:
    for cut in range(len(sealed.message)):
        await assert_stream_refused(client, sealed.message[:cut], sealed.plaintext)


@pytest.mark.parametrize("pair", [(0, 1), (1, 2)], ids=["frames-1-2", "frames-2-3"])
async def test_swapping_two_frames_is_refused_before_the_swapped_frame(
    client: EnvelopeClient, sealed: Sealed, pair: tuple[int, int]
) -> None:
    (a0, a1), (b0, b1) = sealed.frame(pair[0]), sealed.frame(pair[1])
    m = sealed.message
    swapped = m[:a0] + m[b0:b1] + m[a0:a1] + m[b1:]
    assert len(swapped) == len(m)
    received = await assert_stream_refused(client, swapped, sealed.plaintext)
    assert len(received.plaintext) <= pair[0] * FRAME


@pytest.mark.parametrize(
    "extra", [b"\x00", b"\xff" * 17, b"\x02" * 200], ids=["one-byte", "17-bytes", "200-bytes"]
)
@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_appending_bytes_is_refused_without_the_final_frame(
    client: EnvelopeClient, sealed: Sealed, extra: bytes, chunk: int | None
) -> None:
    await assert_stream_refused(
        client,
        sealed.message + extra,
        sealed.plaintext,
        chunk=chunk,
        error=errors.MalformedMessageError,
    )


async def test_appending_bytes_in_a_separate_chunk_is_refused(
    client: EnvelopeClient, sealed: Sealed
) -> None:
    source = agen([sealed.message, b"", b"trailing"])
    received = await drain(client.decrypt_stream(source))
    assert isinstance(received.error, errors.MalformedMessageError)
    assert FINAL_CONTENT not in received.plaintext
    assert sealed.plaintext.startswith(received.plaintext)


async def test_appending_a_second_message_is_refused(
    client: EnvelopeClient, sealed: Sealed
) -> None:
    await assert_stream_refused(
        client,
        sealed.message + sealed.message,
        sealed.plaintext,
        error=errors.MalformedMessageError,
    )


@pytest.mark.parametrize("back", [1, 5, 16, 30, 85], ids=lambda b: f"{b}-from-end")
@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_flipping_a_bit_in_the_final_frame_never_releases_it(
    client: EnvelopeClient, sealed: Sealed, back: int, chunk: int | None
) -> None:
    mutated = bytearray(sealed.message)
    mutated[sealed.body_end - back] ^= 0x10
    received = await assert_stream_refused(client, bytes(mutated), sealed.plaintext, chunk=chunk)
    if back <= 16 + len(FINAL_CONTENT):  # in the ciphertext or tag: the tag check fails
        assert isinstance(received.error, errors.AuthenticationError)


@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_flipping_a_bit_in_an_earlier_frame_stops_at_that_frame(
    client: EnvelopeClient, sealed: Sealed, chunk: int | None
) -> None:
    _, end = sealed.frame(1)
    mutated = bytearray(sealed.message)
    mutated[end - 3] ^= 0x01
    received = await assert_stream_refused(client, bytes(mutated), sealed.plaintext, chunk=chunk)
    assert isinstance(received.error, errors.AuthenticationError)
    assert len(received.plaintext) <= FRAME


@pytest.mark.parametrize("where", ["last-byte", "first-signature-byte", "length-field"])
@pytest.mark.parametrize("chunk", [None, 37], ids=["whole", "37"])
async def test_corrupted_signature_never_releases_the_final_frame(
    client: EnvelopeClient, where: str, chunk: int | None
) -> None:
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT_SIGN)
    footer = body_end(message, FRAME, len(plaintext))
    index = {"last-byte": len(message) - 1, "first-signature-byte": footer + 2}.get(
        where, footer + 1
    )
    mutated = bytearray(message)
    mutated[index] ^= 0x01
    received = await assert_stream_refused(client, bytes(mutated), plaintext, chunk=chunk)
    if where != "length-field":
        assert isinstance(received.error, errors.AuthenticationError)


async def test_signed_stream_releases_earlier_frames_before_the_signature_check(
    client: EnvelopeClient,
) -> None:
    """As in the ESDK, regular frames of a signed message stream out as they verify; only
    the final frame waits for the signature."""
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT_SIGN)
    end = body_end(message, FRAME, len(plaintext))
    source = agen([message[:end], message[end:]])
    async with client.decrypt_stream(source) as stream:
        early = b""
        while len(early) < REGULAR_PLAINTEXT:
            early += await anext(stream)
        assert early == plaintext[:REGULAR_PLAINTEXT]
        rest = b"".join([c async for c in stream])
    assert rest == FINAL_CONTENT


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_final_frame_waits_for_the_end_of_the_input(
    client: EnvelopeClient, suite: AlgorithmSuite
) -> None:
    """A source that delivered the whole message but has not ended yet might still send
    trailing garbage: the final frame is held until it ends."""
    plaintext = os.urandom(REGULAR_PLAINTEXT) + FINAL_CONTENT
    message = await client.encrypt(plaintext, algorithm_suite=suite)
    release = asyncio.Event()

    async def held_open() -> AsyncIterator[bytes]:
        yield message
        await release.wait()

    received: list[bytes] = []

    async def consume() -> None:
        async for chunk in client.decrypt_stream(held_open()):
            received.append(chunk)

    task = asyncio.create_task(consume())
    await settle(lambda: len(b"".join(received)) >= REGULAR_PLAINTEXT, "the regular frames")
    for _ in range(20):
        await asyncio.sleep(0)
    assert b"".join(received) == plaintext[:REGULAR_PLAINTEXT]
    release.set()
    await asyncio.wait_for(task, 5)
    assert b"".join(received) == plaintext


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_one_byte_chunks_round_trip(client: EnvelopeClient, suite: AlgorithmSuite) -> None:
    plaintext = os.urandom(3 * 64 + 5)
    blob = await client.encrypt_stream(
        agen(fixed_chunks(plaintext, 1)), algorithm_suite=suite
    ).read_all()
    assert await client.decrypt_stream(agen(fixed_chunks(blob, 1))).read_all() == plaintext


# -- 6. allow_signed=False ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 10], ids=["whole", "10"])
async def test_allow_signed_false_refuses_a_signed_message_before_any_plaintext(
    client: EnvelopeClient, chunk: int | None
) -> None:
    plaintext = os.urandom(500)
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT_SIGN)
    source: StreamSource = message if chunk is None else agen(fixed_chunks(message, chunk))
    stream = client.decrypt_stream(source, allow_signed=False)
    received = await drain(stream)
    assert isinstance(received.error, errors.SignedStreamRefusedError)
    assert received.plaintext == b""
    assert await client.decrypt_stream(message).read_all() == plaintext  # default allows


async def test_allow_signed_false_still_decrypts_unsigned_messages(
    client: EnvelopeClient,
) -> None:
    plaintext = os.urandom(500)
    message = await client.encrypt(plaintext, algorithm_suite=COMMIT)
    stream = client.decrypt_stream(agen(fixed_chunks(message, 33)), allow_signed=False)
    assert await stream.read_all() == plaintext


async def test_allow_signed_false_refuses_before_any_kms_decrypt(
    writer_keyring: KmsKeyring, reader_keyring: KmsKeyring
) -> None:
    plaintext = os.urandom(1000)
    async with EnvelopeClient(writer_keyring) as writer:
        signed = await writer.encrypt(
            plaintext, encryption_context=CONTEXT, algorithm_suite=COMMIT_SIGN
        )
        unsigned = await writer.encrypt(plaintext, encryption_context=CONTEXT)
    async with EnvelopeClient(reader_keyring) as reader:
        received = await drain(reader.decrypt_stream(signed, allow_signed=False))
        assert isinstance(received.error, errors.SignedStreamRefusedError)
        assert received.plaintext == b""
        assert reader_keyring.kms_calls == {}
        assert nonzero(reader.stats.kms_calls) == {}
        assert await reader.decrypt_stream(unsigned, allow_signed=False).read_all() == plaintext
        assert reader_keyring.kms_calls == {"Decrypt": 1}


# -- 7. wrong encryption context ---------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_wrong_encryption_context_is_refused_with_no_plaintext(
    client: EnvelopeClient, suite: AlgorithmSuite
) -> None:
    plaintext = os.urandom(300)
    message = await client.encrypt(plaintext, encryption_context=CONTEXT, algorithm_suite=suite)
    received = await drain(
        client.decrypt_stream(agen(fixed_chunks(message, 50)), encryption_context={"tenant": "t2"})
    )
    assert isinstance(received.error, errors.EncryptionContextMismatchError)
    assert received.plaintext == b""
    right = client.decrypt_stream(message, encryption_context={"tenant": "t1"})
    assert await right.read_all() == plaintext


# -- 8. files ----------------------------------------------------------------------------


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_files_round_trip_with_private_permissions(
    client: EnvelopeClient, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB + 123)
    (tmp_path / "plain").write_bytes(data)
    header = await client.encrypt_file(
        tmp_path / "plain", tmp_path / "enc", encryption_context=CONTEXT, frame_length=4096
    )
    assert header.frame_length == 4096
    assert dict(header.encryption_context) == CONTEXT
    assert mode(tmp_path / "enc") == 0o600
    blob = (tmp_path / "enc").read_bytes()
    assert await client.decrypt(blob, encryption_context=CONTEXT) == data

    read_header = await client.decrypt_file(
        tmp_path / "enc", tmp_path / "out", encryption_context=CONTEXT
    )
    assert read_header.message_id == header.message_id
    assert (tmp_path / "out").read_bytes() == data
    assert mode(tmp_path / "out") == 0o600
    assert sorted(os.listdir(tmp_path)) == ["enc", "out", "plain"]


async def test_empty_file_round_trips(client: EnvelopeClient, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    await client.encrypt_file(tmp_path / "plain", tmp_path / "enc")
    await client.decrypt_file(str(tmp_path / "enc"), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == b""
    assert (tmp_path / "enc").stat().st_size > 0


async def test_existing_destination_is_kept_unless_overwrite(
    client: EnvelopeClient, tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    (tmp_path / "plain").write_bytes(data)
    (tmp_path / "enc").write_bytes(b"precious")
    (tmp_path / "out").write_bytes(b"also precious")
    with pytest.raises(errors.ConfigurationError, match="exists"):
        await client.encrypt_file(tmp_path / "plain", tmp_path / "enc")
    assert (tmp_path / "enc").read_bytes() == b"precious"

    await client.encrypt_file(tmp_path / "plain", tmp_path / "enc", overwrite=True)
    assert await client.decrypt((tmp_path / "enc").read_bytes()) == data
    assert mode(tmp_path / "enc") == 0o600

    with pytest.raises(errors.ConfigurationError, match="exists"):
        await client.decrypt_file(tmp_path / "enc", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"also precious"
    await client.decrypt_file(tmp_path / "enc", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out").read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["enc", "out", "plain"]


TAMPERS: dict[str, Callable[[bytes], bytes]] = {
    "bit-flip-in-the-middle": lambda b: (
        b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1 :]
    ),
    "bit-flip-at-the-end": lambda b: b[:-1] + bytes([b[-1] ^ 1]),
    "truncated-by-one": lambda b: b[:-1],
    "truncated-to-half": lambda b: b[: len(b) // 2],
    "extra-byte": lambda b: b + b"\x00",
}


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_tampered_file_leaves_no_destination_and_no_temporary_file(
    client: EnvelopeClient, tmp_path: Path, tamper: str, suite: AlgorithmSuite
) -> None:
    data = os.urandom(2 * MIB + 5)
    blob = await client.encrypt_stream(
        data, frame_length=4096, algorithm_suite=suite, plaintext_length=len(data)
    ).read_all()
    (tmp_path / "enc").write_bytes(TAMPERS[tamper](blob))
    with pytest.raises(errors.EnvelopeError):
        await client.decrypt_file(tmp_path / "enc", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["enc"]


async def test_failed_decrypt_file_with_overwrite_keeps_the_old_destination(
    client: EnvelopeClient, tmp_path: Path
) -> None:
    blob = await client.encrypt(os.urandom(MIB), frame_length=4096)
    (tmp_path / "enc").write_bytes(blob[:-10])
    (tmp_path / "out").write_bytes(b"previous version")
    with pytest.raises(errors.TruncatedMessageError):
        await client.decrypt_file(tmp_path / "enc", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out").read_bytes() == b"previous version"
    assert sorted(os.listdir(tmp_path)) == ["enc", "out"]


async def test_decrypt_file_refusals_leave_nothing(client: EnvelopeClient, tmp_path: Path) -> None:
    signed = await client.encrypt(
        b"s" * 1000, encryption_context=CONTEXT, algorithm_suite=COMMIT_SIGN
    )
    (tmp_path / "enc").write_bytes(signed)
    with pytest.raises(errors.SignedStreamRefusedError):
        await client.decrypt_file(tmp_path / "enc", tmp_path / "out", allow_signed=False)
    with pytest.raises(errors.EncryptionContextMismatchError):
        await client.decrypt_file(
            tmp_path / "enc", tmp_path / "out", encryption_context={"tenant": "t2"}
        )
    assert os.listdir(tmp_path) == ["enc"]


# -- 9. one-shot calls on large objects --------------------------------------------------


@pytest.mark.parametrize("size", [MIB - 1, MIB, MIB + 1, 3 * MIB + 5])
async def test_large_one_shot_calls_round_trip_and_interoperate_with_streams(
    aes_keyring: RawAesKeyring, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    async with EnvelopeClient(aes_keyring) as client:
        blob = await client.encrypt(data, encryption_context=CONTEXT)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == data
        result = await client.decrypt_with_header(bytearray(blob))
        assert result.plaintext == data
        assert (
            result.header.message_id
            == parse_header(blob, max_encrypted_data_keys=10).header.message_id
        )
        streamed = client.decrypt_stream(agen(fixed_chunks(blob, 300_000)))
        assert await streamed.read_all() == data
        from_stream = await client.encrypt_stream(
            agen(fixed_chunks(data, 250_000)), encryption_context=CONTEXT
        ).read_all()
        assert await client.decrypt(from_stream) == data


async def test_large_one_shot_with_small_frames_round_trips(client: EnvelopeClient) -> None:
    data = os.urandom(MIB + 3)  # 16,385 frames of 64 bytes
    blob = await client.encrypt(memoryview(data))
    assert len(blob) == body_end(blob, 64, len(data))
    assert await client.decrypt(blob) == data
    assert await client.decrypt_stream(blob).read_all() == data


async def test_large_one_shot_of_a_wide_memoryview_counts_bytes(
    client: EnvelopeClient,
) -> None:
    words = array.array("I", range(300_000))  # 1.2 MB in 4-byte items
    blob = await client.encrypt(memoryview(words), frame_length=4096)
    assert await client.decrypt(blob) == words.tobytes()


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_large_one_shot_decrypt_refuses_tampering_and_wrong_context(
    aes_keyring: RawAesKeyring, suite: AlgorithmSuite
) -> None:
    data = os.urandom(2 * MIB)
    async with EnvelopeClient(aes_keyring) as client:
        blob = await client.encrypt(data, encryption_context=CONTEXT, algorithm_suite=suite)
        end = body_end(blob, 65536, len(data))
        mutated = bytearray(blob)
        mutated[end - 1] ^= 1
        with pytest.raises(errors.AuthenticationError):
            await client.decrypt(bytes(mutated))
        with pytest.raises(errors.TruncatedMessageError):
            await client.decrypt(blob[:-1])
        with pytest.raises(errors.MalformedMessageError):
            await client.decrypt(blob + b"\x00")
        with pytest.raises(errors.EncryptionContextMismatchError):
            await client.decrypt(blob, encryption_context={"tenant": "t2"})


# -- 10. bad sources ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "source", ["some text", 42, None, object(), 3.5], ids=["str", "int", "None", "object", "float"]
)
def test_non_sources_are_refused_at_call_time(client: EnvelopeClient, source: object) -> None:
    with pytest.raises(errors.ConfigurationError):
        client.encrypt_stream(source)  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError):
        client.decrypt_stream(source)  # type: ignore[arg-type]


def text_sources(kind: str) -> StreamSource:
    if kind == "async-generator":

        async def texts() -> AsyncIterator[str]:
            yield "hello"

        return texts()  # type: ignore[return-value]
    if kind == "sync-list":
        return ["hello"]  # type: ignore[list-item]
    if kind == "mixed":
        return agen([b"\x02", "then text"])  # type: ignore[list-item]
    if kind == "text-file":
        return io.StringIO("hello")  # type: ignore[return-value]
    if kind == "async-read":

        class TextReader:
            async def read(self, n: int = -1, /) -> str:
                return "hello"

        return TextReader()  # type: ignore[return-value]
    if kind == "ints":
        return [1, 2, 3]  # type: ignore[list-item]
    raise AssertionError(kind)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
@pytest.mark.parametrize(
    "kind", ["async-generator", "sync-list", "mixed", "text-file", "async-read", "ints"]
)
async def test_a_source_yielding_non_bytes_fails_during_iteration(
    client: EnvelopeClient, kind: str, direction: str
) -> None:
    source = text_sources(kind)
    stream: EncryptingStream | DecryptingStream = (
        client.encrypt_stream(source) if direction == "encrypt" else client.decrypt_stream(source)
    )
    with pytest.raises(errors.ConfigurationError, match="bytes"):
        await stream.read_all()


def test_streams_need_an_open_client(aes_keyring: RawAesKeyring) -> None:
    client = EnvelopeClient(aes_keyring)
    with pytest.raises(errors.ConfigurationError, match="not open"):
        client.encrypt_stream(b"data")
    with pytest.raises(errors.ConfigurationError, match="not open"):
        client.decrypt_stream(b"data")
