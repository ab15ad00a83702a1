"""HierarchicalKeyring against the moto server: round trips, call counts, coalescing."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
import pytest

from aioenvelope import EnvelopeClient, errors
from aioenvelope.format.suites import AlgorithmSuite
from aioenvelope.keyrings.hierarchy.branch_key_store import BranchKeyStore
from aioenvelope.keyrings.hierarchy.keyring import HierarchicalKeyring

StoreFactory = Callable[..., BranchKeyStore]


@pytest.mark.parametrize(
    "suite",
    [
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
    ],
)
async def test_round_trip_through_the_client(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], suite: AlgorithmSuite
) -> None:
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(
            b"hello", encryption_context={"r": "1"}, algorithm_suite=suite
        )
        assert await client.decrypt(message) == b"hello"


async def test_a_thousand_contexts_cost_one_fetch_to_encrypt_and_one_to_decrypt(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    store = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        messages = [
            await client.encrypt(b"x", encryption_context={"record": str(i)}) for i in range(1000)
        ]
        assert store.calls == {"GetItem": 1, "Decrypt": 1}
    fresh = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(fresh, branch_key_id=branch_keys[0])) as client:
        for message in messages:
            assert await client.decrypt(message) == b"x"
        assert fresh.calls == {"GetItem": 1, "Decrypt": 1}


async def test_concurrent_first_uses_coalesce_into_one_fetch(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    store = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:

        async def one(i: int) -> None:
            await client.encrypt(b"x", encryption_context={"r": str(i)})

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        assert store.calls == {"GetItem": 1, "Decrypt": 1}


async def test_another_branch_keys_message_has_no_usable_key(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[1])
    ) as b:
        message = await b.encrypt(b"x")
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    ) as a:
        with pytest.raises(errors.NoUsableKeyError):
            await a.decrypt(message)


def test_exactly_one_of_branch_key_id_and_supplier(make_branch_key_store: StoreFactory) -> None:
    with pytest.raises(errors.ConfigurationError):
        HierarchicalKeyring(make_branch_key_store())
    with pytest.raises(errors.ConfigurationError):
        HierarchicalKeyring(
            make_branch_key_store(), branch_key_id="a", branch_key_id_supplier=lambda c: "a"
        )


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_supplier_picks_the_branch_key_per_tenant(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], is_async: bool
) -> None:
    def plain(context: Mapping[str, str]) -> str:
        return branch_keys[0] if context["tenant"] == "a" else branch_keys[1]

    async def awaited(context: Mapping[str, str]) -> str:
        return plain(context)

    supplier = awaited if is_async else plain
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id_supplier=supplier)
    async with EnvelopeClient(keyring) as client:
        for tenant in ("a", "b"):
            message = await client.encrypt(b"t", encryption_context={"tenant": tenant})
            assert await client.decrypt(message) == b"t"
    only_b = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[1])
    async with EnvelopeClient(keyring) as client:
        message_a = await client.encrypt(b"t", encryption_context={"tenant": "a"})
    async with EnvelopeClient(only_b) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(message_a)
