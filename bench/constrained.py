"""The cost of constrained decoding: the same prompts streamed free, as JSON matching a schema, and as a
named tool call, at concurrency 1 and 8. Output is long enough in every mode to hit max_tokens."""

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

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
    from bench.run import run_level  # run.py imports this module

    rows = []
    for concurrency in (1, 8):
        for mode, extra in MODES.items():
            result = asyncio.run(run_level(server, concurrency, max(2 * concurrency, 3), max_tokens, count, extra))
            rows.append({"mode": mode} | asdict(result))
            console.print(f"  constrained {mode} c={concurrency}: {result.throughput_tok_s} tok/s")
    table = Table(title="Constrained decoding (llmchat, same prompts, greedy)")
    for col in ("mode", "conc", "tok/s", "vs free", "decode tok/s p50", "TTFT p50 s", "errors"):
        table.add_column(col, justify="right")
    free = {r["concurrency"]: r["throughput_tok_s"] for r in rows if r["mode"] == "free"}
    for r in rows:
        ratio = r["throughput_tok_s"] / free[r["concurrency"]] if free[r["concurrency"]] else float("nan")
        table.add_row(
            r["mode"],
            str(r["concurrency"]),
            f"{r['throughput_tok_s']:.1f}",
            f"{ratio:.2f}x",
            f"{r['decode_tok_s_p50']:.1f}",
            f"{r['ttft_p50_s']:.2f}",
            str(r["errors"]),
        )
    console.print(table)
    (out / "constrained.json").write_text(json.dumps(rows, indent=2))
