"""The DynamoDB branch key store against a real moto server (DynamoDB and KMS on one
endpoint): every operation and its remote calls, every refusal, and interop both ways
with the AWS Cryptographic Material Providers Library's own ``KeyStore``."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import boto3
import pytest
from aws_cryptographic_material_providers.keystore import KeyStore
from aws_cryptographic_material_providers.keystore.config import KeyStoreConfig
from aws_cryptographic_material_providers.keystore.models import (
    CreateKeyInput,
    GetActiveBranchKeyInput,
    GetBranchKeyVersionInput,
    KMSConfigurationKmsKeyArn,
    VersionKeyInput,
)
from fault_proxy import FaultProxy
from kms_server import KmsKey, MotoKms
from moto_keyrings import shared_session

from aioenvelope import CircuitBreakerConfig, RateLimit, errors
from aioenvelope.keyrings.hierarchy.branch_key_store import BranchKeyMaterials, BranchKeyStore
from aioenvelope.runtime import Runtime
from aioenvelope.stats import StatsRecorder

LOGICAL_NAME = "aioenvelope-test-store"
ITEM_TYPES = {"branch:ACTIVE", "beacon:ACTIVE"}

StoreFactory = Callable[..., BranchKeyStore]


@pytest.fixture
def table_name() -> str:
    return f"bks-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_store(moto_kms: MotoKms, kms_key: KmsKey, table_name: str) -> StoreFactory:
    """``make_store(**overrides)``: a store on the test's table and the primary key."""

    def make(**kwargs: Any) -> BranchKeyStore:
        kwargs.setdefault("logical_key_store_name", LOGICAL_NAME)
        kwargs.setdefault("kms_key_id", kms_key.arn)
        kwargs.setdefault("session", shared_session())
        kwargs.setdefault("endpoint_url", moto_kms.endpoint_url)
        kwargs.setdefault("region_name", moto_kms.region)
        return BranchKeyStore(kwargs.pop("table_name", table_name), **kwargs)

    return make


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[BranchKeyStore]:
    """An open store whose table exists; its call counts start after create_table."""
    async with make_store() as made:
        await made.create_table()
    async with make_store() as fresh:
        yield fresh


def ddb_admin(moto_kms: MotoKms) -> Any:
    return boto3.client("dynamodb", region_name=moto_kms.region, endpoint_url=moto_kms.endpoint_url)


def items_of(moto_kms: MotoKms, table: str, branch_key_id: str) -> dict[str, dict[str, Any]]:
    """The table's items for one branch key, by ``type``."""
    found = ddb_admin(moto_kms).query(
        TableName=table,
        KeyConditionExpression="#b = :b",
        ExpressionAttributeNames={"#b": "branch-key-id"},
        ExpressionAttributeValues={":b": {"S": branch_key_id}},
        ConsistentRead=True,
    )["Items"]
    return {item["type"]["S"]: item for item in found}


def mpl_key_store(
    moto_kms: MotoKms, kms_key: KmsKey, table: str, endpoint_url: str | None = None
) -> Any:
    """The MPL's own KeyStore on the same table, over boto3 clients pointed at moto (or
    at ``endpoint_url``, a proxy in front of it)."""
    url = endpoint_url or moto_kms.endpoint_url
    return KeyStore(
        KeyStoreConfig(
            ddb_table_name=table,
            logical_key_store_name=LOGICAL_NAME,
            kms_configuration=KMSConfigurationKmsKeyArn(kms_key.arn),
            ddb_client=boto3.client("dynamodb", region_name=moto_kms.region, endpoint_url=url),
            kms_client=boto3.client("kms", region_name=moto_kms.region, endpoint_url=url),
        )
    )


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def normalised(requests: list[Any], branch_key_id: str) -> list[Any]:
    """Requests with what differs by nature replaced: the branch key ID, version UUIDs
    (numbered by first appearance), create-times, ciphertexts, idempotency tokens."""
    versions: dict[str, str] = {}

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, str):
            return value
        if key in ("CiphertextBlob", "B", "SourceCiphertextBlob"):
            return "<blob>"
        if key == "ClientRequestToken":
            return "<token>"
        value = value.replace(branch_key_id, "<id>")
        value = _UUID.sub(lambda m: versions.setdefault(m[0], f"<v{len(versions)}>"), value)
        return _TIME.sub("<time>", value)

    return [(r.operation, walk(dict(r.body))) for r in requests]


async def in_thread(fn: Callable[[], Any]) -> Any:
    """The MPL is synchronous: run it off the event loop."""
    return await anyio.to_thread.run_sync(fn)


# -- table --------------------------------------------------------------------------


async def test_create_table_makes_the_key_store_schema_and_accepts_it_again(
    make_store: StoreFactory, moto_kms: MotoKms, table_name: str
) -> None:
    async with make_store() as store:
        arn = await store.create_table()
        assert store.calls == {"DescribeTable": 1, "CreateTable": 1}
        assert arn.endswith(f":table/{table_name}")
        assert await store.create_table() == arn
        assert store.calls == {"DescribeTable": 2, "CreateTable": 1}
    table = ddb_admin(moto_kms).describe_table(TableName=table_name)["Table"]
    assert table["KeySchema"] == [
        {"AttributeName": "branch-key-id", "KeyType": "HASH"},
        {"AttributeName": "type", "KeyType": "RANGE"},
    ]
    assert sorted(table["AttributeDefinitions"], key=lambda a: a["AttributeName"]) == [
        {"AttributeName": "branch-key-id", "AttributeType": "S"},
        {"AttributeName": "type", "AttributeType": "S"},
    ]


async def test_create_table_accepts_a_table_another_process_created_meanwhile(
    make_store: StoreFactory, moto_kms: MotoKms, table_name: str, fault_proxy: FaultProxy
) -> None:
    """Two processes setting up at once: ours saw no table, then its CreateTable met the
    other's (ResourceInUseException, from moto itself); it looks again and accepts it."""
    async with make_store() as other:
        await other.create_table()
    fault_proxy.refuse_next(1, "ResourceNotFoundException", operation="DescribeTable")
    async with make_store(endpoint_url=fault_proxy.url) as store:
        arn = await store.create_table()
        assert store.calls == {"DescribeTable": 2, "CreateTable": 1}
    assert arn.endswith(f":table/{table_name}")
    assert fault_proxy.requests() == {"DescribeTable": 2, "CreateTable": 1}


async def test_create_table_refuses_an_existing_table_with_another_key_schema(
    make_store: StoreFactory, moto_kms: MotoKms, table_name: str
) -> None:
    ddb_admin(moto_kms).create_table(
        TableName=table_name,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    async with make_store() as store:
        with pytest.raises(errors.BranchKeyStoreError) as info:
            await store.create_table()
    assert type(info.value) is errors.BranchKeyStoreError
    assert info.value.table_name == table_name
    assert f"{table_name!r} exists but is not a branch key store" in str(info.value)
    assert "id (HASH, S)" in str(info.value)


async def test_a_missing_table_is_named_by_every_operation(
    make_store: StoreFactory, table_name: str
) -> None:
    async with make_store() as store:
        for call in (
            lambda: store.get_active_branch_key("bk"),
            lambda: store.get_branch_key_version("bk", str(uuid.uuid4())),
            lambda: store.rotate_branch_key("bk"),
            lambda: store.create_branch_key("bk"),
        ):
            with pytest.raises(errors.BranchKeyStoreError) as info:
                await call()
            assert type(info.value) is errors.BranchKeyStoreError
            assert f"table {table_name!r} does not exist" in str(info.value)
            assert "'bk'" in str(info.value)
            assert info.value.branch_key_id == "bk"


# -- create, read, rotate -------------------------------------------------------------


async def test_create_branch_key_writes_three_items_in_one_transaction_of_three_kms_calls(
    store: BranchKeyStore, moto_kms: MotoKms, kms_key: KmsKey, table_name: str
) -> None:
    branch_key_id = await store.create_branch_key("tenant-a", encryption_context={"t": "a"})
    assert branch_key_id == "tenant-a"
    assert store.calls == {
        "GenerateDataKeyWithoutPlaintext": 2,
        "ReEncrypt": 1,
        "TransactWriteItems": 1,
    }
    items = items_of(moto_kms, table_name, "tenant-a")
    (version_type,) = set(items) - ITEM_TYPES
    assert version_type.startswith("branch:version:")
    version = version_type.removeprefix("branch:version:")
    assert str(uuid.UUID(version)) == version
    assert items["branch:ACTIVE"]["version"] == {"S": version_type}
    for kind, item in items.items():
        expected = {"branch-key-id", "type", "create-time", "hierarchy-version", "kms-arn"}
        expected |= {"enc", "aws-crypto-ec:t"} | ({"version"} if kind == "branch:ACTIVE" else set())
        assert set(item) == expected, kind
        assert item["hierarchy-version"] == {"N": "1"}
        assert item["kms-arn"] == {"S": kms_key.arn}
        assert item["aws-crypto-ec:t"] == {"S": "a"}
        assert item["create-time"]["S"].endswith("Z")
    encs = {bytes(item["enc"]["B"]) for item in items.values()}
    assert len(encs) == 3  # three distinct KMS ciphertexts


async def test_reads_return_the_same_key_for_the_active_copy_and_its_version(
    store: BranchKeyStore,
) -> None:
    branch_key_id = await store.create_branch_key(encryption_context={"tenant": "t1"})
    assert str(uuid.UUID(branch_key_id)) == branch_key_id  # a UUID when none is given
    before = dict(store.calls)
    active = await store.get_active_branch_key(branch_key_id)
    assert {k: store.calls.get(k, 0) - before.get(k, 0) for k in ("GetItem", "Decrypt")} == {
        "GetItem": 1,
        "Decrypt": 1,
    }
    same = await store.get_branch_key_version(branch_key_id, active.version)
    assert store.calls["GetItem"] == 2
    assert store.calls["Decrypt"] == 2
    assert type(active.key) is bytearray
    assert len(active.key) == 32
    assert same.key == active.key
    assert (same.branch_key_id, same.version) == (branch_key_id, active.version)
    assert dict(active.encryption_context) == {"tenant": "t1"}
    assert active.version_bytes == uuid.UUID(active.version).bytes


async def test_branch_key_materials_hide_the_key_and_wipe_it(store: BranchKeyStore) -> None:
    branch_key_id = await store.create_branch_key()
    materials = await store.get_active_branch_key(branch_key_id)
    key = bytes(materials.key)
    shown = repr(materials)
    for form in (key.hex(), repr(key), str(list(key))):
        assert form not in shown
    assert shown == (
        f"BranchKeyMaterials(branch_key_id={branch_key_id!r}, version={materials.version!r}, "
        "key=<32 bytes, redacted>)"
    )
    materials.wipe()
    assert materials.key == bytearray(32)
    assert isinstance(materials, BranchKeyMaterials)


async def test_create_branch_key_refuses_an_existing_id_and_leaves_it_unchanged(
    store: BranchKeyStore, moto_kms: MotoKms, table_name: str
) -> None:
    await store.create_branch_key("taken")
    before = items_of(moto_kms, table_name, "taken")
    with pytest.raises(errors.BranchKeyExistsError) as info:
        await store.create_branch_key("taken", encryption_context={"other": "x"})
    assert type(info.value) is errors.BranchKeyExistsError
    assert "branch key 'taken' already exists" in str(info.value)
    assert table_name in str(info.value)
    assert info.value.branch_key_id == "taken"
    assert isinstance(info.value.__cause__, errors.DynamoDBError)
    assert items_of(moto_kms, table_name, "taken") == before


async def test_rotation_activates_a_new_version_and_old_versions_stay_readable(
    store: BranchKeyStore, moto_kms: MotoKms, table_name: str
) -> None:
    branch_key_id = await store.create_branch_key("rotating", encryption_context={"t": "r"})
    first = await store.get_active_branch_key(branch_key_id)
    before = dict(store.calls)
    second_version = await store.rotate_branch_key(branch_key_id)
    spent = {k: v - before.get(k, 0) for k, v in store.calls.items() if v != before.get(k, 0)}
    assert spent == {
        "GetItem": 1,
        "ReEncrypt": 2,
        "GenerateDataKeyWithoutPlaintext": 1,
        "TransactWriteItems": 1,
    }
    third_version = await store.rotate_branch_key(branch_key_id)
    assert len({first.version, second_version, third_version}) == 3
    active = await store.get_active_branch_key(branch_key_id)
    assert active.version == third_version
    assert dict(active.encryption_context) == {"t": "r"}  # carried over by rotation
    keys = {
        version: bytes((await store.get_branch_key_version(branch_key_id, version)).key)
        for version in (first.version, second_version, third_version)
    }
    assert keys[first.version] == bytes(first.key)
    assert keys[third_version] == bytes(active.key)
    assert len(set(keys.values())) == 3
    types = set(items_of(moto_kms, table_name, branch_key_id))
    assert types == ITEM_TYPES | {
        f"branch:version:{v}" for v in (first.version, second_version, third_version)
    }


# -- refusals -------------------------------------------------------------------------


async def test_a_missing_branch_key_or_version_is_not_found_naming_both(
    store: BranchKeyStore, table_name: str
) -> None:
    with pytest.raises(errors.BranchKeyNotFoundError) as info:
        await store.get_active_branch_key("nobody")
    assert "the active version of branch key 'nobody'" in str(info.value)
    assert table_name in str(info.value)
    assert (info.value.branch_key_id, info.value.version) == ("nobody", None)
    with pytest.raises(errors.BranchKeyNotFoundError) as rotate_info:
        await store.rotate_branch_key("nobody")
    assert rotate_info.value.branch_key_id == "nobody"
    branch_key_id = await store.create_branch_key("somebody")
    absent = str(uuid.uuid4())
    with pytest.raises(errors.BranchKeyNotFoundError) as version_info:
        await store.get_branch_key_version(branch_key_id, absent)
    assert f"version {absent} of branch key 'somebody'" in str(version_info.value)
    assert (version_info.value.branch_key_id, version_info.value.version) == (
        "somebody",
        absent,
    )
    assert "Decrypt" not in store.calls


async def test_a_version_that_is_not_a_uuid_string_is_a_configuration_error(
    store: BranchKeyStore,
) -> None:
    with pytest.raises(errors.ConfigurationError, match="lower-case UUID string"):
        await store.get_branch_key_version("bk", "branch:version:x")
    with pytest.raises(errors.ConfigurationError, match="lower-case UUID string"):
        await store.get_branch_key_version("bk", str(uuid.uuid4()).upper())
    assert store.calls == {}


async def test_an_item_under_another_kms_key_is_refused_without_calling_kms(
    store: BranchKeyStore, make_store: StoreFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    branch_key_id = await store.create_branch_key("keyed")
    version = (await store.get_active_branch_key(branch_key_id)).version
    async with make_store(kms_key_id=kms_key_2.arn) as other:
        for read, shown_version in (
            (lambda: other.get_active_branch_key(branch_key_id), None),
            (lambda: other.get_branch_key_version(branch_key_id, version), version),
            (lambda: other.rotate_branch_key(branch_key_id), None),
        ):
            with pytest.raises(errors.BranchKeyIntegrityError) as info:
                await read()
            assert f"encrypted under KMS key {kms_key.arn!r}" in str(info.value)
            assert kms_key_2.arn in str(info.value)
            assert "'keyed'" in str(info.value)
            assert info.value.version == shown_version
        assert set(other.calls) == {"GetItem"}


async def test_a_wrong_logical_name_is_a_kms_context_mismatch(
    store: BranchKeyStore, make_store: StoreFactory
) -> None:
    branch_key_id = await store.create_branch_key("named")
    version = (await store.get_active_branch_key(branch_key_id)).version
    async with make_store(logical_key_store_name="another-name") as other:
        with pytest.raises(errors.BranchKeyIntegrityError) as info:
            await other.get_branch_key_version(branch_key_id, version)
        assert other.calls == {"GetItem": 1, "Decrypt": 1}
    message = str(info.value)
    assert f"KMS refused version {version} of branch key 'named'" in message
    assert "InvalidCiphertextException" in message
    assert "'another-name'" in message
    assert isinstance(info.value.__cause__, errors.KMSError)


async def test_a_tampered_item_is_refused_by_kms_for_reads_and_rotation(
    store: BranchKeyStore, moto_kms: MotoKms, table_name: str
) -> None:
    """An ``enc`` copied from another branch key, and a changed context attribute: KMS
    refuses both (the context binds every attribute), and rotation copies neither."""
    await store.create_branch_key("victim", encryption_context={"tenant": "v"})
    await store.create_branch_key("donor", encryption_context={"tenant": "v"})
    admin = ddb_admin(moto_kms)
    victim = items_of(moto_kms, table_name, "victim")["branch:ACTIVE"]
    donor = items_of(moto_kms, table_name, "donor")["branch:ACTIVE"]
    admin.put_item(TableName=table_name, Item={**victim, "enc": donor["enc"]})
    with pytest.raises(
        errors.BranchKeyIntegrityError,
        match=r"KMS refused version [0-9a-f-]{36} of branch key 'victim' in table 'bks-",
    ):
        await store.get_active_branch_key("victim")
    with pytest.raises(errors.BranchKeyIntegrityError, match="'victim'"):
        await store.rotate_branch_key("victim")
    admin.put_item(
        TableName=table_name, Item={**donor, "aws-crypto-ec:tenant": {"S": "someone-else"}}
    )
    with pytest.raises(errors.BranchKeyIntegrityError, match="'donor'"):
        await store.get_active_branch_key("donor")
    assert len(items_of(moto_kms, table_name, "victim")) == 3  # no version was added


async def test_a_malformed_item_is_refused_naming_what_is_wrong(
    store: BranchKeyStore, moto_kms: MotoKms, table_name: str
) -> None:
    await store.create_branch_key("broken")
    active = items_of(moto_kms, table_name, "broken")["branch:ACTIVE"]
    bad = {k: v for k, v in active.items() if k != "enc"}
    ddb_admin(moto_kms).put_item(TableName=table_name, Item={**bad, "version": {"S": "v1"}})
    with pytest.raises(errors.BranchKeyIntegrityError) as info:
        await store.get_active_branch_key("broken")
    assert "it has no enc (B) attribute" in str(info.value)
    assert "Decrypt" not in store.calls


async def test_opens_nest_and_the_last_close_closes(store: BranchKeyStore) -> None:
    """A store shared by two keyrings is opened by each client; the first to close must
    not close it under the other."""
    branch_key_id = await store.create_branch_key()
    await store.open()
    await store.close()
    assert len((await store.get_active_branch_key(branch_key_id)).key) == 32
    await store.close()  # the fixture's open: the last one
    with pytest.raises(errors.ConfigurationError, match="is not open"):
        await store.get_active_branch_key(branch_key_id)
    await store.open()  # balanced by the fixture's exit


async def test_a_closed_store_and_a_key_that_is_no_arn_are_refused(
    make_store: StoreFactory, kms_key: KmsKey
) -> None:
    store = make_store()
    with pytest.raises(errors.ConfigurationError, match="is not open"):
        await store.get_active_branch_key("bk")
    for key in (kms_key.key_id, kms_key.alias_arn, ""):
        with pytest.raises(errors.ConfigurationError, match="must be a KMS key ARN"):
            make_store(kms_key_id=key)
    with pytest.raises(errors.ConfigurationError, match="not a DynamoDB table name"):
        make_store(table_name="x")


async def test_dynamodb_5xx_and_a_hung_table_become_transient_library_errors_on_the_breaker(
    make_store: StoreFactory, fault_proxy: FaultProxy
) -> None:
    """A 5xx after botocore's retries, and a hang at the deadline: DynamoDBError with
    ``transient`` (no botocore error escapes), each counted by the region's breaker, which
    then fails fast without a request."""
    async with make_store() as setup:
        await setup.create_table()
        await setup.create_branch_key("faulty")
    runtime = Runtime(
        clock=anyio.current_time,
        stats=StatsRecorder(),
        breaker_config=CircuitBreakerConfig(failure_threshold=2, reset_timeout=600.0),
    )
    # botocore's standard retries back off up to 1 + 2 + 4 s between 4 attempts.
    patient = make_store(endpoint_url=fault_proxy.url, deadline=10.0)
    hasty = make_store(endpoint_url=fault_proxy.url, deadline=1.0)
    patient.attach(runtime)
    hasty.attach(runtime)
    async with patient, hasty:
        fault_proxy.fail_next(1, 500, error_type="InternalServerError", operation="GetItem")
        assert len((await patient.get_active_branch_key("faulty")).key) == 32  # retried
        assert fault_proxy.requests() == {"GetItem": 2, "Decrypt": 1}
        fault_proxy.fail_next(4, 500, error_type="InternalServerError", operation="GetItem")
        with pytest.raises(errors.DynamoDBError) as info:
            await patient.get_active_branch_key("faulty")
        assert (info.value.error_code, info.value.transient) == ("InternalServerError", True)
        assert (info.value.operation, info.value.table_name) == ("GetItem", patient.table_name)
        assert fault_proxy.requests() == {"GetItem": 6, "Decrypt": 1}
        fault_proxy.hang(True)
        try:
            with pytest.raises(errors.DynamoDBError) as hung:
                await hasty.get_active_branch_key("faulty")
        finally:
            fault_proxy.hang(False)
        assert (hung.value.error_code, hung.value.transient) == ("Timeout", True)
        assert "did not finish within 1 s" in str(hung.value)
        sent = sum(fault_proxy.requests().values())
        with pytest.raises(errors.CircuitOpenError):
            await patient.get_active_branch_key("faulty")
        assert sum(fault_proxy.requests().values()) == sent
        assert runtime.stats.breaker_states == {"us-west-2": "open"}


async def test_an_attached_runtime_counts_the_kms_calls_and_rate_limits_each_decrypt(
    make_store: StoreFactory,
) -> None:
    """A branch key fetch is a remote unwrap: it takes one decrypt rate-limit token, before
    its GetItem (an empty bucket refuses it before any call), and every KMS call shows in
    the client's stats; DynamoDB calls are counted by the store."""
    stats = StatsRecorder()
    runtime = Runtime(
        clock=lambda: 0.0,  # a frozen clock: the bucket never refills
        stats=stats,
        breaker_config=None,
        decrypt_rate_limit=RateLimit(rate=1.0, burst=1),
    )
    store = make_store()
    store.attach(runtime)
    async with store:
        await store.create_table()
        branch_key_id = await store.create_branch_key()
        await store.get_active_branch_key(branch_key_id)
        with pytest.raises(errors.KMSDecryptRateLimited):
            await store.get_active_branch_key(branch_key_id)
        assert dict(stats.kms_calls) == {
            "GenerateDataKeyWithoutPlaintext": 2,
            "ReEncrypt": 1,
            "Decrypt": 1,
        }
        assert store.calls["GetItem"] == 1  # the refused read made no call
        assert store.calls["Decrypt"] == 1


# -- interop with the MPL's KeyStore ----------------------------------------------------


async def test_create_and_rotate_send_exactly_the_mpl_key_stores_requests(
    store: BranchKeyStore,
    make_store: StoreFactory,
    moto_kms: MotoKms,
    kms_key: KmsKey,
    table_name: str,
    fault_proxy: FaultProxy,
) -> None:
    """Every KMS request (key, encryption contexts, sizes) and every TransactWriteItems
    (items, attribute types, conditions) of a create and a rotation, ours against the
    MPL's KeyStore's, seen on the wire through the proxy, in the same order: identical
    once IDs, UUIDs, times and ciphertexts are masked. Our reads are strongly consistent
    (``ConsistentRead``), the MPL's are not: the one difference, left out."""
    mpl = mpl_key_store(moto_kms, kms_key, table_name, endpoint_url=fault_proxy.url)
    context = {"tenant": "t", "region": "eu"}
    await in_thread(
        lambda: mpl.create_key(
            CreateKeyInput(branch_key_identifier="mpl-made", encryption_context=context)
        )
    )
    await in_thread(lambda: mpl.version_key(VersionKeyInput(branch_key_identifier="mpl-made")))
    theirs = fault_proxy.received()
    async with make_store(endpoint_url=fault_proxy.url) as ours_store:
        await ours_store.create_branch_key("ours-made", encryption_context=context)
        await ours_store.rotate_branch_key("ours-made")
    ours = fault_proxy.received()[len(theirs) :]
    expected = normalised(theirs, "mpl-made")
    got = normalised(ours, "ours-made")
    for seen in (expected, got):
        for _, body in seen:
            body.pop("ConsistentRead", None)
    assert [op for op, _ in got] == [
        "GenerateDataKeyWithoutPlaintext",
        "ReEncrypt",
        "GenerateDataKeyWithoutPlaintext",
        "TransactWriteItems",
        "GetItem",
        "ReEncrypt",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncrypt",
        "TransactWriteItems",
    ]
    assert got == expected


async def test_the_mpl_reads_branch_keys_we_created_and_rotated(
    store: BranchKeyStore, moto_kms: MotoKms, kms_key: KmsKey, table_name: str
) -> None:
    mpl = mpl_key_store(moto_kms, kms_key, table_name)
    branch_key_id = await store.create_branch_key("ours", encryption_context={"tenant": "o"})
    first = await store.get_active_branch_key(branch_key_id)
    theirs = await in_thread(
        lambda: mpl.get_active_branch_key(GetActiveBranchKeyInput(branch_key_identifier="ours"))
    )
    got = theirs.branch_key_materials
    assert (got.branch_key_version, bytes(got.branch_key)) == (first.version, bytes(first.key))
    assert got.encryption_context == {"tenant": "o"}
    second = await store.rotate_branch_key(branch_key_id)
    active = await in_thread(
        lambda: mpl.get_active_branch_key(GetActiveBranchKeyInput(branch_key_identifier="ours"))
    )
    old = await in_thread(
        lambda: mpl.get_branch_key_version(
            GetBranchKeyVersionInput(branch_key_identifier="ours", branch_key_version=first.version)
        )
    )
    assert active.branch_key_materials.branch_key_version == second
    ours = await store.get_branch_key_version(branch_key_id, second)
    assert bytes(active.branch_key_materials.branch_key) == bytes(ours.key)
    assert bytes(old.branch_key_materials.branch_key) == bytes(first.key)
    # And the MPL can rotate what we created.
    await in_thread(lambda: mpl.version_key(VersionKeyInput(branch_key_identifier="ours")))
    third = await store.get_active_branch_key(branch_key_id)
    assert third.version not in (first.version, second)


async def test_we_read_branch_keys_the_mpl_created_and_rotated(
    store: BranchKeyStore, moto_kms: MotoKms, kms_key: KmsKey, table_name: str
) -> None:
    mpl = mpl_key_store(moto_kms, kms_key, table_name)
    created = await in_thread(
        lambda: mpl.create_key(
            CreateKeyInput(branch_key_identifier="theirs", encryption_context={"tenant": "m"})
        )
    )
    assert created.branch_key_identifier == "theirs"

    def mpl_active() -> Any:
        return mpl.get_active_branch_key(
            GetActiveBranchKeyInput(branch_key_identifier="theirs")
        ).branch_key_materials

    first = await in_thread(mpl_active)
    ours = await store.get_active_branch_key("theirs")
    assert (ours.version, bytes(ours.key)) == (first.branch_key_version, bytes(first.branch_key))
    assert dict(ours.encryption_context) == {"tenant": "m"}
    await in_thread(lambda: mpl.version_key(VersionKeyInput(branch_key_identifier="theirs")))
    second = await in_thread(mpl_active)
    ours_second = await store.get_active_branch_key("theirs")
    assert ours_second.version == second.branch_key_version != first.branch_key_version
    assert bytes(ours_second.key) == bytes(second.branch_key)
    old = await store.get_branch_key_version("theirs", first.branch_key_version)
    assert bytes(old.key) == bytes(first.branch_key)
    # And we can rotate what the MPL created; the MPL reads the result.
    third = await store.rotate_branch_key("theirs")
    assert (await in_thread(mpl_active)).branch_key_version == third
    # An MPL key with no ID given (a UUID, like ours) and no custom context.
    unnamed = await in_thread(lambda: mpl.create_key(CreateKeyInput()))
    read = await store.get_active_branch_key(unnamed.branch_key_identifier)
    assert dict(read.encryption_context) == {}
