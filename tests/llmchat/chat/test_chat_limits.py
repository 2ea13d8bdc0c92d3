"""What Chat.prepare and the OpenAI adapter refuse before a byte is sent (context, content parts, n), and raw
text prompts; against the real server and its chat core."""

import asyncio
import re
from types import SimpleNamespace

import httpx
import jinja2
import pytest

from llmchat.chat import Chat, ChatError, ChatMessage, ChatRequest, Finish, TextDelta, ToolSpec

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def max_context(live) -> int:
    return httpx.get(f"{live.base_url}/health").json()["max_context"]


def post(live, **change) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1} | change
    return httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=60)


def refusal(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


class NoTokenizer:
    """Fails the test if anything renders or tokenizes."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("the request was rendered")

    def __call__(self, *args, **kwargs):
        raise AssertionError("the request was tokenized")


def prepare(chat: Chat, request: ChatRequest):
    return asyncio.run(chat.prepare(request))


def test_a_template_that_rejects_the_messages_is_a_bad_request():
    class Rejecting(NoTokenizer):
        def apply_chat_template(self, *args, **kwargs):
            raise jinja2.TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    chat = Chat(SimpleNamespace(tokenizer=Rejecting(), max_context=100, vocab_size=100))
    with pytest.raises(ChatError) as caught:
        prepare(chat, ChatRequest([ChatMessage("user", "a"), ChatMessage("user", "b")]))
    assert caught.value.param == "messages" and "roles must alternate" in caught.value.message


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (ChatRequest([ChatMessage("user", "x" * 801)]), "messages"),
        (ChatRequest([ChatMessage("user", "x" * 400), ChatMessage("assistant", "y" * 401)]), "messages"),
        (ChatRequest([ChatMessage("user", "Hi")], tools=(ToolSpec("f", "d" * 800),)), "messages"),
        (ChatRequest([], prompt="x" * 801), "prompt"),
    ],
    ids=["one message", "all messages", "tool definitions", "raw prompt"],
)
def test_text_too_long_to_fit_is_refused_without_tokenizing(request_, param):
    chat = Chat(SimpleNamespace(tokenizer=NoTokenizer(), max_context=100, vocab_size=100))
    with pytest.raises(ChatError) as caught:
        prepare(chat, request_)
    assert (caught.value.param, caught.value.code) == (param, "context_length_exceeded")
    assert "800" in caught.value.message and "100 tokens" in caught.value.message


def test_huge_body_is_refused_by_characters(live, max_context):
    # 2 MiB: under the body limit, far over what the context holds.
    response = post(live, messages=[{"role": "user", "content": "word " * (2**21 // 5)}])
    error = refusal(response)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert str(8 * max_context) in error["message"]


def test_prompt_over_the_context_says_both_token_counts(live, max_context):
    # Under 8 characters a token, so it is tokenized, and over the context once it is.
    response = post(live, messages=[{"role": "user", "content": "hello " * max_context}])
    error = refusal(response)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    num_tokens = int(re.search(r"The prompt is (\d+) tokens", error["message"])[1])
    assert num_tokens > max_context
    assert f"context of {max_context} tokens" in error["message"]


def test_max_tokens_beyond_what_the_context_leaves_is_refused_not_clamped(live, max_context):
    error = refusal(post(live, max_tokens=max_context))
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
    assert f"max_tokens is {max_context}" in error["message"]


MEDIA_PARTS = [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}},
]


@pytest.mark.parametrize("part", MEDIA_PARTS, ids=lambda part: part["type"])
def test_media_parts_are_refused_at_the_part(live, part):
    content = [{"type": "text", "text": "What is this?"}, part]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    error = refusal(post(live, messages=messages))
    assert error["param"] == "messages.1.content.1"
    assert "text-only" in error["message"] and part["type"] in error["message"]


def test_text_parts_are_joined(live):
    parts = post(
        live,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}],
    )
    whole = post(live, messages=[{"role": "user", "content": "Say hi."}])
    assert parts.status_code == whole.status_code == 200, parts.text
    assert parts.json()["usage"]["prompt_tokens"] == whole.json()["usage"]["prompt_tokens"]


def test_more_choices_than_the_server_allows_are_refused(live):
    error = refusal(post(live, n=17))
    assert error["param"] == "n"
    assert "limit of 16" in error["message"]


def run_raw(chat: Chat, text: str, max_tokens: int = 3) -> tuple[list[int], str, Finish]:
    async def generate():
        prepared = await chat.prepare(ChatRequest([], max_tokens=max_tokens, temperature=0.0, prompt=text))
        events = [event async for event in chat.events(prepared, chat.start(prepared)[0])]
        return prepared.prompt_ids, events

    ids, events = asyncio.run(generate())
    assert isinstance(events[-1], Finish)
    return ids, "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def test_raw_prompt_is_tokenized_as_is(live):
    chat = live.app.state.runtime.chat
    text = "Once upon a time, there was a"
    ids, completion, finish = run_raw(chat, text)
    # No chat template around it: exactly the tokenizer's own encoding (SmolLM2 adds no BOS).
    assert ids == chat.engine.tokenizer(text)["input_ids"]
    assert finish.prompt_tokens == len(ids)
    assert completion and finish.completion_tokens >= 1


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": (ToolSpec("f"),)}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
    ids=["with tools", "empty"],
)
def test_raw_prompt_refusals(live, change, param):
    request = ChatRequest(**{"messages": [], "prompt": "Once upon a time"} | change)
    with pytest.raises(ChatError) as caught:
        prepare(live.app.state.runtime.chat, request)
    assert caught.value.param == param


def test_no_messages_and_no_prompt_is_refused(live):
    with pytest.raises(ChatError) as caught:
        prepare(live.app.state.runtime.chat, ChatRequest([]))
    assert caught.value.param == "messages"
