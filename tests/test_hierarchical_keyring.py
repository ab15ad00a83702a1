"""HierarchicalKeyring against the moto server: round trips, branch key suppliers, and
what the caller sees when the key store fails. (Caching: test_hierarchical_keyring_caching.)"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping

import pytest
from kms_server import KmsKey

from aioenvelope import (
    AlgorithmSuite,
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    errors,
    inspect,
)

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


async def test_another_branch_keys_message_has_no_usable_key(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[1])
    ) as b:
        message = await b.encrypt(b"x")
    store = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as a:
        with pytest.raises(errors.NoUsableKeyError) as info:
            await a.decrypt(message)
    version = inspect(message).encrypted_data_keys[0].ciphertext[28:44]
    text = str(info.value)
    assert text.startswith(
        f"the hierarchical keyring with branch key {branch_keys[0]!r} (table "
        f"{store.table_name!r}) could not decrypt any of the message's 1 encrypted data "
        "keys (0 named this branch key): the message was written under another branch key"
    ), text
    assert f"branch key {branch_keys[1]} version {uuid.UUID(bytes=version)}" in text
    assert store.calls == {}  # nothing fetched for a key it does not hold


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


@pytest.mark.parametrize(
    ("store_options", "branch_key", "error", "named"),
    [
        ({"table_name": "no-such-table"}, "tenant-a", errors.BranchKeyStoreError, "no-such-table"),
        ({}, "tenant-z", errors.BranchKeyNotFoundError, "tenant-z"),
        (
            {"logical_key_store_name": "another"},
            "tenant-a",
            errors.BranchKeyIntegrityError,
            "another",
        ),
        ({"kms_key_id": "second"}, "tenant-a", errors.BranchKeyIntegrityError, "tenant-a"),
    ],
    ids=["missing-table", "missing-branch-key", "wrong-logical-name", "item-under-another-kms-key"],
)
async def test_store_failures_reach_the_caller_as_keyring_errors_naming_what_is_wrong(
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    kms_key_2: KmsKey,
    store_options: dict[str, str],
    branch_key: str,
    error: type[errors.KeyringError],
    named: str,
) -> None:
    """Each failure is the store's own error class (a KeyringError), unwrapped by the
    keyring and the client, with the table, branch key or name it is about: on
    encrypt (the active version) and on decrypt (the version a message names)."""
    if store_options.get("kms_key_id") == "second":
        store_options = {"kms_key_id": kms_key_2.arn}
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id="tenant-a")
    ) as good:
        message = await good.encrypt(b"x", encryption_context={"r": "1"})
    keyring = HierarchicalKeyring(make_branch_key_store(**store_options), branch_key_id=branch_key)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(error) as on_encrypt:
            await client.encrypt(b"x")
        assert named in str(on_encrypt.value)
        assert isinstance(on_encrypt.value, errors.KeyringError)
        if branch_key == "tenant-a":  # the message names this branch key: its version is read
            with pytest.raises(error) as on_decrypt:
                await client.decrypt(message)
            assert named in str(on_decrypt.value)


def tenant_of(context: Mapping[str, str]) -> str:
    return context["tenant"]  # KeyError for a context without one


async def test_a_supplier_that_raises_is_a_configuration_error_naming_the_context_keys(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """A supplier reading a key the context lacks raises KeyError: the caller gets a
    library error that says so and lists the context's keys (never its values), on
    encrypt and on decrypt, before any remote call."""
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    ) as writer:
        message = await writer.encrypt(b"x", encryption_context={"row": "secret-row-7"})
    store = make_branch_key_store()
    keyring = HierarchicalKeyring(store, branch_key_id_supplier=tenant_of)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.ConfigurationError) as on_encrypt:
            await client.encrypt(b"x", encryption_context={"row": "secret-row-7"})
        with pytest.raises(errors.ConfigurationError) as on_decrypt:
            await client.decrypt(message)
    for info in (on_encrypt, on_decrypt):
        text = str(info.value)
        assert text.startswith("branch_key_id_supplier raised KeyError: 'tenant'"), text
        assert "keys ['row']" in text
        assert "secret-row-7" not in text
        assert isinstance(info.value.__cause__, KeyError)
    assert store.calls == {}


@pytest.mark.parametrize("where", ["branch_key_id", "supplier"])
async def test_a_branch_key_id_that_is_not_utf8_is_refused_as_configuration(
    make_branch_key_store: StoreFactory, where: str
) -> None:
    lone_surrogate = "tenant-\ud800"
    if where == "branch_key_id":
        with pytest.raises(errors.ConfigurationError, match="not encodable as UTF-8"):
            HierarchicalKeyring(make_branch_key_store(), branch_key_id=lone_surrogate)
        return
    keyring = HierarchicalKeyring(
        make_branch_key_store(), branch_key_id_supplier=lambda _: lone_surrogate
    )
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.ConfigurationError, match="not encodable as UTF-8"):
            await client.encrypt(b"x")


async def test_an_edk_of_the_wrong_length_is_skipped_without_a_fetch(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """A hierarchy EDK whose length no data key of the message's suite has is malformed:
    it is passed over before any GetItem or KMS call (hostile input costs no remote
    work)."""
    async with EnvelopeClient(
        HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    ) as writer:
        message = await writer.encrypt(b"x")
    edk = inspect(message).encrypted_data_keys[0]
    longer = message.replace(
        len(edk.ciphertext).to_bytes(2, "big") + edk.ciphertext,
        (len(edk.ciphertext) + 1).to_bytes(2, "big") + edk.ciphertext + b"\0",
    )
    assert longer != message
    store = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        with pytest.raises(errors.EnvelopeError):
            await client.decrypt(longer)
    assert store.calls == {}


async def test_a_callers_edk_holding_a_bytearray_is_unwrapped_like_bytes(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """Keyrings are public: a caller may hand ``on_decrypt`` an EDK whose ciphertext is
    a bytearray or memoryview (EncryptedDataKey does not check). It opens to the same
    data key as the bytes the message holds; anything else is passed over."""
    from aioenvelope import EncryptedDataKey
    from aioenvelope.keyrings.base import DecryptionMaterials

    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring) as client:
        message = await client.encrypt(b"x", encryption_context={"r": "1"})
        edk = inspect(message).encrypted_data_keys[0]
        suite = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
        found = []
        for ciphertext in (edk.ciphertext, bytearray(edk.ciphertext), memoryview(edk.ciphertext)):
            given = EncryptedDataKey(edk.provider_id, edk.provider_info, ciphertext)  # type: ignore[arg-type]
            materials = await keyring.on_decrypt(DecryptionMaterials(suite, {"r": "1"}), [given])
            found.append(materials.plaintext_data_key)
        assert found[0] is not None
        assert len(found[0]) == 32
        assert found == [found[0]] * 3
        odd = EncryptedDataKey(edk.provider_id, edk.provider_info, "not bytes")  # type: ignore[arg-type]
        with pytest.raises(errors.NoUsableKeyError):
            await keyring.on_decrypt(DecryptionMaterials(suite, {"r": "1"}), [odd])
