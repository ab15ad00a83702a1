"""Shared fixtures: keys, clients, and a real moto KMS server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from kms_server import KmsKey, MotoKms, dummy_credentials, running_moto

from aioenvelope import CommitmentPolicy, EnvelopeClient, RawAesKeyring


@pytest.fixture(scope="session")
def rsa_private_key() -> rsa.RSAPrivateKey:
    """One 2048-bit key for the session: generating keys is slow and proves nothing."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def aes_keyring() -> RawAesKeyring:
    return RawAesKeyring("test-namespace", "test-key", os.urandom(32))


@pytest.fixture
async def client(aes_keyring: RawAesKeyring) -> AsyncIterator[EnvelopeClient]:
    async with EnvelopeClient(aes_keyring, frame_length=64) as c:
        yield c


@pytest.fixture
async def legacy_client(aes_keyring: RawAesKeyring) -> AsyncIterator[EnvelopeClient]:
    """A client that also reads non-committing (legacy) suites."""
    async with EnvelopeClient(
        aes_keyring,
        frame_length=64,
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT,
    ) as c:
        yield c


@pytest.fixture(scope="session")
def moto_kms() -> Iterator[MotoKms]:
    """One real moto KMS server (127.0.0.1, port 0) for the session, dummy credentials."""
    with dummy_credentials(), running_moto() as kms:
        yield kms


@pytest.fixture(scope="session")
def kms_key(moto_kms: MotoKms) -> KmsKey:
    return moto_kms.create_key("primary")


@pytest.fixture(scope="session")
def kms_key_2(moto_kms: MotoKms) -> KmsKey:
    return moto_kms.create_key("secondary")
