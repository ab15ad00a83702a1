"""Batch job: seal the sensitive columns of a large SQLite table, rotate it to another KMS
key by re-encrypting every row, and verify it, with bounded concurrency.

    python examples/batch_job.py demo --db /tmp/customers.db     # embedded KMS, end to end
    python examples/batch_job.py encrypt --db customers.db --key-id alias/old
    python examples/batch_job.py rotate --db customers.db --key-id alias/old --to-key-id alias/new
    python examples/batch_job.py verify --db customers.db --key-id alias/new

Each row becomes one message. The row's id is sealed inside it (and checked on reading)
rather than put in the encryption context: the data-key cache is keyed by context, so a
context per row would cost one KMS call per row; this way the whole table shares a data
key (each message still derives its own key from its own message ID), and rotating it
costs one Decrypt under the old key and one GenerateDataKey under the new one. Work is
committed a chunk at a time, so an interrupted job resumes where it stopped. Needs the
``examples`` extra (aiosqlite, tqdm; moto for ``demo``).
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

import aiosqlite
from tqdm import tqdm

from aioenvelope import BatchProgress, EnvelopeClient, KmsKeyring, run_batch
from aioenvelope._embedded_kms import embedded_kms

CONTEXT = {"table": "customers"}
Row = tuple[Any, ...]  # (id, *columns) as selected
# What one row's operation returns: the parameters of its UPDATE, or None (verify).
Operation = Callable[[Row], Awaitable[tuple[Any, ...] | None]]
Failures = list[tuple[int, Exception]]  # (row id, error) of each row that failed
Outcome = tuple[int, Failures]  # rows processed, and those that failed


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
        return await client.encrypt(record, encryption_context=CONTEXT), row_id

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
    """Re-encrypt each sealed row under ``--to-key-id``: the old message is decrypted and
    verified to its end, then sealed again as a new message (a new message ID, a data key
    of the new key, new frames). A new header on the old body is not an option: it would
    need a second header tag under the same key and IV (see ``aioenvelope.reencrypt``).
    The new key's data key is cached like any encryption's, so the table shares one."""
    target = kms_keyring(args, args.to_key_id)

    async def reencrypt(row: Row) -> tuple[bytes, int]:
        row_id, sealed = row
        new = await client.reencrypt(sealed, to_keyring=target, encryption_context=CONTEXT)
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
    """Check every row: sealed, no plaintext left, and its message opens to its own id."""

    async def check(row: Row) -> None:
        row_id, sealed, email, card = row
        if sealed is None or email is not None or card is not None:
            raise ValueError("row is not (only) sealed")
        record = json.loads(await client.decrypt(sealed, encryption_context=CONTEXT))
        if record["id"] != row_id:  # a message copied here from another row
            raise ValueError(f"sealed record belongs to row {record['id']}")

    return await for_each_row(
        db, args, columns="sealed, email, card", where="1", operation=check, update=None
    )


STEPS = {"encrypt": encrypt, "rotate": rotate, "verify": verify}


def kms_keyring(args: argparse.Namespace, key_id: str, *also: str) -> KmsKeyring:
    """A keyring for ``key_id`` (and ``also``, decrypt-side) on ``args``'s endpoint."""
    return KmsKeyring(
        key_id,
        additional_key_ids=also,
        session=args.session,
        region_name=args.region,
        endpoint_url=args.endpoint_url,
    )


async def run_step(step: str, args: argparse.Namespace) -> bool:
    """One step with its own client; prints its outcome and KMS calls. True if all rows ok."""
    # Rotation decrypts with the old key or the new one, so a rerun after a partial
    # failure redoes the failed rows and merely re-encrypts the done ones again.
    also = (args.to_key_id,) if step == "rotate" else ()
    async with (
        aiosqlite.connect(args.db) as db,
        EnvelopeClient(kms_keyring(args, args.key_id, *also)) as client,
    ):
        started = time.perf_counter()
        total, failures = await STEPS[step](db, client, args)
        stats = client.stats
    for row_id, error in failures:
        print(f"{step}: row {row_id} failed: {type(error).__name__}: {error}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(f"{step}: {total} rows, {len(failures)} failed ({elapsed:.1f} s)")
    print("kms_calls", " ".join(f"{op}={n}" for op, n in sorted(stats.kms_calls.items())))
    return not failures


async def demo(args: argparse.Namespace) -> bool:
    """encrypt -> rotate -> verify against an embedded KMS, which lives for this run only."""
    with embedded_kms() as kms:
        print(f"started an embedded KMS (moto) at {kms.endpoint_url}")
        args.session, args.region, args.endpoint_url = kms.session(), kms.region, kms.endpoint_url
        args.key_id = await kms.create_key("batch-job-old")
        args.to_key_id = await kms.create_key("batch-job-new")
        ok = [await run_step(step, args) for step in ("encrypt", "rotate")]
        args.key_id = args.to_key_id  # verify with the new key only
        return all(ok) and await run_step("verify", args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=[*STEPS, "demo"])
    parser.add_argument("--db", required=True, help="SQLite file (created by encrypt/demo)")
    parser.add_argument("--rows", type=int, default=1000, help="rows to seed a new table with")
    parser.add_argument("--concurrency", type=int, default=16, help="rows in flight at once")
    parser.add_argument("--chunk-size", type=int, default=1000, help="rows per transaction")
    parser.add_argument("--key-id", default=os.environ.get("AIOENVELOPE_KMS_KEY_ID"))
    parser.add_argument("--to-key-id", help="rotate: the KMS key to re-encrypt the rows under")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"))
    parser.add_argument("--endpoint-url", default=os.environ.get("AIOENVELOPE_KMS_ENDPOINT_URL"))
    args = parser.parse_args()
    args.session = None  # the default credential chain, unless the demo sets its own
    if args.step == "demo":
        return 0 if asyncio.run(demo(args)) else 1
    if not args.key_id:
        # Sealing under a key that disappears with this process would lose the data.
        parser.error(f"{args.step} needs --key-id (or AIOENVELOPE_KMS_KEY_ID); try `demo`")
    if args.step == "rotate" and not args.to_key_id:
        parser.error("rotate needs --to-key-id")
    return 0 if asyncio.run(run_step(args.step, args)) else 1


if __name__ == "__main__":
    sys.exit(main())
