"""Tool-call parser conformance: a table of outputs per family, each parsed whole and under several chunkings."""

import json
import random
from dataclasses import dataclass, field

import pytest

from llmchat.chat.call_object import call_key
from llmchat.chat.core import detect_family
from llmchat.chat.events import Notice, TextDelta, ToolCallCut, ToolCallDelta, ToolCallStart
from llmchat.chat.prompt import template_knows_tools
from llmchat.chat.toolcalls import PARSERS, parse_all
from tests.llmchat.chat.toolcall_cases import CASES, NOW, WEATHER

TOOLS = frozenset({"get_weather", "now", "search"})


@dataclass
class Result:
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def collect(events) -> Result:
    result, ids = Result(), []
    for event in events:
        if isinstance(event, TextDelta):
            assert event.text, "no empty content deltas"
            result.content += event.text
        elif isinstance(event, ToolCallStart):
            assert event.index == len(result.calls) and event.id.startswith("call_")
            ids.append(event.id)
            result.calls.append((event.name, ""))
        elif isinstance(event, ToolCallDelta):
            assert event.index == len(result.calls) - 1, "argument fragments belong to the newest call"
            name, args = result.calls[event.index]
            result.calls[event.index] = (name, args + event.arguments)
        else:
            assert isinstance(event, Notice | ToolCallCut)
            if isinstance(event, ToolCallCut):
                assert event.index == len(result.calls) - 1, "only the newest call can be cut"
            result.notices.append(event.name)
    assert len(set(ids)) == len(ids), "every call has its own id"
    return result


def chunkings(text: str, markers: tuple[str, ...]):
    yield "whole", [text]
    yield "per-char", list(text)
    for seed in range(3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6))) if len(text) > 1 else []
        yield f"random-{seed}", [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    cuts = sorted({i + len(m) // 2 for m in markers if m for i in _find_all(text, m)})
    if cuts:
        yield "split-markers", [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _find_all(text: str, marker: str):
    at = text.find(marker)
    while at >= 0:
        yield at
        at = text.find(marker, at + 1)


def _cases():
    for n, (family, text, content, calls, notices, modes) in enumerate(CASES):
        for mode in modes:
            yield pytest.param(
                family, text, Result(content, calls, notices), mode == "eager", id=f"{family}-{n}-{mode}"
            )


@pytest.mark.parametrize(("family", "text", "expected", "eager"), list(_cases()))
def test_streamed_equals_one_shot_equals_expected(family, text, expected, eager):
    parser_class = PARSERS[family]
    one_shot = collect(parse_all(parser_class(TOOLS, stream_arguments=eager), text))
    assert one_shot == expected
    markers = (parser_class.open, parser_class.close, parser_class.alt_open, "</tool_call>")
    for name, chunks in chunkings(text, markers):
        parser = parser_class(TOOLS, stream_arguments=eager)
        events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
        assert collect(events) == expected, name
        for event in events:
            if isinstance(event, TextDelta):
                assert "<tool_call>" not in event.text or expected.notices, f"{name}: marker leaked"


PRETTY = '{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}'
# Outputs of a model that also writes a call as a bare JSON object at the start of its reply (Qwen2.5 under
# tool_choice auto): (output, expected content, expected calls, expected notices).
BARE_CASES = [
    (WEATHER, "", [("get_weather", '{"city": "Paris"}')], []),
    (f"```json\n{PRETTY}\n```", "", [("get_weather", '{\n    "city": "Paris"\n  }')], []),
    (f"\n  {NOW}\n", "", [("now", "{}")], []),
    (f"<tool_call>\n{NOW}\n</tool_call>", "", [("now", "{}")], []),
    ("Sure, here is the weather.", "Sure, here is the weather.", [], []),
    ("```python\nprint(1)\n```", "```python\nprint(1)\n```", [], []),
    ("`x` and `y`", "`x` and `y`", [], []),
    ('{"name": "tell_joke", "arguments": {}}', '{"name": "tell_joke", "arguments": {}}', [], ["tool_call.rejected"]),
    ('{"answer": 42}', '{"answer": 42}', [], ["tool_call.rejected"]),
    (f"Here: {WEATHER}", f"Here: {WEATHER}", [], []),  # not at the start: text, as the grammar allows
]


@pytest.mark.parametrize(("text", "content", "calls", "notices"), BARE_CASES)
def test_a_bare_json_call_at_the_start_is_a_call(text, content, calls, notices):
    expected = Result(content, calls, notices)
    hermes = PARSERS["hermes"]
    assert collect(parse_all(hermes(TOOLS, stream_arguments=True, bare_calls=True), text)) == expected
    for name, chunks in chunkings(text, ("```json", "<tool_call>", "</tool_call>")):
        parser = hermes(TOOLS, stream_arguments=True, bare_calls=True)
        assert collect([e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()) == expected, name
    if calls and "<tool_call>" not in text:  # without bare calls (no marker token) the same output is text
        assert collect(parse_all(hermes(TOOLS, stream_arguments=True), text)).calls == []


def test_arguments_stream_before_the_call_ends():
    parser = PARSERS["hermes"](TOOLS, stream_arguments=True)
    events = parser.feed('<tool_call>{"name": "search", "arguments": {"q": "Eiff')
    assert [type(e) for e in events] == [ToolCallStart, ToolCallDelta]
    assert events[1].arguments == '{"q": "Eiff'
    assert not PARSERS["hermes"](TOOLS).feed('<tool_call>{"name": "search", "arguments": {"q": "Eiff')


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_a_call_cut_off_before_its_name_is_not_content_under_a_grammar(family):
    # max_tokens can end a grammar-forced second call early; its marker text must not reach the client.
    first = {
        "hermes": f"<tool_call>{WEATHER}</tool_call>",
        "llama3": WEATHER,
        "mistral": f"[TOOL_CALLS][{WEATHER}",
        "mistral_args": f"[TOOL_CALLS]{args_marker_call(WEATHER)}",
        "qwen3_coder": f"<tool_call>\n{xml_call(WEATHER)}\n</tool_call>",
    }
    cut = {
        "hermes": '<tool_call>\n{"na',
        "llama3": '; {"na',
        "mistral": ', {"na',
        "mistral_args": "[TOOL_CALLS]no",
        "qwen3_coder": "\n<tool_call>\n<function=no",
    }
    text = first[family] + cut[family]
    streamed = collect(parse_all(PARSERS[family](TOOLS, stream_arguments=True), text))
    assert streamed.calls == [("get_weather", '{"city": "Paris"}')] and streamed.content == ""
    assert streamed.notices == ["tool_call.unterminated"]
    held = collect(parse_all(PARSERS[family](TOOLS), text))
    assert held.calls == streamed.calls and held.notices == ["tool_call.unterminated"]


def test_at_most_max_calls():
    parser = PARSERS["hermes"](TOOLS, max_calls=1)
    result = collect(parse_all(parser, f"<tool_call>{WEATHER}</tool_call><tool_call>{NOW}</tool_call>"))
    assert result.calls == [("get_weather", '{"city": "Paris"}')]
    assert result.content == f"<tool_call>{NOW}</tool_call>"
    assert result.notices == ["tool_call.rejected"]


def test_name_validation_can_be_off():
    result = collect(parse_all(PARSERS["hermes"](None), '<tool_call>{"name": "x", "arguments": {"a": 1}}</tool_call>'))
    assert result.calls == [("x", '{"a": 1}')]
    assert json.loads(result.calls[0][1]) == {"a": 1}


@pytest.mark.parametrize("family", sorted(PARSERS))
@pytest.mark.parametrize("eager", [False, True])
def test_random_text_never_raises_and_chunking_never_matters(family, eager):
    """Seeded noise made of JSON punctuation and marker pieces: no exception, and every chunking agrees."""
    parser_class = PARSERS[family]
    pieces = ['{"name": "now"', '"arguments": {', "}", "]", "[", ",", ";", '"', "\\", " ", "x", ":", "\n"]
    pieces += [parser_class.open, parser_class.close, parser_class.alt_open, "<tool_", "call>"]
    rng = random.Random(family)
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        expected = collect(parse_all(parser_class(TOOLS, stream_arguments=eager), text))
        for name, chunks in chunkings(text, ()):
            parser = parser_class(TOOLS, stream_arguments=eager)
            assert collect([e for c in chunks for e in parser.feed(c)] + parser.finish()) == expected, (name, text)


def spell(family: str, *calls: str) -> str:
    """Calls as a family writes them, with the separator the grammar makes the model use."""
    syntax = PARSERS[family].syntax
    if family == "llama3":
        calls = tuple(c.replace('"arguments"', '"parameters"') for c in calls)
    if syntax.args_marker:
        calls = tuple(args_marker_call(c) for c in calls)
    if syntax.xml:
        calls = tuple(xml_call(c) for c in calls)
    return syntax.open + syntax.list_open + syntax.sep.join(calls) + syntax.close


def xml_call(call: str) -> str:
    """A call object as Qwen3-Coder spells it, strings as they are and other values as JSON."""
    parsed = json.loads(call)
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
        for k, v in parsed["arguments"].items()
    )
    return f"<function={parsed['name']}>\n{params}</function>"


def args_marker_call(call: str) -> str:
    """A call object as newer Mistral tokenizers spell it: name[ARGS]{arguments}."""
    parsed = json.loads(call)
    return f"{parsed['name']}[ARGS]{json.dumps(parsed['arguments'])}"


LYON = '{"name": "get_weather", "arguments": {"city": "Lyon"}}'


@pytest.mark.parametrize("family", sorted(PARSERS))
@pytest.mark.parametrize("eager", [False, True])
def test_a_repeated_call_ends_the_output(family, eager):
    """The repeat is dropped with everything after it, whatever its spelling, under every chunking."""
    again = '{"name": "get_weather", "arguments": {"city":"Paris"}}'  # other spacing, same call
    text = spell(family, WEATHER, LYON, NOW, again, NOW) + " and some text"
    for name, chunks in chunkings(text, (PARSERS[family].open, PARSERS[family].close)):
        parser = PARSERS[family](TOOLS, stream_arguments=eager)
        result = collect([e for c in chunks for e in parser.feed(c)] + parser.finish())
        assert result.calls == [
            ("get_weather", '{"city": "Paris"}'),
            ("get_weather", '{"city": "Lyon"}'),
            ("now", "{}"),
        ], name
        assert result.notices == ["tool_call.repeated"] and result.content == "", name
        assert parser.ended and parser.num_complete == 3


def test_a_call_under_a_used_name_streams_only_once_it_differs():
    """Streaming, a call whose name an earlier call used is held until whole (it might be a repeat); a new
    name streams at once."""
    parser = PARSERS["hermes"](TOOLS, stream_arguments=True)
    events = parser.feed(spell("hermes", WEATHER, NOW)[:-30])
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather", "now"]
    parser = PARSERS["hermes"](TOOLS, stream_arguments=True)
    text = spell("hermes", WEATHER, LYON)
    held = parser.feed(text[: text.index("Lyon")])
    assert [type(e) for e in held if not isinstance(e, ToolCallDelta)] == [ToolCallStart]
    rest = parser.feed(text[text.index("Lyon") :]) + parser.finish()
    assert isinstance(rest[0], ToolCallStart) and rest[0].index == 1
    assert "".join(e.arguments for e in rest if isinstance(e, ToolCallDelta)) == '{"city": "Lyon"}'


def test_call_key_compares_json_values():
    assert call_key("f", '{"a": 1, "b": [1.0, "x"]}') == call_key("f", '{"b":[1,"x"],"a":1.0}')
    assert call_key("f", '{"a": 1}') != call_key("g", '{"a": 1}')
    assert call_key("f", '{"a": 1}') != call_key("f", '{"a": "1"}')
    assert call_key("f", '{"a": 1}') != call_key("f", '{"a": true}')
    assert call_key("f", r'{"a": "caf\u00e9"}') == call_key("f", '{"a": "café"}')


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_a_call_cut_inside_its_arguments_is_marked(family):
    """ToolCallCut names the call whose fragments were streamed but whose arguments are not whole."""
    text = spell(family, WEATHER, LYON)
    text = text[: text.index("Lyon")]
    events = parse_all(PARSERS[family](TOOLS, stream_arguments=True), text)
    assert not [e for e in events if isinstance(e, ToolCallCut)], "a held call was never sent: nothing to cut"
    text = spell(family, WEATHER, NOW.replace("{}", '{"zone": "CET"}'))
    events = parse_all(PARSERS[family](TOOLS, stream_arguments=True), text[: text.index("CET")])
    (cut,) = [e for e in events if isinstance(e, ToolCallCut)]
    assert cut.index == 1


@pytest.mark.parametrize(
    ("template", "family"),
    [
        (None, "hermes"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),  # no tools: our Hermes prompt
        ("{% if tools %}<tools>{{ tools }}</tools>{% endif %}<tool_call>", "hermes"),  # Qwen 2.5 / Hermes
        ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]", "mistral"),
        ('{% if tools %}{{ tools }}{% endif %}{"name": ..., "parameters": ...}<|python_tag|>', "llama3"),
        ("{% if tools %}{{ tools }}{% endif %}<<CALL name args>>", "none"),  # tools, but no syntax we know
        ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]{{ name }}[ARGS]", "mistral_args"),
    ],
)
def test_family_is_detected_from_the_chat_template(template, family):
    assert detect_family(template, template_knows_tools(template)) == family


MID_ARGUMENT = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa</tool_call>',
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa<|python_tag|>',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa[TOOL_CALLS]',
    "mistral_args": '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa[TOOL_CALLS]',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nPa</tool_call>",
}


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_a_marker_mid_argument_or_a_stream_cut_after_a_marker_is_no_content(family):
    """Under a grammar (the streaming mode) a marker written inside a call's arguments is part of them, and the
    output ending there cuts the call; output ending right after an open marker keeps only the text before it."""
    cut = collect(parse_all(PARSERS[family](TOOLS, stream_arguments=True), MID_ARGUMENT[family]))
    assert [name for name, _ in cut.calls] == ["get_weather"] and cut.content == ""
    assert cut.notices == ["tool_call.unterminated"]  # the cut, said once
    opener = PARSERS[family].open
    if opener:
        after = collect(parse_all(PARSERS[family](TOOLS, stream_arguments=True), f"Sure. {opener}"))
        assert after.content == "Sure." and after.calls == [] and after.notices == ["tool_call.unterminated"]
