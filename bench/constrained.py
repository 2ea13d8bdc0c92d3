"""The cost of constrained decoding: the same prompts streamed free, as JSON matching a schema, and as a
named tool call, at 1, 8 and 16 clients, every reply max_tokens long (the schemas cannot close sooner), and
output tokens as the server counts them (a tool call's markup is output too).

Two schemas: `story`, one free string (almost nothing is forced), and `cast`, records of fixed keys and
enums (much is forced: keys, punctuation, the rest of an enum value once it is decided). The steps column
is the server's model steps per output token over the run: 1.00 when every token needs one, below when
the grammar's forced tokens were appended without.
"""

from pathlib import Path

from rich.console import Console

from bench import servers

# minLength: greedy decoding sometimes closed the story after a few words, and a short reply's tok/s is
# mostly its prompt's prefill.
STORY = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"]}
CAST = {
    "type": "object",
    "properties": {
        "characters": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "role": {"type": "string", "enum": ["protagonist", "antagonist", "mentor", "sidekick"]},
                    "age": {"type": "integer"},
                },
                "required": ["name", "role", "age"],
            },
        }
    },
    "required": ["characters"],
}


def json_schema(name: str, schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}}


MODES = {
    "free": {},
    "json_schema story": json_schema("story", STORY),
    "json_schema cast": json_schema("cast", CAST),
    "tool call": {
        "tools": [{"type": "function", "function": {"name": "write", "description": "Write it", "parameters": STORY}}],
        "tool_choice": {"type": "function", "function": {"name": "write"}},
    },
}


def run(server: servers.Server, count, max_tokens: int, console: Console, out: Path) -> None:
    from bench.run import run_variants  # run.py imports this module

    usage = {"stream_options": {"include_usage": True}}
    variants = {mode: {"extra": extra | usage, "server_counts": True} for mode, extra in MODES.items()}
    title = "Constrained decoding (llmchat, same prompts, greedy)"
    run_variants(
        server,
        count,
        max_tokens,
        console,
        out / "constrained.json",
        label="mode",
        title=title,
        variants=variants,
        levels=(1, 8, 16),
        steps=True,
    )
