"""llmchat's traces and metrics over real OTLP (gRPC and HTTP/protobuf) to receivers on loopback ports.

llmchat runs as its own process with the standard OTEL_* variables, as the systemd unit runs it; the
official openai SDK is the client, one request carrying a W3C traceparent.
"""

import json
import time

import httpx
import openai
import pytest

from llmchat.observe import DURATION_BUCKETS, TOKEN_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from tests.conftest import spawn_llmchat
from tests.hrserve.otlp_receiver import HTTPReceiver, OTLPReceiver

MODEL = "SmolLM2-135M-Instruct"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_SERVICE_NAME": "llmchat"}


def plain(value):
    """An OTLP AnyValue as a Python value."""
    kind = value.WhichOneof("value")
    return [plain(v) for v in value.array_value.values] if kind == "array_value" else getattr(value, kind)


def attrs(item) -> dict:
    return {kv.key: plain(kv.value) for kv in item.attributes}


def wait_until(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for telemetry"
        time.sleep(0.1)


def chat_spans(receiver):
    return [s for _, s in receiver.spans if s.name == f"chat {MODEL}"]


@pytest.fixture(scope="module")
def grpc_run(tmp_path_factory):
    """Two chats (one streamed, one with a caller's traceparent) exported over gRPC, scheme-less endpoint; and
    /metrics as a scraper reads it meanwhile, with OTEL_METRICS_EXPORTER left at its default."""
    with OTLPReceiver() as receiver:
        env = FAST_EXPORT | {"OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{receiver.port}"}
        server = spawn_llmchat(tmp_path_factory.mktemp("grpc"), env)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=ASK,
            max_tokens=8,
            temperature=0.5,
            top_p=0.9,
            seed=7,
            extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        streamed = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, stream=True))
        wait_until(lambda: len(chat_spans(receiver)) == 2)
        names = {"gen_ai.server.request.duration", "gen_ai.client.token.usage", "llmchat.engine.running"}
        wait_until(lambda: names <= {m.name for m in receiver.metrics})
        scraped = httpx.get(f"{server.base_url}/metrics")
        assert server.stop() == 0
        yield receiver, raw, streamed, scraped


def test_server_span_joins_the_callers_trace_and_parents_the_chat_span(grpc_run):
    receiver, raw, _, _ = grpc_run
    assert raw.headers["x-trace-id"] == TRACE_ID
    spans = [s for _, s in receiver.spans if s.trace_id.hex() == TRACE_ID]
    (server,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    (chat,) = [s for s in spans if s.name == f"chat {MODEL}"]
    assert server.parent_span_id.hex() == PARENT_ID
    assert server.kind == server.SPAN_KIND_SERVER
    assert attrs(server)["http.response.status_code"] == 200
    assert chat.parent_span_id == server.span_id
    assert chat.start_time_unix_nano >= server.start_time_unix_nano
    assert chat.end_time_unix_nano <= server.end_time_unix_nano


def test_no_health_receive_or_send_spans(grpc_run):
    receiver, _, _, _ = grpc_run
    names = {s.name for _, s in receiver.spans}
    assert not [n for n in names if "health" in n or n.endswith((" http send", " http receive"))], names
    assert {resource["service.name"] for resource, _ in receiver.spans} == {"llmchat"}


def test_chat_span_carries_the_genai_attributes(grpc_run):
    receiver, raw, _, _ = grpc_run
    response = raw.parse()
    (chat,) = [s for s in chat_spans(receiver) if s.trace_id.hex() == TRACE_ID]
    a = attrs(chat)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "llmchat"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.response.model"] == MODEL
    assert a["gen_ai.request.max_tokens"] == 8
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.request.seed"] == 7 and a["gen_ai.request.stream"] is False
    assert a["gen_ai.response.id"] == response.id
    assert a["gen_ai.response.finish_reasons"] == [response.choices[0].finish_reason]
    assert a["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
    assert a["server.address"] == "127.0.0.1" and a["server.port"] > 0
    assert a["model"] == MODEL and a["streaming"] is False and a["llm.request.num_messages"] == 1
    assert 0 < a["llm.response.time_to_first_token_s"] < 60 and a["llm.request.time_in_queue_s"] >= 0
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
    events = [e.name for e in chat.events]
    assert events.index("queued") < events.index("prefill_started")
    assert "first_token" in events
    assert [e.time_unix_nano for e in chat.events] == sorted(e.time_unix_nano for e in chat.events)


def test_metrics_have_the_conventions_names_and_buckets(grpc_run):
    receiver, _, _, _ = grpc_run
    latest = {m.name: m for m in receiver.metrics}
    expected = {
        "gen_ai.server.request.duration": DURATION_BUCKETS,
        "gen_ai.server.time_to_first_token": TTFT_BUCKETS,
        "gen_ai.server.time_per_output_token": TPOT_BUCKETS,
        "gen_ai.client.token.usage": TOKEN_BUCKETS,
    }
    for name, buckets in expected.items():
        points = latest[name].histogram.data_points
        assert points and list(points[0].explicit_bounds) == buckets, name
        assert attrs(points[0])["gen_ai.request.model"] == MODEL
    usage = latest["gen_ai.client.token.usage"].histogram.data_points
    assert {attrs(p)["gen_ai.token.type"] for p in usage} == {"input", "output"}
    duration = latest["gen_ai.server.request.duration"].histogram.data_points
    assert sum(p.count for p in duration) == 2
    # Every prompt token is counted once, as read from the prefix cache or computed.
    prompt = latest["llmchat.prompt_tokens"].sum.data_points
    assert {attrs(p)["llmchat.prompt_tokens.source"] for p in prompt} == {"cached", "computed"}
    assert sum(p.as_int for p in prompt) == sum(p.sum for p in usage if attrs(p)["gen_ai.token.type"] == "input")
    requests = latest["llmchat.requests"].sum.data_points
    assert sum(p.as_int for p in requests) == 2 and {attrs(p)["llmchat.outcome"] for p in requests} == {"ok"}
    for gauge in ("waiting", "running", "batch_size", "kv_cache.usage", "prefix_cache.usage"):
        assert latest[f"llmchat.engine.{gauge}"].gauge.data_points, gauge
    http = latest["http.server.request.duration"].histogram.data_points
    assert {attrs(p)["http.response.status_code"] for p in http} == {200}


def test_metrics_are_served_for_prometheus_beside_otlp_by_default(grpc_run):
    _, _, _, scraped = grpc_run
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    assert 'gen_ai_server_request_duration_seconds_bucket{gen_ai_operation_name="chat"' in text
    assert "gen_ai_server_request_duration_seconds_count{" in text and 'le="81.92"' in text
    assert "gen_ai_server_time_to_first_token_seconds_bucket{" in text
    assert 'gen_ai_client_token_usage_bucket{gen_ai_operation_name="chat"' in text
    assert "llmchat_requests_total{" in text and "llmchat_engine_running" in text
    assert "http_server_request_duration_seconds_bucket{" in text


def test_http_protobuf_export_with_message_content_opt_in(tmp_path):
    with HTTPReceiver() as receiver:
        env = FAST_EXPORT | {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{receiver.port}",
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
        }
        server = spawn_llmchat(tmp_path, env)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
        wait_until(lambda: chat_spans(receiver) and "gen_ai.client.token.usage" in {m.name for m in receiver.metrics})
        assert server.stop() == 0
    a = attrs(chat_spans(receiver)[0])
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": ASK[0]["content"]}]}
    ]
    output = json.loads(a["gen_ai.output.messages"])
    assert output == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": reply.choices[0].message.content}],
            "finish_reason": reply.choices[0].finish_reason,
        }
    ]


def test_no_collector_listening_fails_nothing(tmp_path):
    with OTLPReceiver() as receiver:
        port = receiver.port  # nothing listens here once the receiver is gone
    env = FAST_EXPORT | {"OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    server = spawn_llmchat(tmp_path, env)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    for _ in range(3):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content
    assert list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, stream=True))
    assert server.stop(timeout_s=30) == 0, "shutdown flushes within its bound even with no collector"


def test_naming_prometheus_still_serves_each_metric_once(tmp_path):
    """OTEL_METRICS_EXPORTER=prometheus (the opt-in of old) is accepted and adds no second reader, which would
    repeat every series."""
    env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "prometheus"}
    server = spawn_llmchat(tmp_path, env)
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
        text = httpx.get(f"{server.base_url}/metrics").text
    finally:
        assert server.stop() == 0
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(samples) == len(set(samples))
    (count,) = [line for line in samples if line.startswith("gen_ai_server_request_duration_seconds_count{")]
    assert count.endswith(" 1.0")
    assert "gen_ai_client_token_usage" in text and "llmchat_engine_running" in text


@pytest.mark.parametrize("idle_s", [0, 7], ids=["before-the-first-export", "while-an-export-retries"])
def test_sigterm_exits_quickly_with_no_collector_and_logs_one_warning(tmp_path, idle_s):
    """The units' settings (the default batch delay and exporter timeout) against an endpoint nobody listens
    on: before, SIGTERM took about 20 s while the exporters retried. 7 s idle lets the first batch export
    (5 s delay) start retrying."""
    with OTLPReceiver() as receiver:
        port = receiver.port
    server = spawn_llmchat(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{port}"})
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4).choices[0].message.content
    time.sleep(idle_s)
    started = time.monotonic()
    assert server.stop(timeout_s=60) == 0
    took_s = time.monotonic() - started
    assert took_s < 5, f"SIGTERM to exit took {took_s:.1f}s"
    log = server.log.read_text()
    assert "Traceback" not in log
    assert "opentelemetry.exporter" not in log, "the exporters' own line per retry and per batch"
    assert log.count("cannot export traces") == 1
