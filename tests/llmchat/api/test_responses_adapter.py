"""The Responses adapter without a server: the event builder fed scripted chat events (item order, sequence
numbers, in-band errors, usage), and the stream's final response equal to the whole one."""

import json

import pytest

from hrserve import ServiceError
from llmchat.api.openai_responses import ResponseReply
from llmchat.api.responses_request import NAMES
from llmchat.api.serving import invalid
from llmchat.chat import ChatError
from llmchat.chat.events import Finish, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from tests.llmchat.api.scripted import MODEL, replay
from tests.llmchat.e2e.test_responses import TEXT_EVENTS, squeeze

ECHO = {"parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def feed(reply: ResponseReply, events) -> list:
    return reply.start(10) + [out for event in events for out in reply.feed(event)]


def test_reply_puts_reasoning_text_and_calls_in_separate_items():
    reply = ResponseReply(MODEL, ECHO)
    script = [
        ReasoningDelta("Think"),
        ReasoningDelta("ing."),
        TextDelta("Calling."),
        ToolCallStart(0, "call_1", "get_weather"),
        ToolCallDelta(0, '{"city":'),
        ToolCallDelta(0, '"Paris"}'),
        Finish("tool_calls", 10, 9),
    ]
    events = feed(reply, script)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert squeeze([e.type for e in events]) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *TEXT_EVENTS[2:],
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    reasoning, message, call = events[-1].response.output
    assert reasoning.type == "reasoning" and reasoning.summary == [] and reasoning.content[0].text == "Thinking."
    assert message.content[0].text == "Calling." and events[-1].response.output_text == "Calling."
    assert (call.call_id, call.arguments, call.status) == ("call_1", '{"city":"Paris"}', "completed")
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1, 2]


def test_reply_reports_an_error_in_band():
    reply = ResponseReply(MODEL, ECHO)
    feed(reply, [TextDelta("Hel")])
    (sse,) = reply.stream_error(ServiceError(500, "Generation failed: boom", "server_error", "generation_error"))
    data = json.loads(sse["data"])
    assert sse["event"] == "error" == data["type"]
    assert data["code"] == "generation_error" and data["message"] == "Generation failed: boom"
    assert data["sequence_number"] == reply.sequence_number - 1 == 5


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_reply_reports_cached_prompt_tokens_streamed_and_whole(reason):
    script = [TextDelta("Paris"), Finish(reason, 10, 2, cached_tokens=6)]
    final = feed(ResponseReply(MODEL, ECHO), script)[-1].response
    sse, whole = replay(lambda: ResponseReply(MODEL, ECHO), script)
    assert json.loads(sse[-1]["data"])["response"]["usage"] == final.usage.model_dump(mode="json", exclude_unset=True)
    for response in (final, whole):
        assert response.usage.model_dump(mode="json", exclude_unset=True) == {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
            "output_tokens": 2,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 12,
        }


def test_core_field_names_become_the_responses_names():
    error = invalid(
        ChatError(lambda n: f"Lower {n['max_tokens']} or shorten the {n['messages']}.", "max_tokens"), NAMES
    )
    assert (error.param, error.message) == ("max_output_tokens", "Lower max_output_tokens or shorten the input.")
    error = invalid(ChatError(lambda n: f"The {n['output_format']} is unusable.", "output_format"), NAMES)
    assert (error.param, error.message) == ("text.format", "The text.format is unusable.")
