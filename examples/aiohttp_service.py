"""An aiohttp service that keeps JSON records of several tenants in SQLite, each under its
tenant's branch key (hierarchical keyring), and files in S3 under an AWS KMS key: two
EnvelopeClients for the whole app. The same routes, answers and storage as
``fastapi_service.py``: either reads what the other wrote.

    pip install 'aioenvelope[examples]'
    python examples/aiohttp_service.py     # embedded KMS, DynamoDB, S3: no AWS account needed

    curl -X PUT localhost:8000/tenants/acme/records/r1 -H 'content-type: application/json' -d '{"pan": "4111"}'
    curl localhost:8000/tenants/acme/records/r1
    curl -X PUT localhost:8000/records/r2 -H 'content-type: application/json' -d '{}'  # tenant 'default'
    curl localhost:8000/stats                            # KMS and DynamoDB calls so far
    curl -T big.iso localhost:8000/files/big.iso         # streamed up to S3, encrypted
    curl localhost:8000/files/big.iso -o copy.iso        # streamed back, decrypted
    curl --http1.0 localhost:8000/files/small.bin -o x   # HTTP/1.0: whole, Content-Length

Files stream both ways at constant memory, however large, except to HTTP/1.0 clients
(and proxies: nginx speaks HTTP/1.0 upstream unless told otherwise), which cannot tell
a streamed body cut off by a failed decryption from a whole one: they get the file
decrypted whole first and sent with a Content-Length, up to 16 MiB, and a 505 above
that.

Records are many and small, so each gets its own encryption context ({"tenant": ...,
"record_id": ...}): a blob copied to another row or tenant fails to decrypt (a 409, not
another record's data). That is affordable under the hierarchical keyring: each record's
data key is wrapped locally under its tenant's branch key, which costs one DynamoDB
GetItem and one KMS Decrypt per tenant per 10 minutes however many records (``GET
/stats`` counts them), where a KMS keyring would call KMS for every record. Files are
few and large: they stay under the KMS key (context {"file": name}, so a file renamed in
S3 fails too), and any AWS Encryption SDK with that key reads a downloaded object, with
no key store. See ``_example_env.py`` for the key store, tenants and branch keys.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiosqlite
from _example_env import (
    DEFAULT_TENANT,
    Aws,
    aws_from,
    call_counts,
    parse_args,
    prepare_records_table,
    record_context,
)
from aiohttp import web

from aioenvelope import EnvelopeClient
from aioenvelope.errors import EncryptionContextMismatchError
from aioenvelope.integrations.aiohttp import (
    envelope_cleanup_ctx,
    envelope_client,
    envelope_error_middleware,
    stream_response,
)
from aioenvelope.integrations.s3 import download_decrypted, upload_encrypted


@dataclass(frozen=True)
class Storage:
    """Where sealed records and files go; opened by a cleanup context."""

    db: aiosqlite.Connection
    s3: Any  # an aioboto3 S3 client
    bucket: str
    tenants: frozenset[str]


STORAGE = web.AppKey("storage", Storage)
# The records' client; the files' is under the integration's default key (ENVELOPE_CLIENT).
RECORDS = web.AppKey("records_envelope", EnvelopeClient)
routes = web.RouteTableDef()


def tenant_and_id(request: web.Request) -> tuple[str, str]:
    """The record's tenant (``DEFAULT_TENANT`` on ``/records/{id}``) and ID; 404 for a
    tenant without a branch key, before any key lookup."""
    tenant = request.match_info.get("tenant", DEFAULT_TENANT)
    if tenant not in request.app[STORAGE].tenants:
        raise web.HTTPNotFound(text=f"no tenant {tenant!r}")
    return tenant, request.match_info["record_id"]


@routes.put("/tenants/{tenant}/records/{record_id}")
@routes.put("/records/{record_id}")
async def put_record(request: web.Request) -> web.Response:
    (tenant, record_id), db = tenant_and_id(request), request.app[STORAGE].db
    try:
        record = await request.json()  # read whole: capped at client_max_size (1 MiB)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise web.HTTPUnprocessableEntity(text="the body must be a JSON object")
    sealed = await envelope_client(request, key=RECORDS).encrypt(
        json.dumps(record).encode(), encryption_context=record_context(tenant, record_id)
    )
    await db.execute(
        "REPLACE INTO records (tenant, id, sealed) VALUES (?, ?, ?)", (tenant, record_id, sealed)
    )
    await db.commit()
    return web.Response(status=204)


@routes.get("/tenants/{tenant}/records/{record_id}")
@routes.get("/records/{record_id}")
async def get_record(request: web.Request) -> web.Response:
    (tenant, record_id), db = tenant_and_id(request), request.app[STORAGE].db
    async with db.execute(
        "SELECT sealed FROM records WHERE tenant = ? AND id = ?", (tenant, record_id)
    ) as rows:
        row = await rows.fetchone()
    if row is None:
        raise web.HTTPNotFound(text=f"no record {record_id!r} for tenant {tenant!r}")
    try:
        plaintext = await envelope_client(request, key=RECORDS).decrypt(
            row[0], encryption_context=record_context(tenant, record_id)
        )
    except EncryptionContextMismatchError:
        # Sealed for another ID or tenant and copied here: refused before any key is
        # fetched. Not this record, and not a server fault to retry.
        raise web.HTTPConflict(
            text=f"the blob stored as record {record_id!r} of tenant {tenant!r} was sealed "
            "for another record (copied from another row?)"
        ) from None
    return web.Response(body=plaintext, content_type="application/json")


@routes.get("/stats")
async def get_stats(request: web.Request) -> web.Response:
    """What each client has asked of KMS and DynamoDB since start-up."""
    records, files = envelope_client(request, key=RECORDS), envelope_client(request)
    return web.json_response(
        {"records": call_counts(records.stats), "files": call_counts(files.stats)}
    )


@routes.put("/files/{name}")
async def put_file(request: web.Request) -> web.Response:
    name, storage = request.match_info["name"], request.app[STORAGE]
    # request.content is read as the body arrives: a couple of 8 MiB parts in memory.
    stored = await upload_encrypted(
        envelope_client(request),
        storage.s3,
        request.content,
        bucket=storage.bucket,
        key=name,
        encryption_context={"file": name},
    )
    return web.json_response(
        {
            "bucket": stored.bucket,
            "key": stored.key,
            "parts": stored.parts,
            "size": stored.size,
            "suite": stored.header.algorithm_suite.name,
        }
    )


@routes.get("/files/{name}", allow_head=False)  # a HEAD would fetch and decrypt it all
async def get_file(request: web.Request) -> web.StreamResponse:
    name, storage = request.match_info["name"], request.app[STORAGE]
    plaintext = download_decrypted(
        envelope_client(request),
        storage.s3,
        bucket=storage.bucket,
        key=name,
        encryption_context={"file": name},
    )
    try:
        # Pulls the first chunk (the GET, the KMS call) before the 200 goes out, so a
        # missing object is a 404 here and a KMS throttle a 429 from the middleware.
        return await stream_response(request, plaintext)  # application/octet-stream
    except storage.s3.exceptions.NoSuchKey:
        raise web.HTTPNotFound(text=f"no file {name!r}") from None


def storage_ctx(aws: Aws, db_path: str) -> Callable[[web.Application], AsyncIterator[None]]:
    async def storage(app: web.Application) -> AsyncIterator[None]:
        async with aiosqlite.connect(db_path) as db, aws.s3() as s3:
            await prepare_records_table(db)
            app[STORAGE] = Storage(db, s3, aws.bucket, frozenset(aws.tenants))
            yield

    return storage


def create_app(aws: Aws, db_path: str) -> web.Application:
    app = web.Application(middlewares=[envelope_error_middleware])  # 429/503 + Retry-After
    # One client per keyring for the app: caches (of data keys, of branch keys), rate
    # limiter and circuit breaker are per client, so a client per request would call KMS
    # per request. Cleanup contexts close in reverse: the storage before the clients.
    app.cleanup_ctx.append(envelope_cleanup_ctx(aws.envelope_client))  # files: the KMS key
    app.cleanup_ctx.append(envelope_cleanup_ctx(aws.records_client, key=RECORDS))
    app.cleanup_ctx.append(storage_ctx(aws, db_path))
    app.add_routes(routes)
    return app


async def until_signalled(*signals: signal.Signals) -> None:
    """What ``web.run_app`` does, here so that the process can say when it is ready."""
    stop = asyncio.Event()
    for sig in signals:
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()


async def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    async with aws_from(args) as aws:
        runner = web.AppRunner(create_app(aws, args.db))
        await runner.setup()  # runs the cleanup contexts' start-up: clients, SQLite, S3
        try:
            await web.TCPSite(runner, args.host, args.port).start()
            host, port = runner.addresses[0][:2]  # the real port for --port 0
            print(f"listening on http://{host}:{port}", flush=True)
            await until_signalled(signal.SIGINT, signal.SIGTERM)
        finally:
            await runner.cleanup()  # finishes requests in flight, then closes it all
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
