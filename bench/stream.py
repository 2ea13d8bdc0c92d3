"""One streamed request and what every scenario measures on it: time to first token, output tokens, the text
and the usage the server reported."""

import json
import time
from collections.abc import Callable

import httpx


def chat_text(event: dict) -> str:
    """A chat chunk's output as the client sees it: content plus tool-call arguments."""
    text = ""
    for choice in event.get("choices", []):
        delta = choice.get("delta") or {}
        calls = delta.get("tool_calls") or []
        text += (delta.get("content") or "") + "".join(c["function"].get("arguments") or "" for c in calls)
    return text


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict,
    text_of,
    count,
    on_text: Callable[[float], None] | None = None,
) -> dict:
    """One streamed request; text_of(event) is the output text an SSE data event carries, and on_text(time)
    hears the perf_counter time of each event that carries some."""
    start = time.perf_counter()
    first = last = None
    parts: list[str] = []
    usage = None
    async with client.stream("POST", path, json=body | {"temperature": 0, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"]))
            usage = event.get("usage") or usage
            if text := text_of(event):
                now = time.perf_counter()
                first = first or now
                last = now
                parts.append(text)
                if on_text:
                    on_text(now)
    if first is None:
        raise RuntimeError("no content streamed")
    text = "".join(parts)
    # Tokens are counted with the model's own tokenizer, the same way for every server.
    tokens = count(text)
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"ttft": first - start, "tokens": tokens, "decode_tok_s": decode, "text": text, "usage": usage}


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, count, extra: dict | None = None
) -> dict:
    """One streamed chat completion, greedy."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    return await stream_request(client, "/v1/chat/completions", body | (extra or {}), chat_text, count)
