"""What the sampling parameters cost (llmchat only): the same sampled load with and without presence,
frequency and repetition penalties, a logit_bias and min_p on every request, at 8 and 16 clients; and n=4
choices at one client against four sequential n=1 requests, with the prompt tokens each computed (/health); at
each prompt size --prompt-tokens names.

Every reply runs to max_tokens (ignore_eos), so both sides of each comparison generate the same tokens.
"""

import asyncio
import json
import time
from pathlib import Path

import httpx
from rich.console import Console

from bench import servers
from bench.report import table

BASE = {"temperature": 0.8, "ignore_eos": True}
PARAMS = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "min_p": 0.05,
    "logit_bias": {str(i): -5.0 for i in range(100, 120)},
}
ASK = "Write a story about a lighthouse keeper and a storm."


async def _load(server: servers.Server, clients: int, requests: int, max_tokens: int, extra: dict, head: str) -> float:
    """Output tokens per second of `requests` chat completions over `clients` concurrent clients, each prompt
    after the shared text `head`."""
    queue = list(range(requests))
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            body = {"model": server.model, "messages": [{"role": "user", "content": f"{head}{ASK} ({i})"}]}
            r = await client.post("/v1/chat/completions", json=body | {"max_tokens": max_tokens, "seed": i} | extra)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=server.base_url, timeout=900) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return tokens / (time.perf_counter() - start)


def _prefilled(server: servers.Server) -> int:
    return httpx.get(server.base_url + "/health").json()["decoding"]["prefilled_tokens"]


async def _choices(
    server: servers.Server, max_tokens: int, n: int, sequential: bool, tag: str, head: str
) -> tuple[float, int]:
    """(output tok/s, prompt tokens computed) of n choices: one request with n, or n requests one after another.
    The `tag` leads the prompt, so neither side reads the other's from the prefix cache."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": f"[{tag}] {head}{ASK}"}],
        "max_tokens": max_tokens,
    }
    body |= BASE | {"seed": 1}
    before = _prefilled(server)
    tokens = 0
    async with httpx.AsyncClient(base_url=server.base_url, timeout=900) as client:
        start = time.perf_counter()
        for _ in range(n if sequential else 1):
            r = await client.post("/v1/chat/completions", json=body | {"n": 1 if sequential else n})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
        wall = time.perf_counter() - start
    return tokens / wall, _prefilled(server) - before


def run(server: servers.Server, max_tokens: int, console: Console, out: Path, heads: list[str], count) -> None:
    """Both comparisons after each of `heads` (shared text before every prompt: --prompt-tokens)."""
    rows = []
    load = table("Sampling parameters on every request (llmchat, sampled, replies to max_tokens)",
                 ("text ahead", "clients", "plain tok/s", "with penalties, bias, min_p tok/s", "ratio"))  # fmt: skip
    choices = table("n=4 at one client against four sequential n=1 requests (llmchat)",
                    ("text ahead", "requests", "tok/s", "prompt tokens computed", "ratio"))  # fmt: skip
    for head in heads:
        ahead = count(head)
        for clients in (8, 16):
            plain = asyncio.run(_load(server, clients, 2 * clients, max_tokens, BASE, head))
            params = asyncio.run(_load(server, clients, 2 * clients, max_tokens, BASE | PARAMS, head))
            rows.append({"prompt_tokens": ahead, "clients": clients, "plain_tok_s": round(plain, 2),
                         "params_tok_s": round(params, 2)})  # fmt: skip
            load.add_row(str(ahead), str(clients), f"{plain:.1f}", f"{params:.1f}", f"{params / plain:.2f}x")
            console.print(f"  sampling {ahead} ahead, c={clients}: plain {plain:.1f}, with parameters {params:.1f}")
        together, computed = asyncio.run(_choices(server, max_tokens, 4, False, f"n4-{ahead}", head))
        apart, computed_apart = asyncio.run(_choices(server, max_tokens, 4, True, f"n1-{ahead}", head))
        choices.add_row(str(ahead), "one with n=4", f"{together:.1f}", str(computed), f"{together / apart:.2f}x")
        choices.add_row(str(ahead), "four with n=1", f"{apart:.1f}", str(computed_apart), "")
        rows.append({"prompt_tokens": ahead, "n4_tok_s": round(together, 2), "n4_prompt_computed": computed,
                     "sequential_tok_s": round(apart, 2), "sequential_prompt_computed": computed_apart})  # fmt: skip
    console.print(load)
    console.print(choices)
    (out / "sampling.json").write_text(json.dumps(rows, indent=2))
