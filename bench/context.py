"""Throughput across context lengths, as agents send them: 1 and 8 clients streaming max_tokens (128) replies to
prompts of about 50, 250, 1,000, 2,000 and 4,000 tokens. Each prompt is the throughput scenario's shared text
(`--prompt-tokens`: seeded numbered rules, a longer one starting with every shorter one) and a short question,
and each size's text is warmed with one untimed request first, so that a prefix cache already holds it.
llmchat's replies run to max_tokens (ignore_eos); the peers get what the throughput scenario sends them
(greedy, max_tokens), so their replies may end sooner. A size whose prompt and reply would not fit the model's
context is skipped, and the table says so."""

import argparse
import asyncio
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from bench import filler, servers
from bench.report import ratio, table

TEMPLATE_TOKENS = 32  # room for the chat template's own tokens around the prompt (a default system prompt)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("context scenario")
    group.add_argument("--context-sizes", default="50,250,1000,2000,4000", help="prompt sizes in tokens, a comma list")
    group.add_argument("--context-clients", default="1,8", help="concurrent streams at each size, a comma list")


def sizes(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.context_sizes.split(",")]


def clients(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.context_clients.split(",")]


def heads(args: argparse.Namespace, count, max_context: int) -> dict[int, str | None]:
    """The shared text for each size that fits the context (None for one that does not): rules up to the size less
    an average question, so that the whole prompt is about that many tokens."""
    from bench.run import PROMPTS  # run.py imports this module

    question = round(statistics.mean(count(p) for p in PROMPTS))
    longest = max(count(p) for p in PROMPTS)
    result: dict[int, str | None] = {}
    for size in sizes(args):
        head = _nearest_head(max(size - question, 0), count)
        fits = count(head) + longest + TEMPLATE_TOKENS + args.max_tokens <= max_context
        result[size] = head if fits else None
    return result


def _nearest_head(tokens: int, count) -> str:
    """filler.head's rules less their last line when that comes nearer `tokens` (filler stops at the first line
    past it, which at ~50 tokens is half the prompt); still a prefix of every longer head."""
    head = filler.head(tokens, count)
    shorter = head.rstrip("\n").rpartition("\n")[0]
    shorter = shorter + "\n\n" if shorter else ""
    return shorter if abs(count(shorter) - tokens) < abs(count(head) - tokens) else head


def run(server: servers.Server, count, args: argparse.Namespace, console: Console, max_context: int) -> list[dict]:
    """Every size at every client count against one server: one row each (a skipped size's rows say why)."""
    from bench.run import run_level  # run.py imports this module

    extra = {"ignore_eos": True} if server.name.startswith("llmchat") else None
    rows = []
    for size, head in heads(args, count, max_context).items():
        if head is None:
            why = f"prompt + {args.max_tokens} over the context ({max_context})"
            console.print(f"  {server.name} ~{size} prompt tokens: skipped, {why}")
            rows += [{"server": server.name, "size": size, "concurrency": c, "skipped": why} for c in clients(args)]
            continue
        asyncio.run(run_level(server, 1, 1, 8, count, head=head))  # warms the prefix, not timed
        for c in clients(args):
            num_requests = max(c * args.requests_per_client, 3)
            result = asyncio.run(run_level(server, c, num_requests, args.max_tokens, count, extra, head=head))
            console.print(
                f"  {server.name} ~{size} prompt tokens, c={c}: {result.throughput_tok_s} tok/s, errors {result.errors}"
            )
            rows.append({"size": size, "skipped": None} | asdict(result))
    return rows


def report(rows: list[dict], args: argparse.Namespace, console: Console, path: Path) -> None:
    """One row per size, tok/s per server and client count; for llmchat, its ratio to llama.cpp and to its own
    figure at the smallest size, both at the most clients."""
    names = list(dict.fromkeys(r["server"] for r in rows))
    levels, top, smallest = clients(args), max(clients(args)), sizes(args)[0]
    cell = {(r["server"], r["size"], r["concurrency"]): r for r in rows}
    columns = ["prompt tokens", *(f"{name} c={c}" for name in names for c in levels)]
    peer = "llama.cpp" in names and "llmchat" in names
    if peer:
        columns.append(f"llmchat / llama.cpp c={top}")
    if "llmchat" in names:
        columns.append(f"llmchat c={top} vs ~{smallest}")
    title = f"Throughput by prompt size (tok/s, max_tokens {args.max_tokens}, shared prefix warmed)"
    result = table(title, columns)

    def tok_s(name: str, size: int, c: int) -> float | None:
        """A figure to compare with: none where some of its requests failed (their tokens are missing)."""
        r = cell.get((name, size, c))
        return r["throughput_tok_s"] if r and not r["skipped"] and not r["errors"] else None

    for size in sizes(args):
        first = next((r for r in rows if r["size"] == size), None)
        if first and first["skipped"]:
            result.add_row(f"~{size}", *["skipped"] * (len(columns) - 1))
            continue
        cells = [f"~{size}"]
        for name in names:
            for c in levels:
                r = cell.get((name, size, c))
                errors = f" ({r['errors']} err)" if r and r["errors"] else ""
                cells.append(f"{r['throughput_tok_s']:.1f}{errors}" if r else "n/a")
        if peer:
            cells.append(ratio(tok_s("llmchat", size, top), tok_s("llama.cpp", size, top)))
        if "llmchat" in names:
            cells.append(ratio(tok_s("llmchat", size, top), tok_s("llmchat", smallest, top)))
        result.add_row(*cells)
    console.print(result)
    if skipped := next((r["skipped"] for r in rows if r["skipped"]), None):
        console.print(f"skipped: {skipped}")
    path.write_text(json.dumps(rows, indent=2))
