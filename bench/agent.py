"""Agent sessions: concurrent multi-turn conversations that share one long system prompt (an operations
handbook and six tool schemas), each turn sent when the conversation's previous turn finished. A server
with a prefix cache should answer turns 2+ much sooner than turn 1; the table shows by how much."""

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console

from bench import filler, servers
from bench.report import percentile, ratio, table
from bench.stream import chat_text, stream_request

FIRST_QUESTIONS = (
    "The checkout service returns 502s since the last deploy. What do I do first?",
    "Replication lag on the primary Postgres cluster is at 40 seconds. How bad is that?",
    "A customer says their invoices from yesterday are missing. Where do I start?",
    "The edge cache hit rate dropped from 90 to 60 percent in an hour. What now?",
    "Our TLS certificate for the auth gateway expires in five days. What is the procedure?",
    "The nightly export job failed twice in a row. Who should I tell?",
    "Disk usage on the search index nodes is at 88 percent. What should happen?",
    "Traffic to the mobile API doubled in ten minutes. Is this an incident?",
)
FOLLOW_UPS = (
    "Which tool would you call for that, and with what arguments?",
    "That did not help. What is the next step?",
    "Who needs to be told, and how often should I post updates?",
    "Which handbook rules apply here? Give their numbers.",
    "Summarize the plan in three short steps.",
    "What should I check before closing the incident?",
)


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {
        "name": name,
        "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required},
    }


_TEXT = {"type": "string"}
_SEVERITY = {"type": "string", "enum": ["sev1", "sev2", "sev3", "sev4"]}
TOOLS = (
    _tool("get_service_status", "Health, version and error rate of one service.", {"service": _TEXT}, ["service"]),
    _tool(
        "query_metrics",
        "A metric aggregated over the last minutes.",
        {
            "metric": _TEXT,
            "window_minutes": {"type": "integer", "minimum": 1, "maximum": 1440},
            "aggregation": {"type": "string", "enum": ["avg", "p50", "p95", "p99", "max"]},
        },
        ["metric", "window_minutes"],
    ),
    _tool(
        "restart_service",
        "Rolling restart of a service in one region.",
        {"service": _TEXT, "region": _TEXT, "drain_first": {"type": "boolean"}},
        ["service", "region"],
    ),
    _tool(
        "page_oncall",
        "Page a team's on-call engineer.",
        {"team": _TEXT, "severity": _SEVERITY, "message": _TEXT},
        ["team", "severity", "message"],
    ),
    _tool(
        "rollback_deploy",
        "Roll a service back to an earlier version.",
        {"service": _TEXT, "to_version": _TEXT, "reason": _TEXT},
        ["service", "to_version"],
    ),
    _tool(
        "create_incident_ticket",
        "Open an incident ticket.",
        {
            "title": _TEXT,
            "severity": _SEVERITY,
            "summary": _TEXT,
            "affected_services": {"type": "array", "items": _TEXT},
        },
        ["title", "severity", "summary"],
    ),
)


@dataclass(slots=True)
class Turn:
    """One answered request of one conversation."""

    turn: int
    start: float
    end: float
    ttft: float
    tokens: int
    usage: dict | None


@dataclass(slots=True)
class TurnResult:
    server: str
    turn: str  # "1".."T", or "2+" for every turn after the first together
    requests: int
    errors: int
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_vs_turn1: float | None  # TTFT p50 over turn 1's
    cached_fraction: float | None  # None: the server did not report usage.prompt_tokens_details.cached_tokens
    prompt_tokens: int | None  # as the server's usage reported them, summed
    output_tokens: int
    tok_s: float  # output tokens over the span from the turn's first request sent to its last one finished
    system_prompt_tokens: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("agent scenario")
    group.add_argument("--agent-conversations", type=int, default=4)
    group.add_argument("--agent-turns", type=int, default=4)
    group.add_argument("--agent-max-tokens", type=int, default=64)
    group.add_argument("--agent-system-tokens", type=int, default=2700, help="size of the shared system prompt")


def system_prompt(tokens: int, count) -> str:
    """The tool schemas go into the text rather than `tools`: not every peer accepts `tools`, and the same
    prompt must reach every server."""
    head = (
        "You are Atlas, the operations agent of an online shop's platform team. Answer briefly, cite the "
        "handbook rule numbers you rely on, and call a tool by answering with one JSON object "
        '{"tool": name, "arguments": {...}}.\n\n# Tools\n'
        + "\n".join(json.dumps(tool) for tool in TOOLS)
        + "\n\n# Operations handbook\n"
    )
    return head + filler.numbered_rules(seed=0, tokens=tokens - count(head), count=count)


async def _conversation(
    client: httpx.AsyncClient, body: dict, index: int, turns: int, done: list[Turn], errors: Counter, count
) -> None:
    question = f"Incident {index + 1}: {FIRST_QUESTIONS[index % len(FIRST_QUESTIONS)]}"
    messages = [*body["messages"], {"role": "user", "content": question}]
    for turn in range(1, turns + 1):
        start = time.perf_counter()
        try:
            r = await stream_request(client, "/v1/chat/completions", body | {"messages": messages}, chat_text, count)
        except Exception:  # counted; without its reply the conversation cannot go on
            errors[turn] += 1
            return
        done.append(Turn(turn, start, time.perf_counter(), r["ttft"], r["tokens"], r["usage"]))
        follow_up = FOLLOW_UPS[(index + turn) % len(FOLLOW_UPS)]
        messages = [*messages, {"role": "assistant", "content": r["text"]}, {"role": "user", "content": follow_up}]


def _cached(turns: list[Turn]) -> tuple[float | None, int | None]:
    usages = [t.usage for t in turns if t.usage]
    prompt = sum(u.get("prompt_tokens") or 0 for u in usages) if usages else None
    details = [u for u in usages if (u.get("prompt_tokens_details") or {}).get("cached_tokens") is not None]
    if not details:
        return None, prompt
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in details)
    return round(cached / max(1, sum(u["prompt_tokens"] for u in details)), 3), prompt


def _summary(server: str, label: str, turns: list[Turn], errors: int, turn1_p50: float, system: int) -> TurnResult:
    ttfts = [t.ttft for t in turns]
    tokens = sum(t.tokens for t in turns)
    span = max((t.end for t in turns), default=0.0) - min((t.start for t in turns), default=0.0)
    p50 = statistics.median(ttfts) if ttfts else float("nan")
    cached, prompt = _cached(turns)
    return TurnResult(
        server=server,
        turn=label,
        requests=len(turns) + errors,
        errors=errors,
        ttft_p50_s=round(p50, 3),
        ttft_p95_s=round(percentile(ttfts, 0.95), 3),
        ttft_vs_turn1=round(p50 / turn1_p50, 3) if turn1_p50 else None,
        cached_fraction=cached,
        prompt_tokens=prompt,
        output_tokens=tokens,
        tok_s=round(tokens / span, 2) if span > 0 else 0.0,
        system_prompt_tokens=system,
    )


def run(server: servers.Server, count, args: argparse.Namespace, console: Console) -> list[TurnResult]:
    system = system_prompt(args.agent_system_tokens, count)
    body = {
        "model": server.model,
        "messages": [{"role": "system", "content": system}],
        "max_tokens": args.agent_max_tokens,
        "stream_options": {"include_usage": True},
    }
    done: list[Turn] = []
    errors: Counter = Counter()

    async def sessions() -> None:
        limits = httpx.Limits(max_connections=args.agent_conversations + 2)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as client:
            await asyncio.gather(
                *(
                    _conversation(client, body, i, args.agent_turns, done, errors, count)
                    for i in range(args.agent_conversations)
                )
            )

    asyncio.run(sessions())
    turn1 = [t for t in done if t.turn == 1]
    turn1_p50 = statistics.median(t.ttft for t in turn1) if turn1 else 0.0
    groups = {str(n): ([t for t in done if t.turn == n], errors[n]) for n in range(1, args.agent_turns + 1)}
    if args.agent_turns > 1:
        groups["2+"] = ([t for t in done if t.turn > 1], sum(e for n, e in errors.items() if n > 1))
    rows = [
        _summary(server.name, label, turns, errs, turn1_p50, count(system)) for label, (turns, errs) in groups.items()
    ]
    later = rows[-1]
    console.print(f"  {server.name} agent: turn 2+ TTFT p50 {later.ttft_p50_s}s = {later.ttft_vs_turn1}x turn 1's")
    return rows


def report(rows: list[TurnResult], args: argparse.Namespace, console: Console, path: Path) -> None:
    """One table, each server's turns together; llmchat x is llmchat's TTFT p50 over the row's, same turn."""
    system = rows[0].system_prompt_tokens if rows else 0
    title = (
        f"Agent sessions: {args.agent_conversations} conversations x {args.agent_turns} turns sharing a "
        f"{system}-token system prompt (greedy, max_tokens {args.agent_max_tokens})"
    )
    columns = ("server", "turn", "requests", "errors", "TTFT p50 s", "TTFT p95 s", "vs turn 1", "cached")
    results = table(title, (*columns, "tok/s", "llmchat x TTFT p50"))
    ours = {r.turn: r for r in rows if r.server == "llmchat"}
    for i, r in enumerate(rows):
        o = ours.get(r.turn)
        results.add_row(
            r.server,
            r.turn,
            str(r.requests),
            str(r.errors),
            f"{r.ttft_p50_s:.2f}",
            f"{r.ttft_p95_s:.2f}",
            "n/a" if r.ttft_vs_turn1 is None else f"{r.ttft_vs_turn1:.2f}",
            "n/a" if r.cached_fraction is None else f"{r.cached_fraction:.2f}",
            f"{r.tok_s:.1f}",
            "" if r.server == "llmchat" or o is None else ratio(o.ttft_p50_s, r.ttft_p50_s),
            end_section=i + 1 == len(rows) or rows[i + 1].server != r.server,
        )
    console.print(results)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
