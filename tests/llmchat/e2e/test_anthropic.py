"""The Anthropic Messages surface: the official anthropic SDK against a real server with the bundled model.
The adapter's offline checks (scripted streams, request mapping) are in test_anthropic_adapter.py."""

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import WEATHER_SCHEMA

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
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


def prompt_tokens(usage) -> int:
    """The whole prompt: Anthropic's input_tokens leaves out the tokens read from cache."""
    assert usage.cache_creation_input_tokens == 0
    return usage.input_tokens + usage.cache_read_input_tokens


def without_ids(message) -> list[dict]:
    return [block.model_dump(exclude={"id"}) for block in message.content]


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
    assert prompt_tokens(r.usage) > 10
    assert 0 < r.usage.output_tokens <= 20


def test_stream_gives_the_same_message(client, answer):
    whole = answer
    streamed, events = stream(client)
    assert streamed.id.startswith("msg_") and streamed.id != whole.id
    assert without_ids(streamed) == without_ids(whole)
    assert (streamed.stop_reason, streamed.stop_sequence) == (whole.stop_reason, whole.stop_sequence)
    # The same prompt may come from the prefix cache the second time: only the split of the prompt may differ.
    assert prompt_tokens(streamed.usage) == prompt_tokens(whole.usage)
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
    # message_delta's usage is cumulative: the prompt split into read-from-cache and not, as in the message.
    usage, start_usage = datas[-2]["usage"], datas[0]["message"]["usage"]
    assert usage.keys() == {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"}
    assert (usage["output_tokens"], usage["cache_creation_input_tokens"]) == (5, 0)
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == start_usage["input_tokens"]


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
    used = client.messages.create(model=MODEL, max_tokens=1, **fields).usage
    assert counted.input_tokens == prompt_tokens(used)


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
    # A bounded string, so the object is complete within max_tokens whatever the model writes in it.
    capital = {"type": "string", "maxLength": 20}
    schema = {"type": "object", "properties": {"capital": capital}, "required": ["capital"]}
    reply = ask(
        client, max_tokens=40, extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}}
    )
    assert reply.stop_reason == "end_turn"
    jsonschema.validate(json.loads(reply.content[0].text), schema)
