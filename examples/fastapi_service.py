"""A FastAPI service that keeps JSON records in SQLite and files in S3, all encrypted
under one AWS KMS key by one EnvelopeClient for the whole app.

    pip install 'aioenvelope[examples]'
    python examples/fastapi_service.py     # embedded KMS and S3: no AWS account needed

    curl -X PUT localhost:8000/records/r1 -H 'content-type: application/json' -d '{"pan": "4111"}'
    curl localhost:8000/records/r1
    curl -T big.iso localhost:8000/files/big.iso         # streamed up to S3, encrypted
    curl localhost:8000/files/big.iso -o copy.iso        # streamed back, decrypted
    curl --http1.0 localhost:8000/files/small.bin -o x   # HTTP/1.0: whole, Content-Length

Files stream both ways at constant memory, however large, except to HTTP/1.0 clients
(and proxies: nginx speaks HTTP/1.0 upstream unless told otherwise), which cannot tell
a streamed body cut off by a failed decryption from a whole one: they get the file
decrypted whole first and sent with a Content-Length, up to 16 MiB, and a 505 above
that. A record's ciphertext is bound to its row by the encryption context, so a blob
copied to another row (or a file renamed in S3) fails to decrypt instead of answering
for the wrong ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import aiosqlite
import uvicorn
from _example_env import Aws, aws_from, parse_args
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from starlette.responses import StreamingResponse

from aioenvelope import EnvelopeClient
from aioenvelope.integrations.s3 import download_decrypted, upload_encrypted
from aioenvelope.integrations.starlette import (
    envelope_lifespan,
    get_envelope_client,
    install_error_handlers,
    stream_response,
)


@dataclass(frozen=True)
class Storage:
    """Where sealed records and files go; opened by the app's lifespan."""

    db: aiosqlite.Connection
    s3: Any  # an aioboto3 S3 client
    bucket: str


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.state.storage  # what the lifespan yielded, per request
    return storage


Envelope = Annotated[EnvelopeClient, Depends(get_envelope_client)]
Store = Annotated[Storage, Depends(get_storage)]
router = APIRouter()


def record_context(record_id: str) -> dict[str, str]:
    return {"table": "records", "id": record_id}


@router.put("/records/{record_id}", status_code=204)
async def put_record(
    record_id: str, record: dict[str, Any], client: Envelope, store: Store
) -> None:
    sealed = await client.encrypt(
        json.dumps(record).encode(), encryption_context=record_context(record_id)
    )
    await store.db.execute("REPLACE INTO records (id, sealed) VALUES (?, ?)", (record_id, sealed))
    await store.db.commit()


@router.get("/records/{record_id}")
async def get_record(record_id: str, client: Envelope, store: Store) -> Response:
    async with store.db.execute("SELECT sealed FROM records WHERE id = ?", (record_id,)) as rows:
        row = await rows.fetchone()
    if row is None:
        raise HTTPException(404, f"no record {record_id!r}")
    plaintext = await client.decrypt(row[0], encryption_context=record_context(record_id))
    return Response(plaintext, media_type="application/json")


@router.put("/files/{name}")
async def put_file(name: str, request: Request, client: Envelope, store: Store) -> dict[str, Any]:
    # request.stream() yields the body as it arrives: a couple of 8 MiB parts in memory.
    stored = await upload_encrypted(
        client,
        store.s3,
        request.stream(),
        bucket=store.bucket,
        key=name,
        encryption_context={"file": name},
    )
    return {
        "bucket": stored.bucket,
        "key": stored.key,
        "parts": stored.parts,
        "size": stored.size,
        "suite": stored.header.algorithm_suite.name,
    }


@router.get("/files/{name}")
async def get_file(name: str, client: Envelope, store: Store) -> StreamingResponse:
    plaintext = download_decrypted(
        client, store.s3, bucket=store.bucket, key=name, encryption_context={"file": name}
    )
    try:
        # Pulls the first chunk (the GET, the KMS call) before the 200 goes out, so a
        # missing object is a 404 here and a KMS throttle a 429 from the error handlers.
        return await stream_response(plaintext)
    except store.s3.exceptions.NoSuchKey:
        raise HTTPException(404, f"no file {name!r}") from None


def create_app(aws: Aws, db_path: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def storage(app: FastAPI) -> AsyncIterator[dict[str, Storage]]:
        """Runs inside the envelope lifespan: opened after the client, closed before it."""
        async with aiosqlite.connect(db_path) as db, aws.s3() as s3:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, sealed BLOB NOT NULL)"
            )
            yield {"storage": Storage(db, s3, aws.bucket)}

    # One client for the app: its data-key cache, rate limiter and circuit breaker are
    # per client, so a client per request would call KMS per request.
    app = FastAPI(lifespan=envelope_lifespan(aws.envelope_client, inner=storage))
    install_error_handlers(app)  # KMS throttled: 429; KMS down: 503; with Retry-After
    app.include_router(router)
    return app


class Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once the app has started."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # exits the process if start-up fails
        host, port = self.servers[0].sockets[0].getsockname()[:2]  # the real port for --port 0
        print(f"listening on http://{host}:{port}", flush=True)


async def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    async with aws_from(args) as aws:
        app = create_app(aws, args.db)
        await Server(uvicorn.Config(app, host=args.host, port=args.port)).serve()


if __name__ == "__main__":
    # On SIGINT or SIGTERM uvicorn stops taking requests, finishes those in flight, runs
    # the lifespan's shutdown, then re-raises the signal so the exit status says what
    # stopped it (-15 for SIGTERM; Ctrl-C ends as a KeyboardInterrupt, silenced here).
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
