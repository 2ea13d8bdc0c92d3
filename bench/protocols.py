"""The same prompts streamed through each chat protocol llmchat speaks (OpenAI chat, Anthropic Messages,
OpenAI Responses) at concurrency 1 and 8: they share one chat core, so throughput should not depend on the
wire format. Greedy, same max_tokens, output counted with the model's tokenizer."""

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench import servers


def _chat(model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    messages = [{"role": "user", "content": prompt}]
    return "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": max_tokens}


def _messages(model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    messages = [{"role": "user", "content": prompt}]
    return "/v1/messages", {"model": model, "messages": messages, "max_tokens": max_tokens}


def _responses(model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    return "/v1/responses", {"model": model, "input": prompt, "max_output_tokens": max_tokens}


def _chat_text(event: dict) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices", []))


def _messages_text(event: dict) -> str:
    return (event.get("delta") or {}).get("text", "") if event.get("type") == "content_block_delta" else ""


def _responses_text(event: dict) -> str:
    return event.get("delta", "") if event.get("type") == "response.output_text.delta" else ""


PROTOCOLS = {
    "chat.completions": (_chat, _chat_text),
    "messages": (_messages, _messages_text),
    "responses": (_responses, _responses_text),
}


async def _one(client: httpx.AsyncClient, protocol: str, model: str, prompt: str, max_tokens: int, count) -> dict:
    build, text_of = PROTOCOLS[protocol]
    path, body = build(model, prompt, max_tokens)
    start, first, last, parts = time.perf_counter(), None, None, []
    async with client.stream("POST", path, json=body | {"temperature": 0, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if text := text_of(json.loads(line[6:])):
                first, last = first or time.perf_counter(), time.perf_counter()
                parts.append(text)
    if first is None:
        raise RuntimeError("no text streamed")
    tokens = count("".join(parts))
    return {"ttft": first - start, "tokens": tokens, "decode": (tokens - 1) / (last - first) if last > first else 0.0}


async def _level(server: servers.Server, protocol: str, concurrency: int, prompts, max_tokens: int, count) -> dict:
    queue, done, errors = list(range(max(2 * concurrency, 3))), [], 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            i = queue.pop(0)
            try:
                done.append(await _one(client, protocol, server.model, prompts[i % len(prompts)], max_tokens, count))
            except Exception:  # counted, the run goes on
                errors += 1

    async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "errors": errors,
        "throughput_tok_s": round(sum(d["tokens"] for d in done) / wall, 2),
        "ttft_p50_s": round(statistics.median([d["ttft"] for d in done] or [float("nan")]), 3),
        "decode_tok_s_p50": round(statistics.median([d["decode"] for d in done] or [0.0]), 2),
    }


def run(server: servers.Server, prompts, count, max_tokens: int, console: Console, out: Path) -> None:
    rows = []
    for concurrency in (1, 8):
        for protocol in PROTOCOLS:
            row = asyncio.run(_level(server, protocol, concurrency, prompts, max_tokens, count))
            rows.append(row)
            console.print(f"  {protocol} c={concurrency}: {row['throughput_tok_s']} tok/s")
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
