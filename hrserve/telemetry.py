"""OpenTelemetry setup from the standard OTEL_* environment: setup_otel() and shutdown_otel().

Spans and metrics leave through batching exporters on background threads, so a collector that is
down costs a request nothing.
"""

import logging
import os
import threading
import time
from collections.abc import Mapping

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from hrserve.exporters import Guard, GuardedMetricExporter, GuardedSpanExporter

log = logging.getLogger("hrserve.telemetry")

_SIGNAL_PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics"}
_DEFAULT_WHERE = {"grpc": "localhost:4317", "http": "localhost:4318"}

# The OTLP exporters in use, for shutdown_otel to interrupt.
_guards: list[Guard] = []


def _env_true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def _selected(env: Mapping[str, str], signal: str) -> list[str]:
    names = env.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp")
    return [n.strip().lower() for n in names.split(",") if n.strip() and n.strip().lower() != "none"]


def otlp_exporter_args(signal: str, env: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """Returns (protocol, kwargs) for the OTLP exporter of `signal` ("traces" or "metrics").

    An endpoint given without a scheme (`localhost:4317`, as our systemd units set it) means a
    plain-text collector: the gRPC exporter would otherwise try TLS, and the HTTP one would fail
    to parse it. OTEL_EXPORTER_OTLP_INSECURE, when set, still wins.
    """
    env = os.environ if env is None else env
    up = signal.upper()
    protocol = env.get(f"OTEL_EXPORTER_OTLP_{up}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    specific = env.get(f"OTEL_EXPORTER_OTLP_{up}_ENDPOINT")
    endpoint = specific or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    kwargs: dict = {}
    if protocol == "grpc":
        if endpoint:
            kwargs["endpoint"] = endpoint
            insecure_env = env.get(f"OTEL_EXPORTER_OTLP_{up}_INSECURE") or env.get("OTEL_EXPORTER_OTLP_INSECURE")
            if insecure_env is None and "://" not in endpoint:
                kwargs["insecure"] = True
    elif protocol in ("http/protobuf", "http/json"):
        if endpoint:
            url = endpoint if "://" in endpoint else f"http://{endpoint}"
            # Only the generic endpoint gets the per-signal path appended (OTLP exporter spec).
            kwargs["endpoint"] = url if specific else url.rstrip("/") + _SIGNAL_PATHS[signal]
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use grpc or http/protobuf")
    return protocol, kwargs


def _span_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp, console or none")
    protocol, kwargs = otlp_exporter_args("traces")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    exporter = GuardedSpanExporter(OTLPSpanExporter(**kwargs), _where(protocol, kwargs))
    _guards.append(exporter.guard)
    return exporter


def _where(protocol: str, kwargs: dict) -> str:
    return kwargs.get("endpoint") or _DEFAULT_WHERE["grpc" if protocol == "grpc" else "http"]


def _metric_readers(env: Mapping[str, str]) -> list[MetricReader]:
    """The push readers OTEL_METRICS_EXPORTER names, and always the Prometheus one: the app serves it at /metrics
    (see instrument_app), not on a port of its own. Naming `prometheus` is accepted and adds no second one."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    pushed = [_metric_reader(n) for n in _selected(env, "metrics") if n != "prometheus"]
    return [*pushed, PrometheusMetricReader()]


def _metric_reader(name: str) -> MetricReader:
    if name == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if name != "otlp":
        raise ValueError(f"OTEL_METRICS_EXPORTER={name!r} is not supported; use otlp, prometheus, console or none")
    protocol, kwargs = otlp_exporter_args("metrics")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    exporter = GuardedMetricExporter(OTLPMetricExporter(**kwargs), _where(protocol, kwargs))
    _guards.append(exporter.guard)
    return PeriodicExportingMetricReader(exporter)


def setup_otel(
    service_name: str,
    version: str,
    *,
    span_exporters: list[SpanExporter] | None = None,
    metric_readers: list[MetricReader] | None = None,
) -> tuple[trace.Tracer, metrics.Meter]:
    """Installs the global tracer and meter providers and returns this service's tracer and meter.

    Exporters come from OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER (default otlp), plus the Prometheus
    reader behind /metrics, unless passed in (tests pass in-memory ones). With OTEL_SDK_DISABLED=true nothing
    is installed and the no-op tracer and meter are returned. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    are honoured. The global providers can be set once per process; later calls reuse them.
    """
    if _env_true(os.environ, "OTEL_SDK_DISABLED"):
        return trace.NoOpTracer(), metrics.NoOpMeter(service_name, version)
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        resource = Resource.create({"service.name": service_name, "service.version": version})
        if os.environ.get("OTEL_SERVICE_NAME"):
            resource = resource.merge(Resource({"service.name": os.environ["OTEL_SERVICE_NAME"]}))
        # No exit hooks: they would flush with no bound on a down collector; shutdown_otel() bounds it.
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if span_exporters is None:
            span_exporters = [_span_exporter(n) for n in _selected(os.environ, "traces")]
        for exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        if metric_readers is None:
            metric_readers = _metric_readers(os.environ)
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(
            MeterProvider(resource=resource, metric_readers=metric_readers, shutdown_on_exit=False)
        )
        log.info("telemetry: %d span exporter(s), %d metric reader(s)", len(span_exporters), len(metric_readers))
    return trace.get_tracer(service_name, version), metrics.get_meter(service_name, version)


def shutdown_otel(timeout_s: float = 3.0) -> None:
    """Flushes what is buffered, then closes the OTLP exporters, all within `timeout_s`: a collector that is
    down or slow costs a restart no more than that. Once the collector is known to be down, or an export is
    stuck retrying, the exporters are closed at once, which ends the retries. What is unsent then is lost.

    The providers stay installed (their export threads are daemons and their exit hooks are off), so an app
    served again in the same process, as the tests do, still records."""
    providers = [p for p in (trace.get_tracer_provider(), metrics.get_meter_provider()) if hasattr(p, "force_flush")]
    deadline = time.monotonic() + timeout_s

    def flush() -> None:
        for provider in providers:
            provider.force_flush(max(0, int((deadline - time.monotonic()) * 1000)))

    # On a daemon thread of our own, a hung export cannot keep the process alive past the deadline.
    worker = threading.Thread(target=flush, name="otel-flush", daemon=True)
    worker.start()
    while worker.is_alive() and time.monotonic() < deadline:
        if any(guard.stuck() for guard in _guards):
            break
        worker.join(0.05)
    for guard in _guards:
        guard.close()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        log.warning("telemetry: the exporters did not finish within %.0f s; what they held is lost", timeout_s)


def serves_metrics(env: Mapping[str, str] | None = None) -> bool:
    """Whether the app serves /metrics: always, but with OTEL_SDK_DISABLED=true, where there are no metrics."""
    env = os.environ if env is None else env
    return not _env_true(env, "OTEL_SDK_DISABLED")


def instrument_app(app, health_path: str = "/health") -> None:
    """HTTP server spans for every request but health checks, joining a caller's W3C `traceparent`, and the
    metrics in Prometheus's text format at GET /metrics.

    The ASGI `receive` and `send` spans are left out, or every chunk of a stream would be a span. With
    OTEL_SDK_DISABLED=true there is no /metrics (a 404): a scraper then reports the target down rather
    than scraping nothing and looking healthy.
    """
    # Stable HTTP conventions (http.response.status_code, http.server.request.duration in seconds)
    # rather than the instrumentation's pre-1.0 default; read once, when instrumentation first starts.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, excluded_urls=f"{health_path}$,/metrics$", exclude_spans=["receive", "send"]
    )
    if serves_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        async def prometheus_metrics(request) -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        app.add_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
