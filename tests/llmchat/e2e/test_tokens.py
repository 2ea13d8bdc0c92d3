"""vLLM's /tokenize, /detokenize and /version against the real server and model: prompts round-trip, messages
count as the chat route counts them, and bad input is a 400 naming the field."""

import httpx
import openai
import pytest

import llmchat
from tests.conftest import WEATHER_SCHEMA, prompt_ids

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}}
]


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", json=body, timeout=60)


def tokenize(live, **body) -> dict:
    r = post(live, "/tokenize", body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("text", ["Hello, world!", "  spaces,\ttabs\nand ünïcödé — 東京 🚀", ""])
def test_a_prompt_round_trips_through_detokenize(live, text):
    tokens = tokenize(live, model=MODEL, prompt=text)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["token_strs"] is None
    assert tokens["max_model_len"] == live.app.state.runtime.engine.max_context
    r = post(live, "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text}


def test_special_tokens_are_added_only_when_asked(live):
    # The bundled model's tokenizer adds no BOS to raw text, so a chat-formatted prompt shows the difference:
    # its special tokens are read as such either way, and `add_special_tokens` adds none of its own.
    text = "<|im_start|>user\nHi<|im_end|>\n"
    with_special = tokenize(live, prompt=text)["tokens"]
    assert tokenize(live, prompt=text, add_special_tokens=False)["tokens"] == with_special
    tokenizer = live.app.state.runtime.engine.tokenizer
    assert with_special == tokenizer(text)["input_ids"]
    assert with_special[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize(("messages", "tools"), [(HI, None), (CHAT, TOOLS)], ids=["one message", "tools and a call"])
def test_messages_count_as_the_chat_route_counts_them(live, messages, tools):
    body = {"messages": messages} | ({"tools": tools} if tools else {})
    tokens = tokenize(live, **body)
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0, **body)
    assert tokens["count"] == len(tokens["tokens"]) == reply.usage.prompt_tokens


def test_messages_are_the_templates_own_tokens(live):
    tokens = tokenize(live, model=MODEL, messages=HI)["tokens"]
    assert tokens == prompt_ids(live.app.state.runtime.engine.loaded, HI[0]["content"])
    text = post(live, "/detokenize", {"tokens": tokens}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and HI[0]["content"] in text


def test_return_token_strs(live):
    tokens = tokenize(live, prompt="Hello tokenizer world", return_token_strs=True)
    tokenizer = live.app.state.runtime.engine.tokenizer
    assert len(tokens["token_strs"]) == tokens["count"]
    assert tokens["token_strs"] == [tokenizer.convert_ids_to_tokens(t) for t in tokens["tokens"]]
    assert tokenizer.convert_tokens_to_string(tokens["token_strs"]) == "Hello tokenizer world"
    chat = tokenize(live, messages=HI, return_token_strs=True)
    assert chat["token_strs"][0] == "<|im_start|>" and len(chat["token_strs"]) == chat["count"]


def test_version(live):
    r = httpx.get(f"{live.base_url}/version")
    assert r.status_code == 200 and r.json() == {"version": llmchat.__version__}


def vocabulary(live) -> int:
    engine = live.app.state.runtime.engine
    return min(engine.vocab_size, len(engine.tokenizer))


def over_the_context(live) -> str:
    return "x" * (8 * live.app.state.runtime.engine.max_context + 1)


BAD_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}
# (case id, path, the body for the live server, expected param: None for a body that names no single field)
BAD = [
    ("id past the vocabulary", "/detokenize", lambda live: {"tokens": [1, 2, vocabulary(live)]}, "tokens.2"),
    ("huge id", "/detokenize", lambda live: {"tokens": [2**70]}, "tokens.0"),
    ("negative id", "/detokenize", lambda live: {"tokens": [5, -1]}, "tokens.1"),
    ("ids not a list", "/detokenize", lambda live: {"tokens": "1 2 3"}, "tokens"),
    ("neither prompt nor messages", "/tokenize", lambda live: {"model": MODEL}, None),
    ("both prompt and messages", "/tokenize", lambda live: {"prompt": "Hi", "messages": HI}, None),
    ("empty messages", "/tokenize", lambda live: {"messages": []}, "messages"),
    ("unknown role", "/tokenize", lambda live: {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    (
        "no generation prompt",
        "/tokenize",
        lambda live: {"messages": HI, "add_generation_prompt": False},
        "add_generation_prompt",
    ),
    ("prefill", "/tokenize", lambda live: {"messages": HI, "continue_final_message": True}, "continue_final_message"),
    (
        "reserved template variable",
        "/tokenize",
        lambda live: {"messages": HI, "chat_template_kwargs": {"tools": []}},
        "chat_template_kwargs.tools",
    ),
    (
        "tool arguments not JSON",
        "/tokenize",
        lambda live: {"messages": [{"role": "assistant", "tool_calls": [BAD_CALL]}]},
        "messages.0.tool_calls.0.function.arguments",
    ),
    ("tools with a prompt", "/tokenize", lambda live: {"prompt": "Hi", "tools": TOOLS}, "tools"),
    ("text that cannot fit", "/tokenize", lambda live: {"prompt": over_the_context(live)}, "prompt"),
]


@pytest.mark.parametrize(("path", "make", "param"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_a_400_naming_the_field(live, path, make, param):
    r = post(live, path, make(live))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], error


def test_the_last_id_of_the_vocabulary_is_fine(live):
    r = post(live, "/detokenize", {"tokens": [vocabulary(live) - 1]})
    assert r.status_code == 200 and isinstance(r.json()["prompt"], str)


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_an_unknown_model_is_a_404_as_on_v1(live, path):
    body = {"model": "gpt-9"} | ({"prompt": "Hi"} if path == "/tokenize" else {"tokens": [1]})
    r = post(live, path, body)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
