"""The same prompts streamed through each chat protocol llmchat speaks (OpenAI chat, Anthropic Messages,
OpenAI Responses) at concurrency 1 and 8: they share one chat core, so throughput should not depend on the
wire format. Greedy, same max_tokens, output counted with the model's tokenizer."""

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import servers


def _messages_text(event: dict) -> str:
    return (event.get("delta") or {}).get("text", "") if event.get("type") == "content_block_delta" else ""


def _responses_text(event: dict) -> str:
    return event.get("delta", "") if event.get("type") == "response.output_text.delta" else ""


def _asks(model: str, max_tokens: int, count) -> dict:
    """Per protocol, ask(client, prompt) -> one streamed request's timings."""
    from bench.run import one_request, stream_request  # run.py imports this module

    def messages(prompt: str) -> list[dict]:
        return [{"role": "user", "content": prompt}]

    return {
        "chat.completions": lambda client, prompt: one_request(client, model, prompt, max_tokens, count),
        "messages": lambda client, prompt: stream_request(
            client,
            "/v1/messages",
            {"model": model, "messages": messages(prompt), "max_tokens": max_tokens},
            _messages_text,
            count,
        ),
        "responses": lambda client, prompt: stream_request(
            client,
            "/v1/responses",
            {"model": model, "input": prompt, "max_output_tokens": max_tokens},
            _responses_text,
            count,
        ),
    }


def run(server: servers.Server, count, max_tokens: int, console: Console, out: Path) -> None:
    from bench.run import run_level

    rows = []
    for concurrency in (1, 8):
        for protocol, ask in _asks(server.model, max_tokens, count).items():
            result = asyncio.run(run_level(server, concurrency, max(2 * concurrency, 3), max_tokens, count, ask=ask))
            rows.append({"protocol": protocol} | asdict(result))
            console.print(f"  {protocol} c={concurrency}: {result.throughput_tok_s} tok/s")
    table = Table(title="Protocols (llmchat, same prompts, greedy)")
    for col in ("protocol", "conc", "tok/s", "vs chat", "decode tok/s p50", "TTFT p50 s", "errors"):
        table.add_column(col, justify="right")
    chat = {r["concurrency"]: r["throughput_tok_s"] for r in rows if r["protocol"] == "chat.completions"}
    for r in rows:
        base = chat[r["concurrency"]]
        table.add_row(
            r["protocol"],
            str(r["concurrency"]),
            f"{r['throughput_tok_s']:.1f}",
            f"{r['throughput_tok_s'] / base:.2f}x" if base else "n/a",
            f"{r['decode_tok_s_p50']:.1f}",
            f"{r['ttft_p50_s']:.2f}",
            str(r["errors"]),
        )
    console.print(table)
    (out / "protocols.json").write_text(json.dumps(rows, indent=2))
