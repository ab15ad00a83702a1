"""The streaming API's inputs: round trips over every source kind and chunking
(random, at frame edges, one byte, empty chunks, mixed bytes-likes, real files), the
header a stream reports, ``plaintext_length``, and sources that are not bytes.
"""

from __future__ import annotations

import array
import asyncio
import io
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from chunkers import (
    AsyncShortReader,
    agen,
    cut_at,
    fixed_chunks,
    random_chunks,
    up_to,
)
from frame_layout import header_length
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_outcome import drain
from suites import SUITES

from aioenvelope import (
    AlgorithmSuite,
    DecryptingStream,
    EncryptingStream,
    EnvelopeClient,
    MessageHeader,
    RawAesKeyring,
    StreamSource,
    errors,
)

CONTEXT = {"tenant": "t1", "purpose": "streams"}

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
        return AsyncShortReader(data, up_to(max(1, max((len(c) for c in chunks), default=1))))
    if kind == "asyncio-streamreader":
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        return reader
    if kind == "blocking-file":
        return io.BytesIO(data)
    raise AssertionError(kind)


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


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
async def test_one_byte_chunks_round_trip(client: EnvelopeClient, suite: AlgorithmSuite) -> None:
    plaintext = os.urandom(3 * 64 + 5)
    blob = await client.encrypt_stream(
        agen(fixed_chunks(plaintext, 1)), algorithm_suite=suite
    ).read_all()
    assert await client.decrypt_stream(agen(fixed_chunks(blob, 1))).read_all() == plaintext


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
