"""One chat request's span and metrics: opened before the response, closed when the stream ends."""

import logging
import time
from dataclasses import dataclass

from opentelemetry.metrics import Histogram, Meter
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.trace import Span, StatusCode

from hrserve import OTELContext
from hrserve import spans as attr
from llmchat.chat import ChatRequest, Finish, Notice

PROVIDER = "llmchat"
log = logging.getLogger("llmchat.observe")


@dataclass(slots=True)
class Instruments:
    duration: Histogram
    time_to_first_token: Histogram
    time_per_output_token: Histogram

    @classmethod
    def create(cls, meter: Meter) -> "Instruments":
        return cls(
            gen_ai_metrics.create_gen_ai_server_request_duration(meter),
            gen_ai_metrics.create_gen_ai_server_time_to_first_token(meter),
            gen_ai_metrics.create_gen_ai_server_time_per_output_token(meter),
        )


class ChatObservation:
    """Records a request's GenAI attributes, time to first token and outcome; end() is idempotent."""

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
        operation: str = "chat",
    ) -> None:
        self.instruments = instruments
        self.metric_attrs = {attr.OPERATION_NAME: operation, attr.PROVIDER_NAME: PROVIDER, attr.REQUEST_MODEL: model}
        attributes = {
            **self.metric_attrs,
            attr.REQUEST_TEMPERATURE: request.temperature,
            attr.REQUEST_TOP_P: request.top_p,
            attr.REQUEST_STREAM: stream,
            attr.NUM_MESSAGES: num_messages,
            attr.NUM_TOOLS: request.num_tools,
            # The issue-facing short names, for operators who filter on them in Tempo or Jaeger.
            "model": model,
            "streaming": stream,
        }
        if request.max_tokens is not None:
            attributes[attr.REQUEST_MAX_TOKENS] = request.max_tokens
        if request.seed is not None:
            attributes[attr.REQUEST_SEED] = request.seed
        if request.stop:
            attributes[attr.REQUEST_STOP_SEQUENCES] = list(request.stop)
        if client_job_id:
            attributes[attr.CLIENT_JOB_ID] = client_job_id
        self.span: Span = otel.start_detached_span(f"{operation} {model}", attributes)
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.is_ended = False
        self.error_type: str | None = None

    def response_id(self, response_id: str, model: str) -> None:
        self.span.set_attributes({attr.RESPONSE_ID: response_id, attr.RESPONSE_MODEL: model})

    def token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.instruments.time_to_first_token.record(self.first_token_at - self.start, self.metric_attrs)
            self.span.add_event("first_token")

    def notice(self, notice: Notice) -> None:
        log.warning("%s: %s", notice.name, notice.message)
        self.span.add_event(notice.name, {"message": notice.message})

    def finish(self, finish: Finish) -> None:
        self.span.set_attributes(
            {
                attr.RESPONSE_FINISH_REASONS: [finish.reason],
                attr.USAGE_INPUT_TOKENS: finish.prompt_tokens,
                attr.USAGE_OUTPUT_TOKENS: finish.completion_tokens,
            }
        )
        if self.first_token_at is not None and finish.completion_tokens > 1:
            per_token = (time.perf_counter() - self.first_token_at) / (finish.completion_tokens - 1)
            self.instruments.time_per_output_token.record(per_token, self.metric_attrs)

    def fail(self, error_type: str, exc: BaseException | None = None) -> None:
        self.span.set_attribute("error.type", error_type)
        self.error_type = error_type
        if exc is not None:
            self.span.record_exception(exc)
        self.span.set_status(StatusCode.ERROR, error_type)

    def disconnected(self) -> None:
        self.span.add_event("client_disconnected")
        self.fail("client_disconnected")

    def end(self) -> None:
        if self.is_ended:
            return
        self.is_ended = True
        attributes = dict(self.metric_attrs)
        if self.error_type:
            attributes["error.type"] = self.error_type
        self.instruments.duration.record(time.perf_counter() - self.start, attributes)
        self.span.end()
