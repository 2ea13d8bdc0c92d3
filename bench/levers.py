"""Decode-step timings for the engine's speed levers, on the bundled model's converted weights.

    .venv-dev/bin/python -m bench.levers                 # dtype x cache kind x forward pass (4-bit too), rows 1/4/8/16
    .venv-dev/bin/python -m bench.levers --compile       # adds torch.compile (minutes of compiling on 2 cores)
    .venv-dev/bin/python -m bench.levers --quantized     # adds bitsandbytes nf4 and int8 (transformers vs fused)

Each case prefills `--context` tokens per row, then times `--steps` decode steps of the whole batch.
"""

import argparse
import time

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from bench.report import captioned
from llmchat.engine import int4
from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.kv_cache import new_cache
from llmchat.engine.loader import ModelConfig, converted_dir, load_model, resolve_source
from llmchat.engine.projections import on_torch_kernel
from llmchat.engine.runner import TransformersForward
from llmchat.settings import Settings

CACHES = {"dynamic (torch.cat)": lambda m: DynamicCache(config=m.config), "spare columns": new_cache}


def time_decode(model, forward, make_cache, rows: int, context: int, steps: int) -> tuple[float, float]:
    """Returns (first step seconds, steady-state ms per step over the second half), on the model's device."""
    device = model.model.embed_tokens.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    ids = torch.randint(100, 1000, (rows, context), device=device)
    mask = torch.ones(rows, context, dtype=torch.long, device=device)
    cache = make_cache(model)
    forward(ids, mask, mask.cumsum(-1) - 1, cache)
    positions = torch.full((rows, 1), context, device=device)
    token = torch.randint(100, 1000, (rows, 1), device=device)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long, device=device)], dim=1)
        forward(token, mask, positions, cache)
        positions = positions + 1
        sync()
        times.append(time.perf_counter() - start)
    steady = times[steps // 2 :]
    return times[0], 1000 * sum(steady) / len(steady)


def linears_of(part) -> list:
    """A fused layer's projections, or the fused pass's logits matmul."""
    if isinstance(part, FusedForward):
        return [part.lm_head]
    return [part.qkv, part.o, part.gate_up, part.down]


def cases(args, weights):
    """(dtype or quantization, model, {name: forward pass}) for each load the table compares."""
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype).eval()
        fused = FusedForward(model, int4_rows=0)
        forwards = {"transformers": TransformersForward(model, "bench"), fused.kind: fused}
        if fused.kind != "fused":
            forwards["fused, unpacked"] = FusedForward(model, packed=False, int4_rows=0)
        four_bit = FusedForward(model, checkpoint=weights)  # up to the crossover measured on this machine
        forwards[four_bit.kind] = four_bit
        if int4.DOT8_KERNEL in four_bit.kind:  # the same with torch's int4 kernel, side by side
            theirs = FusedForward(model, checkpoint=weights)
            on_torch_kernel([q for part in (*theirs.layers, theirs) for q in linears_of(part) if q.int4 is not None])
            forwards[theirs.kind.replace(int4.DOT8_KERNEL, int4.TORCH_KERNEL)] = theirs
        if args.compile:
            forwards["transformers + torch.compile"] = TransformersForward(torch.compile(model, dynamic=True), "")
        yield str(dtype).removeprefix("torch."), model, forwards
    for quantization in ("nf4", "int8") if args.quantized else ():
        config = ModelConfig("bundled", device="cpu", quantization=quantization, cache_dir=Settings().cache_dir)
        model = load_model(config).model
        fused = FusedForward(model)
        yield quantization, model, {"transformers": TransformersForward(model, "bench"), fused.kind: fused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quantized", action="store_true", help="adds the model in bitsandbytes nf4 and int8")
    args = parser.parse_args()
    load_model(ModelConfig("bundled", device="cpu", cache_dir=Settings().cache_dir))  # converts once if needed
    weights = converted_dir(resolve_source("bundled"), Settings().cache_dir)
    table = captioned(f"decode step, context {args.context}, {torch.get_num_threads()} threads")
    for col in ("weights", "cache", "forward", "rows", "first step s", "ms/step", "tok/s"):
        table.add_column(col)
    with torch.inference_mode():
        for label, model, forwards in cases(args, weights):
            for cache_name, make_cache in CACHES.items():
                for forward_name, forward in forwards.items():
                    for rows in map(int, args.rows.split(",")):
                        first, ms = time_decode(model, forward, make_cache, rows, args.context, args.steps)
                        table.add_row(
                            label,
                            cache_name,
                            forward_name,
                            str(rows),
                            f"{first:.2f}",
                            f"{ms:.0f}",
                            f"{1000 * rows / ms:.1f}",
                        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
