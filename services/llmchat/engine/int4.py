"""Compact copies of weights that sit on a GGUF's grid, for decode steps with few rows.

Decoding a few rows reads every weight once per token, so on the CPU that step is bound by memory
bandwidth. A GGUF stores each weight as small integer levels in groups along its rows, with a scale (and
for some types an offset) per group; float32 spends 32 bits on each of them again. Where the converted
weights lie exactly on such a grid, the fused pass also keeps their levels (`Grid`) and uses them for steps
of up to a crossover number of rows, measured at load (`crossover`): larger batches keep the dense matmul,
faster once many rows share each weight read. The levels are read from the GGUF's blocks where the file is
at hand (gguf_grids.py: Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0); otherwise a float32 weight is
checked for the grids its values alone reveal, Q4_1 groups spanning all 16 levels and Q8_0 ones.

On AVX2 CPUs (AVX-512 ones included) llmchat's kernel (dot8.py) multiplies them, keeping 8 bits of each
input or about 16 (input_rounding.py decides per model). Elsewhere, where it cannot be built, or where it is
slower (`torch_kernel_is_faster`), torch's int4 kernel does the 4- and 8-bit grids with a scale per 32, on a
copy in its layout with scales rounded to bfloat16, made at each start; it takes bfloat16 inputs, so a float32
model's rows are rounded to bfloat16 on the way in. The 5-bit grids and Q6_K's scales per 16 it cannot take:
those weights then stay dense.
"""

import copy
import json
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmchat.engine import cpu, dot8
from llmchat.engine.gguf_grids import GGUFWeights

log = logging.getLogger("llmchat.int4")

GROUP = 32
# Row counts the crossover is timed at, in order; it stops at the first the dense matmul wins.
CANDIDATE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)

CACHE_FILE = "int4.safetensors"
# Bump the number when the grids' stored form changes.
FORMAT = "4"
PARTS = ("levels", "scales", "offsets", "fifth")
# A weight's levels, scales, offsets and fifth bits on an unsigned grid (uint8 [out, in / 2], a group's first 16
# levels' low four bits in the low nibbles, the next 16's in the high; float32 scales and offsets [out, in / 32];
# for levels up to 31, their fifth bits uint8 [out, in / 8], a group's 32 as one little-endian word, else None)
# or a signed one (int8 [out, in]; scales [out, in / 32] or, Q6_K's, [out, in / 16]; offsets and fifth None).
Levels = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
# One projection's levels, scales and offsets (None on a signed grid) as gguf_grids.py reads them, before `pack`.
Unpacked = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
DOT8_KERNEL, TORCH_KERNEL = "8-bit dot products", "torch's int4 kernel"
# torch's kernel must be this much faster to be chosen: timing noise must not flip the choice (and with it the
# logits) from one start to the next.
MARGIN = 0.9


def load_grids(checkpoint: Path, projections: list[list[str]], gguf: Path | None = None) -> list["Grid | None"]:
    """The grid of each projection (its parts' parameter names, fused in order), or None off the grid: from the
    blocks of `gguf` (the file the checkpoint was converted from) where given, else from the float32 values.

    Checking every weight takes seconds per hundred million parameters, so the result is kept beside
    the checkpoint and read back on later starts.
    """
    keys = ["+".join(names) for names in projections]
    if gguf is not None and not gguf.is_file():  # moved: the values still show the plainest grids
        log.warning("%s is gone, so only the grids its converted values show are used", gguf)
        gguf = None
    origin = "blocks" if gguf is not None else "values"
    cache = checkpoint / CACHE_FILE
    if cache.is_file():
        # The stub of safetensors 0.4 (the floor) types safe_open without its methods, __enter__ and __exit__ too.
        with safe_open(cache, framework="pt") as f:  # type: ignore[attr-defined, unused-ignore]
            meta = f.metadata() or {}
            same = meta.get("format") == FORMAT and meta.get("from") == origin
            if same and json.loads(meta.get("keys", "[]")) == keys:
                stored = set(f.keys())
                # Every grid stores its levels and scales; offsets and fifth bits only where it has them. Copied out
                # of the file's mapping, which the tensors read from it would keep: llmchat's kernel reads packed
                # levels once, at load, and 240 MB of them stayed resident (0.5B model).
                return [
                    make_grid(
                        cast(
                            Levels,
                            tuple(
                                f.get_tensor(f"{k}.{part}").clone() if f"{k}.{part}" in stored else None
                                for part in PARTS
                            ),
                        )
                    )
                    if f"{k}.levels" in stored
                    else None
                    for k in keys
                ]
    # Opened only here: parsing the file's metadata takes seconds (8 s for a 0.5B model's 151k-token vocabulary).
    blocks = None
    if gguf is not None:
        try:
            blocks = GGUFWeights(gguf)
            log.info("reading the levels of %s's quantized weights (once; kept in %s)", gguf.name, checkpoint)
        except (OSError, ValueError) as exc:  # unreadable: as above
            log.warning("cannot read the blocks of %s, so only grids its values show are used: %s", gguf, exc)
            origin = "values"
    with ExitStack() as files:
        # Each checkpoint file opened once; a name is looked up in the file that holds it.
        holder: dict[str, Any] = {}
        for path in sorted(checkpoint.glob("*.safetensors")):
            if path.name != CACHE_FILE:
                f = files.enter_context(safe_open(path, framework="pt"))  # type: ignore[arg-type, unused-ignore]
                holder.update(dict.fromkeys(f.keys(), f))
        found: list[Levels | None] = []
        for names in projections:
            parts = [holder[name].get_tensor(name) for name in names if name in holder]
            if len(parts) < len(names):
                found.append(None)
            elif blocks is not None:
                found.append(fused_levels([blocks.levels(name, part) for name, part in zip(names, parts, strict=True)]))
            else:
                found.append(grid_levels(torch.cat(parts)))
    tensors = {}
    for key, levels in zip(keys, found, strict=True):
        for part, tensor in zip(PARTS, levels, strict=True) if levels is not None else ():
            if tensor is not None:
                tensors[f"{key}.{part}"] = tensor
    temporary = checkpoint / f".{CACHE_FILE}.{os.getpid()}.tmp"  # replicas starting together each write their own
    try:
        save_file(tensors, temporary, metadata={"format": FORMAT, "from": origin, "keys": json.dumps(keys)})
        os.replace(temporary, cache)
    except OSError as exc:  # a read-only cache costs the check at every start, nothing more
        log.warning("could not keep the 4-bit weights in %s: %s", checkpoint, exc)
    return [make_grid(levels) if levels is not None else None for levels in found]


def make_grid(levels: Levels) -> "Grid | None":
    """The grid for a kernel that can run here, None where only llmchat's takes it and cannot run."""
    if dot8.unavailable() is None or torch_takes(levels):
        return Grid(*levels)
    return None


def torch_takes(levels: Levels) -> bool:
    """Whether torch's int4 kernel can multiply these: 4- or 8-bit levels with a scale per 32, in rows of 16."""
    values, scales, _, fifth = levels
    per_32 = scales.shape[1] * GROUP == values.shape[1] * (2 if values.dtype == torch.uint8 else 1)
    return fifth is None and per_32 and values.shape[0] % 16 == 0


def fused_levels(parts: list[Unpacked | None]) -> Levels | None:
    """The grid of projections fused along their outputs (q, k and v; gate and up) from each one's levels, scales
    and offsets (gguf_grids.py), or None where one has none. Parts of different kinds (a Q8_0 v beside Q5_0 q and
    k) meet as signed levels with a scale per 16 or 32, where that is exact."""
    known = [p for p in parts if p is not None]
    if len(known) < len(parts):
        return None
    if len({(p[2] is None, p[1].shape[1]) for p in known}) > 1:
        signed = [_signed(p) for p in known]
        known = [p[0] for p in signed if p is not None]
        if len(known) < len(signed):
            return None
        finest = max(p[1].shape[1] for p in known)
        known = [(p[0], p[1].repeat_interleave(finest // p[1].shape[1], 1), None) for p in known]
    levels, scales = torch.cat([p[0] for p in known]), torch.cat([p[1] for p in known])
    # The parts are of one kind here: all have offsets or none has.
    offsets = torch.cat([p[2] for p in known if p[2] is not None]) if known[0][2] is not None else None
    return pack(levels, scales, offsets)


def _signed(part: Unpacked) -> tuple[Unpacked, torch.Tensor | None] | None:
    """Unsigned levels whose offset is a whole number of steps below zero (Q4_0's -8, Q5_0's -16) as signed ones
    that fit a byte, with each group's shift (int8; None for levels signed already), or None where they cannot be."""
    levels, scales, offsets = part
    if offsets is None:
        return part, None
    shift = torch.round(-offsets / torch.where(scales == 0, 1, scales))
    if not torch.equal(shift * scales, -offsets):
        return None
    signed = levels.to(torch.int16) - shift.repeat_interleave(GROUP, 1).to(torch.int16)
    if int(signed.min()) < -128 or int(signed.max()) > 127:
        return None
    return (signed, scales, None), shift.to(torch.int8)


def pack(levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> Levels:
    """`Levels` from integer levels [out, in] (unsigned up to 31 with offsets, signed without)."""
    if offsets is None:
        return levels.to(torch.int8).contiguous(), scales.contiguous(), None, None
    groups = levels.view(levels.shape[0], -1, GROUP).to(torch.int32)
    low = groups & 15
    nibbles = (low[..., : GROUP // 2] | (low[..., GROUP // 2 :] << 4)).to(torch.uint8).flatten(1).contiguous()
    fifth = None
    if int(groups.max()) > 15:
        bits = (groups >> 4).view(levels.shape[0], -1, GROUP // 8, 8) << torch.arange(8, dtype=torch.int32)
        fifth = bits.sum(-1).to(torch.uint8).flatten(1).contiguous()
    return nibbles, scales.contiguous(), offsets.contiguous(), fifth


class Grid:
    """A weight's `Levels` as a kernel takes them. llmchat's (dot8.py) takes one signed byte a level in tiles of 8
    outputs: 4- and 5-bit levels are unpacked for it (`widened`), then tiled, and one row takes a copy of them in 5
    bits where they fit (`fives`). torch's int4 kernel, used where llmchat's cannot run or `dot8_kernel` is False,
    takes a copy in its layout. Either kernel's copies alone are kept."""

    def __init__(
        self,
        levels: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor | None,
        fifth: torch.Tensor | None = None,
        dot8_kernel: bool = True,
    ) -> None:
        self.tensors: tuple[torch.Tensor | None, ...]
        self._matmul: Callable[..., torch.Tensor]  # x and then `tensors`
        # llmchat's kernel: a copy of 4- and 5-bit levels in 5 bits for one row (dot8.fives), else None.
        self.fives: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # Where unsigned levels were made signed for llmchat's kernel: each group's shift, to pack them again.
        self._shift: torch.Tensor | None = None
        self.out_features = levels.shape[0]
        if dot8_kernel and dot8.unavailable() is None:
            self.kernel = DOT8_KERNEL
            wide, self._shift = widened((levels, scales, offsets, fifth))
            self.tensors, self._matmul = dot8.tiled(*wide), dot8.levels_mm
            self._pack_fives()
        else:
            if not torch_takes((levels, scales, offsets, fifth)):
                raise ValueError("torch's int4 kernel takes 4- and 8-bit levels with a scale per 32 only")
            self.kernel = TORCH_KERNEL
            self.tensors = _torch_int4(levels, scales, offsets)
            self._matmul = _torch_int4_matmul

    @property
    def dot8_levels(self) -> Levels:
        """The `Levels` of a grid llmchat's kernel multiplies, packed again (one in torch's layout holds none)."""
        assert self.kernel == DOT8_KERNEL, "a grid in torch's layout holds no levels"
        tiles, tile_scales, tile_offsets = self.tensors
        assert tiles is not None and tile_scales is not None
        levels, scales, offsets = dot8.untiled(tiles, tile_scales, tile_offsets, self.out_features)
        if self._shift is not None:
            shift = self._shift.float()
            levels = levels.to(torch.int16) + shift.repeat_interleave(GROUP, 1).to(torch.int16)
            offsets = -(shift * scales)
        return pack(levels, scales, offsets) if offsets is not None else (levels, scales, None, None)

    def head(self, out_features: int) -> "Grid":
        """The grid of this weight's first `out_features` outputs (a multiple of 8) in llmchat's kernel, sharing its
        tensors: for timing a large weight's kernels on part of it, without copies of all of it."""
        assert self.kernel == DOT8_KERNEL and out_features % dot8.TILE == 0
        if out_features >= self.out_features:
            return self
        part = copy.copy(self)
        part.tensors = tuple(None if t is None else t[: out_features // dot8.TILE] for t in self.tensors)
        if self.fives is not None:
            nibbles, fifths, base = self.fives
            part.fives = nibbles[: out_features // dot8.TILE], fifths[: out_features // dot8.TILE], base
        part.out_features = out_features
        part._shift = None if self._shift is None else self._shift[:out_features]
        return part

    @property
    def byte_inputs(self) -> bool:
        """Whether llmchat's kernel rounds this grid's inputs to 8 bits (its levels in quads, dot8.py's `tiled`)."""
        return self.kernel == DOT8_KERNEL and self.tensors[0] is not None and self.tensors[0].dtype == torch.uint8

    def round_inputs_to_bytes(self, on: bool) -> None:
        """Lays a grid of llmchat's kernel out again for 8-bit inputs (where its levels allow) or 16-bit ones."""
        tiles, tile_scales, tile_offsets = self.tensors
        assert self.kernel == DOT8_KERNEL and tiles is not None and tile_scales is not None
        self.tensors = dot8.tiled(*dot8.untiled(tiles, tile_scales, tile_offsets, self.out_features), quads=on)
        self._pack_fives()

    def _pack_fives(self) -> None:
        """One row's copy of the levels in 5 bits, where they are quads that fit (dot8.fives): a decode step of one
        sequence reads 0.6 byte a level instead of 1."""
        tiles, tile_scales, _ = self.tensors
        assert tiles is not None and tile_scales is not None
        self.fives = dot8.fives(tiles, tile_scales)

    @property
    def nbytes(self) -> int:
        fives = sum(t.nbytes for t in self.fives[:2]) if self.fives is not None else 0
        return sum(t.nbytes for t in self.tensors if t is not None) + fives

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] times the weight, in x's dtype."""
        if self.fives is not None and x.shape[0] == 1:
            _, tile_scales, tile_offsets = self.tensors
            assert tile_scales is not None
            out = dot8.fives_mv(x, *self.fives, tile_scales, tile_offsets)
        else:
            out = self._matmul(x, *self.tensors)
        # llmchat's kernel also returns the outputs its tiles were padded with (none where out is a multiple of 8).
        return out if out.shape[1] == self.out_features else out[:, : self.out_features].contiguous()


def four_bit_levels(nibbles: torch.Tensor) -> torch.Tensor:
    """Packed levels' low four bits, uint8 [out, groups, GROUP] (the inverse of `pack`'s nibbles)."""
    groups = nibbles.view(nibbles.shape[0], -1, GROUP // 2)
    return torch.cat([groups & 15, groups >> 4], dim=-1)


def widened(levels: Levels) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]:
    """A grid's levels one int8 each [out, in], with its scales and offsets, as llmchat's kernel takes them, and each
    group's shift where unsigned levels whose offset is a whole number of steps (Q4_0's, Q5_0's) became signed ones
    without it (else None)."""
    values, scales, offsets, fifth = levels
    if offsets is None:
        return (values, scales, None), None
    unpacked = four_bit_levels(values).to(torch.int16)
    if fifth is not None:
        bits = (fifth.view(values.shape[0], -1, GROUP // 8, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
        unpacked += 16 * bits.flatten(2).to(torch.int16)
    unpacked = unpacked.flatten(1)
    signed = _signed((unpacked, scales, offsets))
    if signed is None:
        return (unpacked.to(torch.int8).contiguous(), scales, offsets), None
    (shifted, _, _), shift = signed
    return (shifted.to(torch.int8).contiguous(), scales, None), shift


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
    return pack(levels.flatten(1), scale.squeeze(-1), low.squeeze(-1))


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
    return pack(levels.flatten(1), scale.squeeze(-1), None)


def _torch_int4(levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """torch's packed int4 layout of a grid, with scales and zeros rounded to bfloat16 as its kernel takes them.

    A Q8_0 level q splits exactly into two 4-bit ones, q + 128 = 16 * high + low: the weight is high's grid
    (scale 16 s) plus low's (scale s), stored side by side along the input as one matmul over the input twice.
    """
    scale = scales.unsqueeze(-1)
    if offsets is not None:
        # torch's kernel computes (level - 8) * scale + zero.
        return _pack(four_bit_levels(levels), scale, offsets.unsqueeze(-1) + 8 * scale)
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


def crossover(
    seconds_at: Callable[[int], tuple[float, float]],
    name: str = "4-bit",
    candidates: tuple[int, ...] = CANDIDATE_ROWS,
    baseline: str = "dense",
) -> int:
    """The most rows for which the `name` matmuls (the 4-bit ones) beat the `baseline` ones, 0 if never: row counts
    are tried in `candidates` order until the baseline wins. `seconds_at(rows)`: (baseline, name) seconds; `name`
    says in the log which matmuls they are."""
    rows_won = 0
    for rows in candidates:
        base_s, own_s = seconds_at(rows)
        if own_s >= base_s:  # a loss is timed again: one disturbed by other work must not end the search
            base_again, own_again = seconds_at(rows)
            base_s, own_s = min(base_s, base_again), min(own_s, own_again)
        log.info("%s at %d rows: %.1f ms, %s %.1f ms", name, rows, own_s * 1e3, baseline, base_s * 1e3)
        if own_s >= base_s:
            break
        rows_won = rows
    return rows_won


def torch_kernel_is_faster(grids: list[Grid], width: int, dtype: torch.dtype) -> bool:
    """Whether torch's int4 kernel multiplies one row by these grids (llmchat's kernel's) faster than llmchat's:
    where torch has AVX-512 code and llmchat's kernel only AVX2, the flags alone do not say. False where torch's
    cannot take one of them."""
    packed = [g.dot8_levels for g in grids]  # packed again from the kernel's bytes: once
    if not all(torch_takes(levels) for levels in packed):
        return False
    theirs = [Grid(*levels, dot8_kernel=False) for levels in packed]
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
