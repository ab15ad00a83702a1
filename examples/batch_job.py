"""Batch job: seal the sensitive columns of a large SQLite table, each row bound to its id,
move it to another branch key (under another KMS key) by re-encrypting every row, and
verify it, with bounded concurrency.

    python examples/batch_job.py demo --db /tmp/customers.db     # embedded KMS and DynamoDB
    python examples/batch_job.py encrypt --db customers.db --key-id alias/old
    python examples/batch_job.py rotate --db customers.db --key-id alias/old \
        --to-key-id alias/new --to-branch-key-id customers-2
    python examples/batch_job.py verify --db customers.db --key-id alias/new \
        --branch-key-id customers-2

Each row becomes one message whose encryption context names its row,
``{"table": "customers", "row_id": "<id>"}``, so a row's ciphertext copied to another
row fails to decrypt there. Under a KMS keyring a context per row would cost one KMS
call per row (the data-key cache is keyed by context); so the rows are sealed under the
hierarchical keyring: every message gets its own data key, wrapped locally under a
branch key that is stored in a DynamoDB table (``--key-store-table``) encrypted under
the KMS key (``--key-id``) and fetched once (one GetItem, one KMS Decrypt) for the whole
table. Rotation re-encrypts every row under another branch key, created under
``--to-key-id`` in the same table if missing: one fetch of each branch key, however
many rows. ``encrypt`` creates the table and the branch key if missing. Each step prints
the KMS and DynamoDB calls its client made. Work is committed a chunk at a time, so an
interrupted job resumes where it stopped. Needs the ``examples`` extra (aiosqlite, tqdm;
moto for ``demo``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aioboto3
import aiosqlite
from _example_env import ensure_branch_key, key_arn
from tqdm import tqdm

from aioenvelope import (
    BatchProgress,
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    MultiKeyring,
    run_batch,
)
from aioenvelope.testing import embedded_aws

TABLE = "customers"
Row = tuple[Any, ...]  # (id, *columns) as selected
# What one row's operation returns: the parameters of its UPDATE, or None (verify).
Operation = Callable[[Row], Awaitable[tuple[Any, ...] | None]]
Failures = list[tuple[int, Exception]]  # (row id, error) of each row that failed
Outcome = tuple[int, Failures]  # rows processed, and those that failed


def row_context(row_id: int) -> dict[str, str]:
    """A row's encryption context: stored in its message and checked on every read, so
    the message opens for this row of this table only."""
    return {"table": TABLE, "row_id": str(row_id)}


def synthetic_customer(row_id: int) -> tuple[str, str]:
    """Deterministic seed data (email, card), so runs are repeatable."""
    return f"customer{row_id}@example.com", f"4000{row_id * 7_919_813 % 10**12:012d}"


async def create_table(db: aiosqlite.Connection, rows: int) -> None:
    """Create and seed the table, in one transaction, unless it already exists."""
    if await db.execute_fetchall("SELECT 1 FROM sqlite_master WHERE name = 'customers'"):
        return
    await db.execute(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, card TEXT, sealed BLOB)"
    )
    await db.executemany(
        "INSERT INTO customers VALUES (?, ?, ?, NULL)",
        ((i, *synthetic_customer(i)) for i in range(1, rows + 1)),
    )
    await db.commit()
    print(f"created table customers with {rows} rows")


async def for_each_row(
    db: aiosqlite.Connection,
    args: argparse.Namespace,
    *,
    columns: str,
    where: str,
    operation: Operation,
    update: str | None,
) -> Outcome:
    """Run ``operation`` over the selected rows, ``args.chunk_size`` rows at a time (by id,
    so a failed row is not selected again), and write each chunk's results in one
    transaction. Returns how many rows it saw and which failed."""
    select = f"SELECT id, {columns} FROM customers WHERE ({where})"  # noqa: S608 - ours
    [(total,)] = await db.execute_fetchall(f"SELECT count(*) FROM ({select})")  # noqa: S608
    failures: Failures = []
    last_id: float = float("-inf")
    with tqdm(total=total, unit="row", leave=False, disable=not sys.stderr.isatty()) as bar:

        def tick(_: BatchProgress) -> None:
            bar.update()

        while rows := [
            tuple(row)
            for row in await db.execute_fetchall(
                f"{select} AND id > ? ORDER BY id LIMIT ?", (last_id, args.chunk_size)
            )
        ]:
            last_id = rows[-1][0]
            results = await run_batch(
                rows, operation, concurrency=args.concurrency, on_progress=tick
            )
            failures += [(r.item[0], r.error) for r in results if r.error is not None]
            if update is not None:
                await db.executemany(update, [r.value for r in results if r.value is not None])
                await db.commit()
    return total, failures


async def encrypt(
    db: aiosqlite.Connection, client: EnvelopeClient, args: argparse.Namespace
) -> Outcome:
    """Seal each row still in plaintext, clearing its plaintext columns as it is sealed."""
    await create_table(db, args.rows)

    async def seal(row: Row) -> tuple[bytes, int]:
        row_id, email, card = row
        record = json.dumps({"id": row_id, "email": email, "card": card}).encode()
        return await client.encrypt(record, encryption_context=row_context(row_id)), row_id

    return await for_each_row(
        db,
        args,
        columns="email, card",
        where="sealed IS NULL",
        operation=seal,
        update="UPDATE customers SET sealed = ?, email = NULL, card = NULL WHERE id = ?",
    )


async def rotate(
    db: aiosqlite.Connection, client: EnvelopeClient, args: argparse.Namespace
) -> Outcome:
    """Re-encrypt each sealed row under ``--to-branch-key-id``: the old message is
    decrypted and verified to its end, then sealed again as a new message (a new message
    ID, a data key wrapped by the new branch key, new frames), with the same context. A
    new header on the old body is not an option: it would need a second header tag under
    the same key and IV (see ``aioenvelope.reencrypt``). A row holding another row's
    message fails here, as it does on reading."""
    target = hierarchical_keyring(args, args.to_key_id, args.to_branch_key_id)

    async def reencrypt(row: Row) -> tuple[bytes, int]:
        row_id, sealed = row
        new = await client.reencrypt(
            sealed, to_keyring=target, encryption_context=row_context(row_id)
        )
        return new, row_id

    return await for_each_row(
        db,
        args,
        columns="sealed",
        where="sealed IS NOT NULL",
        operation=reencrypt,
        update="UPDATE customers SET sealed = ? WHERE id = ?",
    )


async def verify(
    db: aiosqlite.Connection, client: EnvelopeClient, args: argparse.Namespace
) -> Outcome:
    """Check every row: sealed, no plaintext left, and its message opens as its own row's
    (a message copied from another row fails its encryption context check)."""

    async def check(row: Row) -> None:
        row_id, sealed, email, card = row
        if sealed is None or email is not None or card is not None:
            raise ValueError("row is not (only) sealed")
        record = json.loads(await client.decrypt(sealed, encryption_context=row_context(row_id)))
        if record["id"] != row_id:  # the context says this row; so must the record
            raise ValueError(f"sealed record belongs to row {record['id']}")

    return await for_each_row(
        db, args, columns="sealed, email, card", where="1", operation=check, update=None
    )


STEPS = {"encrypt": encrypt, "rotate": rotate, "verify": verify}


def key_store(args: argparse.Namespace, key_id: str) -> BranchKeyStore:
    """The key store table of ``args``, for branch keys under the KMS key ``key_id`` (an
    ARN: the store records it in every item). Branch keys under several KMS keys may
    share a table; each store reads only items under its own key."""
    return BranchKeyStore(
        args.key_store_table,
        logical_key_store_name=args.key_store_name,
        kms_key_id=key_id,
        session=args.session,
        region_name=args.region,
        endpoint_url=args.endpoint_url,
    )


def hierarchical_keyring(
    args: argparse.Namespace, key_id: str, branch_key_id: str
) -> HierarchicalKeyring:
    return HierarchicalKeyring(key_store(args, key_id), branch_key_id=branch_key_id)


async def prepare_branch_key(args: argparse.Namespace, key_id: str, branch_key_id: str) -> None:
    """Create the key store table and the branch key unless they exist (``encrypt``, and
    ``rotate``'s target). Not counted in the step's calls: its own store does it."""
    async with key_store(args, key_id) as store:
        await store.create_table()
        created = await ensure_branch_key(store, branch_key_id)
    print(
        f"branch key {branch_key_id} under {key_id} in table {args.key_store_table}"
        + (" (created)" if created else "")
    )


async def run_step(step: str, args: argparse.Namespace) -> bool:
    """One step with its own client; prints its outcome and its KMS and DynamoDB calls.
    True if all rows ok."""
    args.key_id = await key_arn(args.session, args.key_id, args.endpoint_url)
    if step == "encrypt":
        await prepare_branch_key(args, args.key_id, args.branch_key_id)
    keyring: HierarchicalKeyring | MultiKeyring = hierarchical_keyring(
        args, args.key_id, args.branch_key_id
    )
    if step == "rotate":
        args.to_key_id = await key_arn(args.session, args.to_key_id, args.endpoint_url)
        await prepare_branch_key(args, args.to_key_id, args.to_branch_key_id)
        # Rotation reads with the old branch key or the new one, so a rerun after a
        # partial failure redoes the failed rows and merely re-encrypts the done ones.
        keyring = MultiKeyring(
            keyring, [hierarchical_keyring(args, args.to_key_id, args.to_branch_key_id)]
        )
    async with aiosqlite.connect(args.db) as db, EnvelopeClient(keyring) as client:
        started = time.perf_counter()
        total, failures = await STEPS[step](db, client, args)
        stats = client.stats
    for row_id, error in failures:
        print(f"{step}: row {row_id} failed: {type(error).__name__}: {error}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(f"{step}: {total} rows, {len(failures)} failed ({elapsed:.1f} s)")
    for service, calls in (
        ("kms_calls", stats.kms_calls),
        ("dynamodb_calls", stats.dynamodb_calls),
    ):
        print(service, " ".join(f"{op}={n}" for op, n in sorted(calls.items())))
    return not failures


async def demo(args: argparse.Namespace) -> bool:
    """encrypt -> rotate -> verify against an embedded KMS and DynamoDB, which live for
    this run only."""
    async with embedded_aws() as kms:
        print(f"started an embedded KMS and DynamoDB (moto) at {kms.endpoint_url}")
        args.session, args.region, args.endpoint_url = kms.session(), kms.region, kms.endpoint_url
        args.key_id = await kms.create_kms_key(alias="batch-job-old")
        args.to_key_id = await kms.create_kms_key(alias="batch-job-new")
        args.to_branch_key_id = args.to_branch_key_id or f"{args.branch_key_id}-2"
        ok = [await run_step(step, args) for step in ("encrypt", "rotate")]
        # verify with the new branch key only
        args.key_id, args.branch_key_id = args.to_key_id, args.to_branch_key_id
        return all(ok) and await run_step("verify", args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=[*STEPS, "demo"])
    parser.add_argument("--db", required=True, help="SQLite file (created by encrypt/demo)")
    parser.add_argument("--rows", type=int, default=1000, help="rows to seed a new table with")
    parser.add_argument("--concurrency", type=int, default=16, help="rows in flight at once")
    parser.add_argument("--chunk-size", type=int, default=1000, help="rows per transaction")
    parser.add_argument(
        "--key-id",
        default=os.environ.get("AIOENVELOPE_KMS_KEY_ID"),
        help="the KMS key the branch key is stored under",
    )
    parser.add_argument(
        "--branch-key-id", default="customers", help="the branch key the rows are under"
    )
    parser.add_argument("--to-key-id", help="rotate: the KMS key of the new branch key")
    parser.add_argument("--to-branch-key-id", help="rotate: the branch key to move the rows to")
    parser.add_argument(
        "--key-store-table",
        default="aioenvelope-batch-branch-keys",
        help="the DynamoDB table of branch keys (encrypt creates it if missing)",
    )
    parser.add_argument(
        "--key-store-name",
        default="aioenvelope-batch",
        help="the key store's logical name: the same for every reader and writer of the table",
    )
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"))
    parser.add_argument(
        "--endpoint-url",
        default=os.environ.get("AIOENVELOPE_KMS_ENDPOINT_URL"),
        help="a KMS and DynamoDB endpoint other than AWS's",
    )
    args = parser.parse_args()
    # The default credential chain, unless the demo sets its own: one session for KMS and
    # DynamoDB, so botocore loads its service models once.
    args.session = aioboto3.Session(region_name=args.region)
    if args.step == "demo":
        return 0 if asyncio.run(demo(args)) else 1
    if not args.key_id:
        # Sealing under a key that disappears with this process would lose the data.
        parser.error(f"{args.step} needs --key-id (or AIOENVELOPE_KMS_KEY_ID); try `demo`")
    if args.step == "rotate" and not (args.to_key_id and args.to_branch_key_id):
        parser.error("rotate needs --to-key-id and --to-branch-key-id")
    if args.step == "rotate" and args.to_branch_key_id == args.branch_key_id:
        parser.error("rotate moves the rows to another branch key: --to-branch-key-id")
    return 0 if asyncio.run(run_step(args.step, args)) else 1


if __name__ == "__main__":
    sys.exit(main())
