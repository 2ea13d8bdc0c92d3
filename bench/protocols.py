"""The same prompts streamed through each chat protocol llmchat speaks (OpenAI chat, Anthropic Messages,
OpenAI Responses) at concurrency 1 and 8: they share one chat core, so throughput should not depend on the
wire format. Greedy, same max_tokens, output counted with the model's tokenizer."""

from pathlib import Path

from rich.console import Console

from bench import servers
from bench.stream import one_request, stream_request


def _messages_text(event: dict) -> str:
    return (event.get("delta") or {}).get("text", "") if event.get("type") == "content_block_delta" else ""


def _responses_text(event: dict) -> str:
    return event.get("delta", "") if event.get("type") == "response.output_text.delta" else ""


def _asks(model: str, max_tokens: int, count) -> dict:
    """Per protocol, ask(client, prompt) -> one streamed request's timings."""

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
    from bench.run import run_variants

    variants = {protocol: {"ask": ask} for protocol, ask in _asks(server.model, max_tokens, count).items()}
    title = "Protocols (llmchat, same prompts, greedy)"
    run_variants(
        server, count, max_tokens, console, out / "protocols.json", label="protocol", title=title, variants=variants
    )
