"""OpenTelemetry traces and metrics for an :class:`~aioenvelope.EnvelopeClient`.

Imported only when a client is made with ``telemetry=True`` (or a
:class:`~aioenvelope.Telemetry`); needs ``opentelemetry-api`` (the ``[otel]`` extra).
The application brings the SDK and its exporters; with none configured every call here
goes to OpenTelemetry's no-op.

What is recorded (docs/observability.md lists every name):

- a span per remote key-service call (CLIENT kind), per stream, and per one-shot message
  under :attr:`Telemetry.message_spans`;
- a histogram of key-service call durations, recorded per call;
- counters read from the client's own counters (:class:`~aioenvelope.ClientStats`) when
  the metric reader collects, so a message costs no metric call at all: cache lookups,
  coalesced waits, rate-limited requests, messages and plaintext bytes;
- breaker transitions as they happen, and each breaker's state as an up-down counter.

Never recorded: key material, plaintext, encryption-context values, error messages
(their ``error.type`` code is); context keys only with ``record_context_keys=True``.
"""

from __future__ import annotations

import collections
import contextvars
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..breaker import CLOSED, HALF_OPEN, OPEN
from ..errors import CircuitOpenError, KeyServiceError, KMSDecryptRateLimited
from ..stats import StatsRecorder
from ..telemetry import CallWatch, MessageWatch, Observer, Telemetry

__all__ = ["SCOPE", "OpenTelemetryObserver"]

SCOPE = "aioenvelope"
"""The instrumentation scope (tracer and meter name)."""

# Seconds; OpenTelemetry's advisory boundaries for durations in seconds (its default
# boundaries are for milliseconds and would put every KMS call in the first bucket).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# Counted from StatsRecorder fields: (metric, field, attributes).
_COUNTED: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    *(
        (
            "aioenvelope.cache.lookups",
            f"{cache}_cache_{field}",
            (("aioenvelope.cache", cache), ("aioenvelope.cache.result", result)),
        )
        for cache in ("encrypt", "decrypt", "branch_key")
        for field, result in (("hits", "hit"), ("misses", "miss"))
    ),
    ("aioenvelope.coalesced_waits", "coalesced_waits", ()),
    ("aioenvelope.rate_limited", "rate_limited", ()),
    ("aioenvelope.messages", "messages_encrypted", (("aioenvelope.operation", "encrypt"),)),
    ("aioenvelope.messages", "messages_decrypted", (("aioenvelope.operation", "decrypt"),)),
    ("aioenvelope.bytes", "bytes_encrypted", (("aioenvelope.operation", "encrypt"),)),
    ("aioenvelope.bytes", "bytes_decrypted", (("aioenvelope.operation", "decrypt"),)),
)

_COUNTERS: dict[str, tuple[str, str]] = {
    "aioenvelope.cache.lookups": (
        "{lookup}",
        "Per-message lookups of the data-key and branch-key caches, by cache and result",
    ),
    "aioenvelope.coalesced_waits": (
        "{wait}",
        "Cache misses that waited for a key-service call already in flight",
    ),
    "aioenvelope.rate_limited": (
        "{request}",
        "Remote unwrap requests the decrypt rate limit refused or made wait",
    ),
    "aioenvelope.messages": ("{message}", "Messages encrypted or decrypted"),
    "aioenvelope.bytes": ("By", "Plaintext bytes encrypted or decrypted"),
}

_STATES = (CLOSED, OPEN, HALF_OPEN)


class _Totals:
    """The counters of every client on one meter provider: live clients' counts are
    read at collection, a closed client's final counts kept, so each counter only grows
    (a client dropped without closing loses at most what it counted since the last
    collection)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # collection may run on an exporter's thread
        self._live: weakref.WeakKeyDictionary[StatsRecorder, dict[str, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._totals: collections.Counter[tuple[str, tuple[tuple[str, str], ...]]] = (
            collections.Counter()
        )

    def attach(self, stats: StatsRecorder) -> None:
        with self._lock:
            self._live.setdefault(stats, {})

    def detach(self, stats: StatsRecorder) -> None:
        with self._lock:
            self._fold(stats)
            self._live.pop(stats, None)

    def _fold(self, stats: StatsRecorder) -> None:
        seen = self._live.get(stats)
        if seen is None:
            return
        for metric, field, attributes in _COUNTED:
            value = getattr(stats, field)
            self._totals[metric, attributes] += value - seen.get(field, 0)
            seen[field] = value

    def observe(self, metric: str) -> Iterator[Observation]:
        with self._lock:
            for stats in list(self._live):
                self._fold(stats)
            for (name, attributes), value in self._totals.items():
                if name == metric:
                    yield Observation(value, dict(attributes))
            # Every attribute set is reported from the start, zeros included, so a
            # dashboard's "misses / lookups" has both series before the first miss.
            for name, _field, attributes in _COUNTED:
                if name == metric and (name, attributes) not in self._totals:
                    yield Observation(0, dict(attributes))

    def breaker_states(self) -> Iterator[Observation]:
        with self._lock:
            counts: collections.Counter[tuple[str, str]] = collections.Counter()
            names: set[str] = set()
            for stats in list(self._live):
                for name, state in list(stats.breaker_states.items()):
                    names.add(name)
                    counts[name, state] += 1
        for name in sorted(names):
            for state in _STATES:
                yield Observation(
                    counts[name, state],
                    {
                        "aioenvelope.circuit_breaker": name,
                        "aioenvelope.circuit_breaker.state": state,
                    },
                )


class _Instruments:
    """One set of instruments per meter provider, shared by its clients (OpenTelemetry
    keeps the first instrument of a name; a second client's callbacks would be lost)."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.totals = _Totals()
        self.call_duration = meter.create_histogram(
            "aioenvelope.key_service.call.duration",
            unit="s",
            description="Duration of remote key-service calls (retries included), by "
            "service, operation and outcome",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.transitions = meter.create_counter(
            "aioenvelope.circuit_breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes, by breaker and new state",
        )
        for name, (unit, description) in _COUNTERS.items():
            meter.create_observable_counter(
                name, callbacks=[self._callback(name)], unit=unit, description=description
            )
        meter.create_observable_up_down_counter(
            "aioenvelope.circuit_breaker.state",
            callbacks=[lambda _options: self.totals.breaker_states()],
            unit="{breaker}",
            description="Number of circuit breakers in each state, by breaker (endpoint) "
            "and state; every state is reported, 0 included. Clients in one process with "
            "a breaker for the same endpoint add up",
        )

    def _callback(self, name: str) -> Any:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return list(self.totals.observe(name))

        return observe


# Instruments per meter provider, dropped with it (a test suite or an application that
# makes providers must not keep every one alive). The global provider has one set,
# keyed apart: before the application sets it, OpenTelemetry hands out a proxy that
# forwards to the real one once set, so a client made before and one made after must
# share instruments (the real meter keeps the first instruments of a name and ignores a
# second set's callbacks).
_INSTRUMENTS: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
# A provider that cannot be weakly referenced (``__slots__``) is kept, with its instruments.
_PINNED_INSTRUMENTS: dict[int, tuple[Any, _Instruments]] = {}
_GLOBAL_INSTRUMENTS: list[_Instruments] = []
_INSTRUMENTS_LOCK = threading.Lock()


def _instruments_for(provider: Any) -> _Instruments:
    """The instruments for ``provider`` (``None``: OpenTelemetry's global provider)."""
    with _INSTRUMENTS_LOCK:
        if provider is None:
            if not _GLOBAL_INSTRUMENTS:
                _GLOBAL_INSTRUMENTS.append(_Instruments(metrics.get_meter(SCOPE, _version())))
            return _GLOBAL_INSTRUMENTS[0]
        try:
            known = _INSTRUMENTS.get(provider)
        except TypeError:
            pinned = _PINNED_INSTRUMENTS.get(id(provider))
            if pinned is None:
                pinned = (provider, _Instruments(provider.get_meter(SCOPE, _version())))
                _PINNED_INSTRUMENTS[id(provider)] = pinned
            return pinned[1]
        if known is None:
            known = _INSTRUMENTS[provider] = _Instruments(provider.get_meter(SCOPE, _version()))
        return known


def _version() -> str:
    from .. import __version__

    return __version__


class _CallWatch(CallWatch):
    __slots__ = ("_attributes", "_observer", "_span", "_started", "_token_otel")

    def __init__(
        self,
        observer: OpenTelemetryObserver,
        span: Span,
        attributes: dict[str, str],
        endpoint: str | None,
    ) -> None:
        super().__init__(endpoint)
        self._observer = observer
        self._span = span
        self._attributes = attributes
        self._started = 0.0
        self._token_otel: object = None

    def __enter__(self) -> _CallWatch:
        super().__enter__()
        self._token_otel = otel_context.attach(trace.set_span_in_context(self._span))
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = time.perf_counter() - self._started
        super().__exit__(exc_type, exc, tb)
        otel_context.detach(self._token_otel)  # type: ignore[arg-type]
        self.finish(exc, elapsed)

    def finish(self, exc: BaseException | None, elapsed: float) -> None:
        """End the span; record the duration of a call that sent something, less the
        time it waited for our own rate limit."""
        span, attributes = self._span, self._attributes
        outcome, error_type = _outcome(exc)
        if self.endpoint:
            attributes["server.address"] = self.endpoint
        if span.is_recording():
            recorded: dict[str, Any] = {
                "aioenvelope.attempts": self.attempts,
                "aioenvelope.outcome": outcome,
            }
            if "server.address" in attributes:
                recorded["server.address"] = attributes["server.address"]
            if self.local_wait > 0:
                recorded["aioenvelope.rate_limit.wait"] = self.local_wait
            if error_type is not None:
                recorded["error.type"] = error_type
                if isinstance(exc, KeyServiceError):
                    recorded["aioenvelope.error.transient"] = exc.transient
                span.set_status(Status(StatusCode.ERROR, error_type))
            span.set_attributes(recorded)
        span.end()
        # Refused (breaker, rate limit) or failed before sending (no credentials): the
        # service was not called, and its latency histogram says nothing of it.
        if outcome in ("ok", "error") and self.attempts > 0:
            metric = {
                "aioenvelope.key_service": attributes["aioenvelope.key_service"],
                "rpc.method": attributes["rpc.method"],
                "aioenvelope.outcome": outcome,
            }
            if error_type is not None:
                metric["error.type"] = error_type
            if "server.address" in attributes:
                metric["server.address"] = attributes["server.address"]
            self._observer.instruments.call_duration.record(
                max(elapsed - self.local_wait, 0.0), metric
            )


_ERROR_TYPE_CHARS = 64  # a service's error code, clipped: an attribute and a metric label


def _outcome(exc: BaseException | None) -> tuple[str, str | None]:
    """(outcome, error.type) of a call that ended with ``exc``: the key service's error
    code for a :class:`~aioenvelope.errors.KeyServiceError`, else the class name."""
    if exc is None:
        return "ok", None
    if isinstance(exc, CircuitOpenError):
        return "refused", "CircuitOpen"
    if isinstance(exc, KMSDecryptRateLimited):
        return "refused", "RateLimited"
    if isinstance(exc, KeyServiceError):
        return "error", (exc.error_code or type(exc).__name__)[:_ERROR_TYPE_CHARS]
    if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)) or _is_cancel(exc):
        return "cancelled", type(exc).__name__
    return "error", type(exc).__name__


def _is_cancel(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError)


# The span of the message or stream being worked on, when it has one: what a cache
# lookup annotates (never a caller's span, which is not ours to write on).
_MESSAGE_SPAN: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
    "aioenvelope_message_span", default=None
)


class _Current:
    """Makes a message's span the current span and the one cache lookups annotate."""

    __slots__ = ("_span", "_token", "_use")

    def __init__(self, span: Span) -> None:
        self._span = span
        # Not OpenTelemetry's status on exception: it writes the exception's message,
        # and finish() says what failed by its type alone.
        self._use = trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        )
        self._token: contextvars.Token[Span | None] | None = None

    def __enter__(self) -> Span:
        self._token = _MESSAGE_SPAN.set(self._span)
        return self._use.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._use.__exit__(exc_type, exc, tb)
        finally:
            if self._token is not None:
                _MESSAGE_SPAN.reset(self._token)
                self._token = None


class _MessageWatch(MessageWatch):
    __slots__ = ("_record_keys", "_span")

    def __init__(self, span: Span, record_keys: bool) -> None:
        self._span = span
        self._record_keys = record_keys

    def current(self) -> AbstractContextManager[object]:
        return _Current(self._span)

    def finish(
        self,
        *,
        suite_id: int | None,
        frames: int,
        plaintext_bytes: int,
        error: BaseException | None,
        context: Mapping[str, str] | None = None,
    ) -> None:
        span = self._span
        if self._record_keys and context:
            _set_context_keys(span, context)
        recorded: dict[str, Any] = {
            "aioenvelope.frames": frames,
            "aioenvelope.plaintext.bytes": plaintext_bytes,
            "aioenvelope.outcome": "ok",
        }
        if suite_id is not None:
            recorded["aioenvelope.suite"] = f"0x{suite_id:04X}"
        if error is not None:
            outcome, error_type = _outcome(error)
            recorded["aioenvelope.outcome"] = outcome
            recorded["error.type"] = error_type or type(error).__name__
            if outcome != "cancelled":
                span.set_status(Status(StatusCode.ERROR, error_type))
        span.set_attributes(recorded)
        span.end()


class OpenTelemetryObserver(Observer):
    """Spans and metrics for one client (see the module docstring)."""

    def __init__(self, settings: Telemetry) -> None:
        self.settings = settings
        if settings.tracer_provider is None:
            self.tracer = trace.get_tracer(SCOPE, _version())  # proxies a later global
        else:
            self.tracer = settings.tracer_provider.get_tracer(SCOPE, _version())
        self.instruments = _instruments_for(settings.meter_provider)
        self._message_spans = settings.message_spans

    # -- key-service calls ------------------------------------------------------------

    def call(
        self,
        service: str,
        operation: str,
        *,
        key_id: str,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> CallWatch:
        attributes = {
            "aioenvelope.key_service": service,
            "rpc.method": operation,
            "aioenvelope.key_id": key_id,
        }
        if region:
            attributes["cloud.region"] = region
        span = self.tracer.start_span(
            f"{service} {operation}", kind=SpanKind.CLIENT, attributes=attributes
        )
        return _CallWatch(self, span, attributes, endpoint)

    def refused(
        self,
        service: str,
        operation: str,
        *,
        key_id: str,
        region: str | None,
        error: BaseException,
    ) -> None:
        watch = self.call(service, operation, key_id=key_id, region=region)
        assert isinstance(watch, _CallWatch)
        watch.finish(error, 0.0)

    def breaker_moved(
        self,
        name: str,
        old: str,
        new: str,
        *,
        service: str,
        operation: str | None,
        error_code: str | None,
    ) -> None:
        self.instruments.transitions.add(
            1,
            {
                "aioenvelope.circuit_breaker": name,
                "aioenvelope.circuit_breaker.state": new,
                "aioenvelope.key_service": service,
            },
        )
        span = trace.get_current_span()
        if span.is_recording():
            event = {"aioenvelope.circuit_breaker": name, "from": old, "to": new}
            if error_code and new == OPEN:  # what opened it; not on probing or closing
                event["error.type"] = error_code
            span.add_event("aioenvelope.circuit_breaker.transition", event)

    # -- messages ---------------------------------------------------------------------

    def cache_lookup(self, cache: str, hit: bool) -> None:
        span = _MESSAGE_SPAN.get()
        if span is not None and span.is_recording():
            span.set_attribute(f"aioenvelope.{cache}_cache.hit", hit)

    def message(self, operation: str, context: Mapping[str, str] | None) -> MessageWatch | None:
        mode = self._message_spans
        if mode == "never" or (
            mode == "when_traced" and not trace.get_current_span().is_recording()
        ):
            return None
        return self._start(f"aioenvelope.{operation}", operation, context)

    def stream(self, operation: str, context: Mapping[str, str] | None) -> MessageWatch | None:
        return self._start(f"aioenvelope.{operation}_stream", operation, context)

    def _start(
        self, name: str, operation: str, context: Mapping[str, str] | None
    ) -> MessageWatch | None:
        span = self.tracer.start_span(name, attributes={"aioenvelope.operation": operation})
        if not span.is_recording():
            return None
        record_keys = self.settings.record_context_keys
        if record_keys and context:
            _set_context_keys(span, context)
        return _MessageWatch(span, record_keys)

    # -- counters ---------------------------------------------------------------------

    def attach(self, stats: StatsRecorder) -> None:
        self.instruments.totals.attach(stats)

    def detach(self, stats: StatsRecorder) -> None:
        self.instruments.totals.detach(stats)


def _set_context_keys(span: Span, context: Mapping[str, str]) -> None:
    """The encryption context's keys (never its values), sorted; the ESDK's reserved
    ``aws-crypto-public-key`` included when a signed message stores it."""
    span.set_attribute("aioenvelope.encryption_context.keys", sorted(str(k) for k in context))
