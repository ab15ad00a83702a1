"""Helpers and fixtures for the key manager tests (``test_key_manager_*.py``).

Keyrings on the session's moto server (named by ARN, no start-up DescribeKey, one shared
aioboto3 session: ``moto_keyrings``), messages and their EDKs read without KMS, and a keyring whose decrypts
wait at a gate so that a cache miss stays in flight for as long as a test needs. Test
modules bind the fixtures they use by name (``keyring = support.keyring``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from fake_clock import FakeClock
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring

import aioenvelope
from aioenvelope import (
    AlgorithmSuite,
    CacheConfig,
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    KmsKeyring,
    MessageHeader,
)

CONTEXT = {"tenant": "t1", "purpose": "key-manager-tests"}
PLAINTEXT = b"attack at dawn " * 7
KIB = 1024
BURST = 10_000
# A burst test's claim is coalescing, not speed: while 10,000 tasks start on one loop
# (and moto answers in the same process), the one shared KMS call can take seconds on a
# loaded 2-core VM, so it gets 30 s instead of the default 2 s.
BURST_DEADLINE = 30.0
COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
PUBLIC_KEY_FIELD = "aws-crypto-public-key"


# -- helpers -----------------------------------------------------------------------------


def kms_keyring(moto_kms: MotoKms, key_arn: str, *, deadline: float = 2.0) -> KmsKeyring:
    """A keyring on the moto server. Named by ARN without the start-up DescribeKey, so the
    only KMS calls are the data-key calls under test. ``deadline`` is KmsKeyring's default
    unless a burst test needs room (see :data:`BURST_DEADLINE`)."""
    return moto_kms_keyring(moto_kms, key_arn, check_keys=False, deadline=deadline)


def payload(i: int) -> bytes:
    """1 KiB of plaintext, different for every ``i``."""
    return (b"message %d " % i).ljust(KIB, b".")


def header_of(blob: bytes) -> MessageHeader:
    """The message's header, read without any KMS call."""
    return aioenvelope.inspect(blob)


def edk_ciphertext(blob: bytes) -> bytes:
    """The ciphertext of the message's only EDK (KMS's CiphertextBlob)."""
    (edk,) = header_of(blob).encrypted_data_keys
    return edk.ciphertext


def with_edk_ciphertext(blob: bytes, ciphertext: bytes) -> bytes:
    """``blob`` with its EDK's ciphertext replaced (same length, so the header still parses)."""
    original = edk_ciphertext(blob)
    assert len(ciphertext) == len(original)
    assert blob.count(original) == 1
    return blob.replace(original, ciphertext)


def bogus_messages(blob: bytes, count: int) -> list[bytes]:
    """``count`` copies of ``blob``, each with a different corrupted EDK: every one is a
    distinct decrypt cache key, needs its own KMS Decrypt, and KMS refuses each
    (InvalidCiphertextException: the change is in the blob's authenticated part)."""
    original = edk_ciphertext(blob)
    messages = []
    for i in range(1, count + 1):
        flip = i.to_bytes(2, "big")
        bad = original[:-2] + bytes(a ^ b for a, b in zip(original[-2:], flip, strict=True))
        messages.append(with_edk_ciphertext(blob, bad))
    assert len(set(messages)) == count
    return messages


def missing_key(key: KmsKey) -> str:
    """The ARN of a key that does not exist (same account and region as ``key``)."""
    return key.arn.replace(key.key_id, "00000000-0000-4000-8000-000000000000")


def nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` without zero entries (stats may list every operation)."""
    return {name: n for name, n in counts.items() if n}


async def encrypt_messages(
    keyring: Keyring,
    count: int,
    *,
    context: Mapping[str, str] = CONTEXT,
    cache: CacheConfig | None = CacheConfig(),  # noqa: B008 - frozen config, never mutated
) -> list[bytes]:
    """``count`` messages of ``payload(i)`` from one client (by default sharing a data key)."""
    async with EnvelopeClient(keyring, cache=cache) as client:
        return [await client.encrypt(payload(i), encryption_context=context) for i in range(count)]


class GatedKeyring(Keyring):
    """A real KmsKeyring whose decrypts wait at a gate first, so that a cache miss stays
    in flight for exactly as long as a test needs (instead of racing moto)."""

    def __init__(self, inner: KmsKeyring) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls = 0

    @property
    def kms_calls(self) -> Mapping[str, int]:
        return self.inner.kms_calls

    def attach(self, runtime: Any) -> None:
        self.inner.attach(runtime)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        return await self.inner.on_encrypt(materials)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        return await self.inner.on_decrypt(materials, encrypted_data_keys)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    """The writer's keyring: a fresh one per test, so its ``kms_calls`` start at zero."""
    return kms_keyring(moto_kms, kms_key.arn)


@pytest.fixture
def reader_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> KmsKeyring:
    """A second keyring for a second client, whose decrypt cache starts cold."""
    return kms_keyring(moto_kms, kms_key.arn)


@pytest.fixture
def gated_keyring(moto_kms: MotoKms, kms_key: KmsKey) -> GatedKeyring:
    return GatedKeyring(kms_keyring(moto_kms, kms_key.arn))
