"""The frames a stream writes: byte-identical to the one-shot writer (through the
``EncryptingStream`` seam, with twin encryptors), at small, large and multi-MiB frame
lengths, signed up to the randomized signature; and one-shot calls on large objects
interoperating with the streams.
"""

from __future__ import annotations

import array
import os
import random

import pytest
from chunkers import (
    agen,
    cut_at,
    fixed_chunks,
    random_chunks,
)
from frame_layout import body_end
from hypothesis import given, settings
from hypothesis import strategies as st
from suites import COMMIT, COMMIT_SIGN, MIB, SUITES
from twin_encryptors import Twins

from aioenvelope import (
    AlgorithmSuite,
    EnvelopeClient,
    RawAesKeyring,
    errors,
    inspect,
)

CONTEXT = {"tenant": "t1", "purpose": "streams"}

# -- 2. byte-identical output ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=400),
    frame_length=st.sampled_from([1, 16, 64]),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
async def test_stream_output_is_byte_identical_to_encrypt_all(
    data: bytes, frame_length: int, cuts: list[int]
) -> None:
    twins = Twins(COMMIT, frame_length, CONTEXT)
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
    twins = Twins(COMMIT, frame_length, CONTEXT)
    streamed = await twins.stream(agen(random_chunks(data, rng, max_chunk))).read_all()
    assert streamed == twins.make().encrypt_all(data)
    assert await twins.stream(data).read_all() == streamed


async def test_frames_larger_than_a_step_are_byte_identical_to_encrypt_all() -> None:
    """Frames of several MiB: steps too big to run inline go to a worker thread."""
    frame_length = 3 * MIB + 1
    rng = random.Random(7)
    data = rng.randbytes(7 * MIB + 11)
    twins = Twins(COMMIT, frame_length, CONTEXT)
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
    twins = Twins(COMMIT_SIGN, 64, CONTEXT)
    streamed = await twins.stream(agen(fixed_chunks(data, 23))).read_all()
    one_shot = twins.make().encrypt_all(data)
    end = body_end(one_shot, 64, size)
    assert streamed[:end] == one_shot[:end]
    for message in (streamed, one_shot):
        footer = message[end:]
        assert int.from_bytes(footer[:2], "big") == len(footer) - 2
        assert 100 <= len(footer) - 2 <= 104  # a P-384 DER signature
        assert twins.read(message) == data


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
        assert result.header.message_id == inspect(blob).message_id
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
