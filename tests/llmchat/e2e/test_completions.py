"""Legacy text completions end to end: real server, bundled model, the openai SDK as the client (the adapter's
chunk and usage rules on scripted events are in tests/llmchat/api)."""

import httpx
import openai
import pytest
from opentelemetry import trace

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def complete(client, **kwargs):
    return client.completions.create(**{"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 6} | kwargs)


def collect(stream) -> tuple[str, str | None, list]:
    text, finish, usages = "", None, []
    for chunk in stream:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish, usages


def test_completion_continues_the_raw_prompt(client):
    r = complete(client)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.text.strip() and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    # No chat template: the prompt is the text itself, a handful of tokens.
    assert r.usage.prompt_tokens < 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming(client):
    whole = complete(client)
    text, finish, usages = collect(complete(client, stream=True, stream_options={"include_usage": True}))
    assert text == whole.choices[0].text and finish == whole.choices[0].finish_reason
    # The second request may find the first one's prompt in the prefix cache: only that may differ.
    (usage,) = usages
    assert usage.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
    for u in (usage, whole.usage):
        assert 0 <= u.prompt_tokens_details.cached_tokens <= u.prompt_tokens


def test_stream_without_include_usage_sends_none(client):
    _, finish, usages = collect(complete(client, max_tokens=2, stream=True))
    assert finish == "length" and usages == []


def test_stop_string_ends_with_stop(client):
    whole = complete(client).choices[0].text
    assert "." in whole, "the test needs the unstopped text to hold the stop string"
    r = complete(client, stop=["."])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == whole[: whole.index(".")]


def test_echo_puts_the_prompt_first(client):
    plain = complete(client).choices[0].text
    echoed = complete(client, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    text, _, _ = collect(complete(client, echo=True, stream=True))
    assert text == PROMPT + plain


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 16
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 16 else "stop")


def test_prompt_as_a_one_string_list(client):
    assert complete(client, prompt=[PROMPT]).choices[0].text == complete(client).choices[0].text


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 17}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": [791, 6864, 315]}, "prompt"),
        ({"prompt": [[791, 6864]]}, "prompt"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"suffix": "and that is all."}, "suffix"),
        ({"logprobs": 6}, "logprobs"),
        ({"max_tokens": 100_000}, "max_tokens"),
    ],
    ids=["n", "best_of", "token-ids", "token-id-lists", "several-prompts", "empty", "suffix", "logprobs", "too-long"],
)
def test_refusals_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, **fields)
    assert err.value.body["param"] == param


def test_token_id_refusal_says_to_send_text(client):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, prompt=[791, 6864, 315])
    assert "token ids" in err.value.message


def test_stream_wire_format_ends_with_done(live):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_span_operation_is_text_completion(client, spans):
    r = complete(client, max_tokens=1)
    trace.get_tracer_provider().force_flush()
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"text_completion {MODEL}"]
    assert span.attributes["gen_ai.operation.name"] == "text_completion"
    assert span.attributes["gen_ai.response.id"] == r.id
