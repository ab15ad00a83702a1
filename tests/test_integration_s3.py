"""The S3 integration against moto's S3 and KMS (one real moto server, on loopback).

Part boundaries are checked on what actually went over the wire: :class:`Recording`
wraps the aioboto3 S3 client the caller owns and notes each ``UploadPart`` body, then
passes the call through to moto unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import aws_encryption_sdk
import boto3
import httpx
import pytest
from esdk_peer import esdk_decrypt
from fastapi import FastAPI, Request
from kms_server import REGION, KmsKey, MotoKms
from starlette.responses import StreamingResponse

import aioenvelope
from aioenvelope import EnvelopeClient, KmsKeyring, errors
from aioenvelope.integrations.s3 import (
    METADATA_PREFIX,
    S3UploadResult,
    download_decrypted,
    envelope_metadata,
    upload_encrypted,
)
from aioenvelope.integrations.starlette import (
    envelope_lifespan,
    get_envelope_client,
    install_error_handlers,
    stream_response,
)

MIB = 1 << 20
WIRE = 4 + 12 + 16  # a regular frame's bytes beyond its plaintext
CONTEXT = {"upload": "u1"}


class Recording:
    """The caller's S3 client, with each uploaded part's body noted on the way through."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3
        self.parts: list[bytes] = []
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._s3, name)
        if not callable(attr):
            return attr

        async def call(**kwargs: Any) -> Any:
            self.calls.append(name)
            if name == "upload_part":
                self.parts.append(bytes(kwargs["Body"]))
            return await attr(**kwargs)

        return call


@pytest.fixture
def bucket(moto_kms: MotoKms) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    admin_s3(moto_kms).create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    return name


def admin_s3(moto_kms: MotoKms) -> Any:
    return boto3.client("s3", region_name=REGION, endpoint_url=moto_kms.endpoint_url)


@pytest.fixture
async def s3(moto_kms: MotoKms) -> AsyncIterator[Recording]:
    session = aioboto3.Session(region_name=REGION)
    async with session.client("s3", endpoint_url=moto_kms.endpoint_url) as client:
        yield Recording(client)


@pytest.fixture
async def client(moto_kms: MotoKms, kms_key: KmsKey) -> AsyncIterator[EnvelopeClient]:
    keyring = KmsKeyring(kms_key.arn, endpoint_url=moto_kms.endpoint_url, region_name=REGION)
    async with EnvelopeClient(keyring, frame_length=4096) as c:
        yield c


def pattern(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


async def chunked(data: bytes, size: int = 300_001) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def frames_per_part(frame_length: int, part_size: int) -> int:
    wire = frame_length + WIRE
    return max(part_size // wire, -(-5 * MIB // wire))


async def test_small_object_goes_up_with_one_put_and_comes_back_decrypted(
    client: EnvelopeClient, s3: Recording, bucket: str
) -> None:
    data = pattern(100_000)
    result = await upload_encrypted(
        client, s3, chunked(data), bucket=bucket, key="small", encryption_context=CONTEXT
    )
    assert isinstance(result, S3UploadResult)
    assert result.parts == 1
    assert s3.calls == ["put_object"]
    async with download_decrypted(
        client, s3, bucket=bucket, key="small", encryption_context=CONTEXT
    ) as plaintext:
        assert b"".join([chunk async for chunk in plaintext]) == data


@pytest.mark.parametrize(
    ("regular_frames_past_cut", "final_length"),
    [
        pytest.param(0, 100, id="final-frame-starts-at-a-part-boundary"),
        pytest.param(-1, 4096, id="full-final-frame-straddles-a-boundary"),
        pytest.param(-1, 4088, id="final-frame-ends-exactly-at-a-boundary"),
        pytest.param(7, 1, id="one-byte-final-frame"),
    ],
)
async def test_multipart_parts_hold_whole_frames_and_the_first_holds_the_header(
    client: EnvelopeClient,
    s3: Recording,
    bucket: str,
    moto_kms: MotoKms,
    kms_key: KmsKey,
    regular_frames_past_cut: int,
    final_length: int,
) -> None:
    f = 4096
    k = frames_per_part(f, 5 * MIB)
    regular = 2 * k + regular_frames_past_cut  # around the second part boundary
    data = pattern(regular * f + final_length, seed=regular)
    result = await upload_encrypted(
        client, s3, chunked(data), bucket=bucket, key="big", encryption_context=CONTEXT,
        part_size=5 * MIB,
    )  # fmt: skip
    stored = admin_s3(moto_kms).get_object(Bucket=bucket, Key="big")["Body"].read()
    assert b"".join(s3.parts) == stored
    assert result.size == len(stored)
    assert result.parts == len(s3.parts)
    header_length = aioenvelope.inspect(stored).header_length
    # Every part but the last is the header (first only) plus exactly k regular frames.
    for number, part in enumerate(s3.parts[:-1], start=1):
        expected = k * (f + WIRE) + (header_length if number == 1 else 0)
        assert len(part) == expected, number
        offset = header_length if number == 1 else 0
        for i in range(k):  # each frame starts where it should, with its sequence number
            seq = (number - 1) * k + i + 1
            assert struct.unpack_from(">I", part, offset + i * (f + WIRE))[0] == seq
    # The last part starts with a whole frame and holds the final frame entire.
    last = s3.parts[-1]
    assert len(last) >= 4 + 4 + 12 + 4 + final_length + 16
    assert struct.unpack_from(">I", last, 0)[0] in (0xFFFFFFFF, (len(s3.parts) - 1) * k + 1)
    async with download_decrypted(
        client, s3, bucket=bucket, key="big", encryption_context=CONTEXT
    ) as plaintext:
        digest = hashlib.sha256()
        async for chunk in plaintext:
            digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()


async def test_metadata_names_the_suite_and_the_kms_key_for_operators(
    client: EnvelopeClient, s3: Recording, bucket: str, moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    result = await upload_encrypted(
        client, s3, pattern(6 * MIB), bucket=bucket, key="m", metadata={"owner": "team-a"}
    )
    head = admin_s3(moto_kms).head_object(Bucket=bucket, Key="m")
    meta = head["Metadata"]
    assert meta[f"{METADATA_PREFIX}suite"] == "0x0478"
    assert meta[f"{METADATA_PREFIX}kms-key-arns"] == kms_key.arn
    assert meta[f"{METADATA_PREFIX}message-id"] == result.header.message_id.hex()
    assert meta[f"{METADATA_PREFIX}frame-length"] == "4096"
    assert meta[f"{METADATA_PREFIX}format"] == "aws-encryption-sdk"
    assert meta["owner"] == "team-a"
    assert head["ContentType"] == "application/octet-stream"
    assert envelope_metadata(result.header).items() <= meta.items()


async def test_the_aws_encryption_sdk_decrypts_an_uploaded_object(
    client: EnvelopeClient,
    s3: Recording,
    bucket: str,
    moto_kms: MotoKms,
    kms_key: KmsKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = pattern(11 * MIB + 5)
    await upload_encrypted(
        client, s3, chunked(data), bucket=bucket, key="esdk", encryption_context=CONTEXT
    )
    stored = admin_s3(moto_kms).get_object(Bucket=bucket, Key="esdk")["Body"].read()
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_kms.endpoint_url)
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key.arn])
    plaintext, peer = esdk_decrypt(provider, stored)
    assert plaintext == data
    assert peer.user_context == CONTEXT


async def test_a_failing_source_aborts_the_multipart_upload_and_leaves_nothing(
    client: EnvelopeClient, s3: Recording, bucket: str, moto_kms: MotoKms
) -> None:
    async def breaks_after_12_mib() -> AsyncIterator[bytes]:
        for _ in range(12):
            yield os.urandom(MIB)
        raise OSError("the client went away")

    with pytest.raises(OSError, match="went away"):
        await upload_encrypted(client, s3, breaks_after_12_mib(), bucket=bucket, key="gone")
    assert "upload_part" in s3.calls
    assert s3.calls[-1] == "abort_multipart_upload"
    admin = admin_s3(moto_kms)
    assert admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert admin.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


async def test_downloads_refuse_a_truncated_object_and_a_wrong_context(
    client: EnvelopeClient, s3: Recording, bucket: str, moto_kms: MotoKms
) -> None:
    data = pattern(3 * MIB)
    await upload_encrypted(client, s3, data, bucket=bucket, key="t", encryption_context=CONTEXT)
    admin = admin_s3(moto_kms)
    stored = admin.get_object(Bucket=bucket, Key="t")["Body"].read()
    admin.put_object(Bucket=bucket, Key="cut", Body=stored[: len(stored) - 100])
    released: list[bytes] = []

    async def drain() -> None:
        async with download_decrypted(
            client, s3, bucket=bucket, key="cut", encryption_context=CONTEXT
        ) as plaintext:
            async for chunk in plaintext:  # kept one by one: the refusal ends the loop
                released.append(chunk)

    # 3 MiB in 4 KiB frames is 768 regular frames and an empty final frame (40 bytes on
    # the wire), so the cut of 100 bytes ends inside frame 768.
    with pytest.raises(errors.TruncatedMessageError, match="it ends inside frame 768"):
        await drain()
    # Released: exactly the 767 frames verified before the cut, in order; never frame
    # 768, nor the final frame (whose release would pass the object off as whole).
    assert b"".join(released) == data[: 767 * 4096]
    with pytest.raises(errors.EncryptionContextMismatchError):
        await download_decrypted(
            client, s3, bucket=bucket, key="t", encryption_context={"upload": "u2"}
        ).read_all()


async def test_a_bad_part_size_is_refused_before_any_call(
    client: EnvelopeClient, s3: Recording, bucket: str
) -> None:
    with pytest.raises(errors.ConfigurationError, match="part_size"):
        await upload_encrypted(client, s3, b"x", bucket=bucket, key="p", part_size=0)
    assert s3.calls == []


# -- behind a web service: what the example services do -----------------------------------


def files_app(moto_kms: MotoKms, kms_key: KmsKey, s3: Any, bucket: str) -> FastAPI:
    """The example services' file routes: each file sealed under ``{"file": name}``."""
    keyring = KmsKeyring(kms_key.arn, endpoint_url=moto_kms.endpoint_url, region_name=REGION)
    app = FastAPI(lifespan=envelope_lifespan(lambda: EnvelopeClient(keyring)))
    install_error_handlers(app)

    @app.put("/files/{name}")
    async def put_file(name: str, request: Request) -> int:
        client = await get_envelope_client(request)
        stored = await upload_encrypted(
            client, s3, request.stream(), bucket=bucket, key=name, encryption_context={"file": name}
        )
        return stored.size

    @app.get("/files/{name}")
    async def get_file(name: str, request: Request) -> StreamingResponse:
        client = await get_envelope_client(request)
        plaintext = download_decrypted(
            client, s3, bucket=bucket, key=name, encryption_context={"file": name}
        )
        return await stream_response(plaintext)

    app.state.keyring = keyring
    return app


async def test_a_renamed_object_is_a_409_and_a_warning_not_a_500_or_the_other_files_data(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    s3: Recording,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The example services' promise: a file renamed in S3 does not answer for its new
    name. It is refused at the header, before any KMS call or plaintext, as a 409
    ``encryption_context_mismatch`` with nothing else in the body (the bug was a bare
    500 with a traceback), and the operator gets a WARNING line naming the path. An
    object that is no message at all (uploaded around the service) is a 422."""
    app = files_app(moto_kms, kms_key, s3, bucket)
    data = pattern(200_000)
    admin = admin_s3(moto_kms)
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.WARNING, logger="aioenvelope.integrations"):
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as http,
        ):
            assert (await http.put("/files/q3.csv", content=data)).status_code == 200
            assert (await http.get("/files/q3.csv")).content == data
            admin.copy_object(
                Bucket=bucket, Key="q4.csv", CopySource={"Bucket": bucket, "Key": "q3.csv"}
            )
            admin.delete_object(Bucket=bucket, Key="q3.csv")
            decrypts = app.state.keyring.kms_calls["Decrypt"]
            renamed = await http.get("/files/q4.csv")
            assert app.state.keyring.kms_calls["Decrypt"] == decrypts
            admin.put_object(Bucket=bucket, Key="plain.csv", Body=b"id,amount\n1,100\n")
            plain = await http.get("/files/plain.csv")
    assert (renamed.status_code, renamed.json()) == (409, {"error": "encryption_context_mismatch"})
    assert (plain.status_code, plain.json()) == (422, {"error": "malformed_message"})
    assert [r.getMessage() for r in caplog.records if r.name == "aioenvelope.integrations"] == [
        "GET /files/q4.csv answered 409 encryption_context_mismatch: "
        "EncryptionContextMismatchError: encryption context value for key 'file' does not "
        "match the message",
        "GET /files/plain.csv answered 422 malformed_message: MalformedMessageError: "
        "not an AWS Encryption SDK message: unknown version byte 0x69",
    ]
