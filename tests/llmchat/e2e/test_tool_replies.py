"""Tool-call replies that end: a repeated call ends the reply, a call that would not fit in max_tokens is not
begun, a call cut by max_tokens is left out of whole responses, and real-world schemas are enforced or refused.
Real server, bundled model, greedy, through the official SDKs."""

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from opentelemetry import trace

from llmchat.chat.call_object import call_key
from llmchat.engine.constraints import Constraint, GrammarError
from tests.conftest import WEATHER_SCHEMA

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city"}}
WEATHER["function"]["parameters"] = WEATHER_SCHEMA
FLIGHT = {
    "type": "function",
    "function": {
        "name": "book_flight",
        "description": "Book seats on a flight",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string"},
                "destination": {"type": "string"},
                "seats": {"type": "integer"},
            },
            "required": ["origin", "destination", "seats"],
        },
    },
}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
TRIP = [{"role": "user", "content": "2 seats from Oslo to Rome, and the weather in Rome in celsius"}]


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def ask(client, **kwargs):
    args = {"model": MODEL, "messages": PARIS, "tools": [WEATHER], "tool_choice": "required", "temperature": 0}
    return client.chat.completions.create(**(args | kwargs))


def streamed(client, **kwargs) -> tuple[list[tuple[str, str]], str, int]:
    """(calls, finish_reason, completion tokens) of the same request streamed."""
    calls, finish, usage = {}, None, None
    for chunk in ask(client, stream=True, stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                name, args = calls.get(delta.index, ("", ""))
                calls[delta.index] = (delta.function.name or name, args + (delta.function.arguments or ""))
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, usage.completion_tokens


def calls_of(reply) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls or ()]


def assert_whole_distinct(calls, schemas) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])
    assert len({call_key(*c) for c in calls}) == len(calls), calls


def span_events(spans) -> list[str]:
    trace.get_tracer_provider().force_flush()
    return [e.name for s in spans.get_finished_spans() if s.name == f"chat {MODEL}" for e in s.events]


def test_a_repeated_call_ends_the_reply_streamed_and_whole(client, spans):
    """The bundled model asked for Paris's weather calls get_weather again and again; the first repeat ends it."""
    whole = ask(client)
    assert "tool_call.repeated" in span_events(spans)
    assert whole.choices[0].finish_reason == "tool_calls"
    assert_whole_distinct(calls_of(whole), {"get_weather": WEATHER_SCHEMA})
    assert streamed(client) == (calls_of(whole), "tool_calls", whole.usage.completion_tokens)


@pytest.mark.parametrize("max_tokens", [60, 90, 120, 200])
def test_a_reply_ends_with_whole_calls_before_max_tokens(client, max_tokens):
    """After each call, a reply with too little of max_tokens left for another call like it ends there."""
    schemas = {"get_weather": WEATHER_SCHEMA, "book_flight": FLIGHT["function"]["parameters"]}
    whole = ask(client, messages=TRIP, tools=[FLIGHT, WEATHER], max_tokens=max_tokens)
    assert whole.choices[0].finish_reason == "tool_calls"
    assert_whole_distinct(calls_of(whole), schemas)
    assert whole.usage.completion_tokens <= max_tokens
    assert streamed(client, messages=TRIP, tools=[FLIGHT, WEATHER], max_tokens=max_tokens) == (
        calls_of(whole),
        "tool_calls",
        whole.usage.completion_tokens,
    )


def test_the_call_cap_is_a_setting(live, client):
    chat = live.app.state.runtime.chat
    before, chat.max_tool_calls = chat.max_tool_calls, 1
    try:
        whole = ask(client, messages=TRIP, tools=[FLIGHT, WEATHER], max_tokens=200)
    finally:
        chat.max_tool_calls = before
    assert whole.choices[0].finish_reason == "tool_calls" and len(calls_of(whole)) == 1


class RefusesAfterACall(Constraint):
    """A grammar that refuses every token once a whole call has been consumed (its arguments and the call's
    object closed): what a marker the grammar does not expect looks like at that point."""

    def __init__(self, inner: Constraint, tokenizer) -> None:
        super().__init__(inner.matcher, inner.vocab_size)
        self.tokenizer, self.ids = tokenizer, []

    def _closed(self) -> bool:
        return "}}" in self.tokenizer.decode(self.ids)

    def consume(self, tokens: list[int]) -> None:
        if self._closed():
            raise GrammarError("the grammar refused a token (injected)")
        super().consume(tokens)
        self.ids += tokens

    def try_consume(self, tokens: list[int]) -> int:
        taken = 0
        while taken < len(tokens) and not self._closed() and super().try_consume(tokens[taken : taken + 1]):
            self.ids.append(tokens[taken])
            taken += 1
        return taken


def test_a_refused_token_ends_the_reply_and_a_whole_call_stays_a_call(live, client, spans, monkeypatch):
    """Never a 5xx: the reply ends with what was valid, streamed and whole alike, and the span says why."""
    grammar = live.app.state.runtime.chat.grammar
    build = grammar.constraint
    monkeypatch.setattr(grammar, "constraint", lambda text: RefusesAfterACall(build(text), grammar.tokenizer))
    whole = ask(client)
    assert whole.choices[0].finish_reason == "tool_calls"
    assert [name for name, _ in calls_of(whole)] == ["get_weather"]  # the repeat that would follow never came
    assert_whole_distinct(calls_of(whole), {"get_weather": WEATHER_SCHEMA})
    assert "grammar.refused" in span_events(spans)
    assert streamed(client) == (calls_of(whole), "tool_calls", whole.usage.completion_tokens)


def test_a_call_cut_by_max_tokens_is_left_out_of_whole_responses(live, client, spans):
    """Streams have sent its fragments; whole responses leave the broken call out and say why."""
    whole = ask(client, max_tokens=20)
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.tool_calls is None
    assert "tool_call.unterminated" in span_events(spans)
    calls, finish, tokens = streamed(client, max_tokens=20)
    assert finish == "length" and tokens == 20 and calls[0][0] == "get_weather"
    with pytest.raises(json.JSONDecodeError):
        json.loads(calls[0][1])

    messages = anthropic.Anthropic(base_url=live.base_url, api_key="unused", max_retries=0)
    tools = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER_SCHEMA}]
    args = {"model": MODEL, "messages": PARIS, "tools": tools, "tool_choice": {"type": "any"}, "max_tokens": 20}
    message = messages.messages.create(**args, extra_body={"temperature": 0})
    assert message.stop_reason == "max_tokens" and [b.type for b in message.content] == []
    with messages.messages.stream(**args, extra_body={"temperature": 0}) as stream:
        events = [e.type for e in stream]
    assert "content_block_start" in events and stream.get_final_message().content[0].type == "tool_use"

    responses = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0).responses
    response = responses.create(
        model=MODEL,
        input=PARIS,
        tools=[{"type": "function", **WEATHER["function"]}],
        tool_choice="required",
        max_output_tokens=20,
        temperature=0,
    )
    assert response.status == "incomplete" and response.output == []


# Schemas as clients send them, each with a request that gives the values; the model's arguments must
# validate against each as sent.
ASKS = {
    "nested": "Ship to 12 Main Street, zip 10115.",
    "array_of_objects": "Order 2 of sku A1 and 1 of sku B7.",
    "enum_and_bounds": "Forecast in c for 3 days, ratio 0.5.",
    "any_of_and_one_of": "Book it for 2026-12-01 for Ann.",
    "refs": "A line from (0, 0) to (3, 4).",
    "open_map_and_defaults": "Label it env=prod, email bob@example.com.",
    "all_of": "Set a to hello and b to true.",
}
BROAD = {
    "nested": {
        "type": "object",
        "properties": {
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"],
            }
        },
        "required": ["address"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["items"],
    },
    "enum_and_bounds": {
        "type": "object",
        "properties": {
            "unit": {"enum": ["c", "f"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        },
        "required": ["unit", "days", "ratio"],
    },
    "any_of_and_one_of": {
        "type": "object",
        "properties": {
            "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
            "who": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]},
        },
        "required": ["when", "who"],
    },
    "refs": {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "open_map_and_defaults": {
        "type": "object",
        "properties": {
            "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 12}},
            "limit": {"type": "integer", "default": 10},
            "email": {"type": "string", "format": "email"},
        },
        "required": ["labels"],
    },
    "all_of": {
        "allOf": [
            {"properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "boolean"}}},
        ]
    },
}


@pytest.mark.parametrize("name", sorted(BROAD))
def test_real_world_schemas_are_enforced(client, name):
    schema = BROAD[name]
    tool = {
        "type": "function",
        "function": {"name": f"tool.{name}-v2", "description": "Fill in every field", "parameters": schema},
    }
    reply = ask(
        client,
        messages=[{"role": "user", "content": ASKS[name]}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": f"tool.{name}-v2"}},
        max_tokens=200,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    ((called, arguments),) = calls_of(reply)
    assert called == f"tool.{name}-v2"
    jsonschema.validate(json.loads(arguments), schema, format_checker=jsonschema.FormatChecker())


def test_many_tools_with_dotted_and_dashed_names(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"svc-{n}.get_{topic}",
                "description": f"Look up {topic} in region {n}",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
        for n in range(12)
        for topic in ("weather", "stock", "news", "flight", "hotel")
    ]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    reply = ask(client, messages=PARIS, tools=tools, max_tokens=200)
    assert len(tools) == 60 and reply.choices[0].finish_reason == "tool_calls"
    assert_whole_distinct(calls_of(reply), schemas)


UNENFORCEABLE = [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "format": "zipcode"}, "zipcode"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"$ref": "https://example.com/schema.json"}, "https://example.com/schema.json"),
]


@pytest.mark.parametrize(("prop", "keyword"), UNENFORCEABLE)
def test_what_the_grammar_cannot_enforce_is_a_400_naming_it(live, prop, keyword):
    schema = {"type": "object", "properties": {"x": prop}}
    body = {
        "model": MODEL,
        "messages": PARIS,
        "tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": schema}}],
        "max_tokens": 5,
    }
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools.1.function.parameters" and keyword in error["message"], error
    anthropic_body = {
        "model": MODEL,
        "messages": PARIS,
        "max_tokens": 5,
        "tools": [{"name": "f.g", "input_schema": schema}],
    }
    r = httpx.post(f"{live.base_url}/v1/messages", json=anthropic_body, timeout=60)
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert keyword in r.json()["error"]["message"]
