"""One table of decode-step speed on the GPU, the last step of `bin/just gpu-check`.

    .venv-dev/bin/python -m bench.gpu

The bundled model unquantized, in nf4 and in int8, each through transformers' forward, the fused pass and
the fused pass replayed from CUDA graphs (where it can be captured), at 1 and 16 rows.
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from bench.levers import time_decode
from llmchat.engine import gpu
from llmchat.engine.cuda_graphs import GraphedDecode
from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.kv_cache import new_cache
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.engine.runner import TransformersForward
from llmchat.settings import Settings

# dtype auto: bfloat16 where the GPU computes it natively; int8 loads always compute in float16.
LOADS = [("auto", "none"), ("auto", "nf4"), ("auto", "int8")]


def forwards(model) -> dict:
    fused = FusedForward(model)
    result = {"transformers": TransformersForward(model, "bench"), "fused": fused}
    if fused.graph_blocker is None:
        graphed = GraphedDecode(fused, max_rows=16, capture=True)
        graphed.capture_all(model.device)
        result["fused + CUDA graphs"] = graphed
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA or ROCm GPU")
    device = gpu.gpu_state(torch.device("cuda"))["name"]  # with its CUDA or ROCm version, as /health says
    table = Table(
        title=f"decode step on the GPU, context {args.context}", caption=f"GPU: {device}, torch {torch.__version__}"
    )
    for col in ("dtype", "quantization", "forward", "rows", "ms/step", "tok/s", "vs transformers"):
        table.add_column(col, justify="left" if col in ("dtype", "quantization", "forward") else "right")
    with torch.inference_mode():
        for dtype, quantization in LOADS:
            start = time.perf_counter()
            config = ModelConfig("bundled", "cuda", dtype, quantization, cache_dir=Settings().cache_dir)
            loaded = load_model(config)
            model = loaded.model
            passes = forwards(model)  # built (and captured) once per load
            for rows in map(int, args.rows.split(",")):
                baseline = None
                for name, forward in passes.items():
                    ms = time_decode(model, forward, new_cache, rows, args.context, args.steps)[1]
                    baseline = baseline or ms
                    table.add_row(
                        str(loaded.dtype).removeprefix("torch."),
                        quantization,
                        name,
                        str(rows),
                        f"{ms:.1f}",
                        f"{1000 * rows / ms:.0f}",
                        f"{baseline / ms:.2f}x",
                    )
            del loaded, model
            torch.cuda.empty_cache()
            Console(stderr=True).log(f"{dtype} {quantization}: {time.perf_counter() - start:.0f}s")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
