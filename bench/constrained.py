"""The cost of constrained decoding: the same prompts streamed free, as JSON matching a schema, and as a
named tool call, at concurrency 1 and 8. Output is long enough in every mode to hit max_tokens."""

from pathlib import Path

from rich.console import Console

from bench import servers

STORY = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
MODES = {
    "free": {},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY}}},
    "tool call": {
        "tools": [{"type": "function", "function": {"name": "write", "description": "Write it", "parameters": STORY}}],
        "tool_choice": {"type": "function", "function": {"name": "write"}},
    },
}


def run(server: servers.Server, count, max_tokens: int, console: Console, out: Path) -> None:
    from bench.run import run_variants  # run.py imports this module

    variants = {mode: {"extra": extra} for mode, extra in MODES.items()}
    title = "Constrained decoding (llmchat, same prompts, greedy)"
    run_variants(
        server, count, max_tokens, console, out / "constrained.json", label="mode", title=title, variants=variants
    )
