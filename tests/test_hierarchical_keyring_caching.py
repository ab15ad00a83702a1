"""HierarchicalKeyring caching on the moto server: what it costs in DynamoDB and KMS
calls, how it follows rotations, and that branch keys are zeroed when they leave.

Call counts are read from the public counters (``client.stats``, ``store.calls``);
the TTL runs on a FakeClock passed to the client, so nothing here sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
from fake_clock import FakeClock
from fault_proxy import FaultProxy, wait_for
from live_buffers import bytearrays_holding, the_one_holding, zeroed

from aioenvelope import BranchKeyStore, EnvelopeClient, HierarchicalKeyring, inspect
from aioenvelope.keyrings.hierarchy import wrapping

StoreFactory = Callable[..., BranchKeyStore]
ONE_FETCH = {"GetItem": 1, "Decrypt": 1}


def version_of(message: bytes) -> str:
    (edk,) = inspect(message).encrypted_data_keys
    return wrapping.branch_key_version_of(edk.ciphertext)


async def active_key_bytes(make_store: StoreFactory, branch_key_id: str) -> bytes:
    """The active branch key's plaintext, read through another store (so the scans
    below know what to look for); its own copy is zeroed before returning."""
    async with make_store() as admin:
        materials = await admin.get_active_branch_key(branch_key_id)
    secret = bytes(materials.key)
    materials.wipe()
    return secret


async def test_ten_thousand_distinct_contexts_cost_one_fetch_to_encrypt_and_one_to_decrypt(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """The issue's acceptance: per-record contexts cost no KMS call per record."""
    writer_store = make_branch_key_store()
    keyring = HierarchicalKeyring(writer_store, branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        messages = [
            await client.encrypt(b"r", encryption_context={"record": str(i)}) for i in range(10_000)
        ]
        assert dict(client.stats.dynamodb_calls) == {"GetItem": 1}
        assert dict(client.stats.kms_calls) == {"Decrypt": 1}
    assert writer_store.calls == ONE_FETCH
    reader_store = make_branch_key_store()
    keyring = HierarchicalKeyring(reader_store, branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        for message in messages:
            assert await client.decrypt(message) == b"r"
        assert client.stats.branch_key_cache_misses == 1
        assert client.stats.branch_key_cache_hits == 9_999
    assert reader_store.calls == ONE_FETCH


async def test_an_encrypt_warms_the_decrypt_of_what_it_wrote(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """The active version is cached as a version too, so one client's round trip of
    1,000 records makes one fetch in all (the MPL's keyring fetches again to decrypt)."""
    store = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        for i in range(1_000):
            context = {"record": str(i)}
            message = await client.encrypt(b"x", encryption_context=context)
            assert await client.decrypt(message, encryption_context=context) == b"x"
        assert client.stats.branch_key_cache_misses == 1
        assert client.stats.branch_key_cache_hits == 1_999
    assert store.calls == ONE_FETCH


async def test_a_thousand_concurrent_first_uses_make_one_fetch_each_way(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    writer = make_branch_key_store()
    messages: list[bytes] = []
    async with EnvelopeClient(HierarchicalKeyring(writer, branch_key_id=branch_keys[0])) as client:

        async def encrypt_one(i: int) -> None:
            messages.append(await client.encrypt(b"c", encryption_context={"r": str(i)}))

        async with anyio.create_task_group() as tg:
            for i in range(1_000):
                tg.start_soon(encrypt_one, i)
    assert writer.calls == ONE_FETCH
    reader = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(reader, branch_key_id=branch_keys[0])) as client:
        plaintexts: list[bytes] = []

        async def decrypt_one(message: bytes) -> None:
            plaintexts.append(await client.decrypt(message))

        async with anyio.create_task_group() as tg:
            for message in messages:
                tg.start_soon(decrypt_one, message)
    assert plaintexts == [b"c"] * 1_000
    assert reader.calls == ONE_FETCH


async def test_every_message_gets_its_own_data_key_even_under_one_context(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """The client's data-key reuse (on by default) is not applied to this keyring: the
    wrap is local, so a fresh key per message costs nothing remote."""
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        messages = [await client.encrypt(b"same", encryption_context={"t": "1"}) for _ in range(3)]
        assert client.stats.encrypt_cache_hits == client.stats.encrypt_cache_misses == 0
        for message in messages:
            await client.decrypt(message)
        assert client.stats.decrypt_cache_hits == client.stats.decrypt_cache_misses == 0
    edks = {inspect(m).encrypted_data_keys[0].ciphertext for m in messages}
    assert len(edks) == 3


async def test_a_rotation_through_the_same_store_is_used_by_the_next_message(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    store = make_branch_key_store()
    keyring = HierarchicalKeyring(store, branch_key_id=branch_keys[0], ttl=600.0)
    async with EnvelopeClient(keyring, clock=FakeClock()) as client:
        old = await client.encrypt(b"old")
        new_version = await store.rotate_branch_key(branch_keys[0])
        new = await client.encrypt(b"new")
        assert version_of(new) == new_version != version_of(old)
        assert await client.decrypt(old) == b"old"  # the old version is still cached
        assert await client.decrypt(new) == b"new"
        assert client.stats.dynamodb_calls["GetItem"] == 2 + 1  # 1 by the rotation itself


async def test_a_rotation_by_another_store_is_used_once_the_ttl_has_passed(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    clock = FakeClock()
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0], ttl=60.0)
    async with EnvelopeClient(keyring, clock=clock) as client:
        old = await client.encrypt(b"old")
        async with make_branch_key_store() as admin:
            new_version = await admin.rotate_branch_key(branch_keys[0])
        clock.advance(59.0)
        assert version_of(await client.encrypt(b"cached")) == version_of(old)
        clock.advance(2.0)
        fresh = await client.encrypt(b"new")
        assert version_of(fresh) == new_version != version_of(old)
        assert await client.decrypt(old) == b"old"
        assert await client.decrypt(fresh) == b"new"


async def test_a_branch_key_is_fetched_again_after_its_ttl(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    clock = FakeClock()
    store = make_branch_key_store()
    keyring = HierarchicalKeyring(store, branch_key_id=branch_keys[0], ttl=60.0)
    async with EnvelopeClient(keyring, clock=clock) as client:
        await client.encrypt(b"1")
        clock.advance(59.0)
        await client.encrypt(b"2")
        assert store.calls == ONE_FETCH
        clock.advance(2.0)
        await client.encrypt(b"3")
        assert store.calls == {"GetItem": 2, "Decrypt": 2}


# -- wiping ---------------------------------------------------------------------------


def two_tenant_keyring(
    make_store: StoreFactory, branch_keys: tuple[str, str], *, ttl: float
) -> HierarchicalKeyring:
    """Context {"t": "a"} under the first branch key, anything else under the second."""

    def tenant(context: Mapping[str, str]) -> str:
        return branch_keys[0] if context["t"] == "a" else branch_keys[1]

    return HierarchicalKeyring(make_store(), branch_key_id_supplier=tenant, ttl=ttl)


async def test_an_expired_branch_key_is_zeroed_at_the_next_use(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    secret = await active_key_bytes(make_branch_key_store, branch_keys[0])
    clock = FakeClock()

    keyring = two_tenant_keyring(make_branch_key_store, branch_keys, ttl=60.0)
    async with EnvelopeClient(keyring, clock=clock) as client:
        await client.encrypt(b"a", encryption_context={"t": "a"})
        held = the_one_holding(secret)
        clock.advance(61.0)
        await client.encrypt(b"b", encryption_context={"t": "b"})  # another branch key
        assert zeroed(held)
        assert bytearrays_holding(secret) == []


async def test_each_cached_branch_key_is_zeroed_at_the_first_use_after_its_own_ttl(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """The keyring only walks its cache when a key may be due: with keys cached at
    different times, each is still zeroed at the first message (encrypt or decrypt)
    after its own TTL, and not before."""
    secret_a = await active_key_bytes(make_branch_key_store, branch_keys[0])
    secret_b = await active_key_bytes(make_branch_key_store, branch_keys[1])
    clock = FakeClock()

    keyring = two_tenant_keyring(make_branch_key_store, branch_keys, ttl=60.0)
    async with EnvelopeClient(keyring, clock=clock) as client:
        await client.encrypt(b"a", encryption_context={"t": "a"})
        held_a = the_one_holding(secret_a)
        clock.advance(30.0)
        message_b = await client.encrypt(b"b", encryption_context={"t": "b"})
        held_b = the_one_holding(secret_b)
        clock.advance(29.0)  # t=59: both still live
        await client.decrypt(message_b, encryption_context={"t": "b"})
        assert not zeroed(held_a)
        assert not zeroed(held_b)
        clock.advance(2.0)  # t=61: a's TTL passed, b's not
        await client.decrypt(message_b, encryption_context={"t": "b"})
        assert zeroed(held_a)
        assert not zeroed(held_b)
        clock.advance(30.0)  # t=91: b's passed too
        await client.encrypt(b"a", encryption_context={"t": "a"})  # a fetched again
        assert zeroed(held_b)
        assert bytearrays_holding(secret_b) == []


async def test_a_branch_key_evicted_for_size_is_zeroed(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    secret = await active_key_bytes(make_branch_key_store, branch_keys[0])
    keyring = HierarchicalKeyring(
        make_branch_key_store(),
        branch_key_id_supplier=lambda c: branch_keys[0] if c["t"] == "a" else branch_keys[1],
        max_cached_keys=1,
    )
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(b"a", encryption_context={"t": "a"})
        held = the_one_holding(secret)
        await client.encrypt(b"b", encryption_context={"t": "b"})
        assert zeroed(held)
        assert bytearrays_holding(secret) == []
        assert await client.decrypt(message) == b"a"  # fetched again when needed


async def test_a_branch_key_evicted_for_size_is_fetched_again_never_used_zeroed(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """The per-message fast path in front of the caches forgets a key the moment the
    cache evicts (and zeroes) it: the next message under that branch key fetches it
    again. Served from the fast path, the zeroed key would wrap the data key under a
    key derived from zeros, which no reader could open."""
    store = make_branch_key_store()
    keyring = HierarchicalKeyring(
        store,
        branch_key_id_supplier=lambda c: branch_keys[0] if c["t"] == "a" else branch_keys[1],
        max_cached_keys=1,
    )
    async with EnvelopeClient(keyring) as client:
        await client.encrypt(b"a", encryption_context={"t": "a"})
        await client.encrypt(b"b", encryption_context={"t": "b"})  # evicts tenant a's
        again = await client.encrypt(b"a again", encryption_context={"t": "a"})
        assert store.calls == {"GetItem": 3, "Decrypt": 3}
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    ) as reader:
        assert await reader.decrypt(again) == b"a again"


async def test_closing_the_client_zeroes_every_cached_branch_key(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    secrets = [await active_key_bytes(make_branch_key_store, b) for b in branch_keys]
    keyring = HierarchicalKeyring(
        make_branch_key_store(),
        branch_key_id_supplier=lambda c: branch_keys[0] if c["t"] == "a" else branch_keys[1],
    )
    async with EnvelopeClient(keyring) as client:
        for tenant in ("a", "b"):
            await client.encrypt(b"x", encryption_context={"t": tenant})
        held = [the_one_holding(secret) for secret in secrets]
    assert [zeroed(buffer) for buffer in held] == [True, True]
    assert [bytearrays_holding(secret) for secret in secrets] == [[], []]


async def test_closing_the_client_zeroes_a_branch_key_that_expired_unnoticed(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """An entry past its TTL but not yet removed (no use since) is zeroed on close too:
    the cache's own listing skips expired entries."""
    secret = await active_key_bytes(make_branch_key_store, branch_keys[0])
    clock = FakeClock()
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0], ttl=60.0)
    async with EnvelopeClient(keyring, clock=clock) as client:
        await client.encrypt(b"x")
        held = the_one_holding(secret)
        clock.advance(61.0)
    assert zeroed(held)
    assert bytearrays_holding(secret) == []


async def test_an_active_version_fetched_across_a_rotation_is_not_cached_as_active(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """An encrypt whose fetch read the ACTIVE item before the rotation and finished after
    it does not cache what it read as the active version (which would then be used for
    the whole TTL): it fetches again, so it and every later message use the new one."""
    store = make_branch_key_store(endpoint_url=fault_proxy.url, deadline=30.0)
    keyring = HierarchicalKeyring(store, branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        fault_proxy.slow_next(1, 1.0, operation="Decrypt")  # the branch key's unwrap
        async with anyio.create_task_group() as tg:
            in_flight: list[bytes] = []

            async def first() -> None:
                in_flight.append(await client.encrypt(b"first"))

            tg.start_soon(first)
            await wait_for(lambda: fault_proxy.requests().get("Decrypt") == 1, "the unwrap")
            new_version = await store.rotate_branch_key(branch_keys[0])
        assert version_of(in_flight[0]) == new_version
        assert version_of(await client.encrypt(b"second")) == new_version
        assert client.stats.kms_calls["Decrypt"] == 2  # the stale fetch, then the new one


async def test_cancelling_the_first_caller_of_a_fetch_fails_none_of_the_others(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """The shared fetch belongs to no caller: the one that started it going away (a
    client disconnect, a timeout) neither cancels it nor fails those waiting on it."""
    store = make_branch_key_store(endpoint_url=fault_proxy.url, deadline=30.0)
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        fault_proxy.slow_next(1, 1.0, operation="Decrypt")
        results: list[bytes] = []
        first, first_finished = anyio.CancelScope(), anyio.Event()

        async def starter() -> None:
            with first:
                await client.encrypt(b"first")
                first_finished.set()

        async def waiter() -> None:
            results.append(await client.encrypt(b"second"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(starter)
            await wait_for(lambda: fault_proxy.requests().get("Decrypt") == 1, "the unwrap")
            tg.start_soon(waiter)
            await anyio.sleep(0.05)  # the waiter joins the fetch in flight
            first.cancel()
        assert first.cancelled_caught
        assert not first_finished.is_set()
        assert len(results) == 1
        assert await client.decrypt(results[0]) == b"second"
        assert store.calls == ONE_FETCH


async def test_a_cached_version_fetched_again_as_the_active_one_is_zeroed_not_dropped(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """A decrypt caches the version its message names; an encrypt then fetches the
    active version, which is the same one: the entry it replaces is zeroed."""
    secret = await active_key_bytes(make_branch_key_store, branch_keys[0])
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    ) as writer:
        message = await writer.encrypt(b"m")
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        assert await client.decrypt(message) == b"m"
        held = the_one_holding(secret)
        await client.encrypt(b"n")  # fetches the active version: the same one
        assert zeroed(held)
        assert len(bytearrays_holding(secret)) == 1
