"""4-bit copies of weights that already sit on a 4-bit or 8-bit grid, for decode steps with few rows.

Decoding a few rows reads every weight once per token, so on the CPU that step is bound by memory
bandwidth. A Q4_1 GGUF stores 4-bit values in groups of 32 along each row, with a scale and an
offset per group, the group's lowest value at level 0 and its highest at 15; float32 spends 32 bits
on each of them again. Where the converted weights lie exactly on such a grid, the fused pass also
keeps their levels (`Grid`) and uses them for steps of up to a crossover number of rows, measured at
load (`crossover`): larger batches keep the dense matmul, faster once many rows share each weight
read. A Q8_0 weight (the bundled GGUF's embedding, tied to its logits matmul) is 8-bit values times
a scale per group of 32, kept the same way. A weight off both grids gets no copy: a bfloat16
checkpoint's, or a 4-bit type whose groups need not span all 16 levels (Q4_0, the K-quants), where
a group that does not fails the exact check.

On AVX2 CPUs (AVX-512 ones included) llmchat's kernel (dot8.py) multiplies them, keeping about 16 bits
of each input. Elsewhere, where it cannot be built, or where it is slower (`torch_kernel_is_faster`),
torch's int4 kernel does, on a copy in its layout with scales rounded to bfloat16, made at each start;
it takes bfloat16 inputs, so a float32 model's rows are rounded to bfloat16 on the way in.
"""

import json
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmchat.engine import cpu, dot8

log = logging.getLogger("llmchat.int4")

GROUP = 32
# Row counts the crossover is timed at, in order; it stops at the first the dense matmul wins.
CANDIDATE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)

CACHE_FILE = "int4.safetensors"
# Bump the number when the grids' stored form changes.
FORMAT = "3"
PARTS = ("levels", "scales", "offsets")
# A weight's levels on a Q4_1 grid (uint8 [out, in / 2], a group's first 16 levels in the low nibbles, the next
# 16 in the high; float32 scales and offsets [out, in / 32]) or a Q8_0 grid (int8 [out, in]; offsets None).
Levels = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
DOT8_KERNEL, TORCH_KERNEL = "8-bit dot products", "torch's int4 kernel"
# torch's kernel must be this much faster to be chosen: timing noise must not flip the choice (and with it the
# logits) from one start to the next.
MARGIN = 0.9


def load_grids(checkpoint: Path, projections: list[list[str]]) -> list["Grid | None"]:
    """The grid of each projection (its parts' parameter names, fused in order), or None off the grid.

    Checking every weight takes seconds per hundred million parameters, so the result is kept beside
    the checkpoint and read back on later starts.
    """
    keys = ["+".join(names) for names in projections]
    cache = checkpoint / CACHE_FILE
    if cache.is_file():
        with safe_open(cache, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == FORMAT and json.loads(meta.get("keys", "[]")) == keys:
                stored = set(f.keys())
                return [
                    Grid(*(f.get_tensor(f"{k}.{part}") if f"{k}.{part}" in stored else None for part in PARTS))
                    if f"{k}.levels" in stored
                    else None
                    for k in keys
                ]
    with ExitStack() as files:
        # Each checkpoint file opened once; a name is looked up in the file that holds it.
        holder = {}
        for path in sorted(checkpoint.glob("*.safetensors")):
            if path.name != CACHE_FILE:
                f = files.enter_context(safe_open(path, framework="pt"))
                holder.update(dict.fromkeys(f.keys(), f))
        found = []
        for names in projections:
            parts = [holder[name].get_tensor(name) if name in holder else None for name in names]
            found.append(grid_levels(torch.cat(parts)) if all(p is not None for p in parts) else None)
    tensors = {}
    for key, levels in zip(keys, found, strict=True):
        for part, tensor in zip(PARTS, levels, strict=True) if levels is not None else ():
            if tensor is not None:
                tensors[f"{key}.{part}"] = tensor
    temporary = checkpoint / f".{CACHE_FILE}.{os.getpid()}.tmp"  # replicas starting together each write their own
    try:
        save_file(tensors, temporary, metadata={"format": FORMAT, "keys": json.dumps(keys)})
        os.replace(temporary, cache)
    except OSError as exc:  # a read-only cache costs the check at every start, nothing more
        log.warning("could not keep the 4-bit weights in %s: %s", checkpoint, exc)
    return [Grid(*levels) if levels is not None else None for levels in found]


class Grid:
    """A weight's `Levels` as a kernel takes them: llmchat's (dot8.py) takes them as they are; torch's int4
    kernel, used where llmchat's cannot run or `dot8_kernel` is False, takes a copy in its layout, and then
    `levels` is None (not held twice)."""

    def __init__(
        self, levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, dot8_kernel: bool = True
    ) -> None:
        if dot8_kernel and dot8.unavailable() is None:
            self.kernel = DOT8_KERNEL
            self.levels: Levels | None = (levels, scales, offsets)
            self.tensors = (levels, scales) if offsets is None else (levels, scales, offsets)
            self._matmul = dot8.q8_mm if offsets is None else dot8.q4_mm
        else:
            self.kernel = TORCH_KERNEL
            self.levels = None
            self.tensors = _torch_int4(levels, scales, offsets)
            self._matmul = _torch_int4_matmul

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] times the weight, in x's dtype."""
        return self._matmul(x, *self.tensors)


def grid_levels(weight: torch.Tensor) -> Levels | None:
    """A float32 [out, in] weight's levels on a Q4_1 or Q8_0 grid, else None."""
    return q4_1_levels(weight) or q8_0_levels(weight)


def q4_1_levels(weight: torch.Tensor) -> Levels | None:
    """A float32 [out, in] weight's levels if its rows are 4-bit values in groups of 32, else None."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        return None
    groups = weight.float().view(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = ((groups - low) / step).round()
    if ((levels * scale + low - groups).abs() > 1e-3 * step).any():
        return None
    levels = levels.to(torch.uint8)
    nibbles = levels[..., : GROUP // 2] | (levels[..., GROUP // 2 :] << 4)
    return nibbles.flatten(1).contiguous(), scale.squeeze(-1), low.squeeze(-1)


def q8_0_levels(weight: torch.Tensor) -> Levels | None:
    """A float32 [out, in] weight's levels if its rows are 8-bit values times a scale per group of 32, else None."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        return None
    groups = weight.float().view(out_features, in_features // GROUP, GROUP)
    # Q8_0 scales each group so its largest magnitude is level 127 exactly.
    scale = groups.abs().amax(-1, keepdim=True) / 127
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = (groups / step).round()
    if ((levels * scale - groups).abs() > 1e-6 * step).any():
        return None
    return levels.to(torch.int8).flatten(1), scale.squeeze(-1), None


def _torch_int4(levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """torch's packed int4 layout of a grid, with scales and zeros rounded to bfloat16 as its kernel takes them.

    A Q8_0 level q splits exactly into two 4-bit ones, q + 128 = 16 * high + low: the weight is high's grid
    (scale 16 s) plus low's (scale s), stored side by side along the input as one matmul over the input twice.
    """
    scale = scales.unsqueeze(-1)
    if offsets is not None:
        nibbles = levels.view(levels.shape[0], -1, GROUP // 2)
        four_bit = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)
        # torch's kernel computes (level - 8) * scale + zero.
        return _pack(four_bit, scale, offsets.unsqueeze(-1) + 8 * scale)
    shifted = levels.view(levels.shape[0], -1, GROUP).to(torch.int32) + 128
    high, low = shifted.div(16, rounding_mode="floor"), shifted.remainder(16)
    # high: (high - 8) * 16 * scale with zero 0; low: (low - 8) * scale + 8 * scale = low * scale.
    return _pack(
        torch.cat([high, low], dim=1),
        torch.cat([16 * scale, scale], dim=1),
        torch.cat([torch.zeros_like(scale), 8 * scale], dim=1),
    )


def _pack(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 layout of `levels` [out, groups, GROUP] with per-group `scale` and `zero` [out, groups, 1]."""
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32).flatten(1), 2)
    return packed, scales_and_zeros


def _torch_int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The kernel computes in bfloat16 (a float32 input falls to a reference path tens of times slower)."""
    inputs = x.to(torch.bfloat16)
    if scales_and_zeros.shape[0] * GROUP > x.shape[-1]:  # a Q8_0 weight's two grids each take the input
        inputs = torch.cat([inputs, inputs], dim=-1)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(inputs, packed, GROUP, scales_and_zeros).to(x.dtype)


def crossover(seconds_at: Callable[[int], tuple[float, float]], name: str = "") -> int:
    """The most rows for which the 4-bit matmuls beat the dense ones, 0 if never: row counts are tried in
    CANDIDATE_ROWS order until the dense matmuls win. `seconds_at(rows)`: (dense, 4-bit) seconds; `name`
    says in the log which matmuls they are."""
    rows_won = 0
    for rows in CANDIDATE_ROWS:
        dense_s, four_bit_s = seconds_at(rows)
        if four_bit_s >= dense_s:  # a loss is timed again: one disturbed by other work must not end the search
            dense_again, four_bit_again = seconds_at(rows)
            dense_s, four_bit_s = min(dense_s, dense_again), min(four_bit_s, four_bit_again)
        log.info("4-bit %s at %d rows: %.1f ms, dense %.1f ms", name, rows, four_bit_s * 1e3, dense_s * 1e3)
        if four_bit_s >= dense_s:
            break
        rows_won = rows
    return rows_won


def torch_kernel_is_faster(grids: list[Grid], width: int, dtype: torch.dtype) -> bool:
    """Whether torch's int4 kernel multiplies one row by these grids (llmchat's kernel's) faster than llmchat's:
    where torch has AVX-512 code and llmchat's kernel only AVX2, the flags alone do not say."""
    theirs = [Grid(*g.levels, dot8_kernel=False) for g in grids]
    ours_s, theirs_s = timer([(a.matmul, b.matmul) for a, b in zip(grids, theirs, strict=True)], width, dtype)(1)
    log.info("one row, %d grids: llmchat's kernel %.2f ms, torch's %.2f ms", len(grids), ours_s * 1e3, theirs_s * 1e3)
    return theirs_s < MARGIN * ours_s


def timer(pairs: list[tuple[Callable, Callable]], width: int, dtype: torch.dtype, repeats: int = 3):
    """`crossover`'s `seconds_at` over real matmuls: (dense, 4-bit) callables over [rows, width] inputs, e.g.
    every layer's MLP input projection. Timing all of them in turn reads more weights than a cache holds,
    as a decode step does."""

    def seconds_at(rows: int) -> tuple[float, float]:
        x = torch.randn(rows, width).to(dtype)
        dense_s = four_bit_s = float("inf")
        with torch.inference_mode():
            for call in pairs[0]:  # warm-up: kernels pick their blocking on first use
                call(x)
            # In turns, so that a burst of other work on the machine (a server starting) slows both alike.
            for _ in range(repeats):
                dense_s = min(dense_s, cpu.best_of(lambda: [d(x) for d, _ in pairs], 1))
                four_bit_s = min(four_bit_s, cpu.best_of(lambda: [q(x) for _, q in pairs], 1))
        return dense_s, four_bit_s

    return seconds_at
