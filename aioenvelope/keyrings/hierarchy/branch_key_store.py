"""The branch key store: branch keys in a DynamoDB table, each encrypted under AWS KMS.

Items, KMS encryption contexts and write conditions are exactly those of the AWS
Cryptographic Material Providers Library's key store (``KeyStore`` 1.x), so either
library can administer a table the other reads:

- partition key ``branch-key-id`` (S), sort key ``type`` (S);
- per branch key: one ``branch:version:<uuid>`` item per version (never deleted), a
  ``branch:ACTIVE`` copy of the active version (attribute ``version``), and a
  ``beacon:ACTIVE`` item (for searchable encryption; written, never read here);
- every item: ``branch-key-id``, ``type``, ``create-time`` (S), ``hierarchy-version``
  (N 1), ``kms-arn`` (S), ``enc`` (B, the KMS ciphertext of the 32-byte key) and one
  ``aws-crypto-ec:<k>`` (S) per custom context pair;
- an item's KMS encryption context is every attribute but ``enc``, plus ``tablename``
  (the logical key store name), so KMS refuses an item whose attributes were changed or
  whose ``enc`` came from another item.

DynamoDB and KMS are called through :class:`~aioenvelope.keyrings.kms_clients.KmsClients`
(and a DynamoDB subclass of it): the same client lifetime, per-call deadline, botocore
retries, connection gate and per-region circuit breaker as the KMS keyrings, and every
failure becomes a library error.
"""

from __future__ import annotations

import datetime
import re
import uuid
import weakref
from collections.abc import Collection, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import aioboto3
import anyio

from ...errors import (
    BranchKeyExistsError,
    BranchKeyIntegrityError,
    BranchKeyNotFoundError,
    BranchKeyStoreError,
    CircuitOpenError,
    ConfigurationError,
    DynamoDBError,
    KMSDecryptRateLimited,
    KMSError,
    KMSTimeoutError,
)
from ..kms_arn import parse_arn
from ..kms_clients import _TRANSIENT_CODES, KmsClients, KmsSettings

if TYPE_CHECKING:
    from ...runtime import Runtime

__all__ = ["BranchKeyMaterials", "BranchKeyStore"]

BRANCH_KEY_LENGTH = 32
HIERARCHY_VERSION = "1"
ACTIVE_TYPE = "branch:ACTIVE"
BEACON_TYPE = "beacon:ACTIVE"
VERSION_PREFIX = "branch:version:"
CUSTOM_CONTEXT_PREFIX = "aws-crypto-ec:"
TABLE_NAME_CONTEXT_KEY = "tablename"
KEY_SCHEMA = (("branch-key-id", "HASH"), ("type", "RANGE"))

_NOT_EXISTS = "attribute_not_exists(#BranchKeyIdentifierField)"
_EXISTS = "attribute_exists(#BranchKeyIdentifierField)"
_CONDITION_NAMES = {"#BranchKeyIdentifierField": "branch-key-id"}
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")
# How long create_table waits for a new table to become ACTIVE, polling once a second.
TABLE_ACTIVE_WAIT = 120.0


class _RotationListener(Protocol):
    def branch_key_rotated(self, branch_key_id: str) -> None: ...


class BranchKeyMaterials:
    """One version of a branch key, decrypted: the ID, the version (a UUID string), the
    32-byte key in a ``bytearray`` (zeroed by :meth:`wipe`; never in the repr) and the
    custom encryption context it was created with (``aws-crypto-ec:`` prefix removed)."""

    __slots__ = ("branch_key_id", "encryption_context", "key", "version")

    def __init__(
        self,
        branch_key_id: str,
        version: str,
        key: bytearray,
        encryption_context: Mapping[str, str],
    ) -> None:
        self.branch_key_id = branch_key_id
        self.version = version
        self.key = key
        self.encryption_context: Mapping[str, str] = MappingProxyType(dict(encryption_context))

    def __repr__(self) -> str:
        return (
            f"BranchKeyMaterials(branch_key_id={self.branch_key_id!r}, "
            f"version={self.version!r}, key=<{len(self.key)} bytes, redacted>)"
        )

    @property
    def version_bytes(self) -> bytes:
        """The version as the 16 bytes an EDK carries."""
        return uuid.UUID(self.version).bytes

    def wipe(self) -> None:
        """Zero the key in place (the copy botocore returned is immutable ``bytes``: it
        is dropped, not zeroed)."""
        self.key[:] = bytes(len(self.key))  # same length: overwritten in place


class _DynamoDbClients(KmsClients):
    """DynamoDB clients with the KMS clients' lifetime, deadline, retries and breaker;
    ``key_id`` in the base class is the table name here."""

    service = "dynamodb"
    label = "DynamoDB"
    telemetry_name = DynamoDBError.SERVICE
    target = "on table"
    methods = MappingProxyType(
        {
            "DescribeTable": "describe_table",
            "CreateTable": "create_table",
            "GetItem": "get_item",
            "TransactWriteItems": "transact_write_items",
        }
    )
    transient_codes = _TRANSIENT_CODES | {
        "ProvisionedThroughputExceededException",
        "TransactionConflictException",
        "TransactionInProgressException",
        "InternalServerError",
    }

    def _count(self, operation: str) -> None:
        self.calls[operation] += 1
        if self.runtime is not None:
            self.runtime.stats.dynamodb_calls[operation] += 1

    def _failure(
        self, operation: str, key_id: str, what: str, *, error_code: str, transient: bool
    ) -> KMSError | DynamoDBError:
        return DynamoDBError(
            f"DynamoDB {operation} on table {key_id} {what}",
            operation=operation,
            table_name=key_id,
            error_code=error_code,
            transient=transient,
        )


def _now() -> str:
    """``create-time`` as the MPL writes it: ISO 8601, microseconds, ``Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical_version(version: str) -> str | None:
    try:
        parsed = uuid.UUID(version)
    except (ValueError, TypeError, AttributeError):
        return None
    return str(parsed) if str(parsed) == version else None


class BranchKeyStore:
    """A DynamoDB table of branch keys under one KMS key, as the MPL's ``KeyStore``.

    ``kms_key_id`` must be a key ARN: every item records it (``kms-arn``) and reads
    refuse items naming another key. ``logical_key_store_name`` is bound into every
    item's KMS encryption context (as ``tablename``): every reader and writer of the
    table must use the same one. ``endpoint_url`` serves both DynamoDB and KMS (a local
    stand-in such as moto); ``region_name`` is DynamoDB's (default: the session's,
    ``AWS_REGION``, else the key ARN's), KMS is called in the key ARN's region.
    ``deadline`` (per call, botocore's retries included), ``retry_mode`` and
    ``max_attempts`` (attempts per call, the first included) apply to both services, as
    ``KmsKeyring``'s do.

    Use it on its own as ``async with BranchKeyStore(...) as store:`` for
    administration; a keyring using it opens and closes it with its ``EnvelopeClient``
    (opens nest: the clients close when the last user closes).
    """

    def __init__(
        self,
        table_name: str,
        *,
        logical_key_store_name: str,
        kms_key_id: str,
        session: aioboto3.Session | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        deadline: float = 2.0,
        retry_mode: str = "standard",
        max_attempts: int = 4,
    ) -> None:
        if not isinstance(table_name, str) or not _TABLE_NAME.fullmatch(table_name):
            raise ConfigurationError(
                f"{table_name!r} is not a DynamoDB table name (3-255 characters of "
                "A-Z, a-z, 0-9, '_', '-', '.')"
            )
        if not isinstance(logical_key_store_name, str) or not logical_key_store_name:
            raise ConfigurationError("logical_key_store_name must be a non-empty string")
        arn = parse_arn(kms_key_id) if isinstance(kms_key_id, str) else None
        if arn is None or arn.resource_type != "key":
            raise ConfigurationError(
                f"kms_key_id must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>), "
                f"not {kms_key_id!r}: the key store records it in every item and checks it "
                "on every read"
            )
        self.table_name = table_name
        self.logical_key_store_name = logical_key_store_name
        self.kms_key_id = kms_key_id
        self._kms_region = arn.region
        # One session for both services: each new session reloads botocore's models.
        session = session if session is not None else aioboto3.Session()
        reach: dict[str, Any] = {
            "session": session,
            "region_name": region_name,
            "endpoint_url": endpoint_url,
            "deadline": deadline,
            "retry_mode": retry_mode,
            "max_attempts": max_attempts,
        }
        kms_settings = KmsSettings(**reach)
        ddb_settings = KmsSettings(**reach)
        self._ddb_region = ddb_settings.default_region() or arn.region
        self._kms = KmsClients(kms_settings)
        self._ddb = _DynamoDbClients(ddb_settings)
        self._opened = 0
        # Keyrings to tell when this store rotates a branch key (weakly held: a keyring
        # dropped by its user is not kept alive by the store it used).
        self._rotation_listeners: weakref.WeakSet[_RotationListener] = weakref.WeakSet()

    def __repr__(self) -> str:
        return (
            f"BranchKeyStore({self.table_name!r}, logical_key_store_name="
            f"{self.logical_key_store_name!r}, kms_key_id={self.kms_key_id!r})"
        )

    def notify_rotations_to(self, listener: _RotationListener) -> None:
        """Have :meth:`rotate_branch_key` call ``listener.branch_key_rotated(id)`` after
        each rotation, so a keyring on this store moves to the new version at once."""
        self._rotation_listeners.add(listener)

    @property
    def calls(self) -> Mapping[str, int]:
        """DynamoDB and KMS calls made so far, by operation (attempts as seen by us)."""
        return {**self._ddb.calls, **self._kms.calls}

    # -- lifetime -----------------------------------------------------------------

    def attach(self, runtime: Runtime) -> None:
        """Share the client's runtime: both services count toward its region breakers,
        each branch key fetch (GetItem + KMS Decrypt, a remote unwrap) takes one decrypt
        rate-limit token before its GetItem, and calls count in its stats
        (``kms_calls``, ``dynamodb_calls``)."""
        self._kms.runtime = runtime
        self._ddb.runtime = runtime

    async def open(self) -> None:
        if self._opened == 0:
            await self._kms.open()
            try:
                await self._ddb.open()
            except BaseException:
                await self._kms.close()
                raise
        self._opened += 1

    async def close(self) -> None:
        if self._opened == 0:
            return
        self._opened -= 1
        if self._opened == 0:
            try:
                await self._ddb.close()
            finally:
                await self._kms.close()

    async def __aenter__(self) -> BranchKeyStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._opened == 0:
            raise ConfigurationError(
                f"{self!r} is not open: use `async with store:`, or the EnvelopeClient of "
                "the keyring that uses it"
            )

    # -- remote calls -------------------------------------------------------------

    async def _ddb_call(
        self,
        operation: str,
        params: Mapping[str, Any],
        branch_key_id: str | None = None,
        *,
        expected: Collection[str] = (),
    ) -> dict[str, Any]:
        self._check_open()
        try:
            return await self._ddb.call(
                operation, self._ddb_region, self.table_name, params, expected=expected
            )
        except DynamoDBError as exc:
            if exc.error_code == "ResourceNotFoundException" and operation != "DescribeTable":
                raise BranchKeyStoreError(
                    f"the key store table {self.table_name!r} does not exist in "
                    f"{self._ddb_region} (DynamoDB {operation}"
                    + (f" for branch key {branch_key_id!r}" if branch_key_id else "")
                    + "): create it with create_table() or check table_name and region_name",
                    table_name=self.table_name,
                    branch_key_id=branch_key_id,
                ) from exc
            raise

    async def _kms_call(
        self, operation: str, params: dict[str, Any], *, admitted: bool = False
    ) -> dict[str, Any]:
        self._check_open()
        params.setdefault("GrantTokens", [])
        response = await self._kms.call(
            operation, self._kms_region, self.kms_key_id, params, admitted=admitted
        )
        if response.get("KeyId") != self.kms_key_id:
            raise KMSError(
                f"KMS {operation} with key {self.kms_key_id} answered for "
                f"{str(response.get('KeyId'))[:200]!r}, not the key store's key",
                operation=operation,
                key_id=self.kms_key_id,
                error_code="UnexpectedKey",
                transient=False,
            )
        return response

    # -- table --------------------------------------------------------------------

    async def create_table(self) -> str:
        """Create the table (on-demand capacity) and wait until it is ACTIVE; return its
        ARN. An existing table with the key store's key schema is accepted as it is; one
        with another key schema is refused (:class:`BranchKeyStoreError`)."""
        try:
            table = (
                await self._ddb_call(
                    "DescribeTable",
                    {"TableName": self.table_name},
                    expected=("ResourceNotFoundException",),
                )
            )["Table"]
        except DynamoDBError as exc:
            if exc.error_code != "ResourceNotFoundException":
                raise
            table = await self._create_table()
        self._check_schema(table)
        waited = 0.0
        while table.get("TableStatus", "ACTIVE") == "CREATING" and waited < TABLE_ACTIVE_WAIT:
            await anyio.sleep(1.0)
            waited += 1.0
            table = (await self._ddb_call("DescribeTable", {"TableName": self.table_name}))["Table"]
        return str(table.get("TableArn", ""))

    async def _create_table(self) -> dict[str, Any]:
        params = {
            "TableName": self.table_name,
            "AttributeDefinitions": [
                {"AttributeName": name, "AttributeType": "S"} for name, _ in KEY_SCHEMA
            ],
            "KeySchema": [{"AttributeName": name, "KeyType": kind} for name, kind in KEY_SCHEMA],
            "BillingMode": "PAY_PER_REQUEST",
        }
        try:
            response = await self._ddb_call(
                "CreateTable", params, expected=("ResourceInUseException",)
            )
        except DynamoDBError as exc:
            if exc.error_code != "ResourceInUseException":
                raise
            # Created by someone else meanwhile: judge what is there.
            response = await self._ddb_call("DescribeTable", {"TableName": self.table_name})
            return dict(response["Table"])
        return dict(response["TableDescription"])

    def _check_schema(self, table: Mapping[str, Any]) -> None:
        schema = tuple(
            (str(k.get("AttributeName")), str(k.get("KeyType"))) for k in table.get("KeySchema", [])
        )
        types = {
            str(a.get("AttributeName")): str(a.get("AttributeType"))
            for a in table.get("AttributeDefinitions", [])
        }
        if schema != KEY_SCHEMA or any(types.get(name) != "S" for name, _ in KEY_SCHEMA):
            shown = ", ".join(f"{name} ({kind}, {types.get(name, '?')})" for name, kind in schema)
            raise BranchKeyStoreError(
                f"the table {self.table_name!r} exists but is not a branch key store: its key "
                f"schema is {shown or 'unknown'}, a key store needs branch-key-id (HASH, S) "
                "and type (RANGE, S). Use another table_name",
                table_name=self.table_name,
            )

    # -- writes -------------------------------------------------------------------

    def _base_attributes(
        self, branch_key_id: str, create_time: str, custom: Mapping[str, str]
    ) -> dict[str, str]:
        base = {
            "branch-key-id": branch_key_id,
            "create-time": create_time,
            "hierarchy-version": HIERARCHY_VERSION,
            "kms-arn": self.kms_key_id,
        }
        base.update((CUSTOM_CONTEXT_PREFIX + k, v) for k, v in custom.items())
        return base

    def _context(self, attributes: Mapping[str, str]) -> dict[str, str]:
        return {**attributes, TABLE_NAME_CONTEXT_KEY: self.logical_key_store_name}

    @staticmethod
    def _item(attributes: Mapping[str, str], enc: bytes) -> dict[str, Any]:
        item: dict[str, Any] = {
            k: {"N": v} if k == "hierarchy-version" else {"S": v} for k, v in attributes.items()
        }
        item["enc"] = {"B": enc}
        return item

    def _put(self, item: dict[str, Any], condition: str) -> dict[str, Any]:
        return {
            "Put": {
                "Item": item,
                "TableName": self.table_name,
                "ConditionExpression": condition,
                "ExpressionAttributeNames": dict(_CONDITION_NAMES),
            }
        }

    async def _new_version(
        self, base: Mapping[str, str], version: str
    ) -> tuple[dict[str, str], bytes, dict[str, str], bytes]:
        """A new version: (version attributes, its ciphertext, ACTIVE attributes, its
        ciphertext). GenerateDataKeyWithoutPlaintext then ReEncrypt: the key's plaintext
        never leaves KMS."""
        version_attrs = {**base, "type": VERSION_PREFIX + version}
        generated = await self._kms_call(
            "GenerateDataKeyWithoutPlaintext",
            {
                "KeyId": self.kms_key_id,
                "EncryptionContext": self._context(version_attrs),
                "NumberOfBytes": BRANCH_KEY_LENGTH,
            },
        )
        active_attrs = {**base, "type": ACTIVE_TYPE, "version": VERSION_PREFIX + version}
        reencrypted = await self._kms_call(
            "ReEncrypt",
            {
                "CiphertextBlob": generated["CiphertextBlob"],
                "SourceEncryptionContext": self._context(version_attrs),
                "SourceKeyId": self.kms_key_id,
                "DestinationKeyId": self.kms_key_id,
                "DestinationEncryptionContext": self._context(active_attrs),
            },
        )
        return (
            version_attrs,
            bytes(generated["CiphertextBlob"]),
            active_attrs,
            bytes(reencrypted["CiphertextBlob"]),
        )

    async def create_branch_key(
        self,
        branch_key_id: str | None = None,
        *,
        encryption_context: Mapping[str, str] | None = None,
    ) -> str:
        """Create a branch key (a random UUID as its ID unless one is given) with its
        first version, and return the ID. ``encryption_context`` is bound into every
        version's KMS context (stored as ``aws-crypto-ec:<key>`` attributes). An existing
        ID is never overwritten (:class:`BranchKeyStoreError`): the three items are written
        in one transaction, each on condition that its item does not exist.
        Costs 3 KMS calls (GenerateDataKeyWithoutPlaintext, ReEncrypt,
        GenerateDataKeyWithoutPlaintext for the beacon key) and one TransactWriteItems."""
        if branch_key_id is None:
            branch_key_id = str(uuid.uuid4())
        elif not isinstance(branch_key_id, str) or not branch_key_id:
            raise ConfigurationError("branch_key_id must be a non-empty string (or None)")
        custom = dict(encryption_context or {})
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in custom.items()):
            raise ConfigurationError(
                "a branch key's encryption_context maps non-empty strings to strings"
            )
        version = str(uuid.uuid4())
        base = self._base_attributes(branch_key_id, _now(), custom)
        version_attrs, version_enc, active_attrs, active_enc = await self._new_version(
            base, version
        )
        beacon_attrs = {**base, "type": BEACON_TYPE}
        beacon = await self._kms_call(
            "GenerateDataKeyWithoutPlaintext",
            {
                "KeyId": self.kms_key_id,
                "EncryptionContext": self._context(beacon_attrs),
                "NumberOfBytes": BRANCH_KEY_LENGTH,
            },
        )
        items = [
            self._put(self._item(version_attrs, version_enc), _NOT_EXISTS),
            self._put(self._item(active_attrs, active_enc), _NOT_EXISTS),
            self._put(self._item(beacon_attrs, bytes(beacon["CiphertextBlob"])), _NOT_EXISTS),
        ]
        await self._transact(items, branch_key_id, version, creating=True)
        return branch_key_id

    async def rotate_branch_key(self, branch_key_id: str) -> str:
        """Make a new version of the branch key active; return it (a UUID string). Old
        versions stay in the table and keep decrypting. The active item is read and
        authenticated by KMS first (a ReEncrypt to itself, as the MPL does), so a
        tampered item is refused instead of being copied into the new version; the new
        version is written on condition it does not exist and the ACTIVE item on
        condition it does, in one transaction. Costs 1 GetItem, 3 KMS calls (ReEncrypt of
        the active item to itself, GenerateDataKeyWithoutPlaintext, ReEncrypt) and one
        TransactWriteItems."""
        self._check_branch_key_id(branch_key_id)
        item, attrs = await self._get(branch_key_id, ACTIVE_TYPE, None)
        old_version = self._active_version(item, attrs, branch_key_id)
        context = self._context(attrs)
        try:
            await self._kms_call(
                "ReEncrypt",
                {
                    "CiphertextBlob": item["enc"]["B"],
                    "SourceEncryptionContext": context,
                    "SourceKeyId": self.kms_key_id,
                    "DestinationKeyId": self.kms_key_id,
                    "DestinationEncryptionContext": context,
                },
            )
        except KMSError as exc:
            raise self._refused_by_kms(exc, branch_key_id, old_version) from exc
        custom = {
            k: v for k, v in attrs.items() if k.startswith(CUSTOM_CONTEXT_PREFIX)
        }  # carried over as the MPL does
        version = str(uuid.uuid4())
        base = self._base_attributes(branch_key_id, _now(), {})
        base.update(custom)
        version_attrs, version_enc, active_attrs, active_enc = await self._new_version(
            base, version
        )
        items = [
            self._put(self._item(version_attrs, version_enc), _NOT_EXISTS),
            self._put(self._item(active_attrs, active_enc), _EXISTS),
        ]
        await self._transact(items, branch_key_id, version, creating=False)
        for listener in list(self._rotation_listeners):
            listener.branch_key_rotated(branch_key_id)
        return version

    async def _transact(
        self, items: list[dict[str, Any]], branch_key_id: str, version: str, *, creating: bool
    ) -> None:
        params = {"TransactItems": items, "ClientRequestToken": str(uuid.uuid4())}
        try:
            await self._ddb_call("TransactWriteItems", params, branch_key_id)
        except DynamoDBError as exc:
            if exc.error_code != "TransactionCanceledException":
                raise
            reasons = getattr(exc.__cause__, "response", {}).get("CancellationReasons", [])
            codes = [str(r.get("Code", "")) for r in reasons if isinstance(r, Mapping)]
            if "ConditionalCheckFailed" not in codes and "ConditionalCheckFailed" not in str(exc):
                raise
            if creating:
                raise BranchKeyExistsError(
                    f"branch key {branch_key_id!r} already exists in table "
                    f"{self.table_name!r}: create_branch_key never overwrites one (rotate it "
                    "with rotate_branch_key, or choose another ID)",
                    table_name=self.table_name,
                    branch_key_id=branch_key_id,
                    version=version,
                ) from exc
            raise BranchKeyNotFoundError(
                f"branch key {branch_key_id!r} disappeared from table {self.table_name!r} "
                f"while it was rotated to version {version}: nothing was written",
                table_name=self.table_name,
                branch_key_id=branch_key_id,
                version=version,
            ) from exc

    # -- reads --------------------------------------------------------------------

    @staticmethod
    def _check_branch_key_id(branch_key_id: str) -> None:
        if not isinstance(branch_key_id, str) or not branch_key_id:
            raise ConfigurationError("branch_key_id must be a non-empty string")

    async def get_active_branch_key(self, branch_key_id: str) -> BranchKeyMaterials:
        """The active version of the branch key, decrypted (1 GetItem, 1 KMS Decrypt)."""
        self._check_branch_key_id(branch_key_id)
        await self._admit()
        item, attrs = await self._get(branch_key_id, ACTIVE_TYPE, None)
        version = self._active_version(item, attrs, branch_key_id)
        return await self._decrypt(item, attrs, branch_key_id, version)

    async def get_branch_key_version(self, branch_key_id: str, version: str) -> BranchKeyMaterials:
        """The given version (a UUID string) of the branch key, decrypted (1 GetItem, 1
        KMS Decrypt)."""
        self._check_branch_key_id(branch_key_id)
        if not isinstance(version, str) or _canonical_version(version) is None:
            raise ConfigurationError(
                f"a branch key version is a lower-case UUID string, not {str(version)[:64]!r}"
            )
        await self._admit()
        item, attrs = await self._get(branch_key_id, VERSION_PREFIX + version, version)
        return await self._decrypt(item, attrs, branch_key_id, version)

    async def _admit(self) -> None:
        """One decrypt rate-limit token per fetch (its KMS Decrypt is a remote unwrap),
        taken before the GetItem: a refused fetch costs neither call. An open breaker is
        asked first, so a fetch it would refuse takes no token."""
        self._check_open()
        runtime = self._kms.runtime
        if runtime is None:
            return
        # The call each check stands for, as telemetry names it: a refused fetch is seen
        # as a refused span of the call it spared (the token is for the KMS Decrypt).
        kms = ("aws-kms", "Decrypt", self.kms_key_id, self._kms_region)
        checks = (
            ("DynamoDB", ("dynamodb", "GetItem", self.table_name, self._ddb_region)),
            ("KMS", kms),
        )
        spared = kms
        try:
            for service, call in checks:
                breaker = runtime.breaker(call[3])
                if breaker is not None and breaker.refuses():
                    # One region: one breaker for both. The span names the service that
                    # opened it, as the error does.
                    spared = dict(checks).get(breaker.opened_by, call)
                    breaker.before_call(service)  # raises CircuitOpenError, no I/O
            await runtime.admit_remote_decrypt()
        except (CircuitOpenError, KMSDecryptRateLimited) as exc:
            name, operation, key_id, region = spared
            runtime.observer.refused(name, operation, key_id=key_id, region=region, error=exc)
            raise

    def _where(self, branch_key_id: str, version: str | None) -> str:
        shown = f"version {version} of " if version else "the active version of "
        return f"{shown}branch key {branch_key_id!r} in table {self.table_name!r}"

    async def _get(
        self, branch_key_id: str, item_type: str, version: str | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The item and its attributes as strings (``enc`` left out), checked: the
        attributes a key store item has, the key it was asked for, the configured
        KMS key."""
        response = await self._ddb_call(
            "GetItem",
            {
                "TableName": self.table_name,
                "Key": {"branch-key-id": {"S": branch_key_id}, "type": {"S": item_type}},
                "ConsistentRead": True,
            },
            branch_key_id,
        )
        item = response.get("Item")
        if not item:
            missing = "the branch key" if version is None else "that version of the branch key"
            raise BranchKeyNotFoundError(
                f"{self._where(branch_key_id, version)} was not found ({missing} does not "
                "exist): check the branch key ID, the version and table_name",
                table_name=self.table_name,
                branch_key_id=branch_key_id,
                version=version,
            )
        attrs: dict[str, str] = {}
        problems: list[str] = []
        for name, value in item.items():
            if name == "enc":
                continue
            if not isinstance(value, Mapping) or len(value) != 1:
                problems.append(f"attribute {name[:64]!r} is malformed")
                continue
            ((kind, text),) = value.items()
            if kind not in ("S", "N") or not isinstance(text, str):
                problems.append(f"attribute {name[:64]!r} is of type {str(kind)[:8]}, not S")
                continue
            attrs[name] = text
        enc = item.get("enc", {}).get("B") if isinstance(item.get("enc"), Mapping) else None
        if not isinstance(enc, (bytes, bytearray)) or not enc:
            problems.append("it has no enc (B) attribute")
        expected = {
            "branch-key-id": branch_key_id,
            "type": item_type,
            "hierarchy-version": HIERARCHY_VERSION,
        }
        for name, value in expected.items():
            if attrs.get(name) != value:
                problems.append(f"its {name} is {attrs.get(name, 'missing')[:80]!r}, not {value!r}")
        if "create-time" not in attrs:
            problems.append("it has no create-time")
        if TABLE_NAME_CONTEXT_KEY in attrs:
            problems.append(f"it has a {TABLE_NAME_CONTEXT_KEY!r} attribute")
        if problems:
            raise BranchKeyIntegrityError(
                f"{self._where(branch_key_id, version)} is not a valid key store item: "
                + "; ".join(problems),
                table_name=self.table_name,
                branch_key_id=branch_key_id,
                version=version,
            )
        arn = attrs.get("kms-arn")
        if arn != self.kms_key_id:
            raise BranchKeyIntegrityError(
                f"{self._where(branch_key_id, version)} is encrypted under KMS key "
                f"{str(arn)[:200]!r}, not the key store's {self.kms_key_id}: refused without "
                "calling KMS. Configure the store with the key the table was created under",
                table_name=self.table_name,
                branch_key_id=branch_key_id,
                version=version,
            )
        return dict(item), attrs

    def _active_version(
        self, item: Mapping[str, Any], attrs: Mapping[str, str], branch_key_id: str
    ) -> str:
        pointer = attrs.get("version", "")
        version = pointer[len(VERSION_PREFIX) :] if pointer.startswith(VERSION_PREFIX) else ""
        if _canonical_version(version) is None:
            raise BranchKeyIntegrityError(
                f"{self._where(branch_key_id, None)} names no valid version (its version "
                f"attribute is {pointer[:80]!r})",
                table_name=self.table_name,
                branch_key_id=branch_key_id,
            )
        return version

    def _refused_by_kms(
        self, exc: KMSError, branch_key_id: str, version: str
    ) -> KMSError | BranchKeyIntegrityError:
        if exc.transient or isinstance(exc, KMSTimeoutError):
            return exc
        if exc.error_code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return BranchKeyIntegrityError(
                f"KMS refused {self._where(branch_key_id, version)} ({exc.error_code}): its "
                "attributes, enc or the logical key store name "
                f"({self.logical_key_store_name!r}) are not the ones it was encrypted with. "
                "The item was changed outside a key store, or logical_key_store_name is wrong",
                table_name=self.table_name,
                branch_key_id=branch_key_id,
                version=version,
            )
        return exc

    async def _decrypt(
        self,
        item: Mapping[str, Any],
        attrs: Mapping[str, str],
        branch_key_id: str,
        version: str,
    ) -> BranchKeyMaterials:
        try:
            response = await self._kms_call(
                "Decrypt",
                {
                    "KeyId": self.kms_key_id,
                    "CiphertextBlob": bytes(item["enc"]["B"]),
                    "EncryptionContext": self._context(attrs),
                },
                admitted=True,
            )
        except KMSError as exc:
            raise self._refused_by_kms(exc, branch_key_id, version) from exc
        plaintext = response.get("Plaintext")
        if not isinstance(plaintext, (bytes, bytearray)) or len(plaintext) != BRANCH_KEY_LENGTH:
            raise BranchKeyIntegrityError(
                f"KMS Decrypt of {self._where(branch_key_id, version)} returned no "
                f"{BRANCH_KEY_LENGTH}-byte key",
                table_name=self.table_name,
                branch_key_id=branch_key_id,
                version=version,
            )
        custom = {
            k[len(CUSTOM_CONTEXT_PREFIX) :]: v
            for k, v in attrs.items()
            if k.startswith(CUSTOM_CONTEXT_PREFIX)
        }
        return BranchKeyMaterials(branch_key_id, version, bytearray(plaintext), custom)
