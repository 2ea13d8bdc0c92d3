"""OTLP exporters that report a collector outage once and never hold up a shutdown.

Left alone, the OTLP exporters log a warning per retry and an error per failed batch (the SDK adds a
traceback when an exporter raises), and they retry with backoff for up to their timeout; so with the
collector down the log fills, and a SIGTERM waits out the retries. Wrapped, an outage is one warning when
it starts (with the exporter's own last words as the reason) and one info line when it ends, and close()
interrupts whatever retry is under way.
"""

import logging
import threading
import time
from collections.abc import Sequence

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("hrserve.telemetry")

# The modules of opentelemetry-exporter-otlp-proto-{grpc,http} that log per retry or per failed batch.
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)


class LastWords(logging.Filter):
    """Keeps the exporters' own log records out of the log, remembering the last one per signal (its first
    line) as an outage's reason. The gRPC exporters share one logger and name the signal in the message."""

    def __init__(self) -> None:
        super().__init__()
        self.messages = {"traces": "", "metrics": ""}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().split("\n", 1)[0]
        self.messages["metrics" if "metric" in record.name + message else "traces"] = message
        return False


last_words = LastWords()


class Outage:
    """Whether exporting one signal to one place is failing, logged when that changes."""

    def __init__(self, signal: str, where: str) -> None:
        self.signal, self.where = signal, where
        self.down = False

    def failed(self, reason: str) -> None:
        if not self.down:
            self.down = True
            log.warning(
                "telemetry: cannot export %s to %s (%s); they are dropped, and logged again once it recovers",
                self.signal,
                self.where,
                reason or last_words.messages[self.signal] or "no reason given",
            )

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            log.info("telemetry: exporting %s to %s again", self.signal, self.where)


class Guard:
    """What the span and metric wrappers share: the outage, and close() that stops further attempts."""

    def __init__(self, inner, signal: str, where: str) -> None:
        # Only once an exporter is guarded do its modules' lines go unlogged (addFilter adds a filter once).
        for name in EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(last_words)
        self.inner = inner
        self.outage = Outage(signal, where)
        self.closed = threading.Event()
        self.started: float | None = None  # when the export under way began
        self.reason_at_close = ""

    def stuck(self, after_s: float = 0.5) -> bool:
        """Whether the collector is known to be down, or an export has been retrying for a while."""
        started = self.started
        return self.outage.down or (started is not None and time.monotonic() - started > after_s)

    def attempt(self, export, success) -> bool:
        if self.closed.is_set():
            return False
        self.started = time.monotonic()
        try:
            ok = export() == success
        except Exception as error:  # an exporter that raises must not reach the SDK, which logs a traceback
            self.outage.failed(f"{type(error).__name__}: {error}")
            return False
        finally:
            self.started = None
        if ok:
            self.outage.succeeded()
        else:
            # after close() the exporter's last words are about being interrupted, not about the collector
            self.outage.failed(self.reason_at_close if self.closed.is_set() else "")
        return ok

    def close(self) -> None:
        """Interrupts a retry in progress (the OTLP exporters wake from their backoff) and refuses new work."""
        if self.closed.is_set():
            return
        self.reason_at_close = last_words.messages[self.outage.signal]
        self.closed.set()
        try:
            self.inner.shutdown()
        except Exception as error:
            log.debug("telemetry: closing the %s exporter: %s", self.outage.signal, error)


class GuardedSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, where: str) -> None:
        self.guard = Guard(inner, "traces", where)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        ok = self.guard.attempt(lambda: self.guard.inner.export(spans), SpanExportResult.SUCCESS)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.guard.inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.guard.close()


class GuardedMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, where: str) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.guard = Guard(inner, "metrics", where)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        ok = self.guard.attempt(
            lambda: self.guard.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs),
            MetricExportResult.SUCCESS,
        )
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.guard.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.guard.close()
