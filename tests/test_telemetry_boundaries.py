"""Where telemetry's edges are: attacks from the issue 17 review, kept as tests.

Each test is a reviewer's reproduction turned round to pin the fix, through the public
API against the real servers (moto behind the fault proxy, the remote keyrings'
conformance harnesses) and read back from the OpenTelemetry SDK's in-memory exporters
(``otel_support``):

- a hierarchical keyring's branch-key fetch refused by the rate limit or an open breaker
  is a refused span of the call it spared, as any other refused call is;
- cache-hit attributes go on the library's own message or stream span, never on the
  caller's;
- time spent waiting for our own decrypt rate limit is not the key service's latency;
- bytes an ``encrypt_stream`` refused (past ``plaintext_length``) are not counted;
- clients made before and after the application sets its global meter provider report
  through one set of instruments;
- the breaker state gauge counts breakers (clients in one process add up);
- a remote keyring's refusal to unwrap is a DEBUG line, outages and refused wraps are
  WARNINGs.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
from child_process import run_child
from fake_clock import FakeClock
from fault_proxy import FaultProxy
from keyring_harness import KeyringHarness
from kms_server import REGION, KmsKey, MotoKms
from moto_keyrings import kms_via, moto_kms_keyring
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode
from otel_support import Otel, attributes_of, id_of, parent_of

from aioenvelope import (
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    RateLimit,
    RawAesKeyring,
    Telemetry,
    errors,
)

StoreFactory = Callable[..., BranchKeyStore]

CONTEXT = {"tenant": "boundaries", "purpose": "telemetry"}
PLAINTEXT = b"telemetry at its edges " * 40
THRESHOLD = 5  # CircuitBreakerConfig's default failure_threshold
DURATION = "aioenvelope.key_service.call.duration"
# A DynamoDB region of its own for the branch key store, so that DynamoDB's breaker and
# KMS's (one per region) are two breakers and each can be opened alone.
DYNAMODB_REGION = "eu-west-1"


@pytest.fixture
def otel() -> Otel:
    return Otel()


def outcomes(otel: Otel, name: str) -> list[str]:
    return [attributes_of(s)["aioenvelope.outcome"] for s in otel.spans(name)]


def durations(otel: Otel, method: str) -> list[tuple[str, int]]:
    """(outcome, recordings) of each duration point of ``method``."""
    return [
        (attrs["aioenvelope.outcome"], point.count)
        for attrs, point in otel.points(DURATION)
        if attrs["rpc.method"] == method
    ]


def by_tenant(context: Mapping[str, str]) -> str:
    return context["tenant"]


# -- a refused branch-key fetch is a refused span ------------------------------------------


async def test_a_branch_key_fetch_refused_by_the_rate_limit_is_a_refused_kms_decrypt_span(
    otel: Otel,
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    kms_key: KmsKey,
) -> None:
    """The hierarchical keyring takes a fetch's rate-limit token before its GetItem, so a
    refused fetch sends nothing at all. It must still be seen as every other refused call
    is: a span of the call the token is for (the KMS Decrypt), outcome refused, no
    attempt, under the message that was refused, and no latency point."""
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id_supplier=by_tenant)
    async with EnvelopeClient(
        keyring,
        decrypt_rate_limit=RateLimit(rate=0.001, burst=1),
        clock=FakeClock(),
        telemetry=otel.telemetry(),
    ) as client:
        with otel.tracer.start_as_current_span("request"):
            await client.encrypt(PLAINTEXT, encryption_context={"tenant": branch_keys[0]})
        with (
            pytest.raises(errors.KMSDecryptRateLimited),
            otel.tracer.start_as_current_span("request"),
        ):
            await client.encrypt(PLAINTEXT, encryption_context={"tenant": branch_keys[1]})
        assert client.stats.rate_limited == 1

    assert outcomes(otel, "aws-kms Decrypt") == ["ok", "refused"]
    assert outcomes(otel, "dynamodb GetItem") == ["ok"]  # the refused fetch read nothing
    refused = otel.spans("aws-kms Decrypt")[1]
    assert refused.kind is SpanKind.CLIENT
    assert attributes_of(refused) == {
        "aioenvelope.key_service": "aws-kms",
        "rpc.method": "Decrypt",
        "aioenvelope.key_id": kms_key.arn,
        "cloud.region": REGION,
        "aioenvelope.attempts": 0,
        "aioenvelope.outcome": "refused",
        "error.type": "RateLimited",
    }
    assert refused.status.status_code is StatusCode.ERROR
    failed_message = otel.spans("aioenvelope.encrypt")[1]
    assert parent_of(refused) == id_of(failed_message)
    assert attributes_of(failed_message)["error.type"] == "RateLimited"
    assert otel.value("aioenvelope.rate_limited") == 1
    assert durations(otel, "Decrypt") == [("ok", 1)]
    assert durations(otel, "GetItem") == [("ok", 1)]


@pytest.mark.parametrize("failing", ["kms", "dynamodb"])
async def test_a_branch_key_fetch_refused_by_an_open_breaker_is_a_refused_span_of_its_service(
    otel: Otel,
    make_branch_key_store: StoreFactory,
    fault_proxy: FaultProxy,
    kms_key: KmsKey,
    failing: str,
) -> None:
    """With DynamoDB and KMS in two regions (two breakers), five failed fetches open the
    breaker of the service that failed. The next fetch is refused before any request:
    one span of the call that breaker spared (KMS's Decrypt in the key's region, or
    DynamoDB's GetItem of the table in its region), outcome refused, error CircuitOpen,
    no attempt, and no latency point for it."""
    async with make_branch_key_store(region_name=DYNAMODB_REGION) as admin:
        await admin.create_table()
        branch_key_id = await admin.create_branch_key("tenant-elsewhere")
    store = make_branch_key_store(
        region_name=DYNAMODB_REGION, endpoint_url=fault_proxy.url, max_attempts=1, deadline=5.0
    )
    keyring = HierarchicalKeyring(store, branch_key_id=branch_key_id)
    if failing == "kms":
        fault_proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
        name, key_id, region = "aws-kms Decrypt", kms_key.arn, REGION
        service, method = "aws-kms", "Decrypt"
    else:
        fault_proxy.dynamodb_error_next(THRESHOLD, "InternalServerError", 500, operation="GetItem")
        name, key_id, region = "dynamodb GetItem", store.table_name, DYNAMODB_REGION
        service, method = "dynamodb", "GetItem"
    async with EnvelopeClient(keyring, clock=FakeClock(), telemetry=otel.telemetry()) as client:
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KeyServiceError):
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert client.stats.breaker_states[region] == "open"
        sent = dict(fault_proxy.requests())
        with pytest.raises(errors.CircuitOpenError):
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert fault_proxy.requests() == sent

    assert outcomes(otel, name) == ["error"] * THRESHOLD + ["refused"]
    refused = otel.spans(name)[-1]
    assert attributes_of(refused) == {
        "aioenvelope.key_service": service,
        "rpc.method": method,
        "aioenvelope.key_id": key_id,
        "cloud.region": region,
        "aioenvelope.attempts": 0,
        "aioenvelope.outcome": "refused",
        "error.type": "CircuitOpen",
    }
    assert refused.status.status_code is StatusCode.ERROR
    if failing == "kms":
        assert outcomes(otel, "dynamodb GetItem") == ["ok"] * THRESHOLD
    else:
        assert otel.spans("aws-kms Decrypt") == []  # no fetch got as far as KMS
    assert durations(otel, method) == [("error", THRESHOLD)]


async def test_a_fetch_refused_by_a_breaker_shared_by_both_services_names_the_one_that_failed(
    otel: Otel,
    make_branch_key_store: StoreFactory,
    fault_proxy: FaultProxy,
    kms_key: KmsKey,
) -> None:
    """The usual setup: the branch key table and the KMS key in one region, so one
    breaker stands for both. KMS's failures open it; the refused fetch is asked about
    DynamoDB first, yet its span must name KMS's Decrypt, as the error does ("KMS in
    ... failed"), not a GetItem of a table that never failed."""
    async with make_branch_key_store() as admin:
        await admin.create_table()
        branch_key_id = await admin.create_branch_key("tenant-here")
    store = make_branch_key_store(endpoint_url=fault_proxy.url, max_attempts=1, deadline=5.0)
    keyring = HierarchicalKeyring(store, branch_key_id=branch_key_id)
    fault_proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
    async with EnvelopeClient(keyring, clock=FakeClock(), telemetry=otel.telemetry()) as client:
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KMSError):
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        with pytest.raises(errors.CircuitOpenError, match=r"^KMS in"):
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    assert outcomes(otel, "aws-kms Decrypt") == ["error"] * THRESHOLD + ["refused"]
    assert outcomes(otel, "dynamodb GetItem") == ["ok"] * THRESHOLD
    refused = otel.spans("aws-kms Decrypt")[-1]
    assert attributes_of(refused)["aioenvelope.key_id"] == kms_key.arn
    assert attributes_of(refused)["error.type"] == "CircuitOpen"


# -- cache hits are written on our span, never the caller's ----------------------------------


@pytest.mark.parametrize("mode", ["never", "when_traced", "always"])
async def test_cache_lookups_never_write_on_the_callers_span(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy, mode: str
) -> None:
    """The caller's span (a web request) is the application's: a cache lookup annotates
    the library's message span when there is one, and nothing when there is none
    (``message_spans="never"``), so the request span is left as the caller made it while
    the lookups still count."""
    keyring = kms_via(fault_proxy, moto_kms, kms_key)
    async with EnvelopeClient(keyring, telemetry=otel.telemetry(message_spans=mode)) as client:
        with otel.tracer.start_as_current_span("request"):
            for _ in range(2):  # a miss then a hit, in each cache
                message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            for _ in range(2):
                await client.decrypt(message, encryption_context=CONTEXT)

    (request,) = otel.spans("request")
    assert attributes_of(request) == {}
    assert otel.value("aioenvelope.cache.lookups") == 4
    hits = {
        operation: [
            attributes_of(s)[f"aioenvelope.{operation}_cache.hit"]
            for s in otel.spans(f"aioenvelope.{operation}")
        ]
        for operation in ("encrypt", "decrypt")
    }
    expected = [] if mode == "never" else [False, True]
    assert hits == {"encrypt": expected, "decrypt": expected}


async def test_branch_key_cache_lookups_never_write_on_the_callers_span(
    otel: Otel, make_branch_key_store: StoreFactory, branch_keys: tuple[str, str]
) -> None:
    """The hierarchical keyring's branch-key cache, with message spans off: its lookups
    count, and the caller's span gets none of them."""
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    telemetry = otel.telemetry(message_spans="never")
    async with EnvelopeClient(keyring, telemetry=telemetry) as client:
        with otel.tracer.start_as_current_span("request"):
            for _ in range(2):
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    (request,) = otel.spans("request")
    assert attributes_of(request) == {}
    for result in ("hit", "miss"):
        lookup = {"aioenvelope.cache": "branch_key", "aioenvelope.cache.result": result}
        assert otel.value("aioenvelope.cache.lookups", lookup) == 1
    # The fetch's calls are the caller's span's children: key-service calls always trace.
    calls = [s for s in otel.spans() if s.kind is SpanKind.CLIENT]
    assert sorted(s.name for s in calls) == ["aws-kms Decrypt", "dynamodb GetItem"]
    assert {parent_of(s) for s in calls} == {id_of(request)}


# -- the rate limit's wait is ours, not the service's -----------------------------------------


async def test_time_waiting_for_the_decrypt_rate_limit_is_not_key_service_latency(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """``RateLimit(wait=True)``: the second Decrypt waits about a second for a token,
    then KMS answers in milliseconds. The latency histogram is the service's (an operator
    alerts on it): the wait is taken out of it and shown on the call's span instead.
    The real clock: in wait mode the bucket sleeps for real and reads the client's clock
    after, so a clock that only moves by hand would never refill it."""
    async with EnvelopeClient(moto_kms_keyring(moto_kms, kms_key.arn), cache=None) as writer:
        messages = [
            await writer.encrypt(PLAINTEXT, encryption_context={"n": str(i)}) for i in (1, 2)
        ]
    keyring = moto_kms_keyring(moto_kms, kms_key.arn, check_keys=False)
    async with EnvelopeClient(
        keyring,
        decrypt_rate_limit=RateLimit(rate=1.0, burst=1, wait=True),
        telemetry=otel.telemetry(),
    ) as client:
        for message in messages:
            assert await client.decrypt(message) == PLAINTEXT
        assert client.stats.rate_limited == 1

    first, second = otel.spans("aws-kms Decrypt")
    assert attributes_of(second)["aioenvelope.rate_limit.wait"] >= 0.5
    assert "aioenvelope.rate_limit.wait" not in attributes_of(first)  # a token was there
    assert [attributes_of(s)["aioenvelope.outcome"] for s in (first, second)] == ["ok", "ok"]
    ((attrs, point),) = [(a, p) for a, p in otel.points(DURATION) if a["rpc.method"] == "Decrypt"]
    assert attrs["aioenvelope.outcome"] == "ok"
    assert point.count == 2
    assert point.max < 0.5, point.max


# -- a refused stream counts only what it accepted ---------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "accepted"),
    [([1000, 50_000], 1000), ([1500], 0)],
    ids=["overflow-in-a-later-piece", "overflow-in-the-first-piece"],
)
async def test_an_encrypt_stream_past_its_plaintext_length_does_not_count_the_refused_bytes(
    otel: Otel, pieces: list[int], accepted: int
) -> None:
    """``plaintext_length=1000`` and a source that goes on: the piece that crosses the
    declared length is refused, never sealed, and must not be counted as encrypted
    (``stats.bytes_encrypted``, the ``aioenvelope.bytes`` counter); no message is."""

    async def source() -> AsyncIterator[bytes]:
        for size in pieces:
            yield b"p" * size

    keyring = RawAesKeyring("ns", "name", os.urandom(32))
    async with EnvelopeClient(keyring, frame_length=4096, telemetry=otel.telemetry()) as client:
        with pytest.raises(errors.ConfigurationError, match="plaintext_length"):
            await client.encrypt_stream(source(), plaintext_length=1000).read_all()
        assert client.stats.bytes_encrypted == accepted
        assert client.stats.messages_encrypted == 0
        assert otel.value("aioenvelope.bytes", {"aioenvelope.operation": "encrypt"}) == accepted
    (stream,) = otel.spans("aioenvelope.encrypt_stream")
    assert attributes_of(stream)["error.type"] == "ConfigurationError"


# -- the global providers, set after a client was made --------------------------------------------


GLOBAL_PROVIDERS_SET_LATE = """
import asyncio, json, os
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from aioenvelope import EnvelopeClient, RawAesKeyring


def encrypted(reader):
    total = 0
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "aioenvelope.messages":
                    total += sum(
                        p.value for p in metric.data.data_points
                        if p.attributes.get("aioenvelope.operation") == "encrypt"
                    )
    return total


async def main():
    early = EnvelopeClient(RawAesKeyring("ns", "early", os.urandom(32)), telemetry=True)
    async with early:
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        late = EnvelopeClient(RawAesKeyring("ns", "late", os.urandom(32)), telemetry=True)
        async with late:
            with trace.get_tracer("app").start_as_current_span("request"):
                for _ in range(3):
                    await early.encrypt(b"x")
                for _ in range(5):
                    await late.encrypt(b"x")
            print(json.dumps({
                "reported": encrypted(reader),
                "counted": early.stats.messages_encrypted + late.stats.messages_encrypted,
                "spans": sorted(s.name for s in exporter.get_finished_spans()),
            }))


asyncio.run(main())
"""


def test_clients_made_before_and_after_the_global_providers_are_set_all_report() -> None:
    """``telemetry=True`` uses OpenTelemetry's global providers, which an application
    often sets after making (or opening) a client: a module-level client, a lifespan
    order. The client made before and the one made after must report every message
    through one set of instruments (the SDK keeps the first instruments of a name and
    drops a second set's callbacks), and the early client's message spans reach the
    provider set later. A child process: OpenTelemetry sets its globals once."""
    out = run_child("global providers set late", GLOBAL_PROVIDERS_SET_LATE, cpu_budget=60)
    result = json.loads(out)
    assert result["counted"] == 8
    assert result["reported"] == 8
    assert result["spans"] == ["aioenvelope.encrypt"] * 8 + ["request"]


async def test_a_meter_provider_the_application_drops_is_not_kept_alive() -> None:
    """Instruments are made once per meter provider and shared by its clients; a test
    suite or an application that makes providers (one per tenant, per test) must get
    each back when it lets go of it, not leak one per provider for the process's life."""
    provider = MeterProvider(shutdown_on_exit=False)  # the SDK's atexit hook would keep it
    settings = Telemetry(meter_provider=provider, tracer_provider=TracerProvider())
    async with EnvelopeClient(RawAesKeyring("ns", "key", os.urandom(32)), telemetry=settings) as c:
        await c.encrypt(PLAINTEXT)
    dropped = weakref.ref(provider)
    del provider, settings, c
    gc.collect()
    assert dropped() is None


# -- the breaker gauge counts breakers -----------------------------------------------------------


async def test_the_breaker_state_gauge_counts_breakers_and_clients_in_one_region_add_up(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey, fault_proxy: FaultProxy
) -> None:
    """Two clients on one meter provider, each with its breaker for the same region: the
    gauge is a count of breakers in each state, so the region reads closed=2; once one of
    them opens, closed=1 and open=1; a closed client's breakers leave it."""
    clock = FakeClock()
    a = EnvelopeClient(moto_kms_keyring(moto_kms, kms_key.arn), telemetry=otel.telemetry())
    b = EnvelopeClient(
        kms_via(fault_proxy, moto_kms, kms_key_2, max_attempts=1),
        clock=clock,
        telemetry=otel.telemetry(),
    )

    def gauge() -> dict[str, float]:
        return {
            attrs["aioenvelope.circuit_breaker.state"]: point.value
            for attrs, point in otel.points("aioenvelope.circuit_breaker.state")
            if attrs["aioenvelope.circuit_breaker"] == REGION
        }

    async with a:
        async with b:
            await a.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            await b.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            assert gauge() == {"closed": 2, "half_open": 0, "open": 0}

            fault_proxy.fail_next(THRESHOLD, 500, operation="GenerateDataKey")
            for i in range(THRESHOLD):
                with pytest.raises(errors.KMSError):
                    await b.encrypt(PLAINTEXT, encryption_context={"n": str(i)})
            assert b.stats.breaker_states[REGION] == "open"
            assert gauge() == {"closed": 1, "half_open": 0, "open": 1}
        assert gauge() == {"closed": 1, "half_open": 0, "open": 0}


# -- log levels of remote keyrings' failures ---------------------------------------------------


REMOTE_HARNESSES = ["vault_transit_harness", "gcp_kms_harness", "azure_kv_harness"]


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The library's one line per failed key-service call."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("aioenvelope.")
        and r.name != "aioenvelope.breaker"
        and " failed: " in r.getMessage()
    ]


@pytest.fixture
def remote_harness(request: pytest.FixtureRequest) -> KeyringHarness:
    built: KeyringHarness = request.getfixturevalue(request.param)
    assert built.remote is not None
    return built


remote_harnesses = pytest.mark.parametrize(
    "remote_harness",
    REMOTE_HARNESSES,
    indirect=True,
    ids=[n.removesuffix("_harness") for n in REMOTE_HARNESSES],
)


@remote_harnesses
async def test_a_refused_unwrap_is_logged_at_debug_and_the_next_key_opens_the_message(
    remote_harness: KeyringHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """A message may carry data keys wrapped under keys this service lets us use and
    keys it does not: decrypt tries them in turn, and a refusal to unwrap one is an
    answer, not a fault. Logged at WARNING it would be a line per message; it is one
    DEBUG line (still there for whoever looks), and nothing at INFO or above."""
    keyring = remote_harness.wrapping_all(["A", "B"])
    async with EnvelopeClient(keyring, cache=None) as writer:
        message = await writer.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    caplog.set_level(logging.DEBUG, logger="aioenvelope")
    async with EnvelopeClient(remote_harness.wrapping_all(["A", "B"]), cache=None) as client:
        caplog.clear()
        assert remote_harness.remote is not None
        remote_harness.remote.refuse_next(1)
        assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        lines = failure_lines(caplog)
        assert [r.levelno for r in lines] == [logging.DEBUG], [r.getMessage() for r in lines]
        ours = [r for r in caplog.records if r.name.startswith("aioenvelope")]
        assert not [r.getMessage() for r in ours if r.levelno >= logging.INFO]


@remote_harnesses
@pytest.mark.parametrize("call", ["outage-on-unwrap", "refused-wrap", "outage-on-wrap"])
async def test_outages_and_refused_wraps_are_logged_at_warning(
    remote_harness: KeyringHarness, caplog: pytest.LogCaptureFixture, call: str
) -> None:
    """An outage is a fault whatever the call, and a refused wrap means this keyring
    cannot encrypt at all (its configuration or grants are wrong): one WARNING line
    each. Only a refused unwrap is quiet."""
    remote = remote_harness.remote
    assert remote is not None
    async with EnvelopeClient(remote_harness.keyring("A"), cache=None) as writer:
        message = await writer.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    caplog.set_level(logging.DEBUG, logger="aioenvelope")
    keyring = remote_harness.keyring("A", one_attempt=True)
    async with EnvelopeClient(keyring, cache=None) as client:
        caplog.clear()
        if call == "outage-on-unwrap":
            remote.fail_next(1)
            with pytest.raises(remote.request_error) as failed:
                await client.decrypt(message, encryption_context=CONTEXT)
        else:
            (remote.refuse_next if call == "refused-wrap" else remote.fail_next)(1)
            with pytest.raises(remote.request_error) as failed:
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert getattr(failed.value, "transient", None) is (call != "refused-wrap")
        lines = failure_lines(caplog)
        assert [r.levelno for r in lines] == [logging.WARNING], [r.getMessage() for r in lines]
