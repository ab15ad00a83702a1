"""Streaming interop with the AWS Encryption SDK: our streams against both of its APIs.

``test_interop_esdk.py`` pins the message format with whole messages. Here the same
bytes go through the streaming paths, where the bugs are different: a frame boundary
that falls between two source chunks, a header split over a dozen reads, a final frame
that is exactly full, an empty message, a source that yields empty or one-byte chunks.
Our side is always ``encrypt_stream``/``decrypt_stream`` fed from sources cut at
seeded random sizes; the ESDK side is both its one-shot ``encrypt``/``decrypt`` and its
streaming API (``EncryptionSDKClient.stream(mode="e"|"d")``, iterated chunk by chunk).

Raw keys follow :mod:`esdk_peer` (our keyring's namespace and name are the ESDK master
key's provider ID and key ID); KMS cases use the session's moto server, with the ESDK's
boto3 clients pointed at it through ``AWS_ENDPOINT_URL_KMS``.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping
from typing import Any

import pytest
from chunkers import (
    AsyncShortReader,
    BlockingShortReader,
    agen,
    mixed_chunks,
    random_up_to,
    up_to,
)
from cryptography.hazmat.primitives.asymmetric import rsa
from esdk_peer import (
    PeerHeader,
    SharedKey,
    assert_headers_agree,
    esdk_decrypt,
    esdk_encrypt,
    kms_master_keys,
    peer_keys,
    shared_key,
)
from kms_server import KmsKey, MotoKms
from suites import COMMITTING_SUITES, LEGACY_SUITES

from aioenvelope import (
    AlgorithmSuite,
    CommitmentPolicy,
    EnvelopeClient,
    KmsKeyring,
    MessageHeader,
    StreamSource,
)

NAMESPACE = "aioenvelope-stream-interop"
KEY_NAME = "stream-key"
CONTEXT = {"purpose": "stream-interop", "鍵": "値 𐀂"}
ESDK_WRITERS = ["esdk-one-shot", "esdk-stream"]
KEY_KINDS_BY_NAME = {"aes": "aes-256", "rsa": "rsa-oaep-sha256"}


def test_there_are_nine_legacy_suites() -> None:
    """Guard for the legacy matrix below: every non-committing suite the ESDK writes."""
    assert len(LEGACY_SUITES) == 9


# ---------------------------------------------------------------------------------------
# Sources cut at random sizes
# ---------------------------------------------------------------------------------------


def rng_for(*parts: object) -> random.Random:
    """A generator seeded by the test case, so every failure replays exactly."""
    return random.Random(zlib.crc32(repr(parts).encode()))


SOURCE_KINDS = [
    "bytes",
    "bytearray",
    "memoryview",
    "async-generator",
    "sync-list",
    "sync-generator",
    "async-reader",
    "blocking-reader",
]


def source_of(kind: str, data: bytes, rng: random.Random, largest: int) -> StreamSource:
    """``data`` as the stream source ``kind`` (see :data:`SOURCE_KINDS`)."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "async-generator":
        return agen(mixed_chunks(data, rng, largest))
    if kind == "sync-list":
        return mixed_chunks(data, rng, largest)
    if kind == "sync-generator":
        return iter(mixed_chunks(data, rng, largest))
    if kind == "async-reader":
        return AsyncShortReader(data, random_up_to(rng, largest))
    if kind == "blocking-reader":
        return BlockingShortReader(data, random_up_to(rng, largest))
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# Shared keys and checks
# ---------------------------------------------------------------------------------------


def esdk_write(
    writer: str, keys: Any, plaintext: bytes, **options: Any
) -> tuple[bytes, PeerHeader]:
    """``writer`` (see :data:`ESDK_WRITERS`): the ESDK's one-shot or streaming encrypt."""
    return esdk_encrypt(keys, plaintext, streaming=writer == "esdk-stream", **options)


def esdk_wrote(
    writer: str, plaintext: bytes, suite: AlgorithmSuite, frame_length: int
) -> tuple[SharedKey, bytes, PeerHeader]:
    """A fresh shared key, and ``plaintext`` written under it (with :data:`CONTEXT`) by
    the ESDK's ``writer``."""
    key = interop_key()
    ciphertext, peer_header = esdk_write(
        writer,
        peer_keys(key.peer),
        plaintext,
        suite_id=suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=frame_length,
    )
    return key, ciphertext, peer_header


def interop_key(kind: str = "aes-256", rsa_key: rsa.RSAPrivateKey | None = None) -> SharedKey:
    """A fresh wrapping key held by both libraries (see :func:`esdk_peer.shared_key`)."""
    return shared_key(kind, rsa_key, namespace=NAMESPACE, name=KEY_NAME)


async def our_stream_encrypt(
    client: EnvelopeClient,
    source: StreamSource,
    *,
    suite: AlgorithmSuite,
    frame_length: int,
    context: Mapping[str, str] = CONTEXT,
    plaintext_length: int | None = None,
) -> tuple[bytes, MessageHeader]:
    async with client.encrypt_stream(
        source,
        encryption_context=context,
        algorithm_suite=suite,
        frame_length=frame_length,
        plaintext_length=plaintext_length,
    ) as stream:
        ciphertext = b"".join([chunk async for chunk in stream])
        assert stream.header is not None
        return ciphertext, stream.header


async def our_stream_decrypt(
    client: EnvelopeClient, source: StreamSource, *, context: Mapping[str, str] = CONTEXT
) -> tuple[bytes, MessageHeader]:
    async with client.decrypt_stream(source, encryption_context=context) as stream:
        plaintext = b"".join([chunk async for chunk in stream])
        assert stream.header is not None
        return plaintext, stream.header


def assert_esdk_reads_both_ways(
    keys: Any, ciphertext: bytes, plaintext: bytes, ours: MessageHeader
) -> None:
    """The ESDK's one-shot decrypt and its streaming decrypt both recover ``plaintext``
    and parse the header we wrote the way we do."""
    for streaming in (False, True):
        decrypted, peer_header = esdk_decrypt(keys, ciphertext, streaming=streaming)
        assert decrypted == plaintext, f"streaming={streaming}"
        assert peer_header.user_context == dict(CONTEXT)
        assert_headers_agree(ours, peer_header)


# ---------------------------------------------------------------------------------------
# 1. The ESDK reads our streams
# ---------------------------------------------------------------------------------------

SIZES = ["empty", "one-byte", "frame-1", "frame", "frame+1", "3-frames+17"]


def size_of(name: str, frame_length: int) -> int:
    return {
        "empty": 0,
        "one-byte": 1,
        "frame-1": frame_length - 1,
        "frame": frame_length,
        "frame+1": frame_length + 1,
        "3-frames+17": 3 * frame_length + 17,
    }[name]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("frame_length", [4096, 65536])
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
@pytest.mark.parametrize("key_kind", ["aes", "rsa"])
async def test_esdk_decrypts_our_stream_one_shot_and_streaming(
    key_kind: str,
    suite: AlgorithmSuite,
    frame_length: int,
    size: str,
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    """encrypt_stream from an async source cut at random sizes (frame boundaries fall
    inside chunks, across chunks and on chunk edges) must be a message the ESDK reads
    with both its APIs: empty, one byte, a final frame one short of full, exactly full
    and one over, and several frames."""
    rng = rng_for(key_kind, suite, frame_length, size)
    plaintext = rng.randbytes(size_of(size, frame_length))
    key = interop_key(KEY_KINDS_BY_NAME[key_kind], rsa_private_key)
    async with EnvelopeClient(key.ours) as client:
        source = agen(mixed_chunks(plaintext, rng, 2 * frame_length + 100))
        ciphertext, header = await our_stream_encrypt(
            client, source, suite=suite, frame_length=frame_length
        )
        # Our own one-shot reader agrees with what the stream wrote.
        assert await client.decrypt(ciphertext, encryption_context=CONTEXT) == plaintext
    assert header.frame_length == frame_length
    assert header.algorithm_suite is suite
    assert_esdk_reads_both_ways(peer_keys(key.peer), ciphertext, plaintext, header)


@pytest.mark.parametrize("source_kind", SOURCE_KINDS)
async def test_esdk_decrypts_our_stream_from_every_source_kind(source_kind: str) -> None:
    """Every kind of source encrypt_stream takes (bytes-likes, async and sync iterables,
    async and blocking readers with short reads) gives the same, ESDK-readable message;
    with plaintext_length given for the kinds whose length is known up front."""
    rng = rng_for(source_kind)
    frame_length = 4096
    plaintext = rng.randbytes(5 * frame_length + 123)
    key = interop_key()
    known_length = source_kind in {"bytes", "bytearray", "memoryview"}
    async with EnvelopeClient(key.ours) as client:
        ciphertext, header = await our_stream_encrypt(
            client,
            source_of(source_kind, plaintext, rng, 3 * frame_length),
            suite=AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
            frame_length=frame_length,
            plaintext_length=len(plaintext) if known_length else None,
        )
    assert_esdk_reads_both_ways(peer_keys(key.peer), ciphertext, plaintext, header)


# ---------------------------------------------------------------------------------------
# 2. We stream-decrypt the ESDK's messages
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame_length", "size"),
    [
        pytest.param(0, 0, id="non-framed-empty"),
        pytest.param(0, 5000, id="non-framed-5000"),
        pytest.param(128, 0, id="f128-empty"),
        pytest.param(128, 128, id="f128-one-full-frame"),
        pytest.param(128, 3 * 128 + 5, id="f128-multi"),
        pytest.param(4096, 4095, id="f4096-frame-1"),
        pytest.param(4096, 4097, id="f4096-frame+1"),
        pytest.param(4096, 4 * 4096, id="f4096-four-full-frames"),
        pytest.param(65536, 1, id="f65536-one-byte"),
        pytest.param(65536, 2 * 65536 + 17, id="f65536-multi"),
    ],
)
@pytest.mark.parametrize("writer", ESDK_WRITERS)
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_we_stream_decrypt_esdk_committing_messages(
    suite: AlgorithmSuite, writer: str, frame_length: int, size: int
) -> None:
    """Messages the ESDK wrote with its one-shot and its streaming encryptor, framed at
    several lengths and non-framed, through decrypt_stream from random-size chunks."""
    rng = rng_for(suite, writer, frame_length, size)
    plaintext = rng.randbytes(size)
    key, ciphertext, peer_header = esdk_wrote(writer, plaintext, suite, frame_length)
    assert peer_header.framed == (frame_length != 0)
    async with EnvelopeClient(key.ours) as client:
        decrypted, header = await our_stream_decrypt(
            client, agen(mixed_chunks(ciphertext, rng, 2 * max(frame_length, 1024) + 100))
        )
    assert decrypted == plaintext
    assert header.algorithm_suite is suite
    assert header.version == 2
    assert_headers_agree(header, peer_header)


@pytest.mark.parametrize(
    "frame_length", [pytest.param(4096, id="framed"), pytest.param(0, id="non-framed")]
)
@pytest.mark.parametrize("writer", ESDK_WRITERS)
@pytest.mark.parametrize("suite", LEGACY_SUITES)
async def test_we_stream_decrypt_esdk_legacy_messages(
    suite: AlgorithmSuite, writer: str, frame_length: int
) -> None:
    """All nine non-committing suites (v1 headers, no-KDF and HKDF-SHA256/384, P-256 and
    P-384 signatures), framed and non-framed, from both ESDK writers, stream-decrypted
    by a client whose policy allows legacy reads."""
    rng = rng_for(suite, writer, frame_length)
    plaintext = rng.randbytes(3 * 4096 + 17)
    key, ciphertext, peer_header = esdk_wrote(writer, plaintext, suite, frame_length)
    assert peer_header.suite_id == suite.suite_id
    async with EnvelopeClient(
        key.ours, commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    ) as client:
        decrypted, header = await our_stream_decrypt(
            client, agen(mixed_chunks(ciphertext, rng, 3000))
        )
    assert decrypted == plaintext
    assert header.algorithm_suite is suite
    assert header.version == 1
    assert_headers_agree(header, peer_header)


@pytest.mark.parametrize("source_kind", ["sync-list", "async-generator", "async-reader"])
@pytest.mark.parametrize(
    ("suite", "frame_length"),
    [
        pytest.param(AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, 128, id="0x0478-framed"),
        pytest.param(
            AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384, 128, id="0x0578-framed"
        ),
        pytest.param(
            AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384, 0, id="0x0578-non-framed"
        ),
        pytest.param(
            AlgorithmSuite.AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384, 128, id="0x0378-framed"
        ),
        pytest.param(AlgorithmSuite.AES_128_GCM_IV12_TAG16_NO_KDF, 0, id="0x0014-non-framed"),
    ],
)
async def test_we_stream_decrypt_esdk_message_fed_one_byte_at_a_time(
    suite: AlgorithmSuite, frame_length: int, source_kind: str
) -> None:
    """A small ESDK message (streaming writer) given to decrypt_stream one byte per
    chunk or per read: the header, each frame prefix, the signature length and the
    signature all arrive split at every possible offset."""
    plaintext = rng_for(suite, frame_length).randbytes(300)
    key, ciphertext, peer_header = esdk_wrote("esdk-stream", plaintext, suite, frame_length)
    one_byte = random.Random(0)
    source: StreamSource
    if source_kind == "async-reader":
        source = AsyncShortReader(ciphertext, up_to(1))
    else:
        chunks = mixed_chunks(ciphertext, one_byte, 1)
        source = chunks if source_kind == "sync-list" else agen(chunks)
    async with EnvelopeClient(
        key.ours, commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    ) as client:
        decrypted, header = await our_stream_decrypt(client, source)
    assert decrypted == plaintext
    assert_headers_agree(header, peer_header)


# ---------------------------------------------------------------------------------------
# 3. KMS, against the moto server
# ---------------------------------------------------------------------------------------


def kms_edk_arns(header: MessageHeader) -> set[str]:
    assert {edk.provider_id for edk in header.encrypted_data_keys} == {"aws-kms"}
    return {edk.provider_info.decode() for edk in header.encrypted_data_keys}


@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_esdk_decrypts_our_kms_stream(
    esdk_kms: MotoKms, kms_key: KmsKey, suite: AlgorithmSuite
) -> None:
    """encrypt_stream under our KmsKeyring (one GenerateDataKey on moto): the ESDK's
    strict KMS provider decrypts it with its one-shot and its streaming API."""
    rng = rng_for("kms-ours", suite)
    plaintext = rng.randbytes(3 * 4096 + 17)
    keyring = KmsKeyring(kms_key.arn, endpoint_url=esdk_kms.endpoint_url)
    async with EnvelopeClient(keyring) as client:
        ciphertext, header = await our_stream_encrypt(
            client, agen(mixed_chunks(plaintext, rng, 5000)), suite=suite, frame_length=4096
        )
    assert kms_edk_arns(header) == {kms_key.arn}
    assert keyring.kms_calls["GenerateDataKey"] == 1
    assert_esdk_reads_both_ways(kms_master_keys(kms_key.arn), ciphertext, plaintext, header)


@pytest.mark.parametrize("writer", ESDK_WRITERS)
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_we_stream_decrypt_esdk_kms_messages(
    esdk_kms: MotoKms, kms_key: KmsKey, suite: AlgorithmSuite, writer: str
) -> None:
    """A message the ESDK wrote under a KMS key (one-shot and streaming) opens with
    decrypt_stream under our strict KmsKeyring: one KMS Decrypt, same header."""
    rng = rng_for("kms-esdk", suite, writer)
    plaintext = rng.randbytes(3 * 4096 + 17)
    ciphertext, peer_header = esdk_write(
        writer,
        kms_master_keys(kms_key.arn),
        plaintext,
        suite_id=suite.suite_id,
        encryption_context=CONTEXT,
        frame_length=4096,
    )
    keyring = KmsKeyring(kms_key.arn, endpoint_url=esdk_kms.endpoint_url)
    async with EnvelopeClient(keyring) as client:
        decrypted, header = await our_stream_decrypt(
            client, agen(mixed_chunks(ciphertext, rng, 5000))
        )
    assert decrypted == plaintext
    assert kms_edk_arns(header) == {kms_key.arn}
    assert keyring.kms_calls["Decrypt"] == 1
    assert_headers_agree(header, peer_header)
