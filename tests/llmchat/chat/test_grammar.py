"""Grammars for tool calls and JSON output, checked token by token against the bundled model's tokenizer."""

import copy
import json

import pytest

from llmchat.chat.grammar import GrammarCompiler, closed, json_grammar, tool_call_grammar
from llmchat.chat.prompt import CallRecord, ChatMessage, PromptRenderer
from llmchat.chat.toolcalls import PARSERS, ToolSpec

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = (ToolSpec("get_weather", "Weather in a city", WEATHER), ToolSpec("now"))


@pytest.fixture(scope="module")
def chat(live):
    return live.app.state.runtime.chat


def accepts(chat, grammar: str, text: str) -> bool:
    return consumes(chat.grammar, grammar, token_ids(chat.grammar, text))


def token_ids(compiler, *pieces: str) -> list[int]:
    """Each piece as the compiler's tokenizer encodes it (a marker it holds as a token, as that token)."""
    tokenizer = compiler.tokenizer
    return [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False)]


def consumes(compiler, grammar: str, ids: list[int]) -> bool:
    matcher = compiler.constraint(grammar).matcher
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def xml_call(name: str, arguments: str) -> str:
    """A call as Qwen3-Coder writes it: each argument a <parameter=...> element, strings as they are."""
    params = "".join(
        f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value)}\n</parameter>\n"
        for key, value in json.loads(arguments).items()
    )
    return f"<function={name}>\n{params}</function>"


def call_text(family: str, *calls: tuple[str, str]) -> str:
    s = PARSERS[family].syntax
    bodies = [
        xml_call(name, args)
        if s.xml
        else f"{name}{s.args_marker}{args}"
        if s.args_marker
        else f'{{"name": "{name}", "{s.args_key}": {args}}}'
        for name, args in calls
    ]
    return s.open + s.list_open + s.sep.join(bodies) + s.close


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_required_accepts_only_valid_calls_to_offered_tools(chat, family):
    syntax = PARSERS[family].syntax
    many = tool_call_grammar(syntax, TOOLS, required=True, max_calls=3)
    one = tool_call_grammar(syntax, TOOLS, required=True, max_calls=1)
    weather, now = ("get_weather", '{"city": "Paris"}'), ("now", "{}")
    assert accepts(chat, many, call_text(family, weather))
    assert accepts(chat, many, call_text(family, weather, now))
    assert not accepts(chat, one, call_text(family, weather, now))
    assert accepts(chat, many, call_text(family, weather, now, weather))
    assert not accepts(chat, many, call_text(family, weather, now, weather, now))
    assert not accepts(chat, many, call_text(family, ("get_weather", '{"town": "Paris"}')))
    assert not accepts(chat, many, call_text(family, ("get_weather", "{}")))
    assert not accepts(chat, many, call_text(family, ("delete_all", "{}")))
    assert not accepts(chat, many, call_text(family, ("now", '{"extra": 1}')))
    assert not accepts(chat, many, "Sure, here you go.")


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_auto_allows_text_or_valid_calls(chat, family):
    auto = tool_call_grammar(PARSERS[family].syntax, TOOLS, required=False, max_calls=8)
    assert accepts(chat, auto, "It is sunny in Paris.")
    assert accepts(chat, auto, call_text(family, ("get_weather", '{"city": "Paris"}')))
    if PARSERS[family].open:
        assert not accepts(chat, auto, PARSERS[family].open + " not a call")


def test_qwen3_coder_values_follow_their_parameters_types(chat):
    schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "lines": {"type": "integer"},
            "mode": {"type": "string", "enum": ["read", "write"]},
            "force": {"type": "boolean"},
            "meta": {"type": "object", "properties": {"tag": {"type": "string"}}},
        },
        "required": ["path"],
    }
    tools = (ToolSpec("edit", None, schema),)
    grammar = tool_call_grammar(PARSERS["qwen3_coder"].syntax, tools, required=True, max_calls=1)

    def call(*params: tuple[str, str]) -> str:
        body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
        return f"<tool_call>\n<function=edit>\n{body}</function>\n</tool_call>"

    assert accepts(chat, grammar, call(("path", "a b\n<c>\n</parameter"), ("lines", "12")))
    assert accepts(chat, grammar, call(("path", "x"), ("mode", "write"), ("force", "true"), ("meta", '{"tag": "t"}')))
    assert not accepts(chat, grammar, call(("path", "x"), ("lines", "twelve")))
    assert not accepts(chat, grammar, call(("path", "x"), ("mode", "append")))
    assert not accepts(chat, grammar, call(("path", "x"), ("meta", '{"other": 1}')))
    assert not accepts(chat, grammar, call(("lines", "1"), ("path", "x")))  # the schema's order
    assert not accepts(chat, grammar, call(("lines", "1")))  # path is required


def test_json_grammar(chat):
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert accepts(chat, json_grammar(None), '{"anything": [1, 2]}')
    assert not accepts(chat, json_grammar(None), "[1, 2]")
    assert accepts(chat, json_grammar(schema), '{"age": 3}')
    assert not accepts(chat, json_grammar(schema), '{"age": "three"}')


def test_closed_keeps_the_schema_but_forbids_invented_keys():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"enum": [{"x": 1}]}}}}}
    out = closed(copy.deepcopy(schema))
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["a"]["properties"]["b"] == {"enum": [{"x": 1}]}
    assert closed({"type": "object", "additionalProperties": True, "properties": {}})["additionalProperties"] is True


def test_closed_walks_schemas_not_values():
    """A property named like a keyword is a schema; default and examples are values, left as sent."""
    value = {"properties": {"x": {}}}
    schema = {"properties": {"properties": {"type": "object", "properties": {}}, "opts": {"default": value}}}
    out = closed(schema)
    assert set(out["properties"]) == {"properties", "opts"} and out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert out["properties"]["opts"]["default"] == value
    nested = closed({"$defs": {"p": {"properties": {"x": {}}}}, "items": [{"properties": {}}]})
    assert nested["$defs"]["p"]["additionalProperties"] is False and nested["items"][0]["additionalProperties"] is False


def test_closed_closes_an_all_of_over_the_keys_of_all_its_parts(chat):
    schema = {"allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]}, {"properties": {"b": {}}}]}
    grammar = json_grammar(schema)
    assert accepts(chat, grammar, '{"a": "x", "b": 1}')
    assert not accepts(chat, grammar, '{"a": "x", "c": 1}')
    assert closed({"anyOf": [{"properties": {"a": {}}}], "properties": {}}).get("additionalProperties") is None


CONVERSATION = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", (CallRecord("call_1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", '{"temp": 18}', tool_call_id="call_1"),
]


def test_builtin_prompt_renders_tools_calls_and_results(chat):
    tokenizer = chat.engine.tokenizer
    text = tokenizer.decode(PromptRenderer(tokenizer).render(CONVERSATION, TOOLS))
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 18}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_aware_template_gets_tools_and_mapping_arguments(chat):
    tokenizer = copy.copy(chat.engine.tokenizer)
    tokenizer.chat_template = (
        "{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.name %} FROM {{ m.name }}{% endif %}\n{% endfor %}"
    )
    renderer = PromptRenderer(tokenizer)
    assert renderer.knows_tools
    text = tokenizer.decode(renderer.render(CONVERSATION, TOOLS))
    assert "TOOL get_weather\nTOOL now\n" in text
    assert "CALL get_weather Paris" in text
    assert 'tool:{"temp": 18} FROM get_weather' in text


@pytest.fixture(scope="module")
def marker_tokens(chat):
    """The bundled tokenizer with every family's markers added as tokens of their own, as Qwen's, Llama 3's and
    Mistral's tokenizers have them: each family's token path, in seconds, without their models."""
    tokenizer = copy.deepcopy(chat.engine.tokenizer)
    markers = sorted({m for parser in PARSERS.values() for m in (*parser.syntax.markers, parser.alt_open) if m})
    tokenizer.add_tokens(markers)
    return GrammarCompiler(tokenizer, chat.engine.vocab_size)


@pytest.mark.parametrize("family", ["hermes", "mistral", "mistral_args", "qwen3_coder"])
def test_markers_that_are_tokens_are_those_tokens_in_the_grammar(marker_tokens, family):
    syntax = PARSERS[family].syntax
    special = marker_tokens.special_token
    call = call_text(family, ("get_weather", '{"city": "Paris"}'))[len(syntax.open + syntax.list_open) :]
    call = call[: len(call) - len(syntax.close)] if syntax.close else call
    ids = token_ids(marker_tokens, syntax.open, syntax.list_open, call, syntax.close)
    assert all(special(m) in ids for m in syntax.markers)  # each marker is its one token here
    for required in (True, False):
        grammar = tool_call_grammar(syntax, TOOLS, required=required, max_calls=3, special_token=special)
        assert consumes(marker_tokens, grammar, ids)
        # The markers' text, spelled in ordinary tokens, is not the marker.
        spelled = char_tokens(marker_tokens, syntax.open)
        assert not consumes(marker_tokens, grammar, spelled + ids[1:])
    auto = tool_call_grammar(syntax, TOOLS, required=False, max_calls=3, special_token=special)
    assert consumes(marker_tokens, auto, token_ids(marker_tokens, "It is sunny in Paris."))
    assert consumes(marker_tokens, auto, token_ids(marker_tokens, "Let me check. ") + ids)


def test_llama3_calls_may_follow_the_python_tag_token(marker_tokens):
    """Llama 3.x writes <|python_tag|> (a token of its own) before a call as often as not; the grammar allows the
    token there and nowhere else, and never its text."""
    syntax = PARSERS["llama3"].syntax
    special = marker_tokens.special_token
    tag = special("<|python_tag|>")
    call = token_ids(marker_tokens, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    for required in (True, False):
        grammar = tool_call_grammar(syntax, TOOLS, required=required, max_calls=2, special_token=special)
        assert consumes(marker_tokens, grammar, [tag, *call]) and consumes(marker_tokens, grammar, call)
        assert not consumes(marker_tokens, grammar, [tag, tag, *call])
        # Its text is no call (under auto, plain text that starts with "<").
        spelled = consumes(marker_tokens, grammar, char_tokens(marker_tokens, "<|python_tag|>") + call)
        assert spelled is not required
    # Without the token in the vocabulary the grammar is as before: calls only.
    plain = tool_call_grammar(syntax, TOOLS, required=True, max_calls=2)
    assert "<[" not in plain


def char_tokens(compiler, text: str) -> list[int]:
    """`text` in the tokens of the original tokenizer (character by character: no marker token)."""
    return [i for ch in text for i in compiler.tokenizer.encode(ch, add_special_tokens=False)]


def test_forced_text_after_a_call_is_the_close_marker_token(marker_tokens):
    """llguidance spells forced text in its canonical tokens: the close marker must come out as its token, which
    the grammar then accepts (Qwen's replies failed there with a 500)."""
    syntax = PARSERS["hermes"].syntax
    grammar = tool_call_grammar(syntax, TOOLS, required=True, max_calls=1, special_token=marker_tokens.special_token)
    matcher = marker_tokens.constraint(grammar).matcher
    call = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert matcher.consume_tokens(token_ids(marker_tokens, syntax.open, call))
    forced = matcher.compute_ff_tokens()
    assert (
        forced == token_ids(marker_tokens, "\n</tool_call>") and marker_tokens.special_token("</tool_call>") in forced
    )
    assert matcher.consume_tokens(forced) and matcher.is_stopped()


def test_auto_takes_a_bare_json_call_at_the_start_where_the_marker_is_a_token(chat, marker_tokens):
    """Qwen2.5's small models answer a call under auto as a bare JSON object as often as with <tool_call>: one
    that names an offered tool must be a valid call; any other object, or text, stays text."""
    syntax = PARSERS["hermes"].syntax
    auto = tool_call_grammar(syntax, TOOLS, required=False, max_calls=3, special_token=marker_tokens.special_token)

    def allows(text: str) -> bool:
        return consumes(marker_tokens, auto, token_ids(marker_tokens, text))

    assert allows('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert allows('```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}\n```')
    assert not allows('{"name": "get_weather", "arguments": {"town": "Paris"}}')
    assert not allows('{"name": "get_weather", "arguments": {"city": "Paris"}} and more text')
    assert allows('{"name": "tell_joke", "arguments": {}}') and allows('{"answer": 42}')
    assert allows("```python\nprint(1)\n```") and allows("It is sunny in Paris.")
    special = marker_tokens.special_token
    off = tool_call_grammar(syntax, TOOLS, required=False, max_calls=3, special_token=special, bare=False)
    bad_call = token_ids(marker_tokens, '{"name": "get_weather", "arguments": {"town": "Paris"}}')
    assert consumes(marker_tokens, off, bad_call)  # LLMCHAT_BARE_TOOL_CALLS=false: any object is text
    text_markers = tool_call_grammar(syntax, TOOLS, required=False, max_calls=3)  # no marker token: no bare calls
    assert accepts(chat, text_markers, '{"name": "get_weather", "arguments": {"town": "Paris"}}')
