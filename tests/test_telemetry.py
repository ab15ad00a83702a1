"""OpenTelemetry traces and metrics, read back from the SDK's in-memory exporters.

KMS is the real moto server, behind the fault proxy where a test needs failures; the
spans and metric points are what an application's exporter would receive. Every
keyring's calls are covered by the conformance suite's telemetry tests
(test_keyring_conformance.py); this module pins the client side: messages, caches,
streams, the rate limit, the breaker, logging, and what is never recorded.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable

import pytest
from fake_clock import FakeClock
from fault_proxy import FaultProxy
from keyring_harness import WatchedKeyring, leaks
from kms_server import KmsKey, MotoKms
from moto_keyrings import kms_via, moto_kms_keyring
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from otel_support import Otel, attributes_of, everything_recorded, id_of, parent_of

from aioenvelope import (
    AlgorithmSuite,
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    RateLimit,
    RawAesKeyring,
    Telemetry,
    errors,
)

CONTEXT = {"tenant": "context-value-never-recorded", "purpose": "telemetry"}
PLAINTEXT = b"plaintext-never-recorded " * 40  # 1000 bytes: one frame
THRESHOLD = 5


@pytest.fixture
def otel() -> Otel:
    return Otel()


def only(spans: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(spans) == 1, f"{what}: {[s.name for s in spans]}"
    return spans[0]


# -- a cache miss, a hit ------------------------------------------------------------------


async def test_a_cache_miss_is_a_kms_span_under_the_encrypt_span_under_the_callers_span(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """The caller's span (a web request) holds the encrypt span, which holds the one KMS
    call the miss made, with the service, operation, key, region, endpoint, attempts and
    outcome; the duration histogram has the call, the cache counter the miss."""
    keyring = kms_via(fault_proxy, moto_kms, kms_key)
    async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
        with otel.tracer.start_as_current_span("request") as request:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    call = only(otel.spans("aws-kms GenerateDataKey"), "KMS spans")
    message = only(otel.spans("aioenvelope.encrypt"), "encrypt spans")
    assert call.kind is SpanKind.CLIENT
    assert parent_of(call) == id_of(message)
    assert parent_of(message) == request.get_span_context().span_id
    assert attributes_of(call) == {
        "aioenvelope.key_service": "aws-kms",
        "rpc.method": "GenerateDataKey",
        "aioenvelope.key_id": kms_key.arn,
        "cloud.region": moto_kms.region,
        "server.address": fault_proxy.url.split("://", 1)[1],
        "aioenvelope.attempts": 1,
        "aioenvelope.outcome": "ok",
    }
    assert attributes_of(message) == {
        "aioenvelope.operation": "encrypt",
        "aioenvelope.encrypt_cache.hit": False,
        "aioenvelope.suite": "0x0478",
        "aioenvelope.frames": 1,
        "aioenvelope.plaintext.bytes": len(PLAINTEXT),
        "aioenvelope.outcome": "ok",
    }
    duration = otel.points("aioenvelope.key_service.call.duration")
    assert [attrs for attrs, _ in duration] == [
        {
            "aioenvelope.key_service": "aws-kms",
            "rpc.method": "GenerateDataKey",
            "aioenvelope.outcome": "ok",
            "server.address": fault_proxy.url.split("://", 1)[1],
        }
    ]
    assert duration[0][1].count == 1
    assert duration[0][1].sum > 0
    miss = {"aioenvelope.cache": "encrypt", "aioenvelope.cache.result": "miss"}
    hit = {"aioenvelope.cache": "encrypt", "aioenvelope.cache.result": "hit"}
    assert otel.value("aioenvelope.cache.lookups", miss) == 1
    assert otel.value("aioenvelope.cache.lookups", hit) == 0
    assert otel.value("aioenvelope.messages", {"aioenvelope.operation": "encrypt"}) == 1
    assert otel.value("aioenvelope.bytes", {"aioenvelope.operation": "encrypt"}) == len(PLAINTEXT)


async def test_a_cache_hit_is_an_encrypt_span_with_no_kms_span(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    keyring = kms_via(fault_proxy, moto_kms, kms_key)
    async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
        with otel.tracer.start_as_current_span("request"):
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        otel.clear()
        with otel.tracer.start_as_current_span("request"):
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    assert [s.name for s in otel.spans()] == ["aioenvelope.encrypt", "request"]
    assert attributes_of(otel.spans("aioenvelope.encrypt")[0])["aioenvelope.encrypt_cache.hit"]
    hit = {"aioenvelope.cache": "encrypt", "aioenvelope.cache.result": "hit"}
    assert otel.value("aioenvelope.cache.lookups", hit) == 1
    assert otel.value("aioenvelope.key_service.call.duration") == 1  # the first one only


async def test_a_decrypt_miss_is_a_kms_decrypt_span_and_a_hit_is_not(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    keyring = kms_via(fault_proxy, moto_kms, kms_key)
    async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        otel.clear()
        with otel.tracer.start_as_current_span("request"):
            assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT
        with otel.tracer.start_as_current_span("request"):
            assert await client.decrypt(message, encryption_context=CONTEXT) == PLAINTEXT

    decrypts = otel.spans("aioenvelope.decrypt")
    assert [attributes_of(s)["aioenvelope.decrypt_cache.hit"] for s in decrypts] == [False, True]
    call = only(otel.spans("aws-kms Decrypt"), "KMS Decrypt spans")
    assert parent_of(call) == id_of(decrypts[0])
    assert attributes_of(decrypts[1])["aioenvelope.plaintext.bytes"] == len(PLAINTEXT)
    for result in ("hit", "miss"):
        lookup = {"aioenvelope.cache": "decrypt", "aioenvelope.cache.result": result}
        assert otel.value("aioenvelope.cache.lookups", lookup) == 1
    assert otel.value("aioenvelope.messages", {"aioenvelope.operation": "decrypt"}) == 2


# -- when a message gets a span ---------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "traced", "untraced"),
    [("when_traced", 1, 0), ("always", 1, 1), ("never", 0, 0)],
)
async def test_message_spans_follow_the_setting_and_key_service_calls_always_get_one(
    otel: Otel, mode: str, traced: int, untraced: int
) -> None:
    """Messages get spans inside a caller's span (``when_traced``), always or never;
    a call to a key service is always traced (here a miss with no caller's span: a root
    span of its own)."""
    keyring = RawAesKeyring("ns", "name", os.urandom(32))
    telemetry = otel.telemetry(message_spans=mode)
    async with EnvelopeClient(keyring, telemetry=telemetry) as client:
        with otel.tracer.start_as_current_span("request"):
            await client.encrypt(PLAINTEXT)
        assert len(otel.spans("aioenvelope.encrypt")) == traced
        otel.clear()
        await client.encrypt(PLAINTEXT)
        assert len(otel.spans("aioenvelope.encrypt")) == untraced


async def test_an_untraced_kms_call_is_a_root_span(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    async with EnvelopeClient(
        kms_via(fault_proxy, moto_kms, kms_key), telemetry=otel.telemetry()
    ) as client:
        await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    call = only(otel.spans("aws-kms GenerateDataKey"), "KMS spans")
    assert call.parent is None
    assert otel.spans("aioenvelope.encrypt") == []


# -- the rate limit, retries, the breaker ---------------------------------------------------


async def test_a_rate_limited_decrypt_is_a_refused_span_and_counted_with_no_duration(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    keyring = kms_via(fault_proxy, moto_kms, kms_key)
    async with EnvelopeClient(keyring, cache=None) as writer:
        first = await writer.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        second = await writer.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    keyring = kms_via(fault_proxy, moto_kms, kms_key)
    async with EnvelopeClient(
        keyring,
        decrypt_rate_limit=RateLimit(rate=0.001, burst=1),
        clock=FakeClock(),
        telemetry=otel.telemetry(),
    ) as client:
        with otel.tracer.start_as_current_span("request"):
            await client.decrypt(first, encryption_context=CONTEXT)
        with (
            pytest.raises(errors.KMSDecryptRateLimited),
            otel.tracer.start_as_current_span("request"),
        ):
            await client.decrypt(second, encryption_context=CONTEXT)

    calls = otel.spans("aws-kms Decrypt")
    assert [attributes_of(s)["aioenvelope.outcome"] for s in calls] == ["ok", "refused"]
    refused = attributes_of(calls[1])
    assert refused["error.type"] == "RateLimited"
    assert refused["aioenvelope.attempts"] == 0
    assert calls[1].status.status_code is StatusCode.ERROR
    failed_message = otel.spans("aioenvelope.decrypt")[1]
    assert attributes_of(failed_message)["error.type"] == "RateLimited"
    assert otel.value("aioenvelope.rate_limited") == 1
    assert otel.value("aioenvelope.key_service.call.duration") == 1  # only the one sent


async def test_retries_are_counted_as_attempts_of_one_call(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """Two throttled attempts then an answer: one span, three attempts, outcome ok.
    A deadline well past botocore's jittered backoff (up to 1 s, then up to 2 s): the
    default 2 s would cut the third attempt off in about one run in four."""
    keyring = kms_via(fault_proxy, moto_kms, kms_key, max_attempts=3, deadline=10.0)
    async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
        fault_proxy.throttle_next(2, operation="GenerateDataKey")
        await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    call = attributes_of(only(otel.spans("aws-kms GenerateDataKey"), "KMS spans"))
    assert call["aioenvelope.attempts"] == 3
    assert call["aioenvelope.outcome"] == "ok"


async def test_a_breaker_opening_is_seen_in_spans_metrics_and_one_warning_each(
    otel: Otel,
    moto_kms: MotoKms,
    kms_key: KmsKey,
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five outages: five error spans (transient, the error code, status ERROR), five
    WARNING lines naming operation and code, one transition to open at WARNING with the
    endpoint, the transition counter and the state gauge; the next call is a refused
    span with no request sent."""
    caplog.set_level(logging.WARNING, logger="aioenvelope")
    keyring = kms_via(fault_proxy, moto_kms, kms_key, max_attempts=1)
    async with EnvelopeClient(keyring, clock=FakeClock(), telemetry=otel.telemetry()) as client:
        assert otel.value("aioenvelope.circuit_breaker.state") == 0  # no breaker made yet
        fault_proxy.fail_next(THRESHOLD, 500, operation="GenerateDataKey")
        for i in range(THRESHOLD):
            with pytest.raises(errors.KMSError):
                await client.encrypt(PLAINTEXT, encryption_context={"n": str(i)})
        with pytest.raises(errors.CircuitOpenError):
            await client.encrypt(PLAINTEXT, encryption_context={"n": "after"})

        region = moto_kms.region
        state = {"aioenvelope.circuit_breaker": region}
        assert (
            otel.value(
                "aioenvelope.circuit_breaker.state",
                {**state, "aioenvelope.circuit_breaker.state": "open"},
            )
            == 1
        )
        assert (
            otel.value(
                "aioenvelope.circuit_breaker.state",
                {**state, "aioenvelope.circuit_breaker.state": "closed"},
            )
            == 0
        )
    transitions = otel.points("aioenvelope.circuit_breaker.transitions")
    assert [(attrs, p.value) for attrs, p in transitions] == [
        (
            {
                "aioenvelope.circuit_breaker": region,
                "aioenvelope.circuit_breaker.state": "open",
                "aioenvelope.key_service": "aws-kms",
            },
            1,
        )
    ]
    calls = otel.spans("aws-kms GenerateDataKey")
    assert len(calls) == THRESHOLD + 1
    for span in calls[:THRESHOLD]:
        attrs = attributes_of(span)
        assert attrs["aioenvelope.outcome"] == "error"
        assert attrs["error.type"] == "KMSInternalException"
        assert attrs["aioenvelope.error.transient"] is True
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "KMSInternalException"
    refused = attributes_of(calls[-1])
    assert refused["aioenvelope.outcome"] == "refused"
    assert refused["error.type"] == "CircuitOpen"
    assert fault_proxy.requests().get("GenerateDataKey", 0) == THRESHOLD

    failures = [r for r in caplog.records if r.name == "aioenvelope.kms"]
    assert len(failures) == THRESHOLD
    assert all(r.levelno == logging.WARNING for r in failures)
    assert all(
        r.aioenvelope_operation == "GenerateDataKey"  # type: ignore[attr-defined]
        and r.aioenvelope_error_code == "KMSInternalException"  # type: ignore[attr-defined]
        and r.aioenvelope_service == "aws-kms"  # type: ignore[attr-defined]
        for r in failures
    )
    opened = [r for r in caplog.records if r.name == "aioenvelope.breaker"]
    assert len(opened) == 1
    assert opened[0].levelno == logging.WARNING
    line = opened[0].getMessage()
    assert region in line
    assert "GenerateDataKey" in line
    assert "KMSInternalException" in line
    assert opened[0].aioenvelope_endpoint == region  # type: ignore[attr-defined]


async def test_a_breaker_closing_after_its_probe_is_a_warning_and_a_transition(
    otel: Otel,
    moto_kms: MotoKms,
    kms_key: KmsKey,
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aioenvelope.breaker")
    clock = FakeClock()
    keyring = kms_via(fault_proxy, moto_kms, kms_key, max_attempts=1)
    async with EnvelopeClient(keyring, clock=clock, telemetry=otel.telemetry()) as client:
        fault_proxy.fail_next(THRESHOLD, 500, operation="GenerateDataKey")
        for i in range(THRESHOLD):
            with pytest.raises(errors.KMSError):
                await client.encrypt(PLAINTEXT, encryption_context={"n": str(i)})
        clock.advance(30.0)
        await client.encrypt(PLAINTEXT, encryption_context={"n": "probe"})
        region = moto_kms.region
        closed = {
            "aioenvelope.circuit_breaker": region,
            "aioenvelope.circuit_breaker.state": "closed",
        }
        assert otel.value("aioenvelope.circuit_breaker.state", closed) == 1
    moves = [
        (attrs["aioenvelope.circuit_breaker.state"], p.value)
        for attrs, p in otel.points("aioenvelope.circuit_breaker.transitions")
    ]
    assert sorted(moves) == [("closed", 1), ("half_open", 1), ("open", 1)]
    lines = [r.getMessage() for r in caplog.records if r.name == "aioenvelope.breaker"]
    region = moto_kms.region
    failed = "KMS GenerateDataKey failing with KMSInternalException"
    assert lines == [
        f"circuit breaker for {region}: closed -> open ({failed})",
        f"circuit breaker for {region}: open -> half_open (probing KMS, after {failed})",
        f"circuit breaker for {region}: half_open -> closed (KMS answered the probe)",
    ]


# -- streams -------------------------------------------------------------------------------


async def test_streams_get_spans_with_frames_bytes_and_their_kms_call_as_a_child(
    otel: Otel, moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """A stream is a span from its first chunk to its end (even with no caller's span),
    with the suite, frames and plaintext bytes; its one KMS call is its child; the byte
    counters count what it sealed and released."""
    size = 300 * 1024  # 64 KiB frames: 5 frames, the last partial
    data = os.urandom(size)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, size, 10_000):
            yield data[start : start + 10_000]

    keyring = kms_via(fault_proxy, moto_kms, kms_key)
    async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
        sealed = await client.encrypt_stream(
            chunks(),
            encryption_context=CONTEXT,
        ).read_all()
        assert await client.decrypt_stream(sealed, encryption_context=CONTEXT).read_all() == data

    for operation, call in (("encrypt", "GenerateDataKey"), ("decrypt", "Decrypt")):
        stream = only(otel.spans(f"aioenvelope.{operation}_stream"), f"{operation} streams")
        # A stream of unknown length never reuses a cached data key: no lookup.
        cache = {"aioenvelope.decrypt_cache.hit": False} if operation == "decrypt" else {}
        assert attributes_of(stream) == {
            **cache,
            "aioenvelope.operation": operation,
            "aioenvelope.suite": "0x0478",
            "aioenvelope.frames": 5,
            "aioenvelope.plaintext.bytes": size,
            "aioenvelope.outcome": "ok",
        }
        kms = only(otel.spans(f"aws-kms {call}"), f"KMS {call} spans")
        assert parent_of(kms) == id_of(stream)
        assert otel.value("aioenvelope.bytes", {"aioenvelope.operation": operation}) == size
        assert otel.value("aioenvelope.messages", {"aioenvelope.operation": operation}) == 1


async def test_a_stream_cut_short_or_failing_ends_its_span_with_what_happened(
    otel: Otel,
) -> None:
    keyring = RawAesKeyring("ns", "name", os.urandom(32))
    async with EnvelopeClient(keyring, frame_length=1024, telemetry=otel.telemetry()) as client:
        sealed = await client.encrypt(os.urandom(10_000))
        stream = client.decrypt_stream(sealed)
        async with stream:
            async for _chunk in stream:
                break  # the caller stops after the first chunk
        with pytest.raises(errors.EnvelopeError):
            await client.decrypt_stream(sealed[:-100]).read_all()  # truncated

    cut, failed = otel.spans("aioenvelope.decrypt_stream")
    assert attributes_of(cut)["aioenvelope.outcome"] == "cancelled"
    assert 0 < attributes_of(cut)["aioenvelope.plaintext.bytes"] < 10_000
    assert attributes_of(failed)["aioenvelope.outcome"] == "error"
    assert attributes_of(failed)["error.type"] == "TruncatedMessageError"
    assert failed.status.status_code is StatusCode.ERROR


# -- the hierarchical keyring -------------------------------------------------------------------


async def test_a_branch_key_fetch_is_a_dynamodb_and_a_kms_span_and_then_a_cache_hit(
    otel: Otel,
    make_branch_key_store: Callable[..., BranchKeyStore],
    branch_keys: tuple[str, str],
) -> None:
    keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
        for _ in range(2):
            with otel.tracer.start_as_current_span("request"):
                await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    get = only(otel.spans("dynamodb GetItem"), "GetItem spans")
    unwrap = only(otel.spans("aws-kms Decrypt"), "KMS Decrypt spans")
    first, second = otel.spans("aioenvelope.encrypt")
    for call in (get, unwrap):
        assert parent_of(call) == id_of(first)
    assert attributes_of(get)["aioenvelope.key_service"] == "dynamodb"
    assert attributes_of(first)["aioenvelope.branch_key_cache.hit"] is False
    assert attributes_of(second)["aioenvelope.branch_key_cache.hit"] is True
    hit = {"aioenvelope.cache": "branch_key", "aioenvelope.cache.result": "hit"}
    assert otel.value("aioenvelope.cache.lookups", hit) == 1


# -- what is never recorded -------------------------------------------------------------------


async def test_no_span_metric_or_log_line_holds_key_bytes_plaintext_or_context_values(
    otel: Otel,
    moto_kms: MotoKms,
    kms_key: KmsKey,
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Everything telemetry and logging produce for misses, hits, decrypts, streams, a
    signed suite, failures and a breaker opening, with context keys recorded (opt-in):
    no data key or wrapping key in any form, no plaintext, no context value. The keys
    are there (that is the opt-in)."""
    caplog.set_level(logging.DEBUG)
    wrapping_key = os.urandom(32)
    raw = WatchedKeyring(RawAesKeyring("ns", "name", wrapping_key))
    kms = WatchedKeyring(kms_via(fault_proxy, moto_kms, kms_key, max_attempts=1))
    telemetry = otel.telemetry(record_context_keys=True, message_spans="always")
    for keyring in (raw, kms):
        async with EnvelopeClient(keyring, clock=FakeClock(), telemetry=telemetry) as client:
            for suite in (None, AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384):
                for _ in range(2):
                    message = await client.encrypt(
                        PLAINTEXT, encryption_context=CONTEXT, algorithm_suite=suite
                    )
                    await client.decrypt(message, encryption_context=CONTEXT)
            streamed = await client.encrypt_stream(PLAINTEXT, encryption_context=CONTEXT).read_all()
            await client.decrypt_stream(streamed).read_all()
            with pytest.raises(errors.EnvelopeError):
                await client.decrypt(message, encryption_context={"tenant": "wrong-value"})
        if keyring is kms:
            async with EnvelopeClient(keyring, clock=FakeClock(), telemetry=telemetry) as client:
                fault_proxy.fail_next(THRESHOLD, 500)
                for i in range(THRESHOLD):
                    with pytest.raises(errors.KMSError):
                        await client.encrypt(PLAINTEXT, encryption_context={"tenant": f"x{i}"})
                with pytest.raises(errors.CircuitOpenError):
                    await client.encrypt(PLAINTEXT, encryption_context={"tenant": "x-open"})

    secrets = {"wrapping key": wrapping_key}
    for i, data_key in enumerate(raw.data_keys + kms.data_keys):
        secrets[f"data key {i}"] = data_key
    ours = list(everything_recorded(otel))
    ours += [
        r.getMessage() + repr(r.__dict__)
        for r in caplog.records
        if r.name.startswith("aioenvelope")
    ]
    everything = ours + [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    assert len(secrets) > 4
    assert len(ours) > 50
    # No key in any record, botocore's included (its redaction stays in force).
    assert leaks(everything, secrets) == []
    assert not [t for t in everything if "plaintext-never-recorded" in t]
    # Context values: in none of ours. (botocore's DEBUG lines show the EncryptionContext
    # it sends to KMS, as CloudTrail records it: docs/observability.md says so.)
    for marker in ("context-value-never-recorded", "wrong-value"):
        assert not [t for t in ours if marker in t], marker
    keys = [
        attributes_of(s).get("aioenvelope.encryption_context.keys")
        for s in otel.spans("aioenvelope.encrypt")
    ]
    assert ("purpose", "tenant") in keys
    assert otel.spans("aws-kms GenerateDataKey")  # the KMS part did run


async def test_context_keys_are_not_recorded_unless_asked(otel: Otel) -> None:
    keyring = RawAesKeyring("ns", "name", os.urandom(32))
    async with EnvelopeClient(keyring, telemetry=otel.telemetry(message_spans="always")) as client:
        await client.decrypt(await client.encrypt(PLAINTEXT, encryption_context=CONTEXT))
    assert len(otel.spans()) == 2
    assert not [
        s for s in otel.spans() if "aioenvelope.encryption_context.keys" in attributes_of(s)
    ]


async def test_nothing_is_logged_at_info_or_above_per_message(
    moto_kms: MotoKms, kms_key: KmsKey, caplog: pytest.LogCaptureFixture, otel: Otel
) -> None:
    """Steady state (cache hits), with telemetry on and off: no log line per message."""
    caplog.set_level(logging.INFO)
    for telemetry in (False, otel.telemetry(message_spans="always")):
        keyring = moto_kms_keyring(moto_kms, kms_key.arn)
        async with EnvelopeClient(keyring, telemetry=telemetry) as client:
            message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
            await client.decrypt(message, encryption_context=CONTEXT)
            caplog.clear()
            for _ in range(50):
                message = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
                await client.decrypt(message, encryption_context=CONTEXT)
            assert [r.getMessage() for r in caplog.records] == []


# -- counters across clients, settings, the extra ---------------------------------------------


async def test_counters_keep_what_closed_clients_counted(otel: Otel) -> None:
    """Counters only grow: a closed client's counts stay in the totals, and a second
    client on the same providers adds to them."""
    for expected in (3, 6):
        keyring = RawAesKeyring("ns", "name", os.urandom(32))
        async with EnvelopeClient(keyring, telemetry=otel.telemetry()) as client:
            for _ in range(3):
                await client.encrypt(PLAINTEXT)
            assert (
                otel.value("aioenvelope.messages", {"aioenvelope.operation": "encrypt"}) == expected
            )
        assert otel.value("aioenvelope.messages", {"aioenvelope.operation": "encrypt"}) == expected


async def test_a_client_with_cache_none_and_telemetry_still_counts_messages(otel: Otel) -> None:
    keyring = RawAesKeyring("ns", "name", os.urandom(32))
    async with EnvelopeClient(keyring, cache=None, telemetry=otel.telemetry()) as client:
        await client.decrypt(await client.encrypt(PLAINTEXT))
        assert client.stats.messages_encrypted == client.stats.messages_decrypted == 1
        assert client.stats.bytes_decrypted == len(PLAINTEXT)
    assert otel.value("aioenvelope.bytes", {"aioenvelope.operation": "decrypt"}) == len(PLAINTEXT)


def test_settings_are_checked() -> None:
    with pytest.raises(errors.ConfigurationError, match="message_spans"):
        Telemetry(message_spans="sometimes")  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError, match="telemetry must be"):
        EnvelopeClient(RawAesKeyring("ns", "n", bytes(32)), telemetry="yes")  # type: ignore[arg-type]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_without_telemetry_opentelemetry_is_never_imported() -> None:
    """A client with telemetry off encrypts and decrypts without importing opentelemetry
    (installed here: the point is that nothing of ours asks for it)."""
    done = run_python(
        """
        import asyncio, os, sys
        from aioenvelope import EnvelopeClient, RawAesKeyring

        async def main():
            async with EnvelopeClient(RawAesKeyring("ns", "n", os.urandom(32))) as client:
                message = await client.encrypt(b"x" * 100, encryption_context={"a": "b"})
                assert await client.decrypt(message) == b"x" * 100
                stream = client.encrypt_stream(b"y" * 100_000)
                await client.decrypt_stream(await stream.read_all()).read_all()

        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_telemetry_without_the_otel_extra_says_what_to_install() -> None:
    done = run_python(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed
        from aioenvelope import EnvelopeClient, RawAesKeyring, errors
        try:
            EnvelopeClient(RawAesKeyring("ns", "n", bytes(32)), telemetry=True)
        except errors.ConfigurationError as exc:
            print(exc)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'aioenvelope[otel]'" in done.stdout


async def test_telemetry_true_uses_the_global_providers() -> None:
    """``telemetry=True`` with no provider set globally: OpenTelemetry's no-op (nothing
    recorded, nothing fails); run in a child so the global providers stay unset here."""
    done = run_python(
        """
        import asyncio, os
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from aioenvelope import EnvelopeClient, RawAesKeyring, Telemetry

        async def run():
            keyring = RawAesKeyring("ns", "n", os.urandom(32))
            telemetry = Telemetry(message_spans="always")
            async with EnvelopeClient(keyring, telemetry=telemetry) as client:
                await client.decrypt(await client.encrypt(b"x"))

        asyncio.run(run())  # no provider yet: the no-op
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        asyncio.run(run())
        print(sorted(s.name for s in exporter.get_finished_spans()))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['aioenvelope.decrypt', 'aioenvelope.encrypt']"


async def test_re_encryption_counts_the_old_message_decrypted_and_the_new_one_encrypted(
    otel: Otel,
) -> None:
    """One-shot and streamed re-encryption alike: one message decrypted and one
    encrypted each, their plaintext bytes on both sides."""
    old_keyring = RawAesKeyring("ns", "old", os.urandom(32))
    new_keyring = RawAesKeyring("ns", "new", os.urandom(32))
    async with EnvelopeClient(old_keyring, telemetry=otel.telemetry()) as client:
        message = await client.encrypt(PLAINTEXT)
        await client.reencrypt(message, to_keyring=new_keyring)
        await client.reencrypt_stream(message, to_keyring=new_keyring).read_all()
        stats = client.stats
    assert (stats.messages_encrypted, stats.messages_decrypted) == (3, 2)
    assert (stats.bytes_encrypted, stats.bytes_decrypted) == (
        3 * len(PLAINTEXT),
        2 * len(PLAINTEXT),
    )
    assert otel.value("aioenvelope.messages", {"aioenvelope.operation": "encrypt"}) == 3
    assert otel.value("aioenvelope.bytes", {"aioenvelope.operation": "decrypt"}) == 2 * len(
        PLAINTEXT
    )
