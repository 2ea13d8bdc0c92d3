"""logprobs / top_logprobs on chat completions and legacy completions, through the openai SDK."""

import math

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def assert_greedy_entries(entries, num_top):
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == num_top
        if num_top:
            # Greedy decoding picks a likeliest token, so its log-probability heads the list (bfloat16
            # logits can tie, and then the list may name the other token first).
            assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-4)
            assert [t.logprob for t in entry.top_logprobs] == sorted(
                (t.logprob for t in entry.top_logprobs), reverse=True
            )


def test_chat_logprobs_cover_the_content_streamed_or_not(client):
    args = {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    response = client.chat.completions.create(**args)
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    assert_greedy_entries(entries, 3)

    streamed = []
    for chunk in client.chat.completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    # The second request's prompt comes from the prefix cache, computed in other chunks than the first's; the
    # 4-bit decode steps round activations to bfloat16, which can turn that last-bit difference into a
    # rounding step.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=0.1)


def test_chat_without_logprobs_has_none(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert response.choices[0].logprobs is None


def test_logprobs_without_alternatives(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0, logprobs=True)
    assert_greedy_entries(response.choices[0].logprobs.content, 0)


@pytest.mark.parametrize(
    ("args", "param"), [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")]
)
def test_bad_logprobs_requests_are_400(client, args, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **args)
    assert raised.value.body["param"] == param


def test_completions_logprobs_columns_streamed_or_not(client):
    args = {"model": MODEL, "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    response = client.completions.create(**args)
    choice = response.choices[0]
    table = choice.logprobs
    assert len(table.tokens) == response.usage.completion_tokens
    assert "".join(table.tokens) == choice.text
    assert table.text_offset == [len("".join(table.tokens[:i])) for i in range(len(table.tokens))]
    for logprob, top in zip(table.token_logprobs, table.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) <= 2
        assert math.isclose(logprob, max(top.values()), abs_tol=1e-4), "greedy: the sampled token is a likeliest"

    streamed = []
    for chunk in client.completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.tokens
    assert streamed == table.tokens


def test_completions_echo_with_logprobs_is_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, echo=True, logprobs=1)
    assert raised.value.body["param"] == "logprobs"
