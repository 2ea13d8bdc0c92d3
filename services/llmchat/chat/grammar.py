"""Constrained decoding with llguidance: grammars for tool calls and JSON output.

A request's grammar becomes a Constraint in its SamplingParams; the engine masks that request's row of
logits only, so constrained and free requests share a batch.
"""

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema
import llguidance
import llguidance.hf

from llmchat.chat.toolcalls import CallSyntax, ToolSpec
from llmchat.engine.constraints import Constraint, GrammarError

# Compact JSON: one spelling per value, fewer tokens, and no room for a small model to loop on whitespace.
_COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def schema_problem(schema: Any, *, must_be_object: bool) -> str | None:
    """Why `schema` is not a usable JSON Schema (None when it is): not valid JSON Schema, or using a keyword
    constrained decoding cannot enforce (llguidance names it), which is refused rather than ignored."""
    if not isinstance(schema, dict):
        return "it must be a JSON Schema object"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"it is not a valid JSON Schema: {exc.message}"
    if must_be_object and schema.get("type", "object") != "object":
        return "a tool's parameters must be a JSON Schema of type 'object'"
    grammar = llguidance.LLMatcher.grammar_from_json_schema(_schema(schema))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        return f"constrained decoding cannot enforce it: {'; '.join(messages)}"
    return None


def _lit(text: str) -> str:
    return json.dumps(text)


# Where JSON Schema nests schemas: a keyword's value is one schema, a list of them, or a map of names to them.
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames", "additionalItems")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# An object beside these may hold keys its own properties do not name, so it is not closed.
_OPENERS = {"additionalProperties", "patternProperties", "anyOf", "oneOf", "$ref"}


def closed(schema: Any, close: bool = True) -> Any:
    """The schema with additionalProperties false on every object that lists properties but says nothing
    about others. What the model writes still validates against the original; it just cannot invent keys
    (small models otherwise copy the schema itself into the arguments). Only schemas are walked, never
    values (enum, const, default, examples). allOf's parts stay open (closing each would forbid the keys
    the others add); the object holding them is closed over the keys they all name."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _ONE and isinstance(value, dict):
            out[key] = closed(value)
        elif key in _LISTS and isinstance(value, list):
            out[key] = [closed(item, close=key != "allOf") for item in value]
        elif key in _MAPS and isinstance(value, dict):
            out[key] = {name: closed(item) for name, item in value.items()}
    if close and not _OPENERS & out.keys():
        parts = out.get("allOf", [])
        if all(isinstance(part, dict) and not (_OPENERS | {"allOf"}) & part.keys() for part in parts):
            # allOf's parts together name the keys: the whole is closed over all of them.
            names = [name for part in parts for name in part.get("properties", {})]
            if "properties" in out or names:
                out["properties"] = dict.fromkeys(names, {}) | out.get("properties", {})
                out["additionalProperties"] = False
    return out


def _schema(schema: dict[str, Any] | None) -> str:
    merged = closed(schema or NO_PARAMETERS)
    merged["x-guidance"] = {**_COMPACT, **merged.get("x-guidance", {})}
    return json.dumps(merged)


def tool_call_grammar(
    syntax: CallSyntax,
    tools: Sequence[ToolSpec],
    *,
    required: bool,
    max_calls: int,
    special_token: Callable[[str], int | None] = lambda _: None,
    bare: bool = True,
) -> str:
    """An llguidance grammar, written in Lark: free text or calls (required=False), or calls only; each
    call names an offered tool and its arguments match that tool's schema. After each call the model may
    end the block, up to `max_calls` calls in it. A marker of the syntax that the tokenizer has as one token
    of its own (`special_token`; Qwen's <tool_call>, Mistral's [TOOL_CALLS]) is that token in the grammar: a
    model trained on it writes the token, never the marker's text. `bare`: whether a reply may open with a bare
    JSON call where the family allows one (bare_calls_allowed)."""
    tokens = {marker: token for marker in syntax.markers if (token := special_token(marker)) is not None}
    alternatives = " | ".join(f"tool_{n}" for n in range(len(tools)))
    lines = ["%llguidance {}"]
    calls = "call" if max_calls == 1 else f"call ({_spell(syntax.sep, tokens)} call){{0,{max_calls - 1}}}"
    block = " ".join(part for part in (_spell(syntax.list_open, tokens), calls, _spell(syntax.close, tokens)) if part)
    trigger = _spell(syntax.open, tokens)
    if syntax.lead in tokens:  # calls at the start may follow the lead token (Llama 3's <|python_tag|>)
        block = f"({_spell(syntax.lead, tokens)})? {block}"
    if required:
        lines.append(f"start: {trigger} {block}")
    elif syntax.open:
        # TEXT may not contain the trigger (nor its text where it is a token: the parser reads text), so once
        # the model starts a call it has to finish a valid one. llguidance takes a token only in a rule, not
        # in a lazy lexeme like `head`; TEXT cannot hold a token anyway.
        free = f"/(.|\\n)*/ & ~/(.|\\n)*{re.escape(syntax.open)}(.|\\n)*/"
        text = f"TEXT: {free}"
        if bare and bare_calls_allowed(syntax, tools, special_token):
            # A reply that starts with a JSON object (bare or in a ```json fence) whose "name" is an offered
            # tool is that call; one naming anything else, or with another first key, stays text. LEAD text may
            # not start with an object: where two lexemes read the same bytes llguidance keeps the longer, and
            # the call would be refused.
            lines += [
                f"start: LEAD | LEAD {trigger} {block} TEXT | FENCE? bare",
                f"LEAD: {free} & ~/\\s*(```(json)?\\s*)?\\{{(.|\\n)*/",
                "FENCE: /\\s*(```(json)?)?\\s*/",
                *_bare_calls(tools, syntax.args_key),
                text,
            ]
        elif syntax.open in tokens:
            lines += [f"start: TEXT | TEXT {trigger} {block} TEXT", text]
        else:
            lines += [f"start: TEXT | head {block} TEXT", f"head[lazy]: TEXT {trigger}", text]
    else:
        lines += [f"start: PLAIN | {block}", "PLAIN: /\\s*([^{\\s](.|\\n)*)?/"]
    if syntax.xml:
        lines += _xml_calls(tools, alternatives)
    elif syntax.args_marker:  # NAME[ARGS]{...}
        lines.append(f"call: {alternatives}")
        marker = _spell(syntax.args_marker, tokens)
        lines += [f"tool_{n}: {_lit(t.name)} {marker} %json {_schema(t.parameters)}" for n, t in enumerate(tools)]
    else:
        lines.append(f'call: "{{\\"name\\": \\"" ({alternatives}) "}}"')
        for n, tool in enumerate(tools):
            head = _lit(f'{tool.name}", "{syntax.args_key}": ')
            lines.append(f"tool_{n}: {head} %json {_schema(tool.parameters)}")
    return llguidance.grammar_from("lark", "\n".join(lines))


def bare_calls_allowed(
    syntax: CallSyntax, tools: Sequence[ToolSpec], special_token: Callable[[str], int | None]
) -> bool:
    """Whether an auto reply may open with a bare JSON call (CallSyntax.bare): where the family allows it and its
    open marker is a token of the tokenizer, unless a tool's schema refers to its own definitions, which would
    not resolve inside the call's. The grammar and the parser both follow this."""
    return (
        syntax.bare
        and bool(syntax.open)
        and special_token(syntax.open) is not None
        and not any("$ref" in json.dumps(tool.parameters or {}) for tool in tools)
    )


def _bare_calls(tools: Sequence[ToolSpec], args_key: str) -> list[str]:
    """Lark rules for `bare`: a JSON object spelling a call to one of `tools` (any whitespace: fenced replies come
    pretty-printed), or another object, which is text."""
    calls = " | ".join(f"bare_{n}" for n in range(len(tools)))
    name_key = _lit('"name"')
    rules = [
        f'bare: "{{" WS ({name_key} WS ":" WS ({calls} | OTHER TEXT) | KEY TEXT)',
        "WS: /\\s*/",
        f'OTHER: /"([^"\\\\]|\\\\.)*"/ & ~/"({"|".join(re.escape(t.name) for t in tools)})"/',
        'KEY: /"([^"\\\\]|\\\\.)*"/ & ~/"name"/',
    ]
    for n, tool in enumerate(tools):
        parameters = closed(tool.parameters or NO_PARAMETERS)
        parameters["x-guidance"] = {"whitespace_flexible": True}
        name, key = json.dumps(tool.name), json.dumps(args_key)
        rules.append(
            f'bare_{n}: {_lit(name)} WS "," WS {_lit(key)} WS ":" WS %json {json.dumps(parameters)} WS "}}" END'
        )
    rules.append("END: /\\s*(```)?\\s*/")
    return rules


# Qwen3-Coder's values by type, each followed by the parameter's end; a string may hold anything but that end.
_XML_SCALARS = {
    "integer": "/-?(0|[1-9][0-9]*)/",
    "number": "/-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?/",
    "boolean": '"true" | "false" | "True" | "False"',  # the template writes Python's spelling
    "null": '"null"',
}
_XML_END = "\n</parameter>\n"


def _xml_calls(tools: Sequence[ToolSpec], alternatives: str) -> list[str]:
    """Lark rules for Qwen3-Coder's XML calls: <function=NAME>, then each parameter of the schema in its order
    (the optional ones may be left out) as <parameter=KEY>, its value on lines of its own, </parameter>."""
    lines = [f'call: "<function=" ({alternatives}) "</function>"']
    for n, tool in enumerate(tools):
        schema = closed(tool.parameters or NO_PARAMETERS)
        required = set(schema.get("required", []))
        parts = []
        for i, (key, prop) in enumerate(schema.get("properties", {}).items()):
            value = f"v_{n}_{i}"
            parts.append(f"p_{n}_{i}" + ("" if key in required else "?"))
            opening = _lit(f"<parameter={key}>\n")
            lines.append(f"p_{n}_{i}: {opening} {value}")
            lines.append(_xml_value(value, prop if isinstance(prop, dict) else {}))
        head = _lit(f"{tool.name}>\n")
        lines.append(f"tool_{n}: {head} {' '.join(parts)}".rstrip())
    return lines


def _xml_value(rule: str, schema: dict[str, Any]) -> str:
    """One parameter's value and end: plain text for a string (a lazy lexeme, ended by the first end marker; its
    minLength and maxLength held, not its pattern or format), the literal for an enum of strings, a scalar's
    pattern, or JSON for anything else."""
    kind = schema.get("type")
    if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]) and schema["enum"]:
        return f"{rule}: ({' | '.join(_lit(v) for v in schema['enum'])}) {_lit(_XML_END)}"
    if kind == "string":
        longest = schema.get("maxLength")
        repeat = f"{{{schema.get('minLength', 0)},{longest}}}" if isinstance(longest, int) else "*"
        return f"{rule}[lazy]: /(.|\\n){repeat}/ {_lit(_XML_END)}"
    if kind in _XML_SCALARS:
        return f"{rule}: ({_XML_SCALARS[kind]}) {_lit(_XML_END)}"
    return f"{rule}: %json {_schema(schema)} {_lit(_XML_END)}"


def _spell(text: str, tokens: dict[str, int]) -> str:
    """`text` as a sequence in a grammar rule: quoted text, with each marker in `tokens` as its token ("" when
    `text` is empty)."""
    if not tokens:
        return _lit(text) if text else ""
    parts = re.split("(" + "|".join(map(re.escape, tokens)) + ")", text)
    return " ".join(f"<[{tokens[part]}]>" if part in tokens else _lit(part) for part in parts if part)


def json_grammar(schema: dict[str, Any] | None) -> str:
    """Any JSON object (schema None), or JSON matching `schema`."""
    return llguidance.LLMatcher.grammar_from_json_schema(_schema(schema or {"type": "object"}))


# vLLM's structured output kinds beyond JSON, as llguidance names their formats ("grammar": Lark or GBNF/EBNF).
STRUCTURED_FORMATS = {"regex": "regex", "choice": "choice", "grammar": "grammar"}


def structured_grammar(kind: str, value: Any) -> str:
    """The grammar for vLLM's `regex` (the whole output matches it), `choice` (the output is one of the strings)
    or `grammar` (Lark, or EBNF as llama.cpp's GBNF); raises GrammarError with llguidance's message when it does
    not compile."""
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
        value = json.dumps(value)
    elif not isinstance(value, str) or not value:
        raise GrammarError(f"{kind} must be a non-empty string")
    try:
        grammar = llguidance.grammar_from(STRUCTURED_FORMATS[kind], value)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError("; ".join(m.strip() for m in messages))
    return grammar


class GrammarCompiler:
    """Owns the llguidance view of the tokenizer (about a second to build, so one per model)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.tokenizer = tokenizer
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)
        # Asked for the call markers of every tool request; the tokenizer builds this map anew at each call.
        self.added_tokens = tokenizer.get_added_vocab()

    def special_token(self, text: str) -> int | None:
        """The token `text` is, where the tokenizer adds it to its vocabulary as one (Qwen's <tool_call>, marked
        special or not: llguidance keeps every added token apart from text), else None."""
        return self.added_tokens.get(text)

    def constraint(self, grammar: str) -> Constraint:
        """Raises GrammarError with llguidance's explanation when the grammar cannot be built."""
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher, self.vocab_size)
