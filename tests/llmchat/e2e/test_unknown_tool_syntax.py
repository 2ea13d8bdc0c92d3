"""A chat template that takes tools but marks calls in a syntax llmchat does not know: tools still reach the
template, auto replies come back as text, required and named calls are a clear 400, and /health and the log
say why, instead of a grammar for a syntax the model never learned."""

import logging
from types import SimpleNamespace

import anthropic
import httpx
import openai
import pytest

from llmchat.chat import Chat, ChatOptions
from tests.conftest import serve_template

MODEL = "SmolLM2-135M-Instruct"
# ChatML, with the tools listed in the system turn and calls taught as <<CALL name args>>, a spelling of our own.
TEMPLATE = """
{%- if tools -%}
{{ '<|im_start|>system\\nYou may call these tools, writing <<CALL name args>>:\\n' }}
{%- for tool in tools %}{{ tool.function.name + ': ' + tool.function.description + '\\n' }}{% endfor -%}
{{ '<|im_end|>\\n' }}
{%- endif -%}
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}
"""
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]


def test_the_chat_layer_says_why_once(caplog):
    engine = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=TEMPLATE))
    with caplog.at_level(logging.WARNING, logger="llmchat.chat"):
        chat = Chat(engine, ChatOptions())
    assert chat.family == "none"
    assert chat.describe()["tool_parser_reason"].startswith("the chat template takes tools but marks calls in no")
    assert [r.getMessage() for r in caplog.records if "no syntax llmchat knows" in r.getMessage()] != []
    assert len(caplog.records) == 1
    # Chosen by the operator, it says so too; a known family has no reason to give.
    chat = Chat(engine, ChatOptions(tool_parser="none"))
    assert chat.describe()["tool_parser_reason"] == "set by tool_parser=none"
    assert "tool_parser_reason" not in Chat(engine, ChatOptions(tool_parser="hermes")).describe()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = serve_template(tmp_path_factory.mktemp("unknown"), TEMPLATE)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_health_names_no_parser_and_why(server):
    health = httpx.get(f"{server.base_url}/health").json()
    assert health["tool_parser"] == "none"
    assert "no syntax llmchat knows" in health["tool_parser_reason"]


def test_auto_reaches_the_template_and_replies_with_text(client):
    plain = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=16, temperature=0)
    reply = client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, max_tokens=16, temperature=0)
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the template listed the tool
    message = reply.choices[0].message
    assert message.tool_calls is None and message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(
        model=MODEL, messages=PARIS, tools=TOOLS, max_tokens=16, temperature=0, stream=True
    )
    chunks = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(d.content or "" for d in chunks) == message.content
    assert not any(d.tool_calls for d in chunks)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_a_call_that_cannot_be_enforced_is_a_400_naming_tool_choice(client, choice):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, tool_choice=choice, max_tokens=16)
    error = caught.value.body
    assert error["param"] == "tool_choice"
    assert "cannot be enforced" in error["message"] and "no syntax llmchat knows" in error["message"]


def test_anthropic_any_is_a_400_in_its_envelope(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": TOOLS[0]["function"]["parameters"]}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=16, messages=PARIS, tools=tools, tool_choice={"type": "any"})
    assert caught.value.body["type"] == "error"
    assert "cannot be enforced" in caught.value.body["error"]["message"]
    reply = client.messages.create(model=MODEL, max_tokens=16, messages=PARIS, tools=tools)
    assert [block.type for block in reply.content] == ["text"]
