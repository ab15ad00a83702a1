"""HierarchicalKeyring against the moto server: round trips, call counts, coalescing."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import pytest
from kms_server import KmsKey, MotoKms
from moto_keyrings import shared_session

from aioenvelope import EnvelopeClient, errors, inspect
from aioenvelope.format.suites import AlgorithmSuite
from aioenvelope.keyrings.hierarchy import wrapping
from aioenvelope.keyrings.hierarchy.branch_key_store import BranchKeyStore
from aioenvelope.keyrings.hierarchy.keyring import HierarchicalKeyring

StoreFactory = Callable[..., BranchKeyStore]


@pytest.fixture
def make_store(moto_kms: MotoKms, kms_key: KmsKey) -> StoreFactory:
    table = f"hk-{uuid.uuid4().hex[:12]}"

    def make(**kwargs: Any) -> BranchKeyStore:
        kwargs.setdefault("logical_key_store_name", "aioenvelope-test-store")
        kwargs.setdefault("kms_key_id", kms_key.arn)
        kwargs.setdefault("session", shared_session())
        kwargs.setdefault("endpoint_url", moto_kms.endpoint_url)
        kwargs.setdefault("region_name", moto_kms.region)
        return BranchKeyStore(table, **kwargs)

    return make


@pytest.fixture
async def branch_keys(make_store: StoreFactory) -> tuple[str, str]:
    async with make_store() as admin:
        await admin.create_table()
        a = await admin.create_branch_key("tenant-a")
        b = await admin.create_branch_key("tenant-b")
    return a, b


@pytest.mark.parametrize(
    "suite",
    [
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
    ],
)
async def test_round_trip_through_the_client(
    make_store: StoreFactory, branch_keys: tuple[str, str], suite: AlgorithmSuite
) -> None:
    keyring = HierarchicalKeyring(make_store(), branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(
            b"hello", encryption_context={"r": "1"}, algorithm_suite=suite
        )
        assert await client.decrypt(message) == b"hello"


async def test_a_thousand_contexts_cost_one_fetch_to_encrypt_and_one_to_decrypt(
    make_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    store = make_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        messages = [
            await client.encrypt(b"x", encryption_context={"record": str(i)}) for i in range(1000)
        ]
        assert store.calls == {"GetItem": 1, "Decrypt": 1}
    fresh = make_store()
    async with EnvelopeClient(HierarchicalKeyring(fresh, branch_key_id=branch_keys[0])) as client:
        for message in messages:
            assert await client.decrypt(message) == b"x"
        assert fresh.calls == {"GetItem": 1, "Decrypt": 1}


async def test_concurrent_first_uses_coalesce_into_one_fetch(
    make_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    store = make_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:

        async def one(i: int) -> None:
            await client.encrypt(b"x", encryption_context={"r": str(i)})

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        assert store.calls == {"GetItem": 1, "Decrypt": 1}


async def test_another_branch_keys_message_has_no_usable_key(
    make_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    async with EnvelopeClient(HierarchicalKeyring(make_store(), branch_key_id=branch_keys[1])) as b:
        message = await b.encrypt(b"x")
    async with EnvelopeClient(HierarchicalKeyring(make_store(), branch_key_id=branch_keys[0])) as a:
        with pytest.raises(errors.NoUsableKeyError):
            await a.decrypt(message)


def test_exactly_one_of_branch_key_id_and_supplier(make_store: StoreFactory) -> None:
    with pytest.raises(errors.ConfigurationError):
        HierarchicalKeyring(make_store())
    with pytest.raises(errors.ConfigurationError):
        HierarchicalKeyring(make_store(), branch_key_id="a", branch_key_id_supplier=lambda c: "a")


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_supplier_picks_the_branch_key_per_tenant(
    make_store: StoreFactory, branch_keys: tuple[str, str], is_async: bool
) -> None:
    def plain(context: Mapping[str, str]) -> str:
        return branch_keys[0] if context["tenant"] == "a" else branch_keys[1]

    async def awaited(context: Mapping[str, str]) -> str:
        return plain(context)

    supplier = awaited if is_async else plain
    keyring = HierarchicalKeyring(make_store(), branch_key_id_supplier=supplier)
    async with EnvelopeClient(keyring) as client:
        for tenant in ("a", "b"):
            message = await client.encrypt(b"t", encryption_context={"tenant": tenant})
            assert await client.decrypt(message) == b"t"
    only_b = HierarchicalKeyring(make_store(), branch_key_id=branch_keys[1])
    async with EnvelopeClient(keyring) as client:
        message_a = await client.encrypt(b"t", encryption_context={"tenant": "a"})
    async with EnvelopeClient(only_b) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(message_a)


async def test_after_rotation_old_messages_decrypt_and_new_ones_use_the_new_version_after_ttl(
    make_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    def version_of(message: bytes) -> str:
        (edk,) = inspect(message).encrypted_data_keys
        return wrapping.branch_key_version_of(edk.ciphertext)

    keyring = HierarchicalKeyring(make_store(), branch_key_id=branch_keys[0], ttl=1.0)
    async with EnvelopeClient(keyring, cache=None) as client:
        old = await client.encrypt(b"old")
        async with make_store() as admin:
            new_version = await admin.rotate_branch_key(branch_keys[0])
        assert version_of(await client.encrypt(b"cached")) == version_of(old)
        await anyio.sleep(1.5)
        fresh = await client.encrypt(b"new")
        assert version_of(fresh) == new_version != version_of(old)
        assert await client.decrypt(old) == b"old"
        assert await client.decrypt(fresh) == b"new"
