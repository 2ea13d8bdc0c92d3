"""JSON log lines carry the trace, span and request ids of the work that wrote them."""

import json
import logging

from opentelemetry import trace

from hrserve.logging import ContextFilter, JsonFormatter
from hrserve.request import request_id_var


def test_json_line_has_ids():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    token = request_id_var.set("req-1")
    try:
        with trace.get_tracer("t").start_as_current_span("s") as span:
            ContextFilter().filter(record)
            ctx = span.get_span_context()
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "info"
    assert line["request_id"] == "req-1"
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")
