"""The Anthropic Messages adapter without a server: the stream's block bookkeeping on scripted chat events the
small model would never produce (read back by the SDK's own accumulator), and request mapping and refusals."""

import json

import anthropic
import pydantic
import pytest

from llmchat.api.anthropic_messages import NAMES, MessageReply, chat_input, to_chat_request
from llmchat.api.anthropic_types import MessagesRequest
from llmchat.api.serving import invalid
from llmchat.chat import CallRecord, ChatError, ChatMessage
from llmchat.chat.events import Finish, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from tests.llmchat.api.scripted import replay as replay_reply
from tests.llmchat.api.scripted import sdk_http_client
from tests.llmchat.e2e.test_anthropic import MODEL, QUESTION, TOOLS, WEATHER_SCHEMA

# Scripted: the SDK's own stream accumulator reads what the reply streams.


def replay(chat_events) -> tuple[anthropic.types.Message, list[dict], anthropic.types.Message]:
    """(the SDK's message from our stream, the raw events, the whole response built from the same chat events)."""
    sse, whole = replay_reply(lambda: MessageReply(MODEL), chat_events)
    sdk = anthropic.Anthropic(api_key="unused", max_retries=0, http_client=sdk_http_client(anthropic, sse))
    with sdk.messages.stream(model=MODEL, messages=QUESTION, max_tokens=50) as s:
        streamed = s.get_final_message()
    # Each reply draws its own id; everything else must agree.
    streamed.id = whole.id
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


def test_cached_prompt_tokens_follow_anthropics_usage_convention():
    # 5 of the 7 prompt tokens came from the prefix cache: input_tokens counts only the other 2.
    streamed, events, whole = replay([TextDelta("Paris"), Finish("stop", 7, 2, cached_tokens=5)])
    expected = {"input_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5, "output_tokens": 2}
    assert whole.usage.model_dump(include=set(expected)) == expected
    assert streamed.usage.model_dump(include=set(expected)) == expected
    # message_start cannot know the cached count yet; message_delta's cumulative usage corrects it.
    (start,) = [e for e in events if e["type"] == "message_start"]
    (delta,) = [e for e in events if e["type"] == "message_delta"]
    assert start["message"]["usage"] == expected | {"input_tokens": 7, "cache_read_input_tokens": 0, "output_tokens": 0}
    assert delta["usage"] == expected
    assert whole.model_dump(exclude_none=True) == streamed.model_dump(exclude_none=True)


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
    error = invalid(exc.value, NAMES)
    assert error.param == param
    assert words in error.message


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
