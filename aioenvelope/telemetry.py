"""Telemetry settings, and the hooks the library calls when telemetry is on.

``EnvelopeClient(keyring, telemetry=True)`` (or a :class:`Telemetry`) turns on
OpenTelemetry traces and metrics: :mod:`aioenvelope.integrations.opentelemetry` is
imported then, and only then, so a client without telemetry never imports
``opentelemetry`` and pays nothing but a ``None`` check per message.

A constructor argument rather than an ``instrument(client)`` call made afterwards: the
hooks live in the key manager, the runtime the keyrings share and the streams, which the
client builds when it is made; a later call would have to reach into them (or patch
methods), and a client instrumented after it opened would miss what happened before.

This module never imports ``opentelemetry``: it holds what the rest of the library
calls (:class:`Observer`, whose base does nothing) and the settings.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .stats import StatsRecorder

__all__ = [
    "NULL_OBSERVER",
    "CallWatch",
    "MessageWatch",
    "Observer",
    "Telemetry",
    "build_observer",
    "note_attempt",
    "note_local_wait",
    "service_name",
]

MessageSpans = Literal["when_traced", "always", "never"]


@dataclass(frozen=True)
class Telemetry:
    """OpenTelemetry settings for an :class:`~aioenvelope.EnvelopeClient`.

    ``tracer_provider`` / ``meter_provider``: the providers to use (``None``: the global
    ones the application set up with ``opentelemetry.trace.set_tracer_provider`` and
    ``opentelemetry.metrics.set_meter_provider``; none set: OpenTelemetry's no-op).

    ``message_spans``: when ``encrypt``/``decrypt`` of one whole message get a span.
    ``"when_traced"`` (default): only inside a caller's recording span (a web request,
    a job step), as its child; ``"always"``: every message, a root span if need be;
    ``"never"``. A span in the OpenTelemetry SDK costs about as much as sealing a 1 KiB
    message (``nox -s bench`` measures it), and a batch loop with no span of its own would
    make one trace per record. Streams and key-service calls always get spans: they are
    few and each is worth seeing.

    ``record_context_keys``: put the encryption context's *keys* (never its values) on
    message and stream spans. Off by default: key names can say more than one expects.
    """

    tracer_provider: Any = None
    meter_provider: Any = None
    message_spans: MessageSpans = "when_traced"
    record_context_keys: bool = False

    def __post_init__(self) -> None:
        if self.message_spans not in ("when_traced", "always", "never"):
            raise ConfigurationError(
                f"message_spans must be 'when_traced', 'always' or 'never', not "
                f"{self.message_spans!r}"
            )


class CallWatch:
    """One remote key-service call as telemetry sees it: a context manager around the
    whole call (breaker, rate limit, retries). The transport reports each attempt it
    sends (:func:`note_attempt`), the time spent waiting for our own rate limit
    (:func:`note_local_wait`: not the service's latency) and, once known, the endpoint.
    This base does nothing but keep the counts."""

    __slots__ = ("_token", "attempts", "endpoint", "local_wait")

    def __init__(self, endpoint: str | None) -> None:
        self.attempts = 0
        self.local_wait = 0.0
        self.endpoint = endpoint
        self._token: contextvars.Token[CallWatch | None] | None = None

    def __enter__(self) -> CallWatch:
        self._token = _CURRENT_CALL.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _CURRENT_CALL.reset(self._token)
            self._token = None


_CURRENT_CALL: contextvars.ContextVar[CallWatch | None] = contextvars.ContextVar(
    "aioenvelope_current_call", default=None
)


def note_attempt() -> None:
    """One attempt of the current key-service call is being sent (retries included)."""
    watch = _CURRENT_CALL.get()
    if watch is not None:
        watch.attempts += 1


def note_local_wait(seconds: float) -> None:
    """The current key-service call waited ``seconds`` for the decrypt rate limit: time
    spent here, taken out of the call's recorded duration."""
    watch = _CURRENT_CALL.get()
    if watch is not None:
        watch.local_wait += seconds


class MessageWatch:
    """One message or stream as telemetry sees it: :meth:`current` makes its span the
    current one (so a key-service call made for it is its child); :meth:`finish` ends
    it with what is known of the message. This base does nothing."""

    __slots__ = ()

    def current(self) -> AbstractContextManager[object]:
        return _NULL_CONTEXT

    def finish(
        self,
        *,
        suite_id: int | None,
        frames: int,
        plaintext_bytes: int,
        error: BaseException | None,
        context: Mapping[str, str] | None = None,
    ) -> None:
        """The message ended: completed (``error`` None), failed or was abandoned."""


_NULL_CONTEXT = contextlib.nullcontext()


class Observer:
    """What the library tells telemetry. This base records nothing: it is what keyrings
    see outside a client, and what tests of the shell use; the client holds ``None``
    instead when telemetry is off, so a message costs one ``None`` check."""

    def call(
        self,
        service: str,
        operation: str,
        *,
        key_id: str,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> CallWatch:
        return CallWatch(endpoint)

    def refused(
        self,
        service: str,
        operation: str,
        *,
        key_id: str,
        region: str | None,
        error: BaseException,
    ) -> None:
        """A call refused (breaker, rate limit) before it reached :meth:`call`: the
        hierarchical keyring asks both before fetching a branch key, so a refused fetch
        costs neither of its two calls."""

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
        """A circuit breaker changed state (``name``: its endpoint, e.g. a region)."""

    def cache_lookup(self, cache: str, hit: bool) -> None:
        """A per-message cache lookup (``encrypt``, ``decrypt``, ``branch_key``)."""

    def message(self, operation: str, context: Mapping[str, str] | None) -> MessageWatch | None:
        """A one-shot ``encrypt``/``decrypt``: a watch if it gets a span, else None."""
        return None

    def stream(self, operation: str, context: Mapping[str, str] | None) -> MessageWatch | None:
        """A stream (``encrypt_stream``, ``decrypt_stream``): a watch if it gets a span."""
        return None

    def attach(self, stats: StatsRecorder) -> None:
        """The client's counters, read by the metric callbacks while it is open."""

    def detach(self, stats: StatsRecorder) -> None:
        """The client closed: its counts are kept in the totals, its gauges dropped."""


NULL_OBSERVER = Observer()

# The breaker names services as its messages do ("KMS in us-east-1 failed ..."); the
# telemetry and log fields name every service as its error class does (``SERVICE``).
_SERVICE_NAMES = {
    "KMS": "aws-kms",
    "DynamoDB": "dynamodb",
    "Vault": "vault-transit",
    "GCP KMS": "gcp-kms",
    "Azure Key Vault": "azure-kv",
}


def service_name(label: str) -> str:
    """The telemetry name of a service the breaker calls ``label``."""
    return _SERVICE_NAMES.get(label, label)


def build_observer(telemetry: bool | Telemetry | None) -> Observer | None:
    """The client's observer: ``None`` when telemetry is off (nothing imported)."""
    if telemetry is None or telemetry is False:
        return None
    if telemetry is True:
        telemetry = Telemetry()
    if not isinstance(telemetry, Telemetry):
        raise ConfigurationError(
            f"telemetry must be True, False or a Telemetry, not {type(telemetry).__name__}"
        )
    try:
        from .integrations.opentelemetry import OpenTelemetryObserver
    except ImportError as exc:
        raise ConfigurationError(
            "telemetry needs the OpenTelemetry API: pip install 'aioenvelope[otel]' "
            f"(and the SDK and exporters your application exports with); {exc}"
        ) from None
    return OpenTelemetryObserver(telemetry)
