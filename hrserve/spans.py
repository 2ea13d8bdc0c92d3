"""OTELContext (start a span, read its ids) and the attribute names spans and metrics use."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes import error_attributes, server_attributes
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

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
REQUEST_ID = "hrserve.request_id"
NUM_MESSAGES = "llm.request.num_messages"
NUM_TOOLS = "llm.request.num_tools"
TIME_TO_FIRST_TOKEN = "llm.response.time_to_first_token_s"
TIME_IN_QUEUE = "llm.request.time_in_queue_s"


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
