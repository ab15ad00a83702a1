"""Shared fixtures: keys, clients, and a real moto KMS server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from esdk_vectors import VectorTally, vectors_required
from fault_proxy import FaultProxy
from kms_server import KmsKey, MotoKms, dummy_credentials, running_moto
from moto_keyrings import moto_kms_keyring, shared_session

from aioenvelope import (
    BranchKeyStore,
    CommitmentPolicy,
    EnvelopeClient,
    KmsKeyring,
    RawAesKeyring,
)

# The keyring conformance suite's per-keyring harness fixtures (test_keyring_conformance).
pytest_plugins = ["keyring_harness"]


def pytest_configure(config: pytest.Config) -> None:
    """The ESDK vector tally: printed at the end of the run, checked in CI (esdk_vectors)."""
    config.pluginmanager.register(VectorTally(required=vectors_required()), "esdk-vector-tally")


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


@pytest.fixture
def fault_proxy(moto_kms: MotoKms) -> Iterator[FaultProxy]:
    """A fresh FaultProxy in front of moto per test: no fault, hold, record or count
    leaks from one test to the next."""
    with FaultProxy(moto_kms.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def make_kms_keyring(moto_kms: MotoKms) -> Callable[..., KmsKeyring]:
    """``make_kms_keyring(key, **kwargs)``: a fresh KmsKeyring on ``key`` (its
    ``kms_calls`` start at zero) talking to the moto server (see moto_keyrings)."""

    def make(key: KmsKey, **kwargs: Any) -> KmsKeyring:
        return moto_kms_keyring(moto_kms, key.arn, **kwargs)

    return make


@pytest.fixture
def make_branch_key_store(moto_kms: MotoKms, kms_key: KmsKey) -> Callable[..., BranchKeyStore]:
    """``make_branch_key_store(**kwargs)``: a fresh BranchKeyStore (its ``calls`` start
    at zero) on this test's own table name (unless ``table_name=``), under ``kms_key``,
    talking to moto; each call makes another store object on the same table."""
    table = f"hk-{uuid.uuid4().hex[:12]}"

    def make(table_name: str = table, **kwargs: Any) -> BranchKeyStore:
        kwargs.setdefault("logical_key_store_name", "aioenvelope-test-store")
        kwargs.setdefault("kms_key_id", kms_key.arn)
        kwargs.setdefault("session", shared_session())
        kwargs.setdefault("endpoint_url", moto_kms.endpoint_url)
        kwargs.setdefault("region_name", moto_kms.region)
        return BranchKeyStore(table_name, **kwargs)

    return make


@pytest.fixture
async def branch_keys(make_branch_key_store: Callable[..., BranchKeyStore]) -> tuple[str, str]:
    """The table of ``make_branch_key_store``, created, with branch keys ``tenant-a``
    and ``tenant-b``."""
    async with make_branch_key_store() as admin:
        await admin.create_table()
        a = await admin.create_branch_key("tenant-a")
        b = await admin.create_branch_key("tenant-b")
    return a, b


@pytest.fixture
def esdk_kms(moto_kms: MotoKms, monkeypatch: pytest.MonkeyPatch) -> MotoKms:
    """Point the ESDK's own boto3 KMS clients at moto: botocore reads the endpoint from
    ``AWS_ENDPOINT_URL_KMS`` when each client is made."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_kms.endpoint_url)
    return moto_kms


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials anywhere botocore looks: environment, files, instance role."""
    for name in list(os.environ):
        if name.startswith("AWS_") and name not in ("AWS_DEFAULT_REGION", "AWS_REGION"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
