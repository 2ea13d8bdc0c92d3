"""The OpenAI chat adapter without a server: scripted chat events streamed as chunks that the openai SDK's own
accumulator folds into the same completion as the whole response; chunk rules (role first, usage null until
the last, log-probabilities on the next output chunk); request mapping and refusals named as OpenAI names them."""

import json

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from hrserve import ServiceError
from llmchat.api.common import DONE
from llmchat.api.openai_chat import NAMES, ChatReply, to_chat_request
from llmchat.api.openai_types import ChatCompletionRequest
from llmchat.api.serving import invalid
from llmchat.chat import ChatError, ChatMessage
from llmchat.chat.events import Finish, Logprobs, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from llmchat.engine.sampling import TokenLogprob
from tests.llmchat.api.scripted import MODEL, replay, sdk_http_client

QUESTION = [{"role": "user", "content": "Weather in Paris and Oslo?"}]


def logprobs(*tokens: str) -> Logprobs:
    return Logprobs([TokenLogprob(t, -0.5, [(t, -0.5), ("x", -2.0)]) for t in tokens])


def play(chat_events, logprobs: bool = False, include_usage: bool = True):
    """(the completion the SDK folds from our stream, the chunks as JSON, the whole response)."""
    sse, whole = replay(lambda: ChatReply(MODEL, logprobs, include_usage), chat_events)
    assert sse[-1] == {"data": DONE}
    client = openai.OpenAI(api_key="unused", max_retries=0, http_client=sdk_http_client(openai, sse))
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True):
        state.handle_chunk(chunk)
    # The snapshot, not get_final_completion(), which raises on finish_reason "length".
    return state.current_completion_snapshot, [json.loads(item["data"]) for item in sse[:-1]], whole


def agree(streamed, whole) -> None:
    """What a client reads from the stream is what the whole response says."""
    (s,), (w,) = streamed.choices, whole.choices
    assert s.finish_reason == w.finish_reason
    # An empty reply streams no content delta, so the accumulator has None where the whole response says "".
    assert s.message.content == (w.message.content or None)
    calls = [(c.id, c.type, c.function.name, c.function.arguments) for c in s.message.tool_calls or []]
    assert calls == [(c.id, c.type, c.function.name, c.function.arguments) for c in w.message.tool_calls or []]
    assert (s.logprobs and s.logprobs.content) == (w.logprobs and w.logprobs.content)
    assert streamed.usage == whole.usage


def test_text_reasoning_and_interleaved_calls_stream_as_the_whole_response():
    streamed, chunks, whole = play(
        [
            ReasoningDelta("Two cities."),
            TextDelta("Checking."),
            ToolCallStart(0, "call_a1", "get_weather"),
            ToolCallStart(1, "call_b2", "get_weather"),
            ToolCallDelta(0, '{"city": '),
            ToolCallDelta(1, '{"city": "Oslo"}'),
            ToolCallDelta(0, '"Paris"}'),
            Finish("tool_calls", 7, 20, cached_tokens=4),
        ]
    )
    agree(streamed, whole)
    message = whole.choices[0].message
    assert message.content == "Checking."
    assert message.reasoning_content == message.reasoning == "Two cities."
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("call_a1", "get_weather", '{"city": "Paris"}'),
        ("call_b2", "get_weather", '{"city": "Oslo"}'),
    ]
    assert whole.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 7,
        "completion_tokens": 20,
        "total_tokens": 27,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    # A call's first delta carries its id, type and name; the rest only argument fragments.
    deltas = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [set(d) for d in deltas[:2]] == [{"index", "id", "type", "function"}] * 2
    assert all(set(d) == {"index", "function"} for d in deltas[2:])


def test_chunk_order_and_the_null_usage_rule():
    _, chunks, _ = play([TextDelta("Paris"), Finish("stop", 7, 1)], include_usage=True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "stop"]
    # With include_usage every chunk says "usage": null but the last, which has no choices.
    assert [c["usage"] for c in chunks[:-1]] == [None] * 3
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    _, chunks, whole = play([TextDelta("Paris"), Finish("stop", 7, 1)], include_usage=False)
    assert len(chunks) == 3 and not any("usage" in c for c in chunks)
    assert whole.usage.total_tokens == 8  # the whole response always has usage


def test_logprobs_ride_on_the_next_output_chunk():
    streamed, chunks, whole = play(
        [logprobs("Par"), logprobs("is"), TextDelta("Paris"), logprobs("."), Finish("stop", 7, 3)], logprobs=True
    )
    agree(streamed, whole)
    on_chunks = [
        [t["token"] for t in (c["choices"][0].get("logprobs") or {}).get("content") or []] for c in chunks[:-1]
    ]
    assert on_chunks == [[], ["Par", "is"], ["."]]
    assert [t.token for t in whole.choices[0].logprobs.content] == ["Par", "is", "."]
    assert whole.choices[0].logprobs.content[0].top_logprobs[1].token == "x"


@pytest.mark.parametrize(
    ("chat_events", "content"),
    [
        ([ToolCallStart(0, "call_a1", "f"), ToolCallDelta(0, "{}"), Finish("tool_calls", 7, 3)], None),
        ([Finish("length", 7, 0)], ""),
        ([ReasoningDelta("Hmm"), Finish("length", 7, 1)], None),
    ],
)
def test_content_is_null_only_beside_calls_or_reasoning(chat_events, content):
    streamed, _, whole = play(chat_events)
    assert whole.choices[0].message.content == content
    agree(streamed, whole)


def test_an_error_after_the_status_line_goes_in_band_then_done():
    reply = ChatReply(MODEL)
    first, done = reply.stream_error(ServiceError(500, "Generation failed: boom", "server_error", "generation_error"))
    assert json.loads(first["data"])["error"] == {
        "message": "Generation failed: boom",
        "type": "server_error",
        "param": None,
        "code": "generation_error",
    }
    assert done == {"data": DONE}


# Request mapping.


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": QUESTION} | fields)


def test_request_maps_to_the_chat_core():
    chat = to_chat_request(
        request(
            messages=[{"role": "developer", "content": "Be brief."}] + QUESTION,
            max_completion_tokens=20,
            temperature=0.5,
            stop="END",
            logprobs=True,
            top_logprobs=2,
            response_format={"type": "json_object"},
        )
    )
    assert chat.messages == [ChatMessage("system", "Be brief."), ChatMessage("user", QUESTION[0]["content"])]
    assert (chat.max_tokens, chat.temperature, chat.stop, chat.logprobs) == (20, 0.5, ("END",), 2)
    assert (chat.json_output, chat.json_schema) == (True, None)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"functions": [{"name": "f"}]}, "functions", "send tools instead"),
        ({"modalities": ["text", "audio"]}, "modalities", "text only"),
        ({"logit_bias": {"x": 1}}, "logit_bias.x", "token ids"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "one structured output"),
        ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
        ({"guided_json": "{not json"}, "guided_json", "JSON Schema"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "response_format"),
        ({"min_tokens": 30, "max_tokens": 10}, "min_tokens", "more than max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
            "messages.0.content.0",
            "text-only",
        ),
        ({"tool_choice": "required"}, "tool_choice", "offers no tools"),
    ],
)
def test_what_cannot_be_served_is_refused_at_the_field(fields, param, words):
    with pytest.raises(ChatError) as exc:
        to_chat_request(request(**fields))
    error = invalid(exc.value, NAMES)
    assert error.param == param and words in error.message


def test_core_field_names_become_openais():
    error = invalid(ChatError(lambda n: f"The {n['output_format']} cannot be enforced.", "output_format"), NAMES)
    assert (error.param, error.message) == ("response_format", "The response_format cannot be enforced.")
