"""4-bit copies of weights that already sit on a 4-bit grid, for decode steps with few rows.

Decoding a few rows reads every weight once per token, so on the CPU that step is bound by memory
bandwidth. A Q4_1 GGUF stores 4-bit values in groups of 32 along each row, with a scale and an
offset per group, the group's lowest value at level 0 and its highest at 15; bfloat16 spends 16
bits on each of them again. Where the converted float32 weights lie exactly on such a grid, the
fused pass also keeps them in torch's packed int4 layout (scale and offset rounded to bfloat16, as
its kernel takes them: the same rounding bfloat16 weights get) and uses it for steps of up to
MAX_ROWS rows. Larger batches keep the bfloat16 matmul, faster once many rows share each weight
read. A weight off the grid gets no copy: a bfloat16 checkpoint's, or a 4-bit type whose groups
need not span all 16 levels (Q4_0, the K-quants), where a group that does not fails the exact check.
"""

import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("llmchat.int4")

GROUP = 32
# Decode steps of the bundled model on the 2-core test VM, bfloat16 -> 4-bit: 1 row 26 -> 15 ms,
# 4 rows 25 -> 18 ms, 8 rows 30 -> 27 ms, 12 rows 31 -> 34 ms.
MAX_ROWS = 8

Int4Weight = tuple[torch.Tensor, torch.Tensor]  # (packed int4, scales and zeros [in / GROUP, out, 2])
CACHE_FILE = "int4.safetensors"
# Bump the number when to_int4's output changes; the packed layout may differ by torch build and CPU.
FORMAT = f"1 torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def load_grids(checkpoint: Path, projections: list[list[str]]) -> list[Int4Weight | None]:
    """The 4-bit form of each projection (its parts' parameter names, fused in order), or None off the grid.

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
                    (f.get_tensor(f"{k}.packed"), f.get_tensor(f"{k}.scales")) if f"{k}.packed" in stored else None
                    for k in keys
                ]
    with ExitStack() as files:
        # Each checkpoint file opened once; a name is looked up in the file that holds it.
        holder = {}
        for path in sorted(checkpoint.glob("*.safetensors")):
            if path.name != CACHE_FILE:
                f = files.enter_context(safe_open(path, framework="pt"))
                holder.update(dict.fromkeys(f.keys(), f))
        grids = []
        for names in projections:
            parts = [holder[name].get_tensor(name) if name in holder else None for name in names]
            grids.append(to_int4(torch.cat(parts)) if all(p is not None for p in parts) else None)
    tensors = {}
    for key, grid in zip(keys, grids, strict=True):
        if grid is not None:
            tensors[f"{key}.packed"], tensors[f"{key}.scales"] = grid
    temporary = checkpoint / f".{CACHE_FILE}.{os.getpid()}.tmp"  # replicas starting together each write their own
    try:
        save_file(tensors, temporary, metadata={"format": FORMAT, "keys": json.dumps(keys)})
        os.replace(temporary, cache)
    except OSError as exc:  # a read-only cache costs the check at every start, nothing more
        log.warning("could not keep the 4-bit weights in %s: %s", checkpoint, exc)
    return grids


def to_int4(weight: torch.Tensor) -> Int4Weight | None:
    """The packed form of a float32 [out, in] weight whose rows are 4-bit values in groups of 32, else None."""
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
    # torch's kernel computes (level - 8) * scale + zero.
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32).view(out_features, -1), 2)
    return packed, scales_and_zeros


def matmul(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    packed, scales_and_zeros = weight
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)
