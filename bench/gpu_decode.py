"""Decode throughput of an 8B model on the GPU against the HBM roofline, the last step of `bin/just gpu-check`.

    .venv-dev/bin/python -m bench.gpu_decode            # Llama-3.1-8B shapes, random bfloat16 weights (no download)
    .venv-dev/bin/python -m bench.gpu_decode --tiny     # a 2-layer model on the CPU: checks the script end to end

The engine runs as the service builds it (paged KV pool, fused pass, CUDA graphs captured by prepare()) and
decodes greedy replies to random prompts at 1, 32 and 64 streams. Each run counts output tokens over a wall-clock
window that opens once every stream has its first token and closes when the first one finishes, so prefill is left
out; a decode step then reads the weights and every running sequence's KV once, and that many bytes over the step's
time, against the card's memory bandwidth, is the share of the roofline reached. While 32 streams decode, a 2,048-token
prompt's time to first token is measured too, and transformers' own continuous batching (`generate_batch`) decodes
the same 32 prompts on the same model where the installed transformers has it. Prints one table and writes
bench/results/gpu_decode.json.
"""

import argparse
import asyncio
import gc
import importlib
import inspect
import json
import time
from contextlib import contextmanager, nullcontext
from itertools import pairwise
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from llmchat.engine import Engine, EngineConfig, LoadedModel, SchedulerConfig, gpu
from llmchat.engine.kv_cache import kv_bytes_per_token
from llmchat.engine.loader import ModelSource
from llmchat.engine.sampling import SamplingParams

LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
TINY = LLAMA_8B | dict(
    hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512
)
EOS = 128009  # Llama 3.1's <|eot_id|>; the replies ignore it

# Peak HBM bandwidth, bytes/s, by what torch.cuda.get_device_name() contains (first match wins).
BANDWIDTH = [
    (("H100", "PCIe"), 2.0e12),
    (("H100", "NVL"), 3.9e12),
    (("H100",), 3.35e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (("H200",), 4.8e12),
    (("A100", "80GB"), 2.0e12),
]

console = Console(stderr=True)


def bandwidth(name: str) -> float | None:
    return next((bw for parts, bw in BANDWIDTH if all(p in name for p in parts)), None)


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def skipped_init():
    """transformers' switch that skips the weights' initialisation (they are drawn once, below), where it has one."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return nullcontext()


def build_model(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama of these shapes with random weights, built directly on `device` in `dtype`."""
    config = transformers.LlamaConfig(**shape, bos_token_id=128000, eos_token_id=EOS, tie_word_embeddings=False)
    with torch.device(device), default_dtype(dtype), skipped_init():
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # matrices N(0, 0.02) as transformers draws them; norm scales 1
            param.normal_(std=0.02) if param.dim() > 1 else param.fill_(1.0)
    return model.eval()


def token_per_id(vocab_size: int):
    """A tokenizer with one word per id. The bundled SmolLM2 tokenizer knows 49,152 ids while random weights pick
    any of 128,256: the others would detokenize to nothing, so the engine would stream no text (and skip the
    detokenizer's work). This one spells every id, and is built in a second with nothing to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f"t{EOS}")


def wrap(model: torch.nn.Module, device: str, start: float) -> LoadedModel:
    """The model as load_model would hand it to the engine."""
    return LoadedModel(
        model=model,
        tokenizer=token_per_id(model.config.vocab_size),
        name="llama-3.1-8b-shaped (random weights)",
        source=ModelSource("dir", "random weights", "llama-3.1-8b-shaped"),
        device=device,
        dtype=model.dtype,
        dtype_reason="chosen by bench.gpu_decode",
        quantization="none",
        quantization_reason="chosen by bench.gpu_decode",
        max_context=model.config.max_position_embeddings,
        memory_bytes=int(model.get_memory_footprint()),
        load_seconds=time.perf_counter() - start,
        cache_hit=None,
    )


def bytes_read_per_step(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every matrix but the input embedding, of which it gathers a few rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - (0 if embed is head else embed.numel() * embed.element_size())


def steady(records: list[list[tuple[float, int]]], prompt_len: int, end_before: float | None = None) -> dict:
    """Tokens per second over the window in which every stream decodes: from the last stream's first token to the
    first stream's last one (or `end_before`). `records`: per stream, (arrival time, completion tokens so far)."""
    t0 = max(r[0][0] for r in records)
    t1 = min(r[-1][0] for r in records)
    if end_before is not None:
        t1 = min(t1, end_before)

    def count(r, t):
        return max((n for ts, n in r if ts <= t), default=0)

    tokens = sum(count(r, t1) - count(r, t0) for r in records)
    if t1 <= t0 or tokens == 0:
        return {"window_s": 0.0, "window_tokens": 0, "tok_s": None, "step_s": None, "kv_tokens": None}
    mid = (t0 + t1) / 2
    steps = tokens / len(records)  # every stream takes one token per step in the window
    return {
        "window_s": t1 - t0,
        "window_tokens": tokens,
        "tok_s": tokens / (t1 - t0),
        "step_s": (t1 - t0) / steps,
        "kv_tokens": sum(prompt_len + count(r, mid) for r in records),  # held by all streams mid-window
    }


async def first_token(engine: Engine, prompt: list[int]) -> tuple[float, float, float]:
    """(submitted, first token, done) times of one prompt answered with one token."""
    submitted = time.perf_counter()
    seq = engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    first = None
    async for out in engine.stream(seq):
        first = first or time.perf_counter()
        if out.finish_reason not in (None, "length"):
            raise RuntimeError(f"the probe ended in {out.finish_reason}: {out.error}")
    return submitted, first, time.perf_counter()


async def decode(engine: Engine, prompts: list[list[int]], new_tokens: int, probe: list[int] | None = None) -> dict:
    """Streams greedy replies to `prompts`; with a `probe`, submits it once every stream is halfway through and times
    its first token (the window ends at its submission, so the tok/s are of decoding alone)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = [engine.submit(p, params) for p in prompts]
    records: list[list[tuple[float, int]]] = [[] for _ in seqs]

    async def consume(seq, record):
        async for out in engine.stream(seq):
            record.append((time.perf_counter(), out.num_completion_tokens))
            if out.finish_reason not in (None, "length"):
                raise RuntimeError(f"a stream ended in {out.finish_reason}: {out.error}")

    tasks = [asyncio.create_task(consume(s, r)) for s, r in zip(seqs, records, strict=True)]
    result: dict = {"streams": len(prompts), "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens}
    end_before = None
    if probe is not None:
        while min(len(s.completion_ids) for s in seqs) < new_tokens // 2 and not any(t.done() for t in tasks):
            await asyncio.sleep(0.005)
        submitted, first, done = await first_token(engine, probe)
        end_before = submitted
        # The decoding streams' longest pause while the probe's prompt was prefilled beside them.
        gaps = [b[0] - a[0] for r in records for a, b in pairwise(r) if b[0] > submitted and a[0] < first]
        result["probe"] = {
            "prompt_tokens": len(probe),
            "ttft_s": first - submitted,
            "beside_streams": len(prompts),
            "stream_gap_max_s": max(gaps, default=None),
            "done_s": done - submitted,
        }
    await asyncio.gather(*tasks)
    return result | steady(records, len(prompts[0]), end_before)


def random_prompts(count: int, length: int, generator: torch.Generator) -> list[list[int]]:
    return torch.randint(0, 128000, (count, length), generator=generator).tolist()


async def run_engine(loaded: LoadedModel, args, prompts: dict[int, list[list[int]]], probe: list[int]) -> dict:
    """The engine as the service builds it (CUDA graphs captured first), through every stream count."""
    tokens_needed = max(prompts) * (args.prompt_tokens + args.new_tokens) + len(probe)
    # Sized for these runs, not 80% of the free memory, so transformers' batching gets the card back after it.
    pool_bytes = int(1.25 * tokens_needed * kv_bytes_per_token(loaded.model))
    scheduling = SchedulerConfig(None, None, 2 * max(prompts))
    engine = Engine(loaded, EngineConfig(scheduling, cuda_graphs=True, pool_bytes=pool_bytes))
    start = time.perf_counter()
    engine.prepare()
    prepare_s = time.perf_counter() - start
    engine.start()
    runs = []
    try:
        warm = random_prompts(2, 64, torch.Generator().manual_seed(1))
        await decode(engine, warm, 8)  # first kernels, allocator growth
        for streams, batch in prompts.items():
            start = time.perf_counter()
            runs.append(await decode(engine, batch, args.new_tokens, probe if streams == args.probe_streams else None))
            console.log(f"llmchat, {streams} streams: {time.perf_counter() - start:.1f}s")
        described = engine.describe()
    finally:
        await asyncio.to_thread(engine.shutdown)
    return {
        "forward": described["forward"],
        "prepare_s": prepare_s,
        "kv_pool": described["kv_pool"],
        "decode_step_s_average": engine.step_cost.decode_step_s,
        "runs": runs,
    }


def run_transformers(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> dict:
    """transformers' continuous batching (`generate_batch`) on the same model and prompts, greedy, end of sequence
    off; the same window as the engine's where it records token timestamps, else the whole run's tok/s."""
    generate_batch = getattr(model, "generate_batch", None)
    if generate_batch is None:
        return {"skipped": f"transformers {transformers.__version__} has no generate_batch"}
    accepted = inspect.signature(generate_batch).parameters
    options = {k: v for k, v in (("record_timestamps", True), ("progress_bar", False)) if k in accepted}
    # eos_token_id None: init_continuous_batching then sets -1, which no token matches.
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    start = time.perf_counter()
    try:
        outputs = generate_batch(prompts, generation_config=config, **options)
    except Exception as exc:  # an API this script does not fit: say why and go on
        return {"skipped": f"generate_batch failed: {type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - start
    done = [o for o in outputs.values() if getattr(o, "error", None) is None]
    result = {
        "streams": len(prompts),
        "attention": model.config._attn_implementation,
        "wall_s_with_warmup": wall,
        "completed": len(done),
        "generated_tokens": sum(len(o.generated_tokens) for o in done),
    }
    if len(done) < len(prompts):
        return result | {"skipped": f"{len(prompts) - len(done)} of {len(prompts)} requests failed or went missing"}
    stamps = [getattr(o, "timestamps", None) for o in done]
    if all(stamps):
        records = [[(t, i + 1) for i, t in enumerate(ts)] for ts in stamps]
        return result | steady(records, len(prompts[0]))
    return result | {"tok_s": result["generated_tokens"] / wall, "window": "whole run (no token timestamps)"}


def roofline(run: dict, weight_bytes: int, bytes_per_token: int, peak: float | None) -> None:
    if run.get("step_s") is None:
        return
    run["bytes_per_step"] = weight_bytes + run["kv_tokens"] * bytes_per_token
    run["achieved_bytes_s"] = run["bytes_per_step"] / run["step_s"]
    run["roofline_share"] = run["achieved_bytes_s"] / peak if peak else None


def render(report: dict) -> Table:
    table = Table(
        title=f"decode: {report['model']}, {report['dtype']}, greedy, context {report['context']} tokens",
        caption=f"device: {report['device']}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"llmchat: {report['llmchat']['forward']}; attention: {report['llmchat']['kv_pool']['attention']}; "
        f"HBM peak {report['peak_bandwidth']}",
    )
    columns = ("run", "streams", "tok/s", "ms/step", "GB read/step", "HBM roofline", "TTFT ms", "max gap ms")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")

    def fmt(value, scale=1.0, spec=".1f"):
        return "n/a" if value is None else f"{value * scale:{spec}}"

    def row(name: str, run: dict) -> None:
        share = run.get("roofline_share")
        table.add_row(
            name,
            str(run["streams"]),
            fmt(run.get("tok_s"), spec=".0f"),
            fmt(run.get("step_s"), 1e3),
            fmt(run.get("bytes_per_step"), 1e-9, ".2f"),
            fmt(share, 100, ".0f") + "%" if share is not None else "unknown" if "bytes_per_step" in run else "n/a",
            "",
            "",
        )

    for run in report["llmchat"]["runs"]:
        row("llmchat", run)
        if probe := run.get("probe"):
            gap = probe["stream_gap_max_s"]
            table.add_row(
                f"llmchat, {probe['prompt_tokens']:,}-token prompt beside them",
                str(probe["beside_streams"]),
                *[""] * 4,
                fmt(probe["ttft_s"], 1e3, ".0f"),
                fmt(gap, 1e3, ".0f"),
            )
    theirs = report["transformers"]
    if "skipped" in theirs:
        table.add_row("transformers generate_batch", "", "skipped", *[""] * 5)
    else:
        row(f"transformers generate_batch ({theirs['attention']})", theirs)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, on the CPU: checks the script")
    parser.add_argument("--streams", default=None, help="stream counts, comma-separated (default 1,32,64; tiny 4)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 1024; tiny 64")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256; tiny 16")
    parser.add_argument("--probe-tokens", type=int, default=None, help="TTFT prompt, default 2048; tiny 128")
    parser.add_argument("--probe-streams", type=int, default=None, help="beside how many streams (32; tiny 4)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/gpu_decode[_tiny].json")
    args = parser.parse_args()
    defaults = ("4", 64, 16, 128, 4) if args.tiny else ("1,32,64", 1024, 256, 2048, 32)
    names = ("streams", "prompt_tokens", "new_tokens", "probe_tokens", "probe_streams")
    for name, default in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    out = args.out or Path("bench/results") / ("gpu_decode_tiny.json" if args.tiny else "gpu_decode.json")
    if not args.tiny and not torch.cuda.is_available():
        console.print("bench.gpu_decode: no CUDA device; nothing to measure (--tiny checks the script on the CPU)")
        return
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda":
        gpu.skip_cudnn_attention()  # as load_model does on a GPU
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(TINY if args.tiny else LLAMA_8B, device, torch.float32 if args.tiny else torch.bfloat16)
    loaded = wrap(model, device.type, start)
    console.log(f"model built in {loaded.load_seconds:.1f}s, {loaded.memory_bytes / 2**30:.1f} GiB")
    weight_bytes = bytes_read_per_step(model)

    generator = torch.Generator().manual_seed(0)
    prompts = {n: random_prompts(n, args.prompt_tokens, generator) for n in map(int, args.streams.split(","))}
    probe = random_prompts(1, args.probe_tokens, generator)[0]
    llmchat = asyncio.run(run_engine(loaded, args, prompts, probe))

    name = gpu.gpu_state(device)["name"] if device.type == "cuda" else "CPU"
    peak = bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    bytes_per_token = llmchat["kv_pool"]["bytes_per_token"]
    if device.type == "cuda":
        for run in llmchat["runs"]:
            roofline(run, weight_bytes, bytes_per_token, peak)

    if args.tiny:
        theirs = {"skipped": "not with --tiny"}
    elif args.probe_streams not in prompts:
        theirs = {"skipped": f"no run of {args.probe_streams} streams to compare with"}
    else:
        gc.collect()  # the engine's pool and graphs go, so transformers can size its cache to the free memory
        torch.cuda.empty_cache()
        start = time.perf_counter()
        theirs = run_transformers(model, prompts[args.probe_streams], args.new_tokens)
        roofline(theirs, weight_bytes, bytes_per_token, peak)
        console.log(f"transformers generate_batch: {time.perf_counter() - start:.1f}s")
    if "skipped" in theirs:
        console.log(f"transformers generate_batch skipped: {theirs['skipped']}")

    report = {
        "model": "Llama-3.1-8B shapes" if not args.tiny else "tiny Llama (2 layers, hidden 256)",
        "device": name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "context": f"{args.prompt_tokens}+{args.new_tokens}",
        "torch": torch.__version__,
        "transformers_version": transformers.__version__,
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_token": bytes_per_token,
        "peak_bandwidth": "unknown" if peak is None else f"{peak / 1e12:.2f} TB/s",
        "llmchat": llmchat,
        "transformers": theirs,
    }
    Console(width=160).print(render(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()
