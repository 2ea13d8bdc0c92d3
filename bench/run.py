"""Benchmarks llmchat against `transformers serve --continuous-batching` (and llama.cpp's server when
installed) on the same weights: each server is started in turn and every chosen scenario runs against it.

    just bench                                  # every scenario, every available server
    just bench --concurrency 1,8                # throughput at a subset of levels
    just bench --scenarios agent,arrival        # only the agent sessions and the long prompt arrival
    just bench --model ~/m.gguf --prompt-tokens 0,1000,3000   # every server on that GGUF, at three prompt sizes
    just bench --scenarios context --context-sizes 50,1000 --context-clients 1,8   # a short context sweep
    just bench --scenarios throughput --concurrency 1,8,16,32,64 --mixed   # and rows mixing the context sizes

Scenarios: throughput (the same streaming load at several concurrencies; with --mixed, also one run per level
whose prompts cycle through the --context-sizes), context (bench/context.py: tok/s at 1 and 8 clients across
prompt sizes of ~50 to ~4,000 tokens), constrained, protocols and sampling (llmchat only: bench/sampling.py), agent
(bench/agent.py), arrival (bench/arrival.py) and tools (bench/tools.py: tool replies on public function-calling
data). Each prints a table and writes bench/results/<scenario>.json; throughput also plots throughput.png.
"""

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console

from bench import agent, arrival, constrained, context, filler, protocols, report, sampling, servers, tools
from bench.report import percentile, ratio, table
from bench.stream import one_request
from llmchat.engine.loader import ModelConfig, converted_dir, load_model, resolve_source
from llmchat.settings import Settings

# constrained, protocols and sampling compare llmchat with itself, so they run against llmchat only.
SCENARIOS = ("throughput", "context", "constrained", "protocols", "sampling", "agent", "arrival", "tools")
PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle for a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "List some tips for learning a new language.",
    "How do airplanes stay in the air?",
    "Write a poem about autumn leaves.",
    "What is machine learning?",
    "Describe a day in the life of a honeybee.",
    "How does a refrigerator keep food cold?",
    "What should I pack for a weekend camping trip?",
    "Explain the rules of chess briefly.",
    "Tell me about the history of the bicycle.",
]


@dataclass
class Result:
    server: str
    concurrency: int
    prompt_tokens: int  # the shared text before each short prompt (0: the short prompts alone)
    num_requests: int
    errors: int
    output_tokens: int
    wall_s: float
    throughput_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    decode_tok_s_p50: float
    peak_rss_mb: float
    mixed: bool = False  # requests cycled through several heads; prompt_tokens is the mean over the requests


async def run_level(
    server: servers.Server,
    concurrency: int,
    num_requests: int,
    max_tokens: int,
    count,
    extra: dict | None = None,
    ask=None,
    server_counts: bool = False,
    head: str | tuple[str, ...] = "",
) -> Result:
    """`num_requests` over `concurrency` clients; ask(client, prompt) replaces the chat request when given.
    With `server_counts`, output tokens are the usage's completion_tokens (the request must ask for usage)
    rather than the streamed text re-tokenized, so tokens a client never sees as text (a tool call's
    markup) count too. `head`: text every prompt starts with (long context, shared as a system prompt is), or a
    tuple of such texts that the requests cycle through (mixed prompt lengths)."""
    ask = ask or (lambda client, prompt: one_request(client, server.model, prompt, max_tokens, count, extra))
    heads = (head,) if isinstance(head, str) else head
    queue = list(range(num_requests))
    done: list[dict] = []
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            i = queue.pop(0)
            try:
                done.append(await ask(client, heads[i % len(heads)] + PROMPTS[i % len(PROMPTS)]))
            except Exception:  # counted, the run goes on
                errors += 1

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = [d["ttft"] for d in done] or [float("nan")]
    tokens = sum(d["usage"]["completion_tokens"] if server_counts else d["tokens"] for d in done)
    return Result(
        server=server.name,
        concurrency=concurrency,
        prompt_tokens=round(statistics.mean(count(heads[i % len(heads)]) for i in range(num_requests))),
        num_requests=num_requests,
        errors=errors,
        output_tokens=tokens,
        wall_s=round(wall, 2),
        throughput_tok_s=round(tokens / wall, 2),
        ttft_p50_s=round(statistics.median(ttfts), 3),
        ttft_p95_s=round(percentile(ttfts, 0.95), 3),
        decode_tok_s_p50=round(statistics.median([d["decode_tok_s"] for d in done] or [0.0]), 2),
        peak_rss_mb=round(server.peak_rss_bytes() / 2**20, 1),
        mixed=len(heads) > 1,
    )


def run_variants(
    server: servers.Server,
    count,
    max_tokens: int,
    console: Console,
    path: Path,
    *,
    label: str,
    title: str,
    variants: dict[str, dict],
    levels: tuple[int, ...] = (1, 8),
    steps: bool = False,
) -> None:
    """Streams each variant (run_level keyword arguments) at each concurrency level, prints each against the
    first variant in a table titled `title`, and writes the rows, each named under `label`, to `path`.
    With `steps`, also the server's model steps per output token (llmchat's /health) over each run."""
    rows = []
    for concurrency in levels:
        for name, kwargs in variants.items():
            before = _decoding(server) if steps else None
            result = asyncio.run(run_level(server, concurrency, max(2 * concurrency, 3), max_tokens, count, **kwargs))
            row = {label: name} | asdict(result)
            if steps:
                after = _decoding(server)
                row["steps_per_token"] = None
                if before and after:
                    tokens = after["output_tokens"] - before["output_tokens"]
                    row["steps_per_token"] = round((after["model_steps"] - before["model_steps"]) / max(tokens, 1), 3)
            rows.append(row)
            console.print(f"  {name} c={concurrency}: {result.throughput_tok_s} tok/s")
    baseline = next(iter(variants))
    columns = (label, "conc", "tok/s", f"vs {baseline}", "tokens/reply", "decode tok/s p50", "TTFT p50 s", "errors")
    rows_table = table(title, (*columns, "steps/token") if steps else columns)
    base = {r["concurrency"]: r["throughput_tok_s"] for r in rows if r[label] == baseline}
    for r in rows:
        base_tok_s = base[r["concurrency"]]
        cells = [
            r[label],
            str(r["concurrency"]),
            f"{r['throughput_tok_s']:.1f}",
            f"{r['throughput_tok_s'] / base_tok_s:.2f}x" if base_tok_s else "n/a",
            f"{r['output_tokens'] / max(r['num_requests'] - r['errors'], 1):.0f}",
            f"{r['decode_tok_s_p50']:.1f}",
            f"{r['ttft_p50_s']:.2f}",
            str(r["errors"]),
        ]
        if steps:
            cells.append("n/a" if r["steps_per_token"] is None else f"{r['steps_per_token']:.2f}")
        rows_table.add_row(*cells)
    console.print(rows_table)
    path.write_text(json.dumps(rows, indent=2))


def _decoding(server: servers.Server) -> dict | None:
    """llmchat's counts since start: output tokens and the model steps that chose them (None from a build
    that does not report them)."""
    return httpx.get(server.base_url + "/health").json().get("decoding")


def prompt_sizes(args) -> list[int]:
    return [int(n) for n in args.prompt_tokens.split(",")]


def ahead(r: Result) -> str:
    """The text-ahead cell: tokens of shared text before each short prompt, or their mean over mixed sizes."""
    return f"mixed, mean {r.prompt_tokens}" if r.mixed else str(r.prompt_tokens)


def render(results: list[Result], console: Console) -> None:
    title = "Streaming load, greedy, max_tokens fixed (same prompts and weights for every server)"
    columns = ("server", "conc", "text ahead", "requests", "errors", "tok/s (all)", "TTFT p50 s", "TTFT p95 s")
    results_table = table(title, (*columns, "decode tok/s p50", "peak RSS MB"))
    for r in results:
        results_table.add_row(
            r.server,
            str(r.concurrency),
            ahead(r),
            str(r.num_requests),
            str(r.errors),
            f"{r.throughput_tok_s:.1f}",
            f"{r.ttft_p50_s:.2f}",
            f"{r.ttft_p95_s:.2f}",
            f"{r.decode_tok_s_p50:.1f}",
            f"{r.peak_rss_mb:.0f}",
        )
    console.print(results_table)
    ours = {(r.concurrency, r.prompt_tokens, r.mixed): r for r in results if r.server == "llmchat"}
    for peer in sorted({r.server for r in results} - {"llmchat"}):
        columns = ("conc", "text ahead", "throughput x", "TTFT p50 x (lower is better)", "decode x")
        ratios = table(f"llmchat / {peer}", columns)
        for r in (r for r in results if r.server == peer and (r.concurrency, r.prompt_tokens, r.mixed) in ours):
            o = ours[(r.concurrency, r.prompt_tokens, r.mixed)]
            ratios.add_row(
                str(r.concurrency),
                ahead(r),
                ratio(o.throughput_tok_s, r.throughput_tok_s),
                ratio(o.ttft_p50_s, r.ttft_p50_s),
                ratio(o.decode_tok_s_p50, r.decode_tok_s_p50),
            )
        console.print(ratios)


def plot(results: list[Result], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def line(r: Result) -> tuple[str, int | str]:  # one line per server and text ahead (mixed: one, any mean)
        return r.server, "mixed" if r.mixed else r.prompt_tokens

    for name, size in dict.fromkeys(map(line, results)):
        points = [(r.concurrency, r.throughput_tok_s) for r in results if line(r) == (name, size)]
        label = f"{name}, mixed prompt sizes" if size == "mixed" else f"{name}, {size} tokens ahead" if size else name
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("aggregate output tokens/s")
    ax.set_title(f"Throughput on {model} (same weights)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument(
        "--servers",
        default="llmchat,transformers,transformers-bf16,llama.cpp",
        help="transformers serves the weights as stored (float32); transformers-bf16 adds --dtype bfloat16; "
        "llmchat-compile is llmchat with --compile",
    )
    parser.add_argument(
        "--llama-cpp-python",
        help="a Python with llama-cpp-python[server] installed (default: this one), e.g. a separate venv's",
    )
    parser.add_argument("--llmchat-args", default="", help="extra flags for llmchat serve, e.g. '--dtype bfloat16'")
    parser.add_argument(
        "--model",
        default="bundled",
        help="what every server serves: a GGUF file (llama.cpp reads it, transformers its converted copy), "
        "default the bundled one",
    )
    parser.add_argument(
        "--prompt-tokens",
        default="0",
        help="throughput at each of these prompt sizes (a comma list): that many tokens of shared text before "
        "each short prompt, as an agent's system prompt and tools are",
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="throughput: also one run at each --concurrency level whose requests cycle through the "
        "--context-sizes prompts (those that fit the context), e.g. --concurrency 1,8,16,32,64 --mixed",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="a comma list of " + ", ".join(SCENARIOS))
    agent.add_arguments(parser)
    arrival.add_arguments(parser)
    context.add_arguments(parser)
    tools.add_arguments(parser)
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    console = Console(width=140)
    args.out.mkdir(parents=True, exist_ok=True)

    # The converted cache is a safetensors copy of the GGUF: transformers serve loads it.
    loaded = load_model(ModelConfig(args.model, device="cpu", cache_dir=Settings().cache_dir))
    source = resolve_source(args.model)
    weights = converted_dir(source, Settings().cache_dir)
    gguf = Path(source.path) / source.gguf_file
    llmchat_args = args.llmchat_args.split()
    if "--model" not in llmchat_args:
        llmchat_args += ["--model", args.model]
    tokenizer, max_context = loaded.tokenizer, loaded.max_context
    del loaded

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    wanted = args.servers.split(",")
    candidates = {
        "llmchat": lambda: servers.llmchat(llmchat_args),
        "llmchat-compile": lambda: servers.llmchat([*llmchat_args, "--compile"], "llmchat-compile"),
        "transformers": lambda: servers.transformers_serve(weights),
        "transformers-bf16": lambda: servers.transformers_serve(weights, "bfloat16"),
        "llama.cpp": lambda: servers.llama_cpp(
            gguf, args.llama_cpp_python, tools="tools" in scenarios, prompt_cache="agent" in scenarios
        ),
    }
    levels = [int(c) for c in args.concurrency.split(",")]
    heads = [filler.head(n, count) for n in prompt_sizes(args)]
    # --mixed: one more throughput run per level, its requests cycling through the context sizes that fit.
    mixed = tuple(h for h in context.heads(args, count, max_context).values() if h is not None) if args.mixed else ()
    results: list[Result] = []
    agent_rows: list[agent.TurnResult] = []
    arrival_rows: list[arrival.ArrivalResult] = []
    tool_rows: list[tools.ReplyResult] = []
    context_rows: list[dict] = []
    for key in wanted:
        server = candidates[key]()
        if server is None:
            console.print(f"[yellow]{key}: not installed, skipped[/yellow]")
            continue
        console.print(f"starting {server.name} ...")
        try:
            server.start(args.out)
            if key == "llmchat":
                health = httpx.get(server.base_url + "/health").json()
                why = health.get("dtype_reason", "reason not reported")
                console.print(f"  dtype {health['dtype']} ({why}), forward pass: {health['forward']}")
                report.levers = f"{health['dtype']}, {health['forward']}"
            asyncio.run(run_level(server, 1, 1, 8, count))  # warm-up, not reported
            if "throughput" in scenarios:
                for head in [*heads, mixed] if mixed else heads:
                    for c in levels:
                        num_requests = max(c * args.requests_per_client, 3)
                        result = asyncio.run(run_level(server, c, num_requests, args.max_tokens, count, head=head))
                        console.print(
                            f"  {server.name} c={c}, {ahead(result)} prompt tokens ahead: "
                            f"{result.throughput_tok_s} tok/s, errors {result.errors}"
                        )
                        results.append(result)
            if "context" in scenarios:
                context_rows += context.run(server, count, args, console, max_context)
            if key == "llmchat" and "constrained" in scenarios:
                constrained.run(server, count, args.max_tokens, console, args.out)
            if key == "llmchat" and "protocols" in scenarios:
                protocols.run(server, count, args.max_tokens, console, args.out)
            if key == "llmchat" and "sampling" in scenarios:
                sampling.run(server, args.max_tokens, console, args.out, heads, count)
            if "agent" in scenarios:
                agent_rows += agent.run(server, count, args, console)
            if "arrival" in scenarios:
                arrival_rows.append(arrival.run(server, count, args, console))
            if "tools" in scenarios:
                tool_rows += tools.run(server, args, console)
        finally:
            server.stop()
    if "throughput" in scenarios:
        render(results, console)
        (args.out / "throughput.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
        plot(results, args.out / "throughput.png", source.name)
        console.print(f"wrote {args.out / 'throughput.json'} and {args.out / 'throughput.png'}")
    if "context" in scenarios:
        context.report(context_rows, args, console, args.out / "context.json")
        console.print(f"wrote {args.out / 'context.json'}")
    if "agent" in scenarios:
        agent.report(agent_rows, args, console, args.out / "agent.json")
        console.print(f"wrote {args.out / 'agent.json'}")
    if "arrival" in scenarios:
        arrival.report(arrival_rows, args, console, args.out / "arrival.json")
        console.print(f"wrote {args.out / 'arrival.json'}")
    if "tools" in scenarios:
        tools.report(tool_rows, args, console, args.out / "tools.json")
        console.print(f"wrote {args.out / 'tools.json'}")


if __name__ == "__main__":
    main()
