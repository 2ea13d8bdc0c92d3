"""The OpenAI surface end to end: real uvicorn, real bundled model, the official openai SDK."""

import json

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_non_streaming_answers_with_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens


def test_max_tokens_gives_length(client):
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story about a dragon."}],
            temperature=0,
            **limit,
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 3


def test_stop_string_cuts_output(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    assert " is " in text
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0, stop=[" is "])
    assert r.choices[0].message.content == text.split(" is ")[0]
    assert r.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        r = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
        )
        return r.choices[0].message.content

    assert sample(1234) == sample(1234)


def test_streaming_sdk_matches_non_streaming(client):
    args = dict(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[0].choices[0].delta.content
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_streaming_wire_format(live):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    data = [line.removeprefix("data: ") for line in lines if not line.startswith(":")]
    assert all(line.startswith("data: ") for line in lines if not line.startswith(":"))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # no include_usage, no usage key
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_default_budget_is_rest_of_context(client, live):
    # Without max_tokens, the only limit is the context: a generation that ends by itself says "stop".
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    health = httpx.get(f"{live.base_url}/health").json()
    too_many = health["max_context"] - r.usage.prompt_tokens + 1
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=too_many)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert exc.value.body["param"] == "max_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": QUESTION, "temperature": 2.5}, "temperature"),
        ({"model": MODEL, "messages": QUESTION, "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": QUESTION, "n": 129}, "n"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_input_is_400_in_openai_envelope(live, body, param):
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_malformed_json_is_400(live):
    r = httpx.post(
        f"{live.base_url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert exc.value.body["code"] == "model_not_found"
    assert exc.value.body["param"] == "model"


def test_unknown_route_is_404_envelope(live):
    r = httpx.get(f"{live.base_url}/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_response_headers_carry_trace_span_and_job_id(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=2, extra_headers={"X-Client-Job-ID": "nightly-42"}
    )
    assert len(raw.headers["x-trace-id"]) == 32
    assert len(raw.headers["x-span-id"]) == 16
    assert raw.headers["x-client-job-id"] == "nightly-42"
    assert raw.headers["x-request-id"]
    body = raw.parse().model_dump()
    assert "trace_id" not in json.dumps(body)


def test_client_job_id_from_query_and_streaming_headers(live):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2, "stream": True}
    url = f"{live.base_url}/v1/chat/completions?client_job_id=batch.7"
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.headers["x-client-job-id"] == "batch.7"
        assert len(r.headers["x-trace-id"]) == 32
        r.read()


@pytest.mark.parametrize("job_id", ["has space", "x" * 129, "new\\nline", "tab\\there", "semi;colon"])
def test_hostile_client_job_id_is_400(live, job_id):
    r = httpx.post(
        f"{live.base_url}/v1/chat/completions",
        params={"client_job_id": job_id},
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 1},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "client_job_id"


def test_health_reports_model_and_memory(live):
    r = httpx.get(f"{live.base_url}/health")
    assert r.status_code == 200
    health = r.json()
    assert health["status"] == "ok" and health["service"] == "llmchat"
    assert health["model"] == MODEL
    assert health["device"] == "cpu" and health["quantization"] == "none"
    assert health["memory_bytes"] > 100_000_000
    assert health["max_context"] == 8192
