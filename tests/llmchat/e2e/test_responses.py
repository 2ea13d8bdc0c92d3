"""The Responses API end to end (real server, bundled model, the openai SDK), plus the event builder fed
scripted chat events the small model never produces (reasoning, an error mid-stream)."""

import json

import httpx
import jsonschema
import openai
import pytest
from opentelemetry import trace

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1}}, "required": ["city"]}
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_SCHEMA,
    }
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def ask(client, **kwargs):
    return client.responses.create(
        **{"model": MODEL, "input": QUESTION, "temperature": 0, "max_output_tokens": 8} | kwargs
    )


def squeeze(types: list[str]) -> list[str]:
    """Event types with runs of the same delta type collapsed to one, to compare against a template."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


def test_text_response(client):
    r = ask(client)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_")
    assert message.content[0].annotations == []
    assert r.output_text.strip()
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert 0 <= r.usage.input_tokens_details.cached_tokens <= r.usage.input_tokens
    assert r.max_output_tokens == 8 and r.temperature == 0 and r.tools == []


def test_stream_is_ordered_and_equals_whole_response(client):
    whole = ask(client)
    events = list(ask(client, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert squeeze([e.type for e in events]) == TEXT_EVENTS + ["response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    final = events[-1].response
    assert deltas == done.text == final.output_text == whole.output_text
    assert final.id == events[0].response.id and final.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens
    added, item_done = (e for e in events if e.type.startswith("response.output_item."))
    assert added.item.status == "in_progress" and added.item.content == []
    assert item_done.item.id == added.item.id and item_done.item.content[0].text == deltas


def test_stream_sends_sse_event_names(live):
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/responses", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and names[-1] == "response.incomplete"


def test_max_output_tokens_gives_incomplete(client):
    r = ask(client, max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete"
    events = list(ask(client, max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == r.output_text


def test_function_call_round_trip(client):
    first = ask(
        client, input=ASK_WEATHER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_output_tokens=40
    )
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 18}'}
    history = ASK_WEATHER + [item.model_dump(exclude_none=True) for item in first.output] + [result]
    final = ask(client, input=history, tools=TOOLS, tool_choice="none", max_output_tokens=20)
    assert final.status in ("completed", "incomplete")
    assert [item.type for item in final.output] == ["message"] and final.output_text.strip()
    question_only = ask(client, input=ASK_WEATHER, max_output_tokens=1)
    assert final.usage.input_tokens > question_only.usage.input_tokens + 20, "the call and its output were rendered"


def test_streamed_function_call_equals_whole(client):
    args = {"input": ASK_WEATHER, "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}}
    whole = ask(client, **args, max_output_tokens=40)
    events = list(ask(client, **args, max_output_tokens=40, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert squeeze([e.type for e in events]) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (call,) = whole.output
    assert deltas == done.arguments == call.arguments and done.name == "get_weather"
    assert events[2].item.type == "function_call" and events[2].item.arguments == ""
    assert events[-1].response.output[0].call_id == events[2].item.call_id


def test_instructions_become_the_system_message(client):
    rule = "Answer in one word, in French."
    guided = ask(client, max_output_tokens=3, instructions=rule)
    assert guided.instructions == rule
    for role in ("system", "developer"):
        explicit = ask(
            client, max_output_tokens=3, input=[{"role": role, "content": rule}, {"role": "user", "content": QUESTION}]
        )
        assert explicit.usage.input_tokens == guided.usage.input_tokens
        assert explicit.output_text == guided.output_text


def test_json_schema_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    fmt = {"type": "json_schema", "name": "answer", "schema": schema}
    r = ask(client, max_output_tokens=30, text={"format": fmt})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "answer"


def test_nothing_is_stored(client):
    r = ask(client, max_output_tokens=1, store=True)
    assert r.store is False  # an extra field of the SDK's type, which knows no `store`
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id" and "stateless" in err.value.message


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda c: c.responses.retrieve("resp_abc"), openai.NotFoundError),
        (lambda c: c.responses.delete("resp_abc"), openai.NotFoundError),
        (lambda c: c.responses.input_items.list("resp_abc"), openai.NotFoundError),
        (lambda c: c.responses.cancel("resp_abc"), openai.BadRequestError),
    ],
    ids=["retrieve", "delete", "input_items", "cancel"],
)
def test_stored_response_routes_explain_statelessness(client, call, error):
    with pytest.raises(error) as err:
        call(client)
    assert "stateless" in err.value.message and err.value.body["type"] == "invalid_request_error"


IMAGE = {"type": "input_image", "image_url": "https://example.com/cat.png"}


@pytest.mark.parametrize(
    "fields, param",
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "What?"}, IMAGE]}]},
            "input.0.content.1.type",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "18"}]}, "input.0.call_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"conversation": "conv_1"}, "conversation"),
    ],
    ids=[
        "image",
        "hosted-tool",
        "orphan-output",
        "item-reference",
        "choice-without-tools",
        "empty",
        "too-long",
        "conversation",
    ],
)
def test_refusals_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, **fields)
    assert err.value.body["param"] == param


def test_image_refusal_names_the_limitation(client):
    content = [{"type": "input_text", "text": "What is this?"}, IMAGE]
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, input=[{"role": "user", "content": content}])
    assert "text only" in err.value.message and "input_image" in err.value.message


def test_span_carries_the_response_id(client, spans):
    raw = client.responses.with_raw_response.create(model=MODEL, input=QUESTION, max_output_tokens=1)
    response = raw.parse()
    trace.get_tracer_provider().force_flush()
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"chat {MODEL}"]
    assert span.attributes["gen_ai.response.id"] == response.id
    assert format(span.context.trace_id, "032x") == raw.headers["x-trace-id"]
