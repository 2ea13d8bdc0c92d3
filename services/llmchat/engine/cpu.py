"""Choices made for a CPU: its matrix capabilities, and the dtype that decodes faster on it.

bfloat16 halves the bytes a decode step reads, but only a CPU that multiplies it natively (AMX, or
AVX512_BF16) turns that into speed; elsewhere torch emulates it, slower than float32 once rows are
batched (bench.levers). Where the flags say AVX512_BF16 without AMX, whether torch's kernels use it
depends on the build, so a few decode-sized matmuls are timed in both dtypes at load and the faster kept.
"""

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("llmchat.engine.cpu")

FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")
# bfloat16 must be this much faster than float32 to be chosen: timing noise must not flip the choice.
MARGIN = 0.9


def capabilities() -> dict[str, bool]:
    """The matrix-relevant flags of this CPU as torch sees them."""
    caps = torch.cpu.get_capabilities()
    return {flag: bool(caps.get(flag)) for flag in FLAGS}


def has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX: Xeon Sapphire Rapids and later)."""
    return capabilities()["amx_bf16"]


def describe() -> str:
    """Which of the flags this CPU has, e.g. "avx2 (no avx512_f, avx512_bf16, amx_bf16)", for /health, logs
    and the benchmark's tables."""
    caps = capabilities()
    have = [flag for flag in FLAGS if caps[flag]]
    lacks = [flag for flag in FLAGS if not caps[flag]]
    return " ".join(have) + (" " if have and lacks else "") + (f"(no {', '.join(lacks)})" if lacks else "")


def pick_dtype(timer=None) -> tuple[torch.dtype, str]:
    """bfloat16 or float32 for this CPU, and why. `timer(dtype)`: seconds for the same matmuls (tests fake it)."""
    caps = capabilities()
    if caps["amx_bf16"]:  # the fused pass then also prepacks the bfloat16 weights for oneDNN
        return torch.bfloat16, "the CPU has AMX: bfloat16 matmuls in hardware"
    if not caps["avx512_bf16"]:
        return torch.float32, "the CPU has neither AMX nor AVX512_BF16: bfloat16 would be emulated"
    timer = timer or time_matmuls
    fp32, bf16 = timer(torch.float32), timer(torch.bfloat16)
    measured = f"decode-sized matmuls took {fp32 * 1e3:.1f} ms in float32, {bf16 * 1e3:.1f} ms in bfloat16"
    choice = torch.bfloat16 if bf16 < MARGIN * fp32 else torch.float32
    log.info("dtype %s: AVX512_BF16 without AMX, %s", str(choice).removeprefix("torch."), measured)
    return choice, f"AVX512_BF16 without AMX; {measured}"


def time_matmuls(dtype: torch.dtype, hidden: int = 2048, out: int = 5632, repeats: int = 5) -> float:
    """Best-of-`repeats` seconds for one and eight rows through a [hidden -> out] projection (a 1B-7B MLP's)."""
    weight = torch.randn(out, hidden).to(dtype)
    rows = [torch.randn(n, hidden).to(dtype) for n in (1, 8)]
    with torch.inference_mode():
        for x in rows:  # warm-up: oneDNN picks and caches its kernels on first use
            F.linear(x, weight)
        return best_of(lambda: [F.linear(x, weight) for x in rows], repeats)


def best_of(run: Callable[[], object], repeats: int) -> float:
    """The fewest seconds `run()` took in `repeats` calls: the least disturbed by other work on the machine."""
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest
