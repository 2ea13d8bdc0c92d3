"""Reasoning (<think>) output: the splitter's table under many chunkings, its place before the tool parser, and
reasoning_content end to end with the bundled model behind a chat template that thinks."""

import random
from types import SimpleNamespace

import httpx
import openai
import pytest

from llmchat.chat import Chat, ChatOptions, PreparedChat
from llmchat.chat.events import ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from llmchat.chat.reasoning import ReasoningSplitter, starts_in_reasoning
from llmchat.chat.toolcalls import PARSERS
from llmchat.engine.sampling import SamplingParams
from tests.conftest import serve_template

MODEL = "SmolLM2-135M-Instruct"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# (case id, model output, starts inside reasoning, expected reasoning, expected answer)
CASES = [
    (
        "reasoning then answer",
        "<think>\nParis is in France.\n</think>\n\nParis.",
        False,
        "Paris is in France.\n",
        "Paris.",
    ),
    ("no tags", "The capital is Paris.", False, "", "The capital is Paris."),
    ("no tags keeps leading whitespace", "\n  Paris.", False, "", "\n  Paris."),
    ("starts inside reasoning", "Let me see.\n</think>\n\nParis.", True, "Let me see.\n", "Paris."),
    ("starts inside, never closes", "Let me see. Hmm", True, "Let me see. Hmm", ""),
    ("open tag inside reasoning is reasoning", "a <think> b</think>c", True, "a <think> b", "c"),
    ("empty reasoning", "<think>\n\n</think>\n\nParis.", False, "", "Paris."),
    ("answer before reasoning", "Well. <think>why</think> Paris.", False, "why", "Well. Paris."),
    ("two reasoning blocks", "<think>a</think>b<think>c</think>d", False, "ac", "bd"),
    ("partial close tag at the end", "<think>I wonder</thi", False, "I wonder</thi", ""),
    ("partial close tag, inside from the start", "I wonder</", True, "I wonder</", ""),
    ("partial open tag at the end", "The tag is <thi", False, "", "The tag is <thi"),
    ("lookalike tags stay text", "<thinking> and </think> are text", False, "", "<thinking> and </think> are text"),
    ("answer then tool-call text", f"Checking.{CALL}", False, "", f"Checking.{CALL}"),
    ("reasoning then tool-call text", f"<think>Need weather.</think>\n{CALL}", False, "Need weather.", CALL),
]


def chunkings(text: str):
    yield "whole", [text]
    yield "per-char", list(text)
    for seed in range(3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6)))
        yield f"random-{seed}", [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    # One cut at every position in and around each tag (or tag-like text): the held-back path.
    starts = [i for i, ch in enumerate(text) if ch == "<"]
    for cut in sorted({at + k for at in starts for k in range(9) if 0 < at + k < len(text)}):
        yield f"cut-{cut}", [text[:cut], text[cut:]]


def split(chunks: list[str], in_reasoning: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(in_reasoning)
    events = [event for chunk in chunks for event in splitter.feed(chunk)] + splitter.finish()
    assert all(event.text for event in events), "no empty deltas"
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    return reasoning, answer


@pytest.mark.parametrize(
    ("text", "in_reasoning", "reasoning", "answer"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_streamed_split_equals_one_shot(text, in_reasoning, reasoning, answer):
    assert split([text], in_reasoning) == (reasoning, answer)
    for name, chunks in chunkings(text):
        assert split(chunks, in_reasoning) == (reasoning, answer), name


def test_reasoning_streams_before_its_tag_closes():
    splitter = ReasoningSplitter()
    assert splitter.feed("<think>The user asks") == [ReasoningDelta("The user asks")]
    # Only the possible start of </think> waits for the next chunk.
    assert splitter.feed(" about Paris.</th") == [ReasoningDelta(" about Paris.")]
    assert splitter.feed("ink>\n\n") == []
    assert splitter.feed("Paris") == [TextDelta("Paris")]
    assert splitter.finish() == []


@pytest.mark.parametrize(
    ("in_reasoning", "chunks", "held", "flushed"),
    [
        (True, ["Hmm</thi"], [ReasoningDelta("Hmm")], [ReasoningDelta("</thi")]),
        (False, ["Paris <thi"], [TextDelta("Paris ")], [TextDelta("<thi")]),
        (False, ["<think>a</think>\n\n", "<"], [ReasoningDelta("a")], [TextDelta("<")]),
    ],
)
def test_generation_stopped_mid_tag_flushes_the_tail_as_what_it_was(in_reasoning, chunks, held, flushed):
    splitter = ReasoningSplitter(in_reasoning)
    assert [e for chunk in chunks for e in splitter.feed(chunk)] == held
    assert splitter.finish() == flushed


@pytest.mark.parametrize(
    ("prompt", "inside"),
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|Assistant|><think>", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<|im_start|>assistant\n", False),
    ],
)
def test_a_prompt_ending_in_the_open_tag_starts_inside_reasoning(prompt, inside):
    assert starts_in_reasoning(prompt) is inside


@pytest.mark.parametrize(
    ("option", "template", "reasons"),
    [
        ("auto", "{{ messages }}<think>", True),
        ("auto", "{{ messages }}", False),
        ("none", "{{ messages }}<think>", False),
        ("think", "{{ messages }}", True),
    ],
)
def test_reasoning_parser_setting(option, template, reasons):
    engine = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template))
    assert Chat(engine, ChatOptions(reasoning_parser=option)).reasons is reasons


def test_only_answer_text_reaches_the_tool_parser():
    parser = PARSERS["hermes"](frozenset({"get_weather"}), stream_arguments=False, max_calls=8)
    prepared = PreparedChat([1], SamplingParams(max_tokens=10), parser, ReasoningSplitter(in_reasoning=True))
    text = f"Maybe {CALL}? No, answer.</think>\n\n{CALL}"
    events = [e for ch in text for e in prepared.parse(ch)] + prepared.parse_end()
    # The call written while reasoning stays reasoning text; the one in the answer is a call.
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == f"Maybe {CALL}? No, answer."
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather"]
    assert "".join(e.arguments for e in events if isinstance(e, ToolCallDelta)) == '{"city": "Paris"}'
    assert not [e for e in events if isinstance(e, TextDelta)]


# SmolLM2's template, but thinking like Qwen3: the generation prompt opens <think>, unless enable_thinking
# is false (then an empty, closed think block and a system line); reasoning_effort becomes a system line.
THINKING_TEMPLATE = r"""
{%- set thinking = enable_thinking is not defined or enable_thinking -%}
{%- if not thinking -%}
{{ '<|im_start|>system\nAnswer at once, without thinking.<|im_end|>\n' }}
{%- endif -%}
{%- if reasoning_effort is defined -%}
{{ '<|im_start|>system\nReasoning effort: ' + reasoning_effort + '<|im_end|>\n' }}
{%- endif -%}
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' + ('<think>\n' if thinking else '<think>\n\n</think>\n\n') }}
{%- endif -%}
"""
# Asks for a long answer, so that 8 tokens cut it short.
ASK = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    server = serve_template(tmp_path_factory.mktemp("reasoning"), THINKING_TEMPLATE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(thinking_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thinking_server.base_url}/v1", api_key="unused", max_retries=0)


def ask(client, **kwargs):
    args = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 8} | kwargs
    return client.chat.completions.create(**args)


def reasoning_of(message) -> str | None:
    extra = message.model_extra or {}
    assert extra.get("reasoning_content") == extra.get("reasoning"), "both names carry the same text"
    return extra.get("reasoning_content")


def test_output_after_an_open_think_is_reasoning(client):
    r = ask(client)
    message = r.choices[0].message
    assert reasoning_of(message)
    assert not message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8


def test_streamed_reasoning_matches_the_response(client):
    whole = reasoning_of(ask(client).choices[0].message)
    reasoning, reasoning_alias, content = "", "", ""
    for chunk in ask(client, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        reasoning += extra.get("reasoning_content") or ""
        reasoning_alias += extra.get("reasoning") or ""
        content += delta.content or ""
    assert reasoning == reasoning_alias == whole
    assert content == ""


def test_thinking_off_by_template_kwargs_gives_an_answer(client):
    thinking = ask(client)
    r = ask(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reasoning_of(r.choices[0].message) is None
    assert r.choices[0].message.content
    # The template added its system line: the variable reached it.
    assert r.usage.prompt_tokens > thinking.usage.prompt_tokens


def test_reasoning_effort_reaches_the_template(client):
    plain = ask(client)
    high = ask(client, reasoning_effort="high")
    assert high.usage.prompt_tokens > plain.usage.prompt_tokens
    assert reasoning_of(high.choices[0].message)
    off = ask(client, reasoning_effort="none")
    assert reasoning_of(off.choices[0].message) is None and off.choices[0].message.content


def test_template_kwargs_win_over_reasoning_effort(client):
    r = ask(client, reasoning_effort="none", extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert reasoning_of(r.choices[0].message)


def test_template_kwargs_cannot_override_the_servers_own(thinking_server):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 1, "chat_template_kwargs": {"add_generation_prompt": False}}
    r = httpx.post(f"{thinking_server.base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "chat_template_kwargs.add_generation_prompt"
    assert "add_generation_prompt" in error["message"]


def test_required_tool_call_is_not_taken_for_reasoning(client):
    # The grammar forces a call from the first token, so the model cannot think even after <think>.
    tool = {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
    r = ask(client, tools=[tool], tool_choice="required", parallel_tool_calls=False, max_tokens=40)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    assert reasoning_of(r.choices[0].message) is None


def test_health_says_whether_reasoning_is_split(live, thinking_server):
    assert httpx.get(f"{live.base_url}/health").json()["reasoning_parser"] == "none"
    assert httpx.get(f"{thinking_server.base_url}/health").json()["reasoning_parser"] == "think"


def test_the_bundled_template_has_no_reasoning(live):
    assert live.app.state.runtime.chat.reasons is False
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
    r = ask(client)
    assert r.choices[0].message.content
    assert reasoning_of(r.choices[0].message) is None
