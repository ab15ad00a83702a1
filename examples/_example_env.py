"""What the two example services share: their command line, the AWS they run on, their
keys (one KMS key for files, a branch key per tenant for records) and their records
table. (The batch job borrows ``key_arn`` and ``ensure_branch_key``.)

That is real AWS KMS, DynamoDB and S3 when a key is given (``--kms-key-id`` or
``AIOENVELOPE_KMS_KEY_ID``, your usual credentials, an existing ``--bucket``), any
such endpoint with ``--endpoint-url``, and otherwise an embedded KMS, DynamoDB and S3
(moto, on 127.0.0.1, in memory) with a fresh key and bucket, so the examples run with
no AWS account at all.

Records are many and small, each bound to its tenant and its ID by its encryption
context. Under a KMS keyring a context per record would cost a KMS call per record
(the data-key cache is keyed by context); under the hierarchical keyring each record's
data key is wrapped locally under its tenant's branch key, which costs one DynamoDB
GetItem and one KMS Decrypt per tenant per ``ttl`` (10 minutes), whatever the number
of records. At start-up the service creates the key store table (``--key-store-table``,
kept as it is if it exists) and a branch key ``tenant-<name>`` for each tenant of
``--tenants`` that has none, so every instance of the service agrees on the IDs and
nothing but the table has to be kept. Files stay under the KMS key: they are few and
large, and any ESDK with that key reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aioboto3
import aiosqlite

from aioenvelope import (
    BranchKeyStore,
    ClientStats,
    EnvelopeClient,
    HierarchicalKeyring,
    KmsKeyring,
    Telemetry,
)
from aioenvelope.errors import BranchKeyExistsError, BranchKeyNotFoundError, ConfigurationError
from aioenvelope.testing import embedded_aws

__all__ = [
    "DEFAULT_TENANT",
    "Aws",
    "argument_parser",
    "aws_from",
    "branch_key_id",
    "call_counts",
    "ensure_branch_key",
    "key_arn",
    "parse_args",
    "prepare_records_table",
    "record_context",
]

DEFAULT_TENANT = "default"  # whose records /records/{id} holds
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def tenant_list(text: str) -> tuple[str, ...]:
    """``--tenants``: comma-separated names, each in a URL path and a branch key ID."""
    tenants = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in tenants if not TENANT_NAME.fullmatch(t)]
    if bad or not tenants:
        raise argparse.ArgumentTypeError(
            f"tenants are names of a-z, 0-9 and '-' (at most 63), not {bad or text!r}"
        )
    return tenants


def branch_key_id(tenant: str) -> str:
    """The tenant's branch key ID: derived from its name, so no mapping has to be
    stored, and every instance of the service finds the same key."""
    return f"tenant-{tenant}"


def tenant_branch_key(context: Mapping[str, str]) -> str:
    """The keyring's ``branch_key_id_supplier``: a record's tenant, from its context,
    picks the branch key (on encryption, and on decryption from the message's own,
    already checked, context)."""
    tenant = context.get("tenant")
    if tenant is None:
        raise ConfigurationError("a record's encryption context names its tenant")
    return branch_key_id(tenant)


def record_context(tenant: str, record_id: str) -> dict[str, str]:
    """A record's encryption context: stored in its message and checked on reading, so
    the blob answers only for this tenant and ID. The tenant also picks the branch key.
    Both services use this one, so either reads what the other wrote."""
    return {"tenant": tenant, "record_id": record_id}


RECORDS_TABLE = """CREATE TABLE IF NOT EXISTS records (
    tenant TEXT NOT NULL, id TEXT NOT NULL, sealed BLOB NOT NULL, PRIMARY KEY (tenant, id)
)"""


async def prepare_records_table(db: aiosqlite.Connection) -> None:
    """Create the records table unless it exists; refuse one of an older version of the
    examples (a row per ID, sealed under another context), which nothing here can read."""
    await db.execute(RECORDS_TABLE)
    columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(records)")}
    if "tenant" not in columns:
        raise ConfigurationError(
            "the SQLite file's records table predates tenants (its records are sealed "
            "under another encryption context): give another --db"
        )


def call_counts(stats: ClientStats) -> dict[str, dict[str, int]]:
    """A client's KMS and DynamoDB calls so far, by operation (``GET /stats``)."""
    return {"kms_calls": dict(stats.kms_calls), "dynamodb_calls": dict(stats.dynamodb_calls)}


def parse_args(description: str) -> argparse.Namespace:
    return argument_parser(description).parse_args()


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The services' shared options, for a service to add its own to."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--db", default="records.db", help="the SQLite file for records")
    parser.add_argument("--bucket", default="aioenvelope-example", help="the S3 bucket for files")
    parser.add_argument("--kms-key-id", default=os.environ.get("AIOENVELOPE_KMS_KEY_ID"))
    parser.add_argument("--endpoint-url", help="a KMS, DynamoDB and S3 endpoint other than AWS's")
    parser.add_argument("--region", default=None, help="defaults to your AWS configuration's")
    parser.add_argument(
        "--tenants",
        type=tenant_list,
        default=(DEFAULT_TENANT, "acme", "globex"),
        help=f"comma-separated tenants, each with its own branch key ('{DEFAULT_TENANT}' "
        "holds /records/{id})",
    )
    parser.add_argument(
        "--key-store-table",
        default="aioenvelope-example-branch-keys",
        help="the DynamoDB table of branch keys (created if missing)",
    )
    parser.add_argument(
        "--key-store-name",
        default="aioenvelope-example",
        help="the key store's logical name: the same for every reader and writer of the table",
    )
    return parser


@dataclass(frozen=True)
class Aws:
    """Where a service keeps its keys and its files. One session for KMS, DynamoDB and
    S3, so botocore loads its service models once."""

    session: aioboto3.Session
    key_id: str  # a key ARN: the key store records it in every item
    bucket: str
    tenants: tuple[str, ...]
    key_store_table: str
    key_store_name: str
    endpoint_url: str | None = None
    region: str | None = None

    def envelope_client(self, telemetry: bool | Telemetry = False) -> EnvelopeClient:
        """A new client for files, under the KMS key: the app's lifespan calls this at
        start-up, inside the running loop that the client's KMS connections then belong
        to. ``telemetry``: as the client takes it (False: none)."""
        keyring = KmsKeyring(self.key_id, session=self.session, endpoint_url=self.endpoint_url)
        return EnvelopeClient(keyring, telemetry=telemetry)

    def key_store(self) -> BranchKeyStore:
        return BranchKeyStore(
            self.key_store_table,
            logical_key_store_name=self.key_store_name,
            kms_key_id=self.key_id,
            session=self.session,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
        )

    def records_client(self, telemetry: bool | Telemetry = False) -> EnvelopeClient:
        """A new client for records: each tenant's under its own branch key, which is
        fetched (a GetItem and a KMS Decrypt) at its first use and cached for 10 minutes."""
        keyring = HierarchicalKeyring(self.key_store(), branch_key_id_supplier=tenant_branch_key)
        return EnvelopeClient(keyring, telemetry=telemetry)

    async def prepare_key_store(self) -> None:
        """Create the table unless it exists, and each tenant's branch key unless it
        exists. Idempotent, and safe while other instances start: each step accepts
        what another one made meanwhile."""
        async with self.key_store() as admin:
            await admin.create_table()
            created = [t for t in self.tenants if await ensure_branch_key(admin, branch_key_id(t))]
        print(
            f"key store table {self.key_store_table}: branch keys "
            + ", ".join(
                branch_key_id(t) + (" (created)" if t in created else "") for t in self.tenants
            ),
            flush=True,
        )

    def s3(self) -> Any:  # aioboto3 has no type stubs
        """An S3 client, to enter with ``async with`` for the life of the app."""
        return self.session.client("s3", endpoint_url=self.endpoint_url)


async def ensure_branch_key(store: BranchKeyStore, branch_key: str) -> bool:
    """Make sure ``branch_key`` exists and KMS opens it; True if it was created here.
    Reading it first (a GetItem and a KMS Decrypt) rather than creating it and catching
    the refusal costs one KMS call, not three, when it exists, and checks it can be used."""
    try:
        (await store.get_active_branch_key(branch_key)).wipe()
        return False
    except BranchKeyNotFoundError:
        pass
    try:
        await store.create_branch_key(branch_key)
    except BranchKeyExistsError:
        # Refused: another instance created it since we looked. Judge what it made.
        (await store.get_active_branch_key(branch_key)).wipe()
        return False
    return True


async def key_arn(session: aioboto3.Session, key_id: str, endpoint_url: str | None) -> str:
    """``key_id`` as a key ARN (an alias or bare key ID is resolved by DescribeKey)."""
    if key_id.startswith("arn:") and ":key/" in key_id:
        return key_id
    async with session.client("kms", endpoint_url=endpoint_url) as kms:
        return str((await kms.describe_key(KeyId=key_id))["KeyMetadata"]["Arn"])


@contextlib.asynccontextmanager
async def aws_from(args: argparse.Namespace) -> AsyncIterator[Aws]:
    """The AWS that ``args`` names, or an embedded one for as long as the service runs."""
    stores = (args.bucket, args.tenants, args.key_store_table, args.key_store_name)
    if args.kms_key_id:
        session = aioboto3.Session(region_name=args.region)
        arn = await key_arn(session, args.kms_key_id, args.endpoint_url)
        aws = Aws(session, arn, *stores, args.endpoint_url, args.region)
        await aws.prepare_key_store()
        yield aws
        return
    async with embedded_aws() as moto:
        print(
            "no KMS key configured (--kms-key-id or AIOENVELOPE_KMS_KEY_ID for AWS): "
            f"started an embedded KMS, DynamoDB and S3 (moto, in memory) at {moto.endpoint_url}",
            flush=True,
        )
        arn = await moto.create_kms_key(alias="aioenvelope-example")
        aws = Aws(moto.session(), arn, *stores, moto.endpoint_url, moto.region)
        async with aws.s3() as s3:
            await s3.create_bucket(
                Bucket=aws.bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
            )
        print(f"created KMS key {arn} and S3 bucket {aws.bucket}", flush=True)
        await aws.prepare_key_store()
        yield aws
