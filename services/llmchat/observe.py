"""One chat request's span and metrics (OpenTelemetry GenAI conventions), plus the engine's gauges.

The span opens before the response and closes when the stream ends. Message content is recorded
only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.
"""

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as names
from opentelemetry.semconv.attributes import error_attributes, server_attributes
from opentelemetry.trace import Span, StatusCode

from hrserve import OTELContext
from llmchat.chat import (
    ChatEvent,
    ChatRequest,
    Finish,
    Logprobs,
    Notice,
    ReasoningDelta,
    TextDelta,
    ToolCallCut,
    ToolCallDelta,
    ToolCallStart,
)
from llmchat.engine import Engine, Sequence

PROVIDER = "llmchat"
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
log = logging.getLogger("llmchat.observe")

# GenAI semantic-convention names, taken from the semconv package rather than typed by hand.
OPERATION_NAME = gen_ai.GEN_AI_OPERATION_NAME
PROVIDER_NAME = gen_ai.GEN_AI_PROVIDER_NAME
REQUEST_MODEL = gen_ai.GEN_AI_REQUEST_MODEL
REQUEST_MAX_TOKENS = gen_ai.GEN_AI_REQUEST_MAX_TOKENS
REQUEST_TEMPERATURE = gen_ai.GEN_AI_REQUEST_TEMPERATURE
REQUEST_TOP_P = gen_ai.GEN_AI_REQUEST_TOP_P
REQUEST_TOP_K = gen_ai.GEN_AI_REQUEST_TOP_K
REQUEST_SEED = gen_ai.GEN_AI_REQUEST_SEED
REQUEST_STREAM = gen_ai.GEN_AI_REQUEST_STREAM
REQUEST_STOP_SEQUENCES = gen_ai.GEN_AI_REQUEST_STOP_SEQUENCES
REQUEST_CHOICE_COUNT = gen_ai.GEN_AI_REQUEST_CHOICE_COUNT
REQUEST_FREQUENCY_PENALTY = gen_ai.GEN_AI_REQUEST_FREQUENCY_PENALTY
REQUEST_PRESENCE_PENALTY = gen_ai.GEN_AI_REQUEST_PRESENCE_PENALTY
RESPONSE_ID = gen_ai.GEN_AI_RESPONSE_ID
RESPONSE_MODEL = gen_ai.GEN_AI_RESPONSE_MODEL
RESPONSE_FINISH_REASONS = gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
USAGE_INPUT_TOKENS = gen_ai.GEN_AI_USAGE_INPUT_TOKENS
USAGE_OUTPUT_TOKENS = gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
USAGE_CACHE_READ_INPUT_TOKENS = gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS
TOKEN_TYPE = gen_ai.GEN_AI_TOKEN_TYPE
INPUT_MESSAGES = gen_ai.GEN_AI_INPUT_MESSAGES
OUTPUT_MESSAGES = gen_ai.GEN_AI_OUTPUT_MESSAGES
SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
SERVER_PORT = server_attributes.SERVER_PORT
ERROR_TYPE = error_attributes.ERROR_TYPE

# Our own attributes, for what the conventions do not name.
CLIENT_JOB_ID = "hrserve.client_job_id"
NUM_MESSAGES = "llm.request.num_messages"
NUM_TOOLS = "llm.request.num_tools"
TIME_TO_FIRST_TOKEN = "llm.response.time_to_first_token_s"
TIME_IN_QUEUE = "llm.request.time_in_queue_s"
MODEL_STEPS = "llmchat.response.model_steps"

# Bucket boundaries the GenAI metric conventions recommend.
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
TOKEN_BUCKETS = [4**n for n in range(14)]  # 1, 4, 16, ... 67108864
PROMPT_TOKENS = "llmchat.prompt_tokens"
PROMPT_TOKENS_SOURCE = "llmchat.prompt_tokens.source"  # cached | computed


@dataclass(slots=True)
class Instruments:
    duration: Histogram
    time_to_first_token: Histogram
    time_per_output_token: Histogram
    token_usage: Histogram
    requests: Counter
    aborts: Counter
    prompt_tokens: Counter

    @classmethod
    def create(cls, meter: Meter) -> "Instruments":
        def histogram(name: str, unit: str, description: str, buckets: list[float]) -> Histogram:
            return meter.create_histogram(
                name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
            )

        return cls(
            histogram(names.GEN_AI_SERVER_REQUEST_DURATION, "s", "Time to last output token.", DURATION_BUCKETS),
            histogram(names.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, "s", "Time to first output token.", TTFT_BUCKETS),
            histogram(
                names.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN, "s", "Time per output token after the first.", TPOT_BUCKETS
            ),
            histogram(names.GEN_AI_CLIENT_TOKEN_USAGE, "{token}", "Input and output tokens used.", TOKEN_BUCKETS),
            meter.create_counter("llmchat.requests", "{request}", "Generation requests by outcome."),
            meter.create_counter("llmchat.aborts", "{request}", "Generations aborted because the client left."),
            meter.create_counter(
                PROMPT_TOKENS, "{token}", "Prompt tokens by whether their KV came from the prefix cache."
            ),
        )


def register_engine_gauges(meter: Meter, get_engine: Callable[[], Engine | None]) -> None:
    """Observable gauges read at each export: queue, batch and KV cache of the engine, once it exists."""

    def gauge(name: str, unit: str, description: str, read: Callable[[Engine], int]) -> None:
        def callback(_: CallbackOptions) -> list[Observation]:
            engine = get_engine()
            return [Observation(read(engine))] if engine is not None else []

        meter.create_observable_gauge(name, [callback], unit=unit, description=description)

    gauge("llmchat.engine.waiting", "{request}", "Requests queued for the batch.", lambda e: e.num_waiting)
    gauge("llmchat.engine.running", "{request}", "Requests in the running batch.", lambda e: e.num_running)
    gauge("llmchat.engine.batch_size", "{sequence}", "Rows in the batch's KV cache.", lambda e: e.batch_size)
    gauge("llmchat.engine.kv_cache.usage", "By", "Memory allocated to the KV cache.", lambda e: e.kv_cache_bytes)
    gauge("llmchat.engine.prefix_cache.usage", "By", "Memory held by the prefix cache.", lambda e: e.prefix_cache_bytes)


def capture_content_enabled() -> bool:
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"


def _input_messages(request: ChatRequest) -> str:
    """The conversation in the GenAI conventions' message shape, as JSON."""
    messages = []
    for m in request.messages:
        parts: list[dict] = [{"type": "text", "content": m.content}] if m.content else []
        if m.role == "tool":
            parts = [{"type": "tool_call_response", "id": m.tool_call_id, "response": m.content}]
        for call in m.tool_calls:
            parts.append({"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments})
        messages.append({"role": m.role, "parts": parts})
    return json.dumps(messages)


class ChatObservation:
    """Records a request's GenAI attributes, timings, events and outcome; end() is idempotent."""

    def __init__(
        self,
        otel: OTELContext,
        instruments: Instruments,
        model: str,
        request: ChatRequest,
        *,
        stream: bool,
        num_messages: int,
        client_job_id: str | None,
        server: tuple[str, int] | None = None,
        operation: str = "chat",
    ) -> None:
        self.instruments = instruments
        self.metric_attrs = {OPERATION_NAME: operation, PROVIDER_NAME: PROVIDER, REQUEST_MODEL: model}
        attributes = {
            **self.metric_attrs,
            REQUEST_TEMPERATURE: request.temperature,
            REQUEST_TOP_P: request.top_p,
            REQUEST_STREAM: stream,
            NUM_MESSAGES: num_messages,
            NUM_TOOLS: request.num_tools,
            # The issue-facing short names, for operators who filter on them in Tempo or Jaeger.
            "model": model,
            "streaming": stream,
        }
        if server is not None:
            attributes[SERVER_ADDRESS], attributes[SERVER_PORT] = server
            self.metric_attrs[SERVER_ADDRESS], self.metric_attrs[SERVER_PORT] = server
        if request.max_tokens is not None:
            attributes[REQUEST_MAX_TOKENS] = request.max_tokens
        if request.seed is not None:
            attributes[REQUEST_SEED] = request.seed
        if request.top_k:
            attributes[REQUEST_TOP_K] = request.top_k
        if request.stop:
            attributes[REQUEST_STOP_SEQUENCES] = list(request.stop)
        if request.n != 1:  # the conventions say to leave it out at 1
            attributes[REQUEST_CHOICE_COUNT] = request.n
        if request.sampling.frequency_penalty:
            attributes[REQUEST_FREQUENCY_PENALTY] = request.sampling.frequency_penalty
        if request.sampling.presence_penalty:
            attributes[REQUEST_PRESENCE_PENALTY] = request.sampling.presence_penalty
        if client_job_id:
            attributes[CLIENT_JOB_ID] = client_job_id
        self.capture = capture_content_enabled()
        if self.capture:
            attributes[INPUT_MESSAGES] = _input_messages(request)
        self.span: Span = otel.start_detached_span(f"{operation} {model}", attributes)
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.seq: Sequence | None = None
        self.has_prefill_event = False
        self.is_ended = False
        self.error_type: str | None = None
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []

    def response_id(self, response_id: str, model: str) -> None:
        self.span.set_attributes({RESPONSE_ID: response_id, RESPONSE_MODEL: model})

    def started(self, seq: Sequence) -> None:
        self.seq = seq
        self.span.add_event("queued", timestamp=seq.submitted_ns)

    def event(self, event: ChatEvent) -> None:
        """Sees every chat event on its way to the client."""
        if isinstance(event, Notice | ToolCallCut):
            log.log(logging.INFO if event.expected else logging.WARNING, "%s: %s", event.name, event.message)
            self.span.add_event(event.name, {"message": event.message})
            return
        if isinstance(event, Finish):
            self.finish(event)
            return
        if isinstance(event, Logprobs):
            return
        if self.first_token_at is None:
            self._prefill_started()
            self.first_token_at = time.perf_counter()
            ttft = self.first_token_at - self.start
            self.instruments.time_to_first_token.record(ttft, self.metric_attrs)
            self.span.set_attribute(TIME_TO_FIRST_TOKEN, round(ttft, 6))
            self.span.add_event("first_token")
        if self.capture:
            if isinstance(event, TextDelta):
                self.text.append(event.text)
            elif isinstance(event, ReasoningDelta):
                self.reasoning.append(event.text)
            elif isinstance(event, ToolCallStart):
                self.calls.append({"type": "tool_call", "id": event.id, "name": event.name, "arguments": ""})
            elif isinstance(event, ToolCallDelta):
                self.calls[event.index]["arguments"] += event.arguments

    def finish(self, finish: Finish) -> None:
        self.span.set_attributes(
            {
                RESPONSE_FINISH_REASONS: finish.reasons or [finish.reason],
                USAGE_INPUT_TOKENS: finish.prompt_tokens,
                USAGE_OUTPUT_TOKENS: finish.completion_tokens,
                USAGE_CACHE_READ_INPUT_TOKENS: finish.cached_tokens,
                MODEL_STEPS: finish.model_steps,
            }
        )
        usage = self.instruments.token_usage
        usage.record(finish.prompt_tokens, self.metric_attrs | {TOKEN_TYPE: "input"})
        usage.record(finish.completion_tokens, self.metric_attrs | {TOKEN_TYPE: "output"})
        prompt = self.instruments.prompt_tokens
        prompt.add(finish.cached_tokens, self.metric_attrs | {PROMPT_TOKENS_SOURCE: "cached"})
        prompt.add(finish.prompt_tokens - finish.cached_tokens, self.metric_attrs | {PROMPT_TOKENS_SOURCE: "computed"})
        if self.first_token_at is not None and finish.completion_tokens > 1:
            per_token = (time.perf_counter() - self.first_token_at) / (finish.completion_tokens - 1)
            self.instruments.time_per_output_token.record(per_token, self.metric_attrs)
        if self.capture:
            parts = [{"type": "reasoning", "content": "".join(self.reasoning)}] if self.reasoning else []
            parts += [{"type": "text", "content": "".join(self.text)}] if self.text else []
            output = [{"role": "assistant", "parts": parts + self.calls, "finish_reason": finish.reason}]
            self.span.set_attribute(OUTPUT_MESSAGES, json.dumps(output))

    def fail(self, error_type: str, exc: BaseException | None = None) -> None:
        self.span.set_attribute(ERROR_TYPE, error_type)
        self.error_type = error_type
        if exc is not None:
            self.span.record_exception(exc)
        self.span.set_status(StatusCode.ERROR, error_type)

    def disconnected(self) -> None:
        self.span.add_event("client_disconnected")
        self.instruments.aborts.add(1, self.metric_attrs)
        self.fail("client_disconnected")

    def end(self) -> None:
        if self.is_ended:
            return
        self.is_ended = True
        self._prefill_started()
        attributes = dict(self.metric_attrs)
        if self.error_type:
            attributes[ERROR_TYPE] = self.error_type
        self.instruments.duration.record(time.perf_counter() - self.start, attributes)
        self.instruments.requests.add(1, attributes | {"llmchat.outcome": "error" if self.error_type else "ok"})
        self.span.end()

    def _prefill_started(self) -> None:
        """The event and time in queue, stamped with the time the engine admitted the sequence."""
        seq = self.seq
        if seq is None or seq.admitted_ns is None or self.has_prefill_event:
            return
        self.has_prefill_event = True
        self.span.add_event("prefill_started", timestamp=seq.admitted_ns)
        self.span.set_attribute(TIME_IN_QUEUE, round((seq.admitted_ns - seq.submitted_ns) / 1e9, 6))
