"""What telemetry costs a message: 1 KiB with telemetry on against the same client off.

Issue 17's targets, as on/off throughput ratios timed in the same interleaved rounds
(the reference is an identical client with ``telemetry`` off):

- ``Telemetry()`` with no provider configured: OpenTelemetry's proxy providers, i.e.
  its no-op (nothing in the bench sets the global providers: checked before the first
  case and again when the bench closes). Target: >= 0.9x (under 10% slower).
- The SDK (``TracerProvider`` with a ``SimpleSpanProcessor`` into an
  ``InMemorySpanExporter``, ``MeterProvider`` with an ``InMemoryMetricReader``) under the
  default ``message_spans="when_traced"``: a loop with no span of its own gets no
  message span; key-service calls are still traced. Target: >= 0.75x (under 25% slower).
- Informational, no target: the SDK with ``message_spans="always"`` (a root span per
  message), and the SDK inside a caller's span (one parent span around each timed batch,
  each message its child): what a span per message costs.

Two keyrings: ``RawAesKeyring`` with no cache (each message makes and wraps its own data
key, as in ``oneshot``'s 1 KiB case) and ``KmsKeyring`` with warm caches against the
embedded KMS (as in ``kms_cache``: after the warm-up no KMS call, so no key-service span).

Every SDK subject has its own providers and exporter. The spans it exported while timed
are counted (printed above the table) and the exporter cleared after each batch, inside
the timing: a batch pays for dropping its own spans, as it would behind a real exporter.
The metric reader is never collected while timed: the library reads its counters at
collection, so a message costs no metric call (collected once, to check the counts).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from aioenvelope import (
    AlgorithmSuite,
    CacheConfig,
    EnvelopeClient,
    Keyring,
    KmsKeyring,
    RawAesKeyring,
    Telemetry,
)
from aioenvelope.errors import ConfigurationError
from aioenvelope.testing import embedded_aws

from .common import KIB, BenchError, Case, Reference, Runner, Settings, Subject, check

__all__ = ["collect"]

FRAME_LENGTH = 64 * KIB
CONTEXT: Mapping[str, str] = {"purpose": "bench"}
NAMESPACE, KEY_NAME = "bench", "aes-256"
SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY  # the library's default
CACHE = CacheConfig()  # the KMS cases' caches: the defaults, as in kms_cache
NOOP_TARGET = 0.9  # issue 17: under 10% slower with a no-op provider
SDK_TARGET = 0.75  # issue 17: under 25% slower with the SDK and an in-memory exporter
# Round trips after the cold one: a warm KMS client may not call KMS during them.
WARM_CHECKS = 3
MESSAGE_SPANS = frozenset({"aioenvelope.encrypt", "aioenvelope.decrypt"})
CALLER_SPAN = "bench batch"
# Environment variables that make OpenTelemetry load global providers on first use.
PROVIDER_VARIABLES = ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")

OFF_LABEL = "telemetry off"


@dataclass(frozen=True)
class Variant:
    """One way of turning telemetry on, timed against the same client with it off."""

    label: str
    target: float | None  # None: informational
    sdk: bool  # the SDK's providers; False: none given (the global no-op)
    message_spans: Literal["when_traced", "always"] = "when_traced"
    caller_span: bool = False  # each timed batch inside one span of the caller's

    @property
    def spans_per_message(self) -> int:
        """Message spans each message exports: none in a loop with no span of its own."""
        return 1 if self.message_spans == "always" or self.caller_span else 0


VARIANTS = (
    Variant("Telemetry(), no provider (no-op)", NOOP_TARGET, sdk=False),
    Variant("SDK, when_traced: no message span", SDK_TARGET, sdk=True),
    Variant("SDK, 'always': a root span per message", None, sdk=True, message_spans="always"),
    Variant("SDK, caller's span: a child per message", None, sdk=True, caller_span=True),
)


# -- the SDK, and the global providers that must stay unset ---------------------------


class Sdk:
    """The OpenTelemetry SDK with in-memory exporters, one set per subject."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("bench")

    def telemetry(self, variant: Variant) -> Telemetry:
        return Telemetry(
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            message_spans=variant.message_spans,
        )

    def take_spans(self) -> tuple[ReadableSpan, ...]:
        """The spans finished since the last call; the exporter is emptied."""
        spans = self.exporter.get_finished_spans()
        self.exporter.clear()
        return spans

    def metric_sum(self, name: str) -> float:
        """The sum of ``name``'s data points now (collects the reader)."""
        total = 0.0
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        total += sum(getattr(p, "value", 0) for p in metric.data.data_points)
        return total

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _check_no_global_providers(when: str) -> None:
    """``Telemetry()`` must time OpenTelemetry's no-op: the global providers unset.

    Unset, the API hands out its proxy providers (which forward to no-op until one is
    set). The environment variables checked first would make it load providers instead.
    """
    for name in PROVIDER_VARIABLES:
        check(name not in os.environ, f"{when}: {name} is set; the no-op case would not be")
    tracer_provider = trace.get_tracer_provider()
    check(
        isinstance(tracer_provider, trace.ProxyTracerProvider),
        f"{when}: a global tracer provider is set ({type(tracer_provider).__name__})",
    )
    meter_provider = metrics.get_meter_provider()
    # The API's proxy meter provider has no public class to test against.
    check(
        type(meter_provider).__name__ == "_ProxyMeterProvider",
        f"{when}: a global meter provider is set ({type(meter_provider).__name__})",
    )


# -- subjects -------------------------------------------------------------------------


@dataclass
class SpanTally:
    """What one subject exported and called while timed (calibration included)."""

    label: str
    messages: int = 0
    message_spans: int = 0
    key_service_spans: int = 0
    kms_calls: int = 0

    def add(self, spans: Iterable[ReadableSpan]) -> None:
        for span in spans:
            self.message_spans += span.name in MESSAGE_SPANS
            self.key_service_spans += span.kind is SpanKind.CLIENT


@dataclass
class Side:
    """One client of a case: telemetry off (the reference) or one variant."""

    label: str
    client: EnvelopeClient
    keyring: Keyring
    sdk: Sdk | None = None
    variant: Variant | None = None
    tallies: dict[str, SpanTally] = field(default_factory=dict)  # by case

    @property
    def caller_span(self) -> bool:
        return self.variant is not None and self.variant.caller_span

    def kms_calls(self) -> int:
        keyring = self.keyring
        return sum(keyring.kms_calls.values()) if isinstance(keyring, KmsKeyring) else 0

    def runner(self, what: str, op: Callable[[], Awaitable[bytes]]) -> Runner:
        """``op`` n times, in a caller's span if the variant says so; tallied."""
        tally = self.tallies.setdefault(what, SpanTally(self.label))
        sdk, caller_span = self.sdk, self.caller_span

        async def run(n: int) -> None:
            before = self.kms_calls()
            if sdk is not None and caller_span:
                with sdk.tracer.start_as_current_span(CALLER_SPAN):
                    for _ in range(n):
                        await op()
            else:
                for _ in range(n):
                    await op()
            tally.messages += n
            tally.kms_calls += self.kms_calls() - before
            if sdk is not None:
                tally.add(sdk.take_spans())

        return run


async def _open_side(
    stack: AsyncExitStack,
    keyring: Keyring,
    variant: Variant | None,
    cache: CacheConfig | None,
) -> Side:
    sdk: Sdk | None = None
    telemetry: bool | Telemetry = False
    if variant is not None:
        if variant.sdk:
            sdk = Sdk()
            stack.callback(sdk.shutdown)  # after the client closes (the stack unwinds)
            telemetry = sdk.telemetry(variant)
        else:
            telemetry = Telemetry()
    client = await stack.enter_async_context(
        EnvelopeClient(keyring, cache=cache, frame_length=FRAME_LENGTH, telemetry=telemetry)
    )
    check(client.algorithm_suite is SUITE, f"the default suite is {client.algorithm_suite}")
    label = OFF_LABEL if variant is None else variant.label
    return Side(label, client, keyring, sdk, variant)


# -- verification: what is timed is what the label says --------------------------------


async def _round_trip(side: Side, off: Side, data: bytes, blob: bytes) -> None:
    """``side`` encrypts what the reference decrypts, and decrypts the reference's blob."""
    ours = await side.client.encrypt(data, encryption_context=CONTEXT)
    check(
        await off.client.decrypt(ours, encryption_context=CONTEXT) == data,
        f"{side.label}: its message did not decrypt with telemetry off",
    )
    check(
        await side.client.decrypt(blob, encryption_context=CONTEXT) == data,
        f"{side.label}: the reference's message did not decrypt",
    )


async def _verify(side: Side, off: Side, data: bytes, blob: bytes, remote: bool) -> None:
    """Warm ``side`` up and check its telemetry: the spans each message exports, the
    key-service spans (only while cold, only for a remote keyring), no KMS call once
    warm, and the message counter the metric reader collects."""
    await _round_trip(side, off, data, blob)  # cold: the KMS keyring calls KMS here
    sdk, variant = side.sdk, side.variant
    cold = sdk.take_spans() if sdk is not None else ()
    if sdk is not None and remote:
        check(
            any(s.kind is SpanKind.CLIENT for s in cold),
            f"{side.label}: the cold round trip's KMS calls exported no span",
        )
    calls = side.kms_calls()
    callers: set[int] = set()  # span ids of the caller's spans
    for _ in range(WARM_CHECKS):
        if sdk is not None and side.caller_span:
            with sdk.tracer.start_as_current_span(CALLER_SPAN) as caller:
                callers.add(caller.get_span_context().span_id)
                await _round_trip(side, off, data, blob)
        else:
            await _round_trip(side, off, data, blob)
    check(side.kms_calls() == calls, f"{side.label}: {side.kms_calls() - calls} warm KMS calls")
    if sdk is None or variant is None:
        return
    warm = sdk.take_spans()
    message_spans = [s for s in warm if s.name in MESSAGE_SPANS]
    expected = variant.spans_per_message * 2 * WARM_CHECKS
    check(
        len(message_spans) == expected,
        f"{side.label}: {len(message_spans)} message spans in {2 * WARM_CHECKS} warm "
        f"messages, expected {expected}",
    )
    check(
        not any(s.kind is SpanKind.CLIENT for s in warm),
        f"{side.label}: key-service spans with warm caches",
    )
    if side.caller_span:
        check(
            all(s.parent is not None and s.parent.span_id in callers for s in message_spans),
            f"{side.label}: message spans are not children of the caller's spans",
        )
    counted = sdk.metric_sum("aioenvelope.messages")
    check(
        counted == 2 * (1 + WARM_CHECKS),
        f"{side.label}: aioenvelope.messages is {counted}, not {2 * (1 + WARM_CHECKS)}",
    )


# -- cases ----------------------------------------------------------------------------


async def _cases(
    stack: AsyncExitStack,
    group: str,
    make_keyring: Callable[[], Keyring],
    cache: CacheConfig | None,
    remote: bool,
) -> tuple[list[Case], list[Side]]:
    """For each op and variant: a case timing the variant against telemetry off."""
    off = await _open_side(stack, make_keyring(), None, cache)
    sides = [await _open_side(stack, make_keyring(), v, cache) for v in VARIANTS]
    data = os.urandom(KIB)
    blob = await off.client.encrypt(data, encryption_context=CONTEXT)
    await _verify(off, off, data, blob, remote)
    for side in sides:
        await _verify(side, off, data, blob, remote)

    def encrypt(side: Side) -> Runner:
        op = partial(side.client.encrypt, data, encryption_context=CONTEXT)
        return side.runner(f"{group} encrypt", op)

    def decrypt(side: Side) -> Runner:
        op = partial(side.client.decrypt, blob, encryption_context=CONTEXT)
        return side.runner(f"{group} decrypt", op)

    cases: list[Case] = []
    for name, runner in (("encrypt", encrypt), ("decrypt", decrypt)):
        for side in sides:
            assert side.variant is not None
            ours = Subject(side.label, runner(side))
            reference = Reference(OFF_LABEL, runner(off), target=side.variant.target)
            cases.append(Case(group, name, "msg/s", 1, ours, (reference,)))
    return cases, [off, *sides]


def _report(sides: list[Side]) -> None:
    """Per case: KMS calls and the message spans each subject exported while timed
    (calibration included). Then checks that the global providers are still unset."""
    lines = []
    for what in dict.fromkeys(what for side in sides for what in side.tallies):
        tallies = [(side, side.tallies[what]) for side in sides if what in side.tallies]
        if not any(t.messages for _, t in tallies):
            continue
        calls = ", ".join(f"{t.label} {t.kms_calls}" for _, t in tallies if t.kms_calls)
        key_spans = sum(t.key_service_spans for _, t in tallies)
        per_message = ", ".join(
            f"{side.variant.label.split(':')[0]} {t.message_spans / t.messages:.2f}"
            for side, t in tallies
            if side.sdk is not None and side.variant is not None and t.messages
        )
        lines.append(
            f"  {what}: KMS calls: {calls or 'none'}; {key_spans} key-service spans; "
            f"message spans per message: {per_message}"
        )
    if lines:
        print("Telemetry while timed (calibration included; exporters emptied after each batch):")
        print("\n".join(lines))
        print(
            "  'always' and caller's span are informational: they pay for one span per "
            "message, which message_spans='when_traced' spares a loop with no span of its "
            f"own.\n  A cached data key encrypts up to {CACHE.max_messages:,} messages: the "
            "reference client, timed in every KMS case, may renew one in a full run.",
            flush=True,
        )
    _check_no_global_providers("after the bench")


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Open every client (raw AES, then KMS), verify and warm them; cases to time."""
    del settings  # the same cases in quick and full runs: only the timing is shorter
    _check_no_global_providers("before the telemetry cases")
    key = os.urandom(32)
    raw_cases, raw_sides = await _cases(
        stack,
        f"telemetry 1 KiB 0x{SUITE.suite_id:04X} raw AES, no cache",
        lambda: RawAesKeyring(NAMESPACE, KEY_NAME, key),
        None,
        remote=False,
    )
    try:
        kms = stack.enter_context(embedded_aws())
    except ConfigurationError as exc:
        raise BenchError(f"{exc} (the telemetry benchmark needs moto[server])") from exc
    key_arn = await kms.create_kms_key("bench-telemetry")

    def kms_keyring() -> Keyring:
        return KmsKeyring(
            key_arn, session=kms.session(), region_name=kms.region, endpoint_url=kms.endpoint_url
        )

    kms_cases, kms_sides = await _cases(
        stack,
        f"telemetry 1 KiB 0x{SUITE.suite_id:04X} KMS, warm caches",
        kms_keyring,
        CACHE,
        remote=True,
    )
    stack.callback(_report, [*raw_sides, *kms_sides])
    return [*raw_cases, *kms_cases]
