"""OTELContext: start a span, read its ids."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.util.types import AttributeValue


def format_trace_id(trace_id: int) -> str:
    return format(trace_id, "032x")


def format_span_id(span_id: int) -> str:
    return format(span_id, "016x")


class OTELContext:
    """A service's tracer plus the helpers request handlers need."""

    def __init__(self, tracer: Tracer, service: str) -> None:
        self.tracer = tracer
        self.service = service

    @contextmanager
    def start_span(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Iterator[Span]:
        """A span made current for the block; an exception marks it as an error and re-raises."""
        with self.tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            yield span

    def start_detached_span(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> Span:
        """A span the caller ends itself, for work that outlives the handler (a response stream)."""
        return self.tracer.start_span(name, attributes=attributes)

    @staticmethod
    def get_trace_id(span: Span | None = None) -> str | None:
        ctx = (span or trace.get_current_span()).get_span_context()
        return format_trace_id(ctx.trace_id) if ctx.is_valid else None

    @staticmethod
    def get_span_id(span: Span | None = None) -> str | None:
        ctx = (span or trace.get_current_span()).get_span_context()
        return format_span_id(ctx.span_id) if ctx.is_valid else None
