"""Long prompt arrival: a few streams are generating when long prompts arrive, one second apart, sharing no
prefix with anything sent before. A server that prefills a whole long prompt in one step stalls every running
stream meanwhile; chunked prefill keeps the running streams' inter-chunk gaps close to their median. While the
prompts prefill, most of the streams' steps carry a chunk, so the median of their gaps from then on is itself a
chunk step's: the longest gap is also given over the median gap before the first prompt was sent, when the
streams decoded alone ("max/before")."""

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import httpx
from rich.console import Console

from bench import filler, servers
from bench.report import percentile, ratio, table
from bench.stream import chat_text, stream_request

# Prompts the model answers at length: ignore_eos is not portable across the servers.
TOPICS = (
    "a lighthouse keeper who finds a map in a bottle",
    "two rival bakers in a mountain village",
    "a robot that learns to paint",
    "a long voyage on a cargo ship",
    "a girl who can talk to birds",
    "a detective in a city of canals",
    "the last day of a travelling circus",
    "a family moving to a farm on Mars",
)
# The first word of each long prompt's system text, so that the prompts differ from each other (and from the
# agent scenario's "You are Atlas") right after the chat template's own opening tokens.
LEADS = ("Harbor", "Orchard", "Quarry", "Meadow", "Glacier", "Canyon", "Prairie", "Tundra")
READY_CHUNKS = 10  # content chunks a running stream shows before the long prompts go out (about one token each)
SPACING_S = 1.0


@dataclass(slots=True)
class ArrivalResult:
    server: str
    running_streams: int
    long_prompts: int
    long_prompt_tokens: int  # each, counted with the model's tokenizer
    gaps: int  # inter-chunk gaps measured, over all running streams
    gap_p50_ms: float | None
    gap_p99_ms: float | None
    gap_max_ms: float | None
    max_over_p50: float | None
    gap_before_p50_ms: float | None  # the streams' median gap before the first long prompt was sent: decode steps
    max_over_before: float | None
    long_ttft_s: list[float | None]  # in the order sent; None for a failed one
    still_running: int  # running streams that streamed on after the last long prompt finished
    errors: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("arrival scenario")
    group.add_argument("--arrival-streams", type=int, default=4, help="streams generating when the prompts arrive")
    group.add_argument("--arrival-long-prompts", type=int, default=2)
    group.add_argument("--arrival-long-tokens", type=int, default=3000, help="size of each long prompt")
    group.add_argument("--arrival-max-tokens", type=int, default=400, help="max_tokens of the running streams")


def _story(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)] + (f", part {i // len(TOPICS) + 1}" if i >= len(TOPICS) else "")
    return f"Write a long story about {topic}. Give it many chapters and describe every place in detail."


def long_prompt(k: int, tokens: int, count) -> list[dict]:
    system = f"{LEADS[k % len(LEADS)]} records desk {k + 1}. Read the rules you are given and answer in one line."
    rules = filler.numbered_rules(seed=100 + k, tokens=tokens, count=count)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": rules + "\n\nWhich rule is the strictest, and why?"},
    ]


def run(server: servers.Server, count, args: argparse.Namespace, console: Console) -> ArrivalResult:
    streams, num_long = args.arrival_streams, args.arrival_long_prompts
    prompts = [long_prompt(k, args.arrival_long_tokens, count) for k in range(num_long)]
    times: list[list[float]] = [[] for _ in range(streams)]
    long_ttft: list[float | None] = [None] * num_long
    long_end = 0.0
    errors = 0
    num_ready = 0
    ready = asyncio.Event()

    def mark_ready() -> None:
        nonlocal num_ready
        num_ready += 1
        if num_ready == streams:
            ready.set()

    def body(messages: list[dict], max_tokens: int) -> dict:
        usage = {"stream_options": {"include_usage": True}}
        return {"model": server.model, "messages": messages, "max_tokens": max_tokens} | usage

    async def running(client: httpx.AsyncClient, i: int) -> None:
        nonlocal errors

        def on_text(now: float) -> None:
            times[i].append(now)
            if len(times[i]) == READY_CHUNKS:
                mark_ready()

        messages = [{"role": "user", "content": _story(i)}]
        try:
            await stream_request(
                client, "/v1/chat/completions", body(messages, args.arrival_max_tokens), chat_text, count, on_text
            )
        except Exception:  # counted, the run goes on
            errors += 1
        finally:
            if len(times[i]) < READY_CHUNKS:  # ended early: the long prompts must not wait for it
                mark_ready()

    async def arrive(client: httpx.AsyncClient, k: int) -> None:
        nonlocal errors, long_end
        await asyncio.sleep(k * SPACING_S)
        try:
            r = await stream_request(client, "/v1/chat/completions", body(prompts[k], 16), chat_text, count)
            long_ttft[k] = round(r["ttft"], 3)
        except Exception:  # counted, the run goes on
            errors += 1
        long_end = max(long_end, time.perf_counter())

    async def scenario() -> float:
        limits = httpx.Limits(max_connections=streams + num_long + 2)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as client:
            tasks = [asyncio.create_task(running(client, i)) for i in range(streams)]
            await ready.wait()
            sent = time.perf_counter()
            await asyncio.gather(*(arrive(client, k) for k in range(num_long)))
            await asyncio.gather(*tasks)
        return sent

    sent = asyncio.run(scenario())
    # A gap counts when it ends after the first long prompt was sent, the one straddling that moment included.
    gaps = [b - a for stream in times for a, b in pairwise(stream) if b >= sent]
    p50 = statistics.median(gaps) if gaps else None
    before = [b - a for stream in times for a, b in pairwise(stream) if b < sent]
    before_p50 = statistics.median(before) if before else None
    result = ArrivalResult(
        server=server.name,
        running_streams=streams,
        long_prompts=num_long,
        long_prompt_tokens=count(prompts[0][1]["content"]) if prompts else 0,
        gaps=len(gaps),
        gap_p50_ms=round(1000 * p50, 1) if gaps else None,
        gap_p99_ms=round(1000 * percentile(gaps, 0.99), 1) if gaps else None,
        gap_max_ms=round(1000 * max(gaps), 1) if gaps else None,
        max_over_p50=round(max(gaps) / p50, 2) if p50 else None,
        gap_before_p50_ms=round(1000 * before_p50, 1) if before_p50 else None,
        max_over_before=round(max(gaps) / before_p50, 2) if gaps and before_p50 else None,
        long_ttft_s=long_ttft,
        still_running=sum(1 for stream in times if stream and stream[-1] > long_end),
        errors=errors,
    )
    console.print(f"  {server.name} arrival: gap max {result.gap_max_ms} ms, long prompts' TTFT {long_ttft} s")
    return result


def _slowest(ttfts: list[float | None]) -> float | None:
    return max((t for t in ttfts if t is not None), default=None)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def report(rows: list[ArrivalResult], args: argparse.Namespace, console: Console, path: Path) -> None:
    """One row per server; llmchat x is llmchat's number over the row's (lower is better for both)."""
    title = (
        f"Long prompt arrival: {args.arrival_streams} streams generating (max_tokens {args.arrival_max_tokens}), "
        f"{args.arrival_long_prompts} prompts of ~{args.arrival_long_tokens} tokens arrive {SPACING_S:.0f}s apart"
    )
    columns = ("server", "gaps", "gap p50 ms", "gap p99 ms", "gap max ms", "max/p50", "max/before", "long TTFT s")
    results = table(title, (*columns, "still running", "errors", "llmchat x gap max", "llmchat x TTFT max"))
    ours = next((r for r in rows if r.server == "llmchat"), None)
    for r in rows:
        peer = ours is not None and r is not ours
        results.add_row(
            r.server,
            str(r.gaps),
            _ms(r.gap_p50_ms),
            _ms(r.gap_p99_ms),
            _ms(r.gap_max_ms),
            "n/a" if r.max_over_p50 is None else f"{r.max_over_p50:.1f}",
            "n/a" if r.max_over_before is None else f"{r.max_over_before:.1f} ({_ms(r.gap_before_p50_ms)} ms)",
            ", ".join("n/a" if t is None else f"{t:.2f}" for t in r.long_ttft_s) or "n/a",
            f"{r.still_running}/{r.running_streams}",
            str(r.errors),
            ratio(ours.gap_max_ms, r.gap_max_ms) if peer else "",
            ratio(_slowest(ours.long_ttft_s), _slowest(r.long_ttft_s)) if peer else "",
        )
    console.print(results)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
