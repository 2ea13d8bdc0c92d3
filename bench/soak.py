"""Soak: mixed load against llmchat for a set time, then a report of requests, errors, latency and memory.

    just soak               # 10 minutes
    just soak --minutes 2   # shorter

The mix (seeded): streaming and non-streaming chat, tool calls (required, streamed and not), JSON-schema
output, and streams the client abandons after a few chunks. Targets: zero 5xx, and resident memory after
warm-up (the first fifth of the run) growing less than 5%. Writes bench/results/soak.json.
"""

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
from rich.console import Console

from bench import servers
from bench.report import captioned

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Explain gravity briefly.", "Hi!"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
# kind -> (weight, extra request fields, stream, abandon after N chunks)
MIX = {
    "chat": (4, {}, False, None),
    "chat-stream": (4, {}, True, None),
    "tools": (2, {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}, False, None),
    "tools-stream": (1, {"tools": [WEATHER], "tool_choice": "required"}, True, None),
    "json": (
        1,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
        False,
        None,
    ),
    "disconnect": (2, {"max_tokens": 200}, True, 3),
}


async def one(client: httpx.AsyncClient, rng: random.Random) -> dict:
    kind = rng.choices(list(MIX), weights=[w for w, *_ in MIX.values()])[0]
    _, extra, stream, abandon = MIX[kind]
    body = {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": 48}
    body |= extra | {"stream": stream, "temperature": rng.choice([0.0, 0.7])}
    start = time.perf_counter()
    status, error = 0, None
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                status, chunks = r.status_code, 0
                async for line in r.aiter_lines():
                    if line.startswith('data: {"error"'):
                        error = line[:200]
                    chunks += line.startswith("data: ")
                    if abandon and chunks >= abandon:
                        break
        else:
            r = await client.post("/v1/chat/completions", json=body)
            status = r.status_code
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"kind": kind, "status": status, "seconds": time.perf_counter() - start, "error": error}


async def soak(server: servers.Server, minutes: float, concurrency: int, seed: int, console: Console) -> dict:
    deadline = time.monotonic() + minutes * 60
    results: list[dict] = []
    memory: list[tuple[float, int, int]] = []  # seconds in, RSS, bytes of KV blocks written so far
    start = time.monotonic()

    async def measure(client: httpx.AsyncClient) -> tuple[float, int, int]:
        pool = (await client.get("/health")).json().get("kv_pool", {})
        written = pool.get("blocks_touched", 0) * pool.get("block_size", 0) * pool.get("bytes_per_token", 0)
        return round(time.monotonic() - start, 1), server.rss_bytes(), written

    async def worker(n: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < deadline:
            results.append(await one(client, rng))

    async def sample(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            memory.append(await measure(client))
            console.print(f"  t={memory[-1][0]:6.0f}s  rss={memory[-1][1] / 2**20:7.1f} MiB  requests={len(results)}")
            await asyncio.sleep(min(15.0, max(1.0, deadline - time.monotonic())))

    async def probe_health(client: httpx.AsyncClient) -> None:
        # Its own connection, as a load balancer's checks would be.
        while time.monotonic() < deadline:
            began = time.perf_counter()
            status = (await client.get("/health")).status_code
            health.append((time.perf_counter() - began, status))
            await asyncio.sleep(0.5)

    health: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with (
        httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as client,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as prober,
    ):
        await asyncio.gather(sample(prober), probe_health(prober), *(worker(n, client) for n in range(concurrency)))
        # Whether the prefix cache filled up (and evicted) while resident memory was measured.
        cache = (await prober.get("/health")).json().get("prefix_cache", {})
        memory.append(await measure(prober))
    return summarize(results, memory, minutes, health) | {"prefix_cache": cache}


def summarize(
    results: list[dict], memory: list[tuple[float, int, int]], minutes: float, health: list[tuple[float, int]]
) -> dict:
    """Memory growth is also given net of the KV pool's blocks first written meanwhile: on the CPU the pool's
    pages are committed as the prefix cache first fills them, which is growth by design, up to the pool's size."""
    done = [r for r in results if r["kind"] != "disconnect" and r["status"] == 200 and not r["error"]]
    latencies = sorted(r["seconds"] for r in done) or [float("nan")]
    _, warm, warm_written = next((m for m in memory if m[0] >= minutes * 60 / 5), memory[0])
    _, end, end_written = memory[-1]
    return {
        "minutes": minutes,
        "requests": len(results),
        "by_kind": dict(Counter(r["kind"] for r in results)),
        "by_status": dict(Counter(str(r["status"]) for r in results)),
        "server_errors_5xx": sum(r["status"] >= 500 for r in results),
        "errors": [r for r in results if r["error"] or (r["status"] != 200 and r["kind"] != "disconnect")][:20],
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "rss_mib": [(t, round(rss / 2**20, 1)) for t, rss, _ in memory],
        "rss_growth_after_warmup_pct": round(100 * (end - warm) / warm, 2),
        "kv_blocks_written_after_warmup_mib": round((end_written - warm_written) / 2**20, 1),
        "rss_growth_after_warmup_net_of_kv_pct": round(100 * (end - warm - (end_written - warm_written)) / warm, 2),
        "health_checks": len(health),
        "health_not_200": sum(status != 200 for _, status in health),
        "health_p99_ms": round(1000 * sorted(s for s, _ in health)[int(0.99 * (len(health) - 1))], 1),
        "health_max_ms": round(1000 * max(s for s, _ in health), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    console = Console(width=120)
    args.out.mkdir(parents=True, exist_ok=True)
    server = servers.llmchat([])
    server.start(args.out)
    try:
        report = asyncio.run(soak(server, args.minutes, args.concurrency, args.seed, console))
    finally:
        server.stop()
    table = captioned(f"Soak: {args.minutes:g} min, {args.concurrency} clients, mixed load")
    for key in ("requests", "by_kind", "by_status", "server_errors_5xx", "latency_p50_s", "latency_p99_s"):
        table.add_row(key, str(report[key]))
    table.add_row("rss MiB (t s)", " ".join(f"{rss}@{t:.0f}" for t, rss in report["rss_mib"]))
    table.add_row("rss growth after warm-up", f"{report['rss_growth_after_warmup_pct']}%")
    table.add_row("KV blocks first written after warm-up", f"{report['kv_blocks_written_after_warmup_mib']} MiB")
    table.add_row("rss growth after warm-up, net of them", f"{report['rss_growth_after_warmup_net_of_kv_pct']}%")
    for key in ("health_checks", "health_not_200", "health_p99_ms", "health_max_ms"):
        table.add_row(key, str(report[key]))
    cache = report["prefix_cache"]
    if "bytes" in cache:
        used = f"{cache['bytes']} of {cache['capacity_bytes']} bytes"
        table.add_row("prefix cache", f"{used}, {cache['num_evicted']} blocks evicted")
    console.print(table)
    for error in report["errors"]:
        console.print(f"[red]{error}[/red]")
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out / 'soak.json'}")


if __name__ == "__main__":
    main()
