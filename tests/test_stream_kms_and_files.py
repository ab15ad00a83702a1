"""Streams against KMS (the moto server: when and how often GenerateDataKey and
Decrypt are called, and a KMS failure at the first pull) and the file API
(``encrypt_file``/``decrypt_file``: permissions, existing destinations, and no
destination or temporary file left by a refused message).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
from chunkers import (
    agen,
    fixed_chunks,
)
from frame_layout import header_length
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring
from stream_outcome import drain
from suites import COMMIT_SIGN, MIB, SUITES

from aioenvelope import (
    AlgorithmSuite,
    EnvelopeClient,
    KmsKeyring,
    errors,
    inspect,
)

CONTEXT = {"tenant": "t1", "purpose": "streams"}


def nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {name: n for name, n in counts.items() if n}


# -- 3. KMS calls (moto) -----------------------------------------------------------------


@pytest.fixture
def writer_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    return moto_kms_keyring(moto_kms, kms_key.arn, check_keys=False)


@pytest.fixture
def reader_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    return moto_kms_keyring(moto_kms, kms_key.arn, check_keys=False)


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
    h1, h2 = inspect(blob1), inspect(blob2)
    assert h1.encrypted_data_keys == h2.encrypted_data_keys
    assert h1.message_id != h2.message_id


async def test_streams_without_plaintext_length_each_get_a_fresh_data_key(
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
    keyring = moto_kms_keyring(moto_kms, missing, check_keys=False)
    started: list[bool] = []

    async def source() -> AsyncIterator[bytes]:
        started.append(True)
        yield b"never encrypted"

    generator = source()
    async with EnvelopeClient(keyring) as client:
        stream = client.encrypt_stream(generator, encryption_context=CONTEXT)
        received = await drain(stream)
    assert isinstance(received.error, errors.KMSError)
    assert "GenerateDataKey" in str(received.error)
    assert "failed with NotFoundException" in str(received.error)
    assert received.plaintext == b""  # not even a header
    assert started == []  # nothing was read before the data key existed
    with pytest.raises(StopAsyncIteration):  # and the source was closed
        await anext(generator)
    assert started == []


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
# The refusal of each tampering of a 2 MiB + 5 message in 4096-byte frames (512 regular
# frames and a final 513th), by (tamper, signed suite).
TAMPER_REFUSALS: dict[tuple[str, bool], tuple[type[errors.EnvelopeError], str]] = {
    **{
        ("bit-flip-in-the-middle", signed): (
            errors.AuthenticationError,
            "^frame 256 failed authentication",
        )
        for signed in (False, True)
    },
    ("bit-flip-at-the-end", False): (
        errors.AuthenticationError,
        "^frame 513 failed authentication",
    ),
    ("bit-flip-at-the-end", True): (
        errors.AuthenticationError,
        "^message signature does not verify",
    ),
    ("truncated-by-one", False): (errors.TruncatedMessageError, "ends inside frame 513\\."),
    ("truncated-by-one", True): (errors.TruncatedMessageError, "ends inside the signature footer"),
    **{
        ("truncated-to-half", signed): (errors.TruncatedMessageError, "ends inside frame 256\\.")
        for signed in (False, True)
    },
    **{
        ("extra-byte", signed): (
            errors.MalformedMessageError,
            "^unexpected bytes after the end of the message$",
        )
        for signed in (False, True)
    },
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
    error, match = TAMPER_REFUSALS[tamper, suite.signing]
    with pytest.raises(error, match=match):
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
