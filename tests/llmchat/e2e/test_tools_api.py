"""Tool calling and JSON output end to end: real server, bundled model, the openai SDK and LiteLLM as clients."""

import json
import os

import httpx
import jsonschema
import openai
import pytest
from opentelemetry import trace

from tests.conftest import WEATHER_SCHEMA

MODEL = "SmolLM2-135M-Instruct"
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_SCHEMA},
    },
    {"type": "function", "function": {"name": "get_time", "description": "The current time"}},
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": {"type": "object", "properties": {}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def ask(client, **kwargs):
    args = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 60} | kwargs
    return client.chat.completions.create(**args)


def assert_valid_calls(calls):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def collect_stream(stream):
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            if delta.id is not None:
                assert delta.index not in calls, "only a call's first delta carries its id"
                assert delta.type == "function" and delta.function.name
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_enforced_choice_gives_one_valid_call(client, choice):
    r = ask(client, tool_choice=choice, parallel_tool_calls=False)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert len(message.tool_calls) == 1
    assert_valid_calls(message.tool_calls)
    if choice == NAMED:
        assert message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_streamed_calls_equal_non_streamed(client, choice):
    whole = ask(client, tool_choice=choice, max_tokens=80)
    content, calls, finish = collect_stream(ask(client, tool_choice=choice, max_tokens=80, stream=True))
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls or ()]
    assert [(c["name"], c["arguments"]) for c in calls] == expected
    assert content == (whole.choices[0].message.content or "")
    assert finish == whole.choices[0].finish_reason
    assert [c["id"] for c in calls] == sorted({c["id"] for c in calls}, key=[c["id"] for c in calls].index)


def test_tool_without_parameters_gets_empty_object(client):
    r = ask(client, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and call.function.arguments == "{}"


def test_tool_choice_none_leaves_tools_out(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0)
    r = ask(client, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_round_trip_call_then_result_then_answer(client):
    first = ask(client, tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "clear"}'},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    answer = final.choices[0].message
    assert answer.tool_calls is None and answer.content
    question_only = ask(client, tool_choice="none", max_tokens=1)
    assert final.usage.prompt_tokens > question_only.usage.prompt_tokens + 20, "the call and its result were rendered"
    assert "18" in answer.content or "clear" in answer.content.lower()


def test_auto_may_answer_in_text(client):
    r = ask(client, tool_choice="auto", max_tokens=20)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert_valid_calls(choice.message.tool_calls)
        assert choice.finish_reason in ("tool_calls", "length")
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content


def test_json_schema_response_validates(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    messages = [{"role": "user", "content": "Invent a person."}]
    for stream in (False, True):
        args = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 60, "response_format": fmt}
        if stream:
            text = "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args)
            )
        else:
            text = client.chat.completions.create(**args).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_json_object_response_parses(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_truncated_call_is_recorded_on_the_span(client, spans):
    r = ask(client, tool_choice="required", max_tokens=8)
    assert r.choices[0].finish_reason == "length"
    trace.get_tracer_provider().force_flush()
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"chat {MODEL}"]
    assert "tool_call.unterminated" in [e.name for e in span.events]
    assert span.attributes["gen_ai.request.model"] == MODEL


BAD_REQUESTS = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 3}}}]},
        "tools.0.function.parameters",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools.0.function.parameters",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
        "response_format.json_schema.schema",
    ),
    ({"messages": [{"role": "tool", "content": "18 degrees"}]}, "messages.0"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                    ],
                }
            ]
        },
        "messages.0.tool_calls.0.function.arguments",
    ),
]


@pytest.mark.parametrize(("change", "param"), BAD_REQUESTS)
def test_bad_tool_requests_are_400_with_param(live, change, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5} | change
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_litellm_client_gets_tool_calls(live, stream):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    r = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{live.base_url}/v1",
        api_key="unused",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
        stream=stream,
    )
    if stream:
        r = litellm.stream_chunk_builder(list(r), messages=ASK)
    assert r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(r.choices[0].message.tool_calls)
