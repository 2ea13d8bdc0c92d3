"""The chat span: name, GenAI attributes, ids matching the response headers, and closing on disconnect; the
observation's cached-prompt attribute and metric on scripted events."""

import time

import httpx
import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hrserve import OTELContext
from llmchat.chat import ChatMessage, ChatRequest
from llmchat.chat.events import Finish, TextDelta
from llmchat.observe import ChatObservation, Instruments

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# 4000 tokens would take minutes here; an aborted sequence stops at its next step. ignore_eos keeps a sampled
# reply from ending on its own before the client hangs up.
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
    "max_tokens": 4000,
    "temperature": 0.7,
    "ignore_eos": True,
}


def chat_spans(exporter):
    trace.get_tracer_provider().force_flush()
    return [s for s in exporter.get_finished_spans() if s.name == f"chat {MODEL}"]


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            return result
        time.sleep(0.05)
    return result


def engine_idle(live) -> bool:
    health = httpx.get(f"{live.base_url}/health").json()
    return health["num_running"] == 0 and health["num_waiting"] == 0


def test_chat_span_attributes_match_response(live, spans):
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *QUESTION],
        max_tokens=8,
        temperature=0,
        seed=7,
        extra_headers={"X-Client-Job-ID": "job-1"},
    )
    response = raw.parse()
    (span,) = wait_for(lambda: chat_spans(spans))
    a = span.attributes
    assert format(span.context.trace_id, "032x") == raw.headers["x-trace-id"]
    assert format(span.context.span_id, "016x") == raw.headers["x-span-id"]
    assert a["model"] == MODEL and a["gen_ai.request.model"] == MODEL
    assert a["streaming"] is False and a["gen_ai.request.stream"] is False
    assert a["gen_ai.operation.name"] == "chat"
    assert a["llm.request.num_messages"] == 2
    assert a["llm.request.num_tools"] == 0
    assert a["hrserve.client_job_id"] == "job-1"
    assert a["gen_ai.request.max_tokens"] == 8
    assert a["gen_ai.request.seed"] == 7
    assert a["gen_ai.response.id"] == response.id
    assert a["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
    assert a["gen_ai.usage.cache_read.input_tokens"] == response.usage.prompt_tokens_details.cached_tokens
    assert tuple(a["gen_ai.response.finish_reasons"]) == (response.choices[0].finish_reason,)
    assert span.status.is_ok


def test_a_request_with_n_choices_has_one_span_with_every_choice(live, spans):
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0)
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, n=3, seed=1, presence_penalty=0.5
    )
    (span,) = wait_for(lambda: chat_spans(spans))
    a = span.attributes
    assert a["gen_ai.request.choice.count"] == 3 and a["gen_ai.request.presence_penalty"] == 0.5
    assert tuple(a["gen_ai.response.finish_reasons"]) == tuple(c.finish_reason for c in response.choices)
    assert a["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == response.usage.completion_tokens


def test_forced_tokens_show_as_fewer_model_steps_in_the_span_and_health(live, spans):
    """JSON of fixed keys: the grammar forces much of it, so the model ran fewer steps than it wrote tokens."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
        "required": ["city", "country"],
    }
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0)
    before = httpx.get(f"{live.base_url}/health").json()["decoding"]
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    (span,) = wait_for(lambda: chat_spans(spans))
    steps = span.attributes["llmchat.response.model_steps"]
    assert response.choices[0].finish_reason == "stop"
    assert 0 < steps < response.usage.completion_tokens
    after = httpx.get(f"{live.base_url}/health").json()["decoding"]
    assert after["jump_forward"] is True
    assert after["output_tokens"] - before["output_tokens"] == response.usage.completion_tokens
    assert after["model_steps"] - before["model_steps"] == steps


def test_streaming_span_covers_the_stream(live, spans):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        r.read()
    (span,) = wait_for(lambda: chat_spans(spans))
    assert span.attributes["streaming"] is True
    assert span.attributes["gen_ai.usage.output_tokens"] == 6
    assert tuple(span.attributes["gen_ai.response.finish_reasons"]) == ("length",)
    assert "first_token" in [e.name for e in span.events]


def test_disconnect_ends_span_and_frees_engine(live, spans):
    body = LONG | {"stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)

    assert wait_for(lambda: engine_idle(live), timeout_s=10)
    (span,) = wait_for(lambda: chat_spans(spans))
    assert "client_disconnected" in [e.name for e in span.events]
    assert span.attributes["error.type"] == "client_disconnected"
    assert span.end_time is not None
    # The server is still serving after the hang-up.
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 2})
    assert r.status_code == 200


def test_non_streaming_disconnect_aborts_generation(live, spans):
    body = LONG
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=1.5))

    assert wait_for(lambda: engine_idle(live), timeout_s=10)
    (span,) = wait_for(lambda: chat_spans(spans))
    assert "client_disconnected" in [e.name for e in span.events]
    assert span.attributes["streaming"] is False


def test_cached_prompt_tokens_reach_the_span_and_the_prompt_tokens_metric():
    # Providers of its own, so the global ones the live tests use see nothing of this.
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    otel = OTELContext(tracer_provider.get_tracer("test"), "llmchat")
    for cached in (8, 0):
        request = ChatRequest(messages=[ChatMessage("user", "Hi")])
        observation = ChatObservation(
            otel, Instruments.create(meter), MODEL, request, stream=False, num_messages=1, client_job_id=None
        )
        for event in (TextDelta("Hello"), Finish("stop", 12, 3, cached_tokens=cached)):
            observation.event(event)
        observation.end()

    assert [s.attributes["gen_ai.usage.cache_read.input_tokens"] for s in exporter.get_finished_spans()] == [8, 0]
    metrics = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
    (prompt_tokens,) = [m for m in metrics if m.name == "llmchat.prompt_tokens"]
    assert prompt_tokens.unit == "{token}" and prompt_tokens.data.is_monotonic
    by_source = {p.attributes["llmchat.prompt_tokens.source"]: p for p in prompt_tokens.data.data_points}
    assert {source: p.value for source, p in by_source.items()} == {"cached": 8, "computed": 4 + 12}
    for point in by_source.values():
        assert point.attributes["gen_ai.request.model"] == MODEL
        assert point.attributes["gen_ai.operation.name"] == "chat"
