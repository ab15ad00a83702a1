"""The example web services end to end, as a user runs them: each example is a real
process on a loopback port, pointed at this session's moto (KMS, DynamoDB and S3 on one
endpoint), and driven over HTTP with httpx.

Records are sealed per record, ``{"tenant": t, "record_id": id}``, under each tenant's
branch key (a hierarchical keyring) in a key store table of the test's own; files under
the KMS key.

moto runs here, in the test process, so the objects it keeps in memory do not count
against the service's memory, which one test measures from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import aws_encryption_sdk
import boto3
import httpx
import pytest
from esdk_peer import esdk_decrypt
from http_framing import TERMINATING_CHUNK, damaged, exchange, http10_get, http11_get
from kms_server import REGION, KmsKey, MotoKms
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from aioenvelope import AlgorithmSuite, inspect
from aioenvelope.integrations.opentelemetry import DURATION_BUCKETS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MIB = 1 << 20
LISTENING = "listening on "
START_TIMEOUT = 30.0  # imports and botocore's models, on a busy 2-core machine
STOP_TIMEOUT = 20.0
ON_LINUX = sys.platform.startswith("linux")


@dataclass(frozen=True)
class Example:
    """One example service, and how it says it has shut down cleanly."""

    script: str
    clean_exit: dict[signal.Signals, int]
    """Exit status per signal. uvicorn (since 0.29) re-raises the signal once it has
    shut the app down, so SIGTERM ends the process by SIGTERM: that is its clean exit."""
    shutdown_line: str
    """Printed only once the app's resources are closed."""


EXAMPLE_SERVICES = [
    pytest.param(
        Example(
            "fastapi_service.py",
            {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: 0},
            "Application shutdown complete.",  # uvicorn's, after the lifespan exited
        ),
        id="fastapi",
    ),
    pytest.param(
        Example("aiohttp_service.py", {signal.SIGTERM: 0, signal.SIGINT: 0}, "stopped"),
        id="aiohttp",
    ),
]


@dataclass
class Service:
    """A running example: its process, its URL, and everything it has printed."""

    proc: subprocess.Popen[str]
    url: str
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    stdout_closed: threading.Event = field(default_factory=threading.Event)

    def output(self) -> str:
        return "".join(self.stdout_lines) + self.stderr_path.read_text()

    def stdout_after_exit(self) -> str:
        """Everything the stopped process printed on stdout, its last lines included
        (the pipe is drained by a thread, which may still be reading them)."""
        assert self.proc.poll() is not None, "stop the service first"
        assert self.stdout_closed.wait(STOP_TIMEOUT), "stdout still open after the exit"
        return "".join(self.stdout_lines)

    def peak_rss(self) -> int:
        """VmHWM: the most resident memory the process has had so far, in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _pump(
    stream: TextIO, lines: list[str], seen: queue.Queue[str | None], closed: threading.Event
) -> None:
    """Drain the service's stdout (a full pipe would block it), line by line."""
    for line in stream:
        lines.append(line)
        seen.put(line)
    closed.set()
    seen.put(None)


@contextlib.contextmanager
def running(
    example: Example,
    moto: MotoKms,
    key: KmsKey,
    bucket: str,
    tmp: Path,
    key_store_table: str,
    *options: str,
    env: dict[str, str] | None = None,
) -> Iterator[Service]:
    """``example`` started on a free port (``--port 0``; it prints the real one), and
    stopped with SIGTERM at the end unless the test stopped it. Its records go to
    ``tmp/records.db``, its branch keys to ``key_store_table`` (created if missing).
    ``options``: more of its command line; ``env``: more environment variables."""
    stderr_path = tmp / f"stderr-{example.script}.txt"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / example.script),
                *("--host", "127.0.0.1", "--port", "0", "--db", str(tmp / "records.db")),
                *("--bucket", bucket, "--kms-key-id", key.arn, "--endpoint-url", moto.endpoint_url),
                *("--key-store-table", key_store_table),
                *options,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=os.environ | (env or {}),  # moto_kms's dummy credentials and region
        )
    service = Service(proc, url="", stderr_path=stderr_path)
    seen: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(
        target=_pump,
        args=(proc.stdout, service.stdout_lines, seen, service.stdout_closed),
        daemon=True,
    ).start()
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not service.url:
            try:
                line = seen.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(
                    f"{example.script} did not start in {START_TIMEOUT} s:\n{service.output()}"
                )
            if line is None:
                pytest.fail(f"{example.script} exited ({proc.wait()}):\n{service.output()}")
            if line.startswith(LISTENING):
                service.url = line.removeprefix(LISTENING).strip()
        yield service
        if proc.poll() is None:  # every test ends as a deployment does: SIGTERM, clean exit
            assert service.stop() == example.clean_exit[signal.SIGTERM], service.output()
    finally:
        service.stop()


@pytest.fixture
def s3_admin(moto_kms: MotoKms) -> Any:
    return boto3.client("s3", region_name=REGION, endpoint_url=moto_kms.endpoint_url)


@pytest.fixture(params=EXAMPLE_SERVICES)
def example(request: pytest.FixtureRequest) -> Example:
    assert isinstance(request.param, Example)
    return request.param


@pytest.fixture
def bucket(s3_admin: Any) -> str:
    name = f"examples-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    return name


@pytest.fixture
def key_store_table() -> str:
    """A key store table of the test's own: the service creates it and its branch keys."""
    return f"examples-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def service(
    example: Example,
    moto_kms: MotoKms,
    kms_key: KmsKey,
    bucket: str,
    tmp_path: Path,
    key_store_table: str,
) -> Iterator[Service]:
    with running(example, moto_kms, kms_key, bucket, tmp_path, key_store_table) as started:
        yield started


@pytest.fixture
async def http(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        yield client


class Body:
    """An upload body made on the fly, 1 MiB at a time, hashed as it is sent."""

    def __init__(self, size_mib: int, seed: bytes = b"") -> None:
        self.size_mib, self.seed = size_mib, seed
        self.sha256 = hashlib.sha256()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(self.size_mib):
            chunk = hashlib.sha256(self.seed + i.to_bytes(4, "big")).digest() * (MIB // 32)
            self.sha256.update(chunk)
            yield chunk


async def download_sha256(http: httpx.AsyncClient, path: str) -> str:
    digest = hashlib.sha256()
    async with http.stream("GET", path) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
    return digest.hexdigest()


def assert_envelope_metadata(
    s3_admin: Any, bucket: str, key: str, kms_key: KmsKey, suite: str
) -> None:
    """The object says how it was encrypted, without a download."""
    meta = s3_admin.head_object(Bucket=bucket, Key=key)["Metadata"]
    assert meta["aioenvelope-format"] == "aws-encryption-sdk"
    assert meta["aioenvelope-suite"] == f"0x{AlgorithmSuite[suite].suite_id:04X}"
    assert kms_key.arn in meta["aioenvelope-kms-key-arns"].split(",")


# -- records in SQLite ---------------------------------------------------------------------


def stored_blob(tmp: Path, tenant: str, record_id: str) -> bytes:
    with contextlib.closing(sqlite3.connect(tmp / "records.db")) as db:
        (blob,) = db.execute(
            "SELECT sealed FROM records WHERE tenant = ? AND id = ?", (tenant, record_id)
        ).fetchone()
    assert isinstance(blob, bytes)
    return blob


def store_blob(tmp: Path, tenant: str, record_id: str, blob: bytes) -> None:
    """What an attacker with write access to the database (or a buggy migration) does."""
    with contextlib.closing(sqlite3.connect(tmp / "records.db")) as db:
        db.execute(
            "REPLACE INTO records (tenant, id, sealed) VALUES (?, ?, ?)", (tenant, record_id, blob)
        )
        db.commit()


async def record_calls(http: httpx.AsyncClient) -> dict[str, dict[str, int]]:
    """``GET /stats``: the records' client's KMS and DynamoDB calls so far."""
    answer = await http.get("/stats")
    assert answer.status_code == 200, answer.text
    calls: dict[str, dict[str, int]] = answer.json()["records"]
    return calls


async def test_records_round_trip_and_are_sealed_in_sqlite_bound_to_their_id(
    service: Service, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """``/records/{id}``: the default tenant's records, bound to the tenant and the ID."""
    record = {"pan": "4111111111111111", "owner": {"name": "Zoë", "tags": [1, 2.5, None]}}
    assert (await http.put("/records/r1", json=record)).status_code == 204
    got = await http.get("/records/r1")
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("application/json")
    assert got.json() == record
    assert (await http.get("/tenants/default/records/r1")).json() == record  # the same row

    sealed = stored_blob(tmp_path, "default", "r1")
    assert sealed[:1] == b"\x02"  # an ESDK message (version 2), not the record
    assert b"4111111111111111" not in sealed
    assert inspect(sealed).encryption_context == {"tenant": "default", "record_id": "r1"}
    # The same ciphertext under another ID fails its encryption context check: a 409,
    # neither the other record's data nor a server error.
    store_blob(tmp_path, "default", "r2", sealed)
    refused = await http.get("/records/r2")
    assert refused.status_code == 409
    assert "sealed for another record" in refused.text


async def test_records_of_two_tenants_round_trip_each_under_its_own_branch_key(
    service: Service, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The same record ID in two tenants: two rows, two contexts, two branch keys (the
    service created ``tenant-<name>`` for each tenant at start-up)."""
    records = {"acme": {"pan": "4111", "n": 1}, "globex": {"pan": "5500", "n": 2}}
    for tenant, record in records.items():
        assert (await http.put(f"/tenants/{tenant}/records/r1", json=record)).status_code == 204
    for tenant, record in records.items():
        got = await http.get(f"/tenants/{tenant}/records/r1")
        assert got.status_code == 200, got.text
        assert got.json() == record
        header = inspect(stored_blob(tmp_path, tenant, "r1"))
        assert header.encryption_context == {"tenant": tenant, "record_id": "r1"}
        assert [(e.provider_id, e.provider_info) for e in header.encrypted_data_keys] == [
            ("aws-kms-hierarchy", f"tenant-{tenant}".encode())
        ]
    assert (await http.get("/records/r1")).status_code == 404  # not the default tenant's
    assert "tenant-acme (created)" in service.output()


async def test_a_record_blob_copied_to_another_row_or_tenant_is_refused_with_409(
    service: Service, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """acme's r1, copied over acme's r2, globex's r1 and the default tenant's r1: each
    is refused (409) by its context before any branch key is fetched, so globex's and
    the default tenant's keys are never fetched; the original still reads."""
    assert (await http.put("/tenants/acme/records/r1", json={"pan": "4111"})).status_code == 204
    assert (await http.put("/tenants/acme/records/r2", json={"pan": "0000"})).status_code == 204
    blob = stored_blob(tmp_path, "acme", "r1")
    for tenant, record_id in (("acme", "r2"), ("globex", "r1"), ("default", "r1")):
        store_blob(tmp_path, tenant, record_id, blob)
        got = await http.get(f"/tenants/{tenant}/records/{record_id}")
        assert got.status_code == 409, (tenant, record_id, got.text)
    assert (await http.get("/records/r1")).status_code == 409
    assert (await http.get("/tenants/acme/records/r1")).json() == {"pan": "4111"}
    assert await record_calls(http) == {
        "kms_calls": {"Decrypt": 1},
        "dynamodb_calls": {"GetItem": 1},
    }


async def test_records_cost_one_getitem_and_one_kms_decrypt_per_tenant_however_many(
    service: Service, http: httpx.AsyncClient
) -> None:
    """50 records with distinct IDs (50 contexts) per tenant, written and read: the
    tenant's branch key is fetched once (a DynamoDB GetItem and a KMS Decrypt) and
    wraps and unwraps every data key locally, where a KMS keyring would call KMS per
    record each way. ``/stats`` is the records' client's own count."""
    assert await record_calls(http) == {"kms_calls": {}, "dynamodb_calls": {}}
    for tenant in ("acme", "globex"):
        for i in range(50):
            record = {"tenant": tenant, "i": i}
            put = await http.put(f"/tenants/{tenant}/records/rec-{i}", json=record)
            assert put.status_code == 204, put.text
        for i in range(50):
            got = await http.get(f"/tenants/{tenant}/records/rec-{i}")
            assert got.json() == {"tenant": tenant, "i": i}
    assert await record_calls(http) == {
        "kms_calls": {"Decrypt": 2},
        "dynamodb_calls": {"GetItem": 2},
    }
    files = (await http.get("/stats")).json()["files"]
    assert files["dynamodb_calls"] == {}  # the files' client has no key store


async def test_an_unknown_tenant_is_404_before_any_key_lookup(
    service: Service, http: httpx.AsyncClient
) -> None:
    """A tenant not in ``--tenants`` has no branch key: refused without a GetItem."""
    assert (await http.put("/tenants/initech/records/r1", json={"a": 1})).status_code == 404
    assert (await http.get("/tenants/initech/records/r1")).status_code == 404
    assert await record_calls(http) == {"kms_calls": {}, "dynamodb_calls": {}}


def test_a_second_service_on_the_same_key_store_reads_the_first_ones_records(
    moto_kms: MotoKms, kms_key: KmsKey, bucket: str, tmp_path: Path, key_store_table: str
) -> None:
    """The FastAPI service writes, stops; the aiohttp one starts on the same SQLite file
    and key store table, finds the branch keys there (creates none) and reads the
    records: both services seal records alike, and branch keys outlive a process."""
    fastapi, aiohttp = (p.values[0] for p in EXAMPLE_SERVICES)
    assert isinstance(fastapi, Example)
    assert isinstance(aiohttp, Example)
    with running(fastapi, moto_kms, kms_key, bucket, tmp_path, key_store_table) as first:
        for tenant in ("acme", "default"):
            put = httpx.put(f"{first.url}/tenants/{tenant}/records/r1", json={"t": tenant})
            assert put.status_code == 204, put.text
    with running(aiohttp, moto_kms, kms_key, bucket, tmp_path, key_store_table) as second:
        for tenant in ("acme", "default"):
            got = httpx.get(f"{second.url}/tenants/{tenant}/records/r1")
            assert got.status_code == 200, got.text
            assert got.json() == {"t": tenant}
        assert httpx.get(f"{second.url}/records/r1").json() == {"t": "default"}
        started = second.output()
    assert "(created)" in first.output()
    assert f"key store table {key_store_table}: branch keys tenant-default, tenant-acme" in started
    assert "(created)" not in started


async def test_missing_records_and_files_are_404(service: Service, http: httpx.AsyncClient) -> None:
    assert (await http.get("/records/absent")).status_code == 404
    assert (await http.get("/files/absent")).status_code == 404


# -- files in S3 ---------------------------------------------------------------------------


async def test_a_file_round_trips_through_s3_as_an_object_the_esdk_decrypts(
    service: Service,
    http: httpx.AsyncClient,
    s3_admin: Any,
    bucket: str,
    kms_key: KmsKey,
    moto_kms: MotoKms,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = Body(12, seed=b"esdk")  # over one 8 MiB part: a multipart upload
    stored = await http.put("/files/report.bin", content=body)
    assert stored.status_code == 200, stored.text
    answer = stored.json()
    assert answer["bucket"] == bucket
    assert answer["key"] == "report.bin"
    assert answer["parts"] == 2
    assert answer["size"] > 12 * MIB
    assert_envelope_metadata(s3_admin, bucket, "report.bin", kms_key, answer["suite"])
    assert await download_sha256(http, "/files/report.bin") == body.sha256.hexdigest()

    # Any ESDK reads the object after a plain download, with the key's ARN and KMS.
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_kms.endpoint_url)
    blob = s3_admin.get_object(Bucket=bucket, Key="report.bin")["Body"].read()
    assert len(blob) == answer["size"]
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key.arn])
    plaintext, header = await anyio.to_thread.run_sync(esdk_decrypt, provider, blob)
    assert hashlib.sha256(plaintext).hexdigest() == body.sha256.hexdigest()
    assert header.user_context == {"file": "report.bin"}
    assert header.suite_id == AlgorithmSuite[answer["suite"]].suite_id


async def round_trip(http: httpx.AsyncClient, name: str, body: Body) -> dict[str, Any]:
    """``body`` up to ``/files/NAME`` and back; the upload's answer."""
    stored = await http.put(f"/files/{name}", content=body)
    assert stored.status_code == 200, stored.text
    assert await download_sha256(http, f"/files/{name}") == body.sha256.hexdigest()
    answer: dict[str, Any] = stored.json()
    return answer


@pytest.mark.skipif(not ON_LINUX, reason="reads the service's peak RSS from /proc/<pid>/status")
async def test_a_64_mib_file_streams_both_ways_at_constant_server_memory(
    service: Service, http: httpx.AsyncClient, s3_admin: Any, bucket: str, kms_key: KmsKey
) -> None:
    """Peak RSS (VmHWM) is judged against itself in the same process, not against a
    figure that depends on the allocator:

    - warm-up: a 16 MiB file up and down, a multipart upload (8 MiB parts), so every
      buffer the pipeline uses (a part and botocore's copy of it, about 16 MiB, read
      buffers, KMS and S3 clients) has been allocated once and the peak includes it;
    - control: another 16 MiB file, the same work again; how far the peak still moves
      is the allocator's own play (measured over 8 runs of each service: 0.3 to 8.3 MiB,
      glibc's per-thread arenas and its dynamic mmap threshold);
    - then 64 MiB: a server holding the body, or growing with it, would raise its peak
      by at least the 48 MiB the body outgrows the warm-up by. Constant memory raises it
      by what the allocator plays (measured: 0.1 to 8.6 MiB). The bound, the control's
      play plus 24 MiB, is half that signal and nearly 3 times the most growth seen.
      (Before, a 1 MiB warm-up left the first multipart upload's part buffers, 17 to
      23 MiB, in the figure judged against 32 MiB.)
    """
    await round_trip(http, "warm-up", Body(16, seed=b"warm-up"))
    warmed = service.peak_rss()
    await round_trip(http, "control", Body(16, seed=b"control"))
    before = service.peak_rss()
    play = before - warmed

    body = Body(64)
    answer = await round_trip(http, "x", body)
    assert (answer["bucket"], answer["key"]) == (bucket, "x")
    assert answer["parts"] > 1
    assert answer["size"] > 64 * MIB
    assert_envelope_metadata(s3_admin, bucket, "x", kms_key, answer["suite"])

    growth = service.peak_rss() - before
    print(
        f"{service.url}: VmHWM {before / MIB:.1f} MiB (control +{play / MIB:.1f} MiB) "
        f"-> +{growth / MIB:.1f} MiB for 64 MiB"
    )
    assert growth < play + 24 * MIB, (
        f"peak RSS grew by {growth / MIB:.1f} MiB for a 64 MiB body "
        f"(by {play / MIB:.1f} MiB for a second 16 MiB one)"
    )


# -- shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_shuts_the_service_down_cleanly(
    service: Service, http: httpx.AsyncClient, example: Example, sig: signal.Signals
) -> None:
    assert (await http.put("/records/r1", json={"a": 1})).status_code == 204
    assert service.stop(sig) == example.clean_exit[sig], service.output()
    output = service.output()
    assert example.shutdown_line in output
    assert "Traceback" not in output


# -- HTTP/1.0 ------------------------------------------------------------------------------


async def test_a_file_over_http10_is_sent_whole_and_a_damaged_one_is_an_error_status(
    service: Service, http: httpx.AsyncClient, s3_admin: Any, bucket: str
) -> None:
    """curl --http1.0, or nginx with its default proxy_http_version: the file comes with
    a Content-Length. Once its object is tampered with in S3, HTTP/1.0 gets a clean 422
    (before, a 200 whose body ended at the close, like a whole one), and HTTP/1.1
    a chunked body without its terminating chunk."""
    body = Body(2, seed=b"http/1.0")
    assert (await http.put("/files/doc", content=body)).status_code == 200
    port = int(service.url.rsplit(":", 1)[1])

    whole = await exchange(port, http10_get("/files/doc"))
    assert (whole.status, whole.complete) == (200, True)
    assert whole.headers["content-length"] == str(2 * MIB)
    assert hashlib.sha256(whole.body).hexdigest() == body.sha256.hexdigest()

    blob = s3_admin.get_object(Bucket=bucket, Key="doc")["Body"].read()
    s3_admin.put_object(Bucket=bucket, Key="doc", Body=damaged(blob, "tampered"))
    refused = await exchange(port, http10_get("/files/doc"))
    assert (refused.status, refused.complete, refused.framed) == (422, True, True)
    assert json.loads(refused.body) == {"error": "message_not_authentic"}
    cut = await exchange(port, http11_get("/files/doc"))
    assert (cut.status, cut.complete) == (200, False)
    assert not cut.raw.endswith(TERMINATING_CHUNK)


async def test_a_file_renamed_in_s3_is_a_clean_409_not_a_500(
    service: Service, http: httpx.AsyncClient, s3_admin: Any, bucket: str
) -> None:
    """The protection the example advertises: an object copied to another name in S3
    fails its encryption context ({"file": name}) check, and the service answers a JSON
    409 an operator can alert on, not a 500 with a traceback."""
    body = Body(1, seed=b"renamed")
    assert (await http.put("/files/original", content=body)).status_code == 200
    s3_admin.copy_object(
        Bucket=bucket, Key="renamed", CopySource={"Bucket": bucket, "Key": "original"}
    )
    refused = await http.get("/files/renamed")
    assert refused.status_code == 409
    assert refused.json() == {"error": "encryption_context_mismatch"}
    output = service.output()  # stderr is line-buffered: the line is written before the answer
    assert "GET /files/renamed answered 409 encryption_context_mismatch" in output
    assert "Traceback" not in output


# -- --metrics (FastAPI) -------------------------------------------------------------------

PROMETHEUS_AT = "prometheus metrics on "


def fastapi_example() -> Example:
    example = EXAMPLE_SERVICES[0].values[0]
    assert isinstance(example, Example)
    assert example.script == "fastapi_service.py"
    return example


def scraped(url: str) -> list[Sample]:
    """Every sample of a Prometheus scrape, parsed as Prometheus parses it."""
    answer = httpx.get(url, timeout=30)
    assert answer.status_code == 200, answer.text
    return [s for family in text_string_to_metric_families(answer.text) for s in family.samples]


def sample(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, [s for s in samples if s.name == name])
    return found[0]


def printed_json(stdout: str) -> list[dict[str, Any]]:
    """The JSON documents the OpenTelemetry console exporters printed (indented, each
    from a ``{`` line to a ``}`` line), among the service's other lines."""
    documents: list[dict[str, Any]] = []
    lines: list[str] | None = None
    for line in stdout.splitlines():
        if line == "{":
            lines = []
        if lines is not None:
            lines.append(line)
            if line == "}":
                documents.append(json.loads("\n".join(lines)))
                lines = None
    return documents


def test_the_fastapi_service_serves_kms_latency_cache_hits_and_counts_to_prometheus(
    moto_kms: MotoKms, kms_key: KmsKey, bucket: str, tmp_path: Path, key_store_table: str
) -> None:
    """``--metrics prometheus --metrics-port 0``: the service prints where its
    ``/metrics`` is, and a scrape after three records written and read has the
    key-service call histogram (in seconds: the library's bucket boundaries, not the
    SDK's millisecond ones) with the branch key's one KMS Decrypt and one DynamoDB
    GetItem, the branch-key cache's one miss and five hits, and the messages and
    plaintext bytes both ways, as ``GET /stats`` and the request bodies count them."""
    options = ("--metrics", "prometheus", "--metrics-port", "0")
    with running(
        fastapi_example(), moto_kms, kms_key, bucket, tmp_path, key_store_table, *options
    ) as service:
        (line,) = [line for line in service.stdout_lines if line.startswith(PROMETHEUS_AT)]
        metrics_url = line.removeprefix(PROMETHEUS_AT).strip()
        assert metrics_url.startswith("http://127.0.0.1:")
        records = [{"i": i, "pan": "4111"} for i in range(3)]
        for i, record in enumerate(records):
            put = httpx.put(f"{service.url}/records/r{i}", json=record)
            assert put.status_code == 204, put.text
        for i, record in enumerate(records):
            assert httpx.get(f"{service.url}/records/r{i}").json() == record
        samples = scraped(metrics_url)
        stats = httpx.get(f"{service.url}/stats").json()["records"]

    assert stats == {"kms_calls": {"Decrypt": 1}, "dynamodb_calls": {"GetItem": 1}}
    calls = "aioenvelope_key_service_call_duration_seconds"
    for service_name, operation in (("aws-kms", "Decrypt"), ("dynamodb", "GetItem")):
        labels = {"aioenvelope_key_service": service_name, "rpc_method": operation}
        assert sample(samples, f"{calls}_count", **labels, aioenvelope_outcome="ok") == 1
        assert sample(samples, f"{calls}_bucket", **labels, le="+Inf") == 1
        bounds = {
            float(s.labels["le"])
            for s in samples
            if s.name == f"{calls}_bucket" and labels.items() <= s.labels.items()
        }
        assert bounds == {*DURATION_BUCKETS, float("inf")}
    branch_keys = {"aioenvelope_cache": "branch_key"}
    lookups = "aioenvelope_cache_lookups_total"
    assert sample(samples, lookups, **branch_keys, aioenvelope_cache_result="hit") == 5
    assert sample(samples, lookups, **branch_keys, aioenvelope_cache_result="miss") == 1
    plaintext = sum(len(json.dumps(record).encode()) for record in records)
    for operation in ("encrypt", "decrypt"):
        op = {"aioenvelope_operation": operation}
        assert sample(samples, "aioenvelope_messages_total", **op) == 3
        assert sample(samples, "aioenvelope_bytes_total", **op) == plaintext


def test_the_fastapi_service_prints_request_spans_around_the_librarys_and_metrics_at_exit(
    moto_kms: MotoKms, kms_key: KmsKey, bucket: str, tmp_path: Path, key_store_table: str
) -> None:
    """``--metrics console``: each request is a trace whose root is FastAPI's span,
    named by the route; the record's ``aioenvelope.encrypt`` and the file's stream are
    in it (message spans are "when_traced": they exist because the request's span is
    current), the KMS call under the stream. At shutdown, once the clients have closed,
    the metrics are printed one last time, every message counted, FastAPI's request
    durations next to the library's metrics."""
    example = fastapi_example()
    with running(
        example, moto_kms, kms_key, bucket, tmp_path, key_store_table, "--metrics", "console"
    ) as service:
        assert httpx.put(f"{service.url}/records/r1", json={"a": 1}).status_code == 204
        assert httpx.get(f"{service.url}/records/r1").json() == {"a": 1}
        stored = httpx.put(f"{service.url}/files/notes.txt", content=b"notes " * 1000)
        assert stored.status_code == 200, stored.text
        assert httpx.get(f"{service.url}/files/notes.txt").content == b"notes " * 1000
        assert service.stop() == example.clean_exit[signal.SIGTERM], service.output()
        printed = printed_json(service.stdout_after_exit())
    assert example.shutdown_line in service.output()

    spans = [d for d in printed if "context" in d]
    by_id = {s["context"]["span_id"]: s for s in spans}

    def named(name: str) -> dict[str, Any]:
        (span,) = [s for s in spans if s["name"] == name]
        return span

    def ancestors(span: dict[str, Any]) -> list[str]:
        """Names from ``span``'s parent up to its trace's root, checked to be one trace."""
        names = []
        while span["parent_id"] is not None:
            parent = by_id[span["parent_id"]]
            assert parent["context"]["trace_id"] == span["context"]["trace_id"]
            names.append(parent["name"])
            span = parent
        return names

    assert ancestors(named("aioenvelope.encrypt"))[-1] == "PUT /records/{record_id}"
    assert ancestors(named("aioenvelope.decrypt"))[-1] == "GET /records/{record_id}"
    kms = named("aws-kms GenerateDataKey")
    assert kms["kind"] == "SpanKind.CLIENT"
    assert kms["attributes"]["aioenvelope.outcome"] == "ok"
    up = ancestors(kms)
    assert (up[0], up[-1]) == ("aioenvelope.encrypt_stream", "PUT /files/{name}")
    request = named("PUT /records/{record_id}")
    assert request["kind"] == "SpanKind.SERVER"
    assert request["attributes"]["http.response.status_code"] == 204

    exports = [d for d in printed if "resource_metrics" in d]
    assert exports, "no metrics printed"
    final = {
        metric["name"]: metric["data"]["data_points"]
        for resource in exports[-1]["resource_metrics"]
        for scope in resource["scope_metrics"]
        for metric in scope["metrics"]
    }
    assert {
        "aioenvelope.key_service.call.duration",
        "aioenvelope.cache.lookups",
        "aioenvelope.messages",
        "aioenvelope.bytes",
        "http.server.request.duration",
    } <= final.keys()
    messages = {
        p["attributes"]["aioenvelope.operation"]: p["value"] for p in final["aioenvelope.messages"]
    }
    assert messages == {"encrypt": 2, "decrypt": 2}  # a record and a file, each way


def test_the_fastapi_service_without_metrics_loads_no_opentelemetry_sdk_or_exporter(
    moto_kms: MotoKms, kms_key: KmsKey, bucket: str, tmp_path: Path, key_store_table: str
) -> None:
    """Python's import log (``PYTHONPROFILEIMPORTTIME``: every module as it is first
    imported, on stderr) of a run that seals and opens a record: aioenvelope is in it,
    and neither the library's OpenTelemetry integration, nor the SDK, nor an exporter.
    (The OpenTelemetry API is: FastAPI 0.142 and later imports it for its own support.)"""
    with running(
        fastapi_example(),
        moto_kms,
        kms_key,
        bucket,
        tmp_path,
        key_store_table,
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    ) as service:
        assert httpx.put(f"{service.url}/records/r1", json={"a": 1}).status_code == 204
        assert httpx.get(f"{service.url}/records/r1").json() == {"a": 1}
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in service.stderr_path.read_text().splitlines()
        if line.startswith("import time:")
    ]
    assert "aioenvelope.client" in imported
    unwanted = (
        "aioenvelope.integrations.opentelemetry",
        "opentelemetry.sdk",
        "opentelemetry.exporter",
        "prometheus_client",
    )
    assert [m for m in imported if m.startswith(unwanted)] == []
