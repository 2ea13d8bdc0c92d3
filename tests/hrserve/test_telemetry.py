"""setup_otel: exporter arguments from OTEL_* and real OTLP export to a plain-text gRPC receiver; the Prometheus
reader and /metrics, there by default."""

import asyncio
import logging
import subprocess
import sys
import textwrap

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from hrserve.exporters import GuardedSpanExporter
from hrserve.telemetry import instrument_app, otlp_exporter_args, setup_otel
from tests.hrserve.otlp_receiver import OTLPReceiver


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("grpc", {})),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317"}, ("grpc", {"endpoint": "localhost:4317", "insecure": True})),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ("grpc", {"endpoint": "http://collector:4317"})),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317"}, ("grpc", {"endpoint": "https://collector:4317"})),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317", "OTEL_EXPORTER_OTLP_INSECURE": "false"},
            ("grpc", {"endpoint": "localhost:4317"}),
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "a:1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "b:2"},
            ("grpc", {"endpoint": "b:2", "insecure": True}),
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"},
            ("http/protobuf", {"endpoint": "http://localhost:4318/v1/traces"}),
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/x"},
            ("http/protobuf", {"endpoint": "https://t/x"}),
        ),
    ],
)
def test_exporter_args(env, expected):
    assert otlp_exporter_args("traces", env) == expected


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="grpc or http/protobuf"):
        otlp_exporter_args("traces", {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_sdk_disabled_is_a_no_op(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracer, meter = setup_otel("svc", "1")
    with tracer.start_as_current_span("x") as span:
        assert not span.get_span_context().is_valid
    meter.create_counter("c").add(1)


EMIT = textwrap.dedent(
    """
    from hrserve import OTELContext, setup_otel, shutdown_otel
    tracer, _ = setup_otel("probe-service", "9.9")
    otel = OTELContext(tracer, "probe-service")
    with otel.start_span("probe-span", {"k": "v"}):
        print(otel.get_trace_id())
    shutdown_otel()
    """
)


def emit_span(env: dict) -> subprocess.CompletedProcess:
    # A fresh process: the global tracer provider can be set once per process.
    full_env = {"PATH": "/usr/bin:/bin", "OTEL_METRICS_EXPORTER": "none", **env}
    return subprocess.run([sys.executable, "-c", EMIT], env=full_env, capture_output=True, text=True, timeout=120)


def test_scheme_less_endpoint_reaches_plain_text_collector():
    with OTLPReceiver() as receiver:
        result = emit_span({"OTEL_EXPORTER_OTLP_ENDPOINT": f"localhost:{receiver.port}"})
        assert result.returncode == 0, result.stderr
        spans = receiver.spans
    assert [span.name for _, span in spans] == ["probe-span"]
    resource, span = spans[0]
    assert resource["service.name"] == "probe-service"
    assert resource["service.version"] == "9.9"
    assert span.trace_id.hex() == result.stdout.strip()


def test_service_name_env_wins():
    with OTLPReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"localhost:{receiver.port}", "OTEL_SERVICE_NAME": "renamed"}
        assert emit_span(env).returncode == 0
        assert receiver.spans[0][0]["service.name"] == "renamed"


def test_collector_down_does_not_fail_the_work():
    with OTLPReceiver() as receiver:
        port = receiver.port  # a port that nothing listens on once the receiver stops
    result = emit_span({"OTEL_EXPORTER_OTLP_ENDPOINT": f"localhost:{port}", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 32


SCRAPE = textwrap.dedent(
    """
    from prometheus_client import generate_latest
    from hrserve import setup_otel
    _, meter = setup_otel("probe-service", "9.9")
    meter.create_counter("probe.requests").add(3)
    print(generate_latest().decode())
    """
)


@pytest.mark.parametrize("exporter", [None, "none", "prometheus", "console,prometheus"])
def test_the_prometheus_reader_is_always_there_and_only_once(exporter):
    # Push exporters still come from OTEL_METRICS_EXPORTER; naming prometheus adds no second reader.
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none", "OTEL_METRIC_EXPORT_INTERVAL": "600000"}
    env |= {"OTEL_METRICS_EXPORTER": exporter} if exporter else {}
    result = subprocess.run([sys.executable, "-c", SCRAPE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (sample,) = [line for line in result.stdout.splitlines() if line.startswith("probe_requests_total{")]
    assert 'otel_scope_name="probe-service"' in sample and sample.endswith(" 3.0")


@pytest.mark.parametrize(("disabled", "status"), [(None, 200), ("true", 404)])
def test_metrics_route_is_there_unless_the_sdk_is_disabled(monkeypatch, disabled, status):
    """With OTEL_SDK_DISABLED=true there are no metrics, and /metrics is a 404 rather than an empty page that
    a scraper would read as a healthy target."""
    if disabled:
        monkeypatch.setenv("OTEL_SDK_DISABLED", disabled)
    else:
        monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    app = FastAPI()
    instrument_app(app)

    async def scrape() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/metrics")

    response = asyncio.run(scrape())
    assert response.status_code == status
    if status == 200:
        assert response.headers["content-type"].startswith("text/plain")


class Flaky(SpanExporter):
    """An exporter whose answers are scripted: SUCCESS, FAILURE, or an exception to raise."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.shut = False

    def export(self, spans):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def shutdown(self):
        self.shut = True


def test_an_outage_is_one_warning_when_it_starts_and_one_line_when_it_ends(caplog):
    ok, failed = SpanExportResult.SUCCESS, SpanExportResult.FAILURE
    inner = Flaky([ok, failed, ConnectionError("refused"), failed, ok, ok, failed])
    exporter = GuardedSpanExporter(inner, "collector:4317")
    with caplog.at_level(logging.INFO, logger="hrserve.telemetry"):
        results = [exporter.export([]) for _ in range(7)]
    assert results == [ok, failed, failed, failed, ok, ok, failed]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "INFO", "WARNING"]
    assert "cannot export traces to collector:4317" in lines[0][1]
    assert lines[1][1] == "telemetry: exporting traces to collector:4317 again"
    assert not any(r.exc_info for r in caplog.records)


def test_a_closed_exporter_shuts_the_inner_one_once_and_sends_nothing_more():
    inner = Flaky([SpanExportResult.SUCCESS])
    exporter = GuardedSpanExporter(inner, "collector:4317")
    exporter.shutdown()
    exporter.shutdown()
    assert inner.shut
    assert exporter.export([]) == SpanExportResult.FAILURE
    assert inner.answers == [SpanExportResult.SUCCESS]
