"""The OpenTelemetry SDK with in-memory exporters, as the telemetry tests read it.

Each test gets its own tracer and meter providers (passed through ``Telemetry``, never
set globally: OpenTelemetry lets a process set its global providers once), a span
exporter that keeps every finished span and a metric reader collected on demand.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from aioenvelope import Telemetry

__all__ = ["Otel", "attributes_of", "everything_recorded", "id_of", "parent_of"]


@dataclass
class Otel:
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)

    def __post_init__(self) -> None:
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def telemetry(self, **options: Any) -> Telemetry:
        return Telemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    @property
    def tracer(self) -> Tracer:
        """A tracer of the test's own, for the caller's span (a request, a job step)."""
        return self.tracer_provider.get_tracer("test")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans, oldest first (``name``: only those)."""
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def clear(self) -> None:
        self.exporter.clear()

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, point) of each data point of ``metric`` now."""
        found: list[tuple[dict[str, Any], Any]] = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        found.extend((dict(p.attributes or {}), p) for p in m.data.data_points)
        return found

    def value(self, metric: str, attributes: Mapping[str, Any] | None = None) -> float:
        """The sum over ``metric``'s points whose attributes include ``attributes`` (a
        histogram's points count their recordings)."""
        total = 0.0
        for attrs, point in self.points(metric):
            if all(attrs.get(k) == v for k, v in (attributes or {}).items()):
                total += point.count if isinstance(point, HistogramDataPoint) else point.value
        return total


def attributes_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def everything_recorded(otel: Otel) -> Iterator[str]:
    """Every text the exporters hold: span names, attributes, events, statuses, links'
    attributes, and every metric's name and point attributes."""
    for span in otel.spans():
        yield span.name
        yield repr(dict(span.attributes or {}))
        yield repr(span.status.description)
        for event in span.events:
            yield event.name
            yield repr(dict(event.attributes or {}))
    data = otel.reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for m in scope.metrics:
                yield m.name
                for point in m.data.data_points:
                    yield repr(dict(point.attributes or {}))


def parent_of(span: ReadableSpan) -> int:
    """The span ID of ``span``'s parent (it must have one)."""
    assert span.parent is not None, f"{span.name} has no parent"
    return int(span.parent.span_id)


def id_of(span: ReadableSpan) -> int:
    """``span``'s own span ID, to compare with a child's :func:`parent_of`."""
    assert span.context is not None
    return int(span.context.span_id)
