"""llmchat's own CPU kernel for matmuls over a GGUF's 4-, 5-, 6- and 8-bit weights (dot8.cpp), on AVX2 CPUs.

torch's int4 kernel widens every weight to float before multiplying, so on a 2-core AVX2 host a one-row
decode step spent 13 of its 17.5 ms there, bound by arithmetic rather than by reading the weights.
Rounding each input row to 8-bit levels per group of 32, as llama.cpp does, turns the work into integer
dot products. Measured there, one row through the 30 layers' matmuls took 6.5 ms instead of 9.5 and the
logits matmul 1.9 ms instead of 4.5 (`bin/just levers` compares whole decode steps with either kernel).
The kernel takes every weight as one byte a level: int4.py unpacks 4- and 5-bit levels once at load, which
holds those weights in 9 or 10 bits each instead of 6 or 7 (with their scales), and made their matmuls 1.3
to 1.8x faster than multiplying the packed levels (2-core AVX2 host). The levels lie in tiles of 8 outputs
(`tiled`), so that one instruction multiplies a few inputs into 8 outputs: there the kernel beat oneDNN's
float32 matmul at every row count timed, up to 512, and prompts take it too where it wins at load
(projections.py). Levels in -32..31 (every GGUF type but Q8_0) can take inputs of 8 bits (vpmaddubsw, 0.65 to
0.8x the time) where the model's logits allow it (input_rounding.py); otherwise llmchat rounds twice, the levels
and then what they leave at a 254th of the step, and sums both products in integers: the inputs keep about 16
bits, against bfloat16's 8 that torch's kernel takes.

It is compiled at first use with the system's C++ compiler against this torch, in one library with the paged
decode attention kernel (paged_attention.cpp, used by paged_kv.py), about 30 s, and kept in
`TORCH_EXTENSIONS_DIR` (the service sets it under its cache directory). Without AVX2, an x86 CPU, or a
compiler, `unavailable()` says why and the 4-bit weights use torch's kernel. Where it runs, the fused pass
still times one row through both kernels at load, per kind of projection, and switches to torch's where it
is 10% faster: torch's has AVX-512 code, this one only AVX2.
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

log = logging.getLogger("llmchat.engine.dot8")

GROUP = 32  # inputs a scale (and an input row's rounding) covers

SOURCE = Path(__file__).with_name("dot8.cpp")
# Built into the same library: decode attention read in place from the paged KV pool (paged_kv.py).
SOURCES = (SOURCE, SOURCE.with_name("paged_attention.cpp"))
# -fopenmp: ATen's parallel_for is inline OpenMP code. The library then needs libgomp.so.1, which resolves to
# the copy torch's wheels load, so the kernel shares torch's threads (tested).
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]


def build_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / "llmchat"


@cache
def unavailable() -> str | None:
    """Why the kernel cannot run here, or None once it is built (or found built) and loaded."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86 CPU ({platform.machine()})"
    if not torch.cpu.get_capabilities().get("avx2"):
        return "the CPU lacks AVX2"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler (c++ or g++) on PATH"
    try:
        torch.ops.load_library(str(_built(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        log.warning("the 8-bit dot-product kernel could not be built; 4-bit weights use torch's kernel: %s", exc)
        return f"kernel build failed: {reason}"
    # Output shapes, for torch.compile to trace the compiled decode step through.
    torch.library.register_fake("llmchat_dot8::levels_mm", _fake)
    torch.library.register_fake("llmchat_dot8::fives_mv", _fake_fives)
    return None


def _built(compiler: str) -> Path:
    """The shared library for this source, torch and compiler, compiled once into the build directory."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*texts, torch.__version__, *command]).encode()).hexdigest()[:16]
    target = build_dir() / f"dot8-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling llmchat's CPU kernels into %s (once, about 30 s)", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # replicas starting together each build their own
        built = Path(scratch) / target.name
        result = subprocess.run(
            [*command, *map(str, SOURCES), "-o", str(built), *libs], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            detail = result.stderr.strip()[-500:] or f"exit status {result.returncode}"
            raise RuntimeError(f"{Path(compiler).name} failed: {detail}")
        os.replace(built, target)
    return target


TILE = 8  # outputs side by side in the kernel's layout (`tiled`)


SHIFT = 32  # added to levels in -32..31 to make them unsigned bytes (dot8.cpp's Quads)


def tiled(
    levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, quads: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A weight's int8 `levels` [out, in], float32 `scales` [out, in / 32] (Q6_K's: [out, in / 16]) and `offsets`
    [out, in / 32] (or None) in the kernel's tiles of 8 outputs; outputs past a multiple of 8 are padded with zero
    levels and scales, and `levels_mm` returns their columns too. Levels in -32..31 (every type but Q8_0) go in
    quads of inputs, shifted to unsigned bytes (dot8.cpp's Quads: uint8 [out / 8, in / 32, 8, 8, 4]), the others in
    pairs (Tiles: int8 [out / 8, in / 32, 16, 8, 2])."""
    out, width = levels.shape
    pad = -out % TILE
    if pad:
        levels, scales = F.pad(levels, (0, 0, 0, pad)), F.pad(scales, (0, 0, 0, pad))
        offsets = None if offsets is None else F.pad(offsets, (0, 0, 0, pad))
    tiles, groups = (out + pad) // TILE, width // GROUP
    if quads and int(levels.min()) >= -SHIFT and int(levels.max()) < SHIFT:
        shifted = (levels.to(torch.int16) + SHIFT).to(torch.uint8)
        levels = shifted.view(tiles, TILE, groups, GROUP // 4, 4).permute(0, 2, 3, 1, 4)
    else:
        levels = levels.view(tiles, TILE, groups, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
    halves = scales.shape[1] // groups
    scales = scales.view(tiles, TILE, groups, halves).permute(0, 2, 3, 1)
    scales = scales[:, :, 0] if halves == 1 else scales
    if offsets is not None:
        offsets = offsets.view(tiles, TILE, groups).transpose(1, 2).contiguous()
    return levels.contiguous(), scales.contiguous(), offsets


def untiled(
    levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`tiled`'s inverse, for a weight of `out` outputs."""
    tiles, groups = levels.shape[:2]
    levels = levels.permute(0, 3, 1, 2, 4).reshape(tiles * TILE, groups * GROUP)[:out]
    if levels.dtype == torch.uint8:
        levels = (levels.to(torch.int16) - SHIFT).to(torch.int8)
    per_group = scales if scales.dim() == 4 else scales[:, :, None]
    scales = per_group.permute(0, 3, 1, 2).reshape(tiles * TILE, -1)[:out]
    if offsets is not None:
        offsets = offsets.transpose(1, 2).reshape(tiles * TILE, groups)[:out]
    return levels.contiguous(), scales.contiguous(), None if offsets is None else offsets.contiguous()


def levels_mm(
    x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """x [rows, in] times a weight in the kernel's tiles (`tiled`): [rows, out rounded up to 8], in x's dtype."""
    return torch.ops.llmchat_dot8.levels_mm(x, levels, scales, offsets)


def _fake(x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], levels.shape[0] * TILE))


FIVE_BASES = (SHIFT - 16, SHIFT)  # quads' bytes less one of these fit 5 bits: signed levels in -16..15, unsigned 0..31


def fives(levels: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """A weight in quads (`tiled`) packed in 5 bits for one row's matmul (dot8.cpp's five_row): nibbles uint8
    [out / 8, in / 32, 4, 32], each pair of quads' first in the low half, fifth bits uint8 [out / 8, in / 32, 32], and
    the base subtracted from each byte. None where it is not quads with a scale per 32 or its bytes span more than
    5 bits from either base (Q6_K's, Q8_0's)."""
    if levels.dtype != torch.uint8 or scales.dim() != 3 or levels.numel() == 0:
        return None
    low, high = int(levels.min()), int(levels.max())
    base = next((b for b in FIVE_BASES if low >= b and high <= b + 31), None)
    if base is None:
        return None
    tiles, groups = levels.shape[:2]
    five = (levels - base).view(tiles, groups, 8, 32)
    nibbles = (five[:, :, 0::2] & 15) | ((five[:, :, 1::2] & 15) << 4)
    bits = (five >> 4) << torch.arange(8, dtype=torch.uint8).view(8, 1)
    return nibbles.contiguous(), bits.sum(2, dtype=torch.uint8).contiguous(), base


def fives_mv(
    x: torch.Tensor,
    nibbles: torch.Tensor,
    fifths: torch.Tensor,
    base: int,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
) -> torch.Tensor:
    """One row x [1, in] times a weight in 5 bits (`fives`) with its tiles' scales and offsets, as levels_mm gives."""
    return torch.ops.llmchat_dot8.fives_mv(x, nibbles, fifths, base, scales, offsets)


def _fake_fives(x: torch.Tensor, nibbles: torch.Tensor, *weight) -> torch.Tensor:
    return x.new_empty((1, nibbles.shape[0] * TILE))
