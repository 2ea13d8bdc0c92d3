"""The Anthropic Messages surface: the official anthropic SDK against a real server with the bundled model,
and the stream's block bookkeeping on scripted chat events the small model would never produce."""

import asyncio
import json

import anthropic
import httpx
import httpx2
import jsonschema
import pydantic
import pytest

from llmchat.anthropic_messages import MessageInfo, chat_input, sse_events, to_chat_request, to_message
from llmchat.anthropic_types import MessagesRequest
from llmchat.chat import CallRecord, ChatError, ChatMessage
from llmchat.events import Finish, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TOOLS = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_SCHEMA}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def client(live) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.base_url, api_key="unused", max_retries=0)


# Current SDKs have no sampling arguments (the API moved on); the server still takes them, so greedy
# decoding for repeatable answers goes in extra_body.
GREEDY = {"extra_body": {"temperature": 0}}


def ask(client, **kwargs):
    return client.messages.create(**({"model": MODEL, "messages": QUESTION, "max_tokens": 20} | GREEDY | kwargs))


def stream(client, **kwargs):
    with client.messages.stream(**({"model": MODEL, "messages": QUESTION, "max_tokens": 20} | GREEDY | kwargs)) as s:
        events = list(s)
        return s.get_final_message(), events


def without_ids(message) -> list[dict]:
    return [block.model_dump(exclude={"id"}) for block in message.content]


# Scripted: the SDK's own stream accumulator reads what sse_events writes.


def replay(chat_events) -> tuple[anthropic.types.Message, list[dict], anthropic.types.Message]:
    """(the SDK's message from our stream, the raw events, the whole response built from the same chat events)."""

    async def events():
        for event in chat_events:
            yield event

    async def run():
        sse = [item async for item in sse_events(events(), MessageInfo(MODEL, "msg_test"), 7)]
        return sse, await to_message(events(), MessageInfo(MODEL, "msg_test"), 7)

    sse, whole = asyncio.run(run())
    body = "".join(f"event: {item['event']}\ndata: {item['data']}\n\n" for item in sse)
    # The SDK's own client (it runs on httpx2) over a transport that answers with our stream.
    transport = httpx2.MockTransport(
        lambda request: httpx2.Response(200, text=body, headers={"content-type": "text/event-stream"})
    )
    sdk = anthropic.Anthropic(api_key="unused", max_retries=0, http_client=httpx2.Client(transport=transport))
    with sdk.messages.stream(model=MODEL, messages=QUESTION, max_tokens=50) as s:
        streamed = s.get_final_message()
    return streamed, [json.loads(item["data"]) for item in sse], whole


def max_open_blocks(events: list[dict]) -> int:
    """Checks that every delta and stop names a started, unstopped block and that all blocks stop before
    message_delta; returns how many were open at once."""
    open_blocks: set[int] = set()
    most = 0
    for event in events:
        if event["type"] == "content_block_start":
            assert event["index"] not in open_blocks
            open_blocks.add(event["index"])
            most = max(most, len(open_blocks))
        elif event["type"] in ("content_block_delta", "content_block_stop"):
            assert event["index"] in open_blocks, event
            if event["type"] == "content_block_stop":
                open_blocks.remove(event["index"])
        elif event["type"] == "message_delta":
            assert not open_blocks
    return most


def test_blocks_follow_content_order_one_at_a_time():
    streamed, events, whole = replay(
        [
            ReasoningDelta("The user wants"),
            ReasoningDelta(" the weather."),
            TextDelta("Checking."),
            ToolCallStart(0, "call_a1", "get_weather"),
            ToolCallDelta(0, '{"city": '),
            ToolCallDelta(0, '"Paris"}'),
            ToolCallStart(1, "call_b2", "get_time"),
            ToolCallDelta(1, "{}"),
            Finish("tool_calls", 7, 12),
        ]
    )
    assert [b.model_dump(exclude_none=True) for b in streamed.content] == [
        {"type": "thinking", "thinking": "The user wants the weather.", "signature": ""},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_a1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b2", "name": "get_time", "input": {}},
    ]
    assert (streamed.stop_reason, streamed.stop_sequence) == ("tool_use", None)
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (7, 12)
    # As Anthropic streams: each block stops before the next starts, once its input is whole.
    assert max_open_blocks(events) == 1
    assert [e["type"] for e in events][:2] == ["message_start", "ping"]
    assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
    assert whole.model_dump(exclude_none=True) == streamed.model_dump(exclude_none=True)


def test_a_call_continued_after_a_later_one_started_stays_correct():
    streamed, events, whole = replay(
        [
            ToolCallStart(0, "call_a1", "get_weather"),
            ToolCallStart(1, "call_b2", "get_weather"),
            ToolCallDelta(0, '{"city": '),
            ToolCallDelta(1, '{"city": "Oslo", '),
            ToolCallDelta(0, '"Paris"}'),
            ToolCallDelta(1, '"unit": "celsius"}'),
            TextDelta("Done."),
            Finish("tool_calls", 7, 20),
        ]
    )
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [
        ("tool_use", {"city": "Paris"}),
        ("tool_use", {"city": "Oslo", "unit": "celsius"}),
        ("text", None),
    ]
    # Both calls' blocks had to stay open to take their later fragments.
    assert max_open_blocks(events) == 2
    assert whole.model_dump(exclude_none=True) == streamed.model_dump(exclude_none=True)


@pytest.mark.parametrize(
    ("chat_events", "stop_reason", "stop_sequence"),
    [
        ([TextDelta("Paris"), Finish("stop", 7, 2, stop_sequence=" is")], "stop_sequence", " is"),
        ([TextDelta("Paris"), Finish("stop", 7, 2)], "end_turn", None),
        # A call cut short by max_tokens keeps the input that parses.
        (
            [
                ToolCallStart(0, "call_a1", "get_weather"),
                ToolCallDelta(0, '{"unit": "celsius", "ci'),
                Finish("length", 7, 5),
            ],
            "max_tokens",
            None,
        ),
        ([Finish("stop", 7, 0)], "end_turn", None),
    ],
)
def test_stop_reasons_and_whole_response_match_the_stream(chat_events, stop_reason, stop_sequence):
    streamed, events, whole = replay(chat_events)
    assert (whole.stop_reason, whole.stop_sequence) == (stop_reason, stop_sequence)
    assert whole.model_dump(exclude_none=True) == streamed.model_dump(exclude_none=True)
    assert max_open_blocks(events) <= 1


# Request mapping.


def request_body(**kwargs) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": MODEL, "max_tokens": 10, "messages": QUESTION} | kwargs)


def test_conversation_maps_to_chat_messages_in_order():
    body = request_body(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        messages=[
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Two cities.", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "timeout"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "And tomorrow?", "cache_control": {"type": "ephemeral"}},
                ],
            },
        ],
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        stop_sequences=["END"],
        thinking={"type": "disabled"},
    )
    request = to_chat_request(body)
    assert request.messages == [
        ChatMessage("system", "Be brief.\n\nUse tools."),
        ChatMessage("user", "Weather in Paris and Oslo?"),
        ChatMessage(
            "assistant",
            "Checking.",
            (
                CallRecord("toolu_1", "get_weather", '{"city": "Paris"}'),
                CallRecord("toolu_2", "get_weather", '{"city": "Oslo"}'),
            ),
        ),
        ChatMessage("tool", "18C", tool_call_id="toolu_1"),
        ChatMessage("tool", "Error: timeout", tool_call_id="toolu_2"),
        ChatMessage("user", "And tomorrow?"),
    ]
    assert (request.tool_choice, request.tool_name, request.parallel_tool_calls) == ("required", None, False)
    assert [t.name for t in request.tools] == ["get_weather"]
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (10, 0.5, 0.9, 40)
    assert request.stop == ("END",)
    assert request.template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ("auto", None, True)),
        ({"type": "auto", "disable_parallel_tool_use": True}, ("auto", None, False)),
        ({"type": "any"}, ("required", None, True)),
        ({"type": "tool", "name": "get_weather"}, ("function", "get_weather", True)),
        ({"type": "none"}, ("none", None, True)),
    ],
)
def test_tool_choice_maps_to_the_chat_core(choice, expected):
    request = chat_input(request_body(tools=TOOLS, tool_choice=choice))
    assert (request.tool_choice, request.tool_name, request.parallel_tool_calls) == expected


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]},
            "messages.0.content.1",
            "image blocks",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [IMAGE]}]}
                ]
            },
            "messages.0.content.0.content.0",
            "image blocks",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
            "messages.0.content.0",
            "assistant messages",
        ),
        ({"messages": QUESTION + [{"role": "assistant", "content": "The capital is"}]}, "messages.1.role", "prefill"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type", "server tool"),
        ({"tools": TOOLS + TOOLS}, "tools.1.name", "unique"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools.0.input_schema", "object"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name", "not one of"),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "offers no tools"),
        (
            {"tools": TOOLS, "output_config": {"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}}},
            "output_config.format",
            "cannot be combined with tools",
        ),
    ],
)
def test_what_cannot_be_served_is_refused_at_the_field(fields, param, words):
    with pytest.raises(ChatError) as exc:
        to_chat_request(request_body(**fields))
    assert exc.value.param == param
    assert words in exc.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"temperature": 1.5},
        {"messages": [{"role": "user", "content": []}]},
        {"messages": [{"role": "system", "content": "Hi"}]},
        {"tools": TOOLS, "tool_choice": {"type": "tool"}},
        {"tools": [{"name": "has spaces", "input_schema": {"type": "object"}}]},
    ],
)
def test_malformed_requests_fail_validation(fields):
    with pytest.raises(pydantic.ValidationError):
        request_body(**fields)


# End to end: the anthropic SDK against the real server.


@pytest.fixture(scope="module")
def answer(client):
    """The greedy answer to QUESTION, which several tests compare against (the CPU model is slow)."""
    return ask(client)


WEATHER_CALL = {
    "messages": ASK_WEATHER,
    "tools": TOOLS,
    "max_tokens": 40,
    "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
}


@pytest.fixture(scope="module")
def weather_call(client):
    return ask(client, **WEATHER_CALL)


def test_message_answers_with_usage(answer):
    r = answer
    assert r.id.startswith("msg_")
    assert (r.type, r.role, r.model) == ("message", "assistant", MODEL)
    assert [b.type for b in r.content] == ["text"]
    assert "Paris" in r.content[0].text
    assert (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    assert r.usage.input_tokens > 10
    assert 0 < r.usage.output_tokens <= 20


def test_stream_gives_the_same_message(client, answer):
    whole = answer
    streamed, events = stream(client)
    assert streamed.id.startswith("msg_") and streamed.id != whole.id
    assert without_ids(streamed) == without_ids(whole)
    assert (streamed.stop_reason, streamed.stop_sequence) == (whole.stop_reason, whole.stop_sequence)
    assert streamed.usage.input_tokens == whole.usage.input_tokens
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == whole.content[0].text


def test_top_k_reaches_the_sampler(client, answer):
    # Sampling from the single likeliest token is greedy decoding, whatever the temperature.
    assert ask(client, extra_body={"temperature": 1, "top_k": 1}).content == answer.content


def test_raw_stream_events_in_anthropic_order(live):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith(("event:", "data:"))]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert [d["type"] for d in datas] == names
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert datas[0]["message"]["content"] == [] and datas[0]["message"]["stop_reason"] is None
    assert datas[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert datas[-2]["usage"] == {"output_tokens": 5}


def test_max_tokens_stops_with_max_tokens(client):
    prompt = [{"role": "user", "content": "Write a long story about a dragon."}]
    for reply in (ask(client, messages=prompt, max_tokens=3), stream(client, messages=prompt, max_tokens=3)[0]):
        assert reply.stop_reason == "max_tokens"
        assert reply.usage.output_tokens == 3


def test_stop_sequence_cuts_output_and_is_named(client, answer):
    text = answer.content[0].text
    assert " is " in text
    for reply in (
        ask(client, stop_sequences=["nothing-like-this", " is "]),
        stream(client, stop_sequences=[" is "])[0],
    ):
        assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", " is ")
        assert reply.content[0].text == text.split(" is ")[0]


def assert_valid_tool_use(reply):
    assert reply.stop_reason == "tool_use"
    calls = [b for b in reply.content if b.type == "tool_use"]
    assert len(calls) == 1
    assert calls[0].id.startswith("toolu_") and calls[0].name == "get_weather"
    jsonschema.validate(calls[0].input, WEATHER_SCHEMA)
    return calls[0]


def test_tool_use_round_trip(client, weather_call):
    first = weather_call
    call = assert_valid_tool_use(first)
    history = ASK_WEATHER + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'}
            ],
        },
    ]
    # tool_choice none: the small model would often call again, and a text answer is what is tested here.
    final = ask(client, **WEATHER_CALL | {"messages": history, "tool_choice": {"type": "none"}})
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"] and final.content[0].text.strip()


def test_streamed_tool_use_accumulates_its_input(client, weather_call):
    streamed, events = stream(client, **WEATHER_CALL)
    assert_valid_tool_use(streamed)
    assert without_ids(streamed) == without_ids(weather_call)
    fragments = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert len(fragments) > 1 and json.loads("".join(fragments)) == streamed.content[0].input


@pytest.mark.parametrize(
    "fields",
    [
        {"system": [{"type": "text", "text": "You answer in one word."}], "messages": QUESTION},
        {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": {"type": "any"}},
    ],
)
def test_count_tokens_matches_the_usage_of_the_same_request(client, fields):
    counted = client.messages.count_tokens(model=MODEL, **fields)
    used = client.messages.create(model=MODEL, max_tokens=1, **fields).usage.input_tokens
    assert counted.input_tokens == used


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert body.keys() == {"type", "error"} and body["type"] == "error"
    assert body["error"].keys() == {"type", "message"}
    return body["error"]


def test_missing_max_tokens_and_bad_role_are_400(live):
    url = f"{live.base_url}/v1/messages"
    r = httpx.post(url, json={"model": MODEL, "messages": QUESTION})
    assert r.status_code == 400
    error = error_of(r)
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]
    r = httpx.post(url, json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "Hi"}]})
    assert r.status_code == 400 and "messages.0.role" in error_of(r)["message"]
    r = httpx.post(f"{url}/count_tokens", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and "messages" in error_of(r)["message"]


def test_unknown_model_is_404_not_found(client, live):
    with pytest.raises(anthropic.NotFoundError) as exc:
        ask(client, model="claude-nonexistent")
    assert exc.value.status_code == 404
    assert exc.value.body["error"]["type"] == "not_found_error"
    assert "claude-nonexistent" in exc.value.body["error"]["message"]
    r = httpx.post(f"{live.base_url}/v1/messages/count_tokens", json={"model": "nope", "messages": QUESTION})
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"


def test_image_block_is_refused(client):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    with pytest.raises(anthropic.BadRequestError) as exc:
        ask(client, messages=messages)
    assert exc.value.status_code == 400
    assert exc.value.body["type"] == "error"
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    assert "image blocks are not supported" in exc.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model=MODEL, messages=messages)


def test_output_config_format_gives_json_matching_the_schema(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    reply = ask(client, max_tokens=30, output_config={"format": {"type": "json_schema", "schema": schema}})
    assert reply.stop_reason == "end_turn"
    jsonschema.validate(json.loads(reply.content[0].text), schema)
