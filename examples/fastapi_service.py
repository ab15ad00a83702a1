"""A FastAPI service that keeps JSON records of several tenants in SQLite, each under its
tenant's branch key (hierarchical keyring), and files in S3 under an AWS KMS key: two
EnvelopeClients for the whole app.

    pip install 'aioenvelope[examples]'
    python examples/fastapi_service.py     # embedded KMS, DynamoDB, S3: no AWS account needed

    curl -X PUT localhost:8000/tenants/acme/records/r1 -H 'content-type: application/json' -d '{"pan": "4111"}'
    curl localhost:8000/tenants/acme/records/r1
    curl -X PUT localhost:8000/records/r2 -H 'content-type: application/json' -d '{}'  # tenant 'default'
    curl localhost:8000/stats                            # KMS and DynamoDB calls so far
    curl -T big.iso localhost:8000/files/big.iso         # streamed up to S3, encrypted
    curl localhost:8000/files/big.iso -o copy.iso        # streamed back, decrypted
    curl --http1.0 localhost:8000/files/small.bin -o x   # HTTP/1.0: whole, Content-Length

    python examples/fastapi_service.py --metrics console     # spans and metrics on stdout
    python examples/fastapi_service.py --metrics prometheus  # curl localhost:9464/metrics

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

``--metrics console`` prints OpenTelemetry's JSON on stdout: a trace per request, its
root FastAPI's span named by the route (``PUT /tenants/{tenant}/records/{record_id}``;
FastAPI 0.142 and later traces requests itself once given a tracer provider), with the
library's spans in it: the record's ``aioenvelope.encrypt``, a file's
``aioenvelope.decrypt_stream``, and under them each KMS or DynamoDB call (``aws-kms
GenerateDataKey``, ``dynamodb GetItem``) with its attempts and outcome. Every 5 seconds,
and once more at shutdown, the metrics: key-service call durations (a histogram by
service, operation and outcome), data-key and branch-key cache lookups by result,
messages and plaintext bytes, breaker states, and FastAPI's request durations.
``--metrics prometheus`` serves the same metrics at http://127.0.0.1:9464/metrics
(``--metrics-port``; 0 picks a free port, printed) for Prometheus to scrape:
``aioenvelope_key_service_call_duration_seconds`` (``_bucket``, ``_count``, ``_sum``),
``aioenvelope_cache_lookups_total``, ``aioenvelope_messages_total``,
``aioenvelope_bytes_total``, ``http_server_request_duration_seconds``. It records no
traces: Prometheus takes only metrics, and a service sends its traces to a collector
with an OTLP span exporter (``opentelemetry-exporter-otlp``) where the console one is
here. Without ``--metrics`` the service loads neither the OpenTelemetry SDK nor the
library's integration, and its clients record nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import aiosqlite
import uvicorn
from _example_env import (
    DEFAULT_TENANT,
    Aws,
    argument_parser,
    aws_from,
    call_counts,
    prepare_records_table,
    record_context,
)
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse

from aioenvelope import EnvelopeClient, Telemetry
from aioenvelope.errors import EncryptionContextMismatchError
from aioenvelope.integrations.s3 import download_decrypted, upload_encrypted
from aioenvelope.integrations.starlette import (
    envelope_client_dependency,
    envelope_lifespan,
    get_envelope_client,
    install_error_handlers,
    stream_response,
)

RECORDS_STATE_KEY = "records_envelope"  # app.state's name for the records' client
METRICS_PORT = 9464  # the Prometheus exporter's customary port
EXPORT_INTERVAL_MS = 5000  # --metrics console: how often the metrics are printed


@dataclass(frozen=True)
class Storage:
    """Where sealed records and files go; opened by the app's lifespan."""

    db: aiosqlite.Connection
    s3: Any  # an aioboto3 S3 client
    bucket: str
    tenants: frozenset[str]


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.state.storage  # what the lifespan yielded, per request
    return storage


Envelope = Annotated[EnvelopeClient, Depends(get_envelope_client)]  # files: the KMS key
Records = Annotated[EnvelopeClient, Depends(envelope_client_dependency(RECORDS_STATE_KEY))]
Store = Annotated[Storage, Depends(get_storage)]
router = APIRouter()


def known_tenant(store: Storage, tenant: str) -> str:
    if tenant not in store.tenants:  # no branch key: refused before any key lookup
        raise HTTPException(404, f"no tenant {tenant!r}")
    return tenant


@router.put("/tenants/{tenant}/records/{record_id}", status_code=204)
async def put_record(
    tenant: str, record_id: str, record: dict[str, Any], client: Records, store: Store
) -> None:
    context = record_context(known_tenant(store, tenant), record_id)
    sealed = await client.encrypt(json.dumps(record).encode(), encryption_context=context)
    await store.db.execute(
        "REPLACE INTO records (tenant, id, sealed) VALUES (?, ?, ?)", (tenant, record_id, sealed)
    )
    await store.db.commit()


@router.get("/tenants/{tenant}/records/{record_id}")
async def get_record(tenant: str, record_id: str, client: Records, store: Store) -> Response:
    context = record_context(known_tenant(store, tenant), record_id)
    async with store.db.execute(
        "SELECT sealed FROM records WHERE tenant = ? AND id = ?", (tenant, record_id)
    ) as rows:
        row = await rows.fetchone()
    if row is None:
        raise HTTPException(404, f"no record {record_id!r} for tenant {tenant!r}")
    try:
        plaintext = await client.decrypt(row[0], encryption_context=context)
    except EncryptionContextMismatchError:
        # Sealed for another ID or tenant and copied here: refused before any key is
        # fetched. Not this record, and not a server fault to retry.
        raise HTTPException(
            409,
            f"the blob stored as record {record_id!r} of tenant {tenant!r} was sealed "
            "for another record (copied from another row?)",
        ) from None
    return Response(plaintext, media_type="application/json")


@router.put("/records/{record_id}", status_code=204)
async def put_default_record(
    record_id: str, record: dict[str, Any], client: Records, store: Store
) -> None:
    await put_record(DEFAULT_TENANT, record_id, record, client, store)


@router.get("/records/{record_id}")
async def get_default_record(record_id: str, client: Records, store: Store) -> Response:
    return await get_record(DEFAULT_TENANT, record_id, client, store)


@router.get("/stats")
async def get_stats(records: Records, files: Envelope) -> JSONResponse:
    """What each client has asked of KMS and DynamoDB since start-up."""
    return JSONResponse({"records": call_counts(records.stats), "files": call_counts(files.stats)})


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


def create_app(aws: Aws, db_path: str, exporting: Exporting | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def storage(app: FastAPI) -> AsyncIterator[dict[str, Storage]]:
        """Runs inside the envelope lifespan: opened after the client, closed before it."""
        async with aiosqlite.connect(db_path) as db, aws.s3() as s3:
            await prepare_records_table(db)
            yield {"storage": Storage(db, s3, aws.bucket, frozenset(aws.tenants))}

    # One client per keyring for the app: caches (of data keys, of branch keys), rate
    # limiter and circuit breaker are per client, so a client per request would call KMS
    # per request. The records' client runs inside the files', and the storage inside both.
    telemetry = exporting.telemetry if exporting is not None else False
    records = envelope_lifespan(
        lambda: aws.records_client(telemetry), state_key=RECORDS_STATE_KEY, inner=storage
    )
    clients = envelope_lifespan(lambda: aws.envelope_client(telemetry), inner=records)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        try:
            async with clients(app) as state:
                yield state
        finally:
            if exporting is not None:
                # Once the clients have closed, so the last export has their final
                # counts. Here, not after serve() in main(): uvicorn re-raises SIGTERM
                # once the app is down, which ends the process there.
                exporting.shutdown()

    if exporting is None:
        app = FastAPI(lifespan=lifespan)
    else:
        # FastAPI's own telemetry (0.142 and later) on the service's providers: a span
        # per request, current while the route runs, so the library's spans are in its
        # trace; and FastAPI's http.server.request.duration next to the library's metrics.
        providers = exporting.telemetry
        app = FastAPI(
            lifespan=lifespan,
            telemetry={
                "tracer_provider": providers.tracer_provider,
                "meter_provider": providers.meter_provider,
            },
        )
    install_error_handlers(app)  # KMS throttled: 429; KMS down: 503; with Retry-After
    app.include_router(router)
    return app


# -- --metrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Exporting:
    """What ``--metrics`` set up: the providers, in the clients' telemetry settings,
    and how to flush and stop them."""

    telemetry: Telemetry
    shutdown: Callable[[], None]


def start_exporting(kind: str, port: int) -> Exporting:
    """OpenTelemetry's SDK, exporting to the console or serving Prometheus.

    The providers are handed to whatever records into them, the clients (in a
    ``Telemetry``) and FastAPI, rather than set globally with ``telemetry=True``: what
    records is then plain to see, the service shuts them down (and flushes them) when
    its app stops, and a test process can run several apps, each with its own. A
    service with more instrumentations that only use the global providers (an HTTP
    client's, a database driver's) sets them globally instead, once, at start-up, and
    passes ``telemetry=True``: FastAPI uses the global ones by default too.
    """
    # Imported here, not at the top: without --metrics the service never imports them.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.trace import NoOpTracerProvider

    resource = Resource.create({"service.name": "aioenvelope-fastapi-example"})
    if kind == "console":
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        reader = PeriodicExportingMetricReader(
            ConsoleMetricExporter(), export_interval_millis=EXPORT_INTERVAL_MS
        )
        meter_provider = MeterProvider([reader], resource=resource, shutdown_on_exit=False)

        def shutdown() -> None:  # each flushes first: the last spans, the final metrics
            tracer_provider.shutdown()
            meter_provider.shutdown()

        return Exporting(
            Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider), shutdown
        )

    import prometheus_client
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    prometheus = MeterProvider(
        [PrometheusMetricReader()], resource=resource, shutdown_on_exit=False
    )
    try:
        server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1")
    except OSError as exc:
        raise SystemExit(f"--metrics-port {port}: {exc}") from None
    print(f"prometheus metrics on http://127.0.0.1:{server.server_port}/metrics", flush=True)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()
        prometheus.shutdown()

    # No traces: a no-op tracer provider (None would mean the global one, for FastAPI too).
    return Exporting(
        Telemetry(tracer_provider=NoOpTracerProvider(), meter_provider=prometheus), stop
    )


class Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once the app has started."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # exits the process if start-up fails
        host, port = self.servers[0].sockets[0].getsockname()[:2]  # the real port for --port 0
        print(f"listening on http://{host}:{port}", flush=True)


async def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--metrics",
        choices=("console", "prometheus"),
        help="export traces and metrics to stdout, or serve metrics to Prometheus",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help=f"--metrics prometheus: the port of /metrics (default {METRICS_PORT}; "
        "0 picks a free one)",
    )
    args = parser.parse_args()
    if args.metrics_port is not None and args.metrics != "prometheus":
        parser.error("--metrics-port is for --metrics prometheus")
    if args.metrics and importlib.util.find_spec("fastapi.telemetry") is None:
        parser.error("--metrics needs FastAPI 0.142 or later (its own OpenTelemetry support)")
    port = METRICS_PORT if args.metrics_port is None else args.metrics_port
    exporting = start_exporting(args.metrics, port) if args.metrics else None
    async with aws_from(args) as aws:
        app = create_app(aws, args.db, exporting)
        await Server(uvicorn.Config(app, host=args.host, port=args.port)).serve()


if __name__ == "__main__":
    # On SIGINT or SIGTERM uvicorn stops taking requests, finishes those in flight, runs
    # the lifespan's shutdown, then re-raises the signal so the exit status says what
    # stopped it (-15 for SIGTERM; Ctrl-C ends as a KeyboardInterrupt, silenced here).
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
