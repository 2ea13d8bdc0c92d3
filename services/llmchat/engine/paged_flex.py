"""Decoding rows' attention on a GPU: torch's FlexAttention over the pool's blocks, read in place.

The pool's keys of one layer, [kv_heads, blocks, 16, dim], are one [1, kv_heads, blocks * 16, dim] tensor
without a copy. Every decoding row's queries go through one FlexAttention call per layer over it:

- the block mask lists, for each group of 16 queries, the blocks of the rows in that group (their tables'
  union), so the kernel loads a row's blocks once per group and never the rest of the pool;
- the mask function maps a pool position back to its place in the query's own sequence (a per-row inverse
  of the block tables) and keeps what is at or before the query, so rows with several pending tokens attend
  causally and shared (prefix-cached, forked) blocks serve every row that holds them;
- grouped key/value heads are never expanded (enable_gqa).

It comes with torch (Triton kernels on CUDA and ROCm, nothing to install), takes 16-token blocks (torch's
flash-attention paged path wants 256-token blocks, FlashInfer another layout), and is chosen only after a
start-up check on the device against SDPA over gathered blocks (`check`); /health names the result. Its
kernel runs in 16x16 tiles, as vLLM's FlexAttention backend does for 16-token blocks. On the CPU llmchat's own
kernel (paged_attention.cpp) is used instead: for 8 rows of 500 tokens (Qwen2.5-0.5B's heads, bfloat16, a
2-core AMX host) compiled FlexAttention took 9.9 ms a layer and that kernel 0.21 ms, and inductor's CPU
template would not compile the mask function with dynamic shapes (only a static kernel per shape).
"""

import functools
import logging
import time
from array import array
from collections.abc import Iterable
from itertools import chain

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, FlexKernelOptions, flex_attention

log = logging.getLogger(__name__)

QUERY_BLOCK = 16
SCRATCH_BLOCKS = 128  # blocks the start-up check writes
# Triton's flex_attention kernel in 16x16 tiles; its decoding kernel is for a few queries of one sequence.
KERNEL_OPTIONS: FlexKernelOptions = {"BLOCK_M": QUERY_BLOCK, "BLOCK_N": 16, "BACKEND": "TRITON"}


@functools.cache
def compiled_flex():
    return torch.compile(flex_attention, fullgraph=True)


class FlexRows:
    """One step's decoding rows for FlexAttention: each row's block table, tokens already in its blocks and
    pending tokens (whose keys and values are written before attention). Compiled on a GPU; elsewhere (tests
    only: llmchat does not choose it on the CPU) torch's eager reference runs, every query against the whole
    pool, with the same mask function."""

    def __init__(
        self,
        rows: list[tuple[list[int], int, int]],
        num_blocks: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        held = [table[: -(-(past + new) // block_size)] for table, past, new in rows]  # the blocks each row reads
        row_of = [i for i, (_, _, new) in enumerate(rows) for _ in range(new)]
        self.num_tokens = len(row_of)
        query_row = _ints(row_of, device)
        query_position = _ints([p for _, past, new in rows for p in range(past, past + new)], device)
        # logical[row, block]: the block's index in the row's table, -1 where the row does not hold it. Tables are
        # padded with an extra column past the pool's blocks, which no key maps to.
        width = max(map(len, held))
        tables = _ints(chain.from_iterable(h + [num_blocks] * (width - len(h)) for h in held), device)
        logical = torch.full((len(rows), num_blocks + 1), -1, dtype=torch.int32, device=device)
        order = torch.arange(width, dtype=torch.int32, device=device).expand(len(rows), width)
        logical.scatter_(1, tables.view(len(rows), width).long(), order)

        def mask_mod(b, h, q, kv):
            block = logical[query_row[q], kv // block_size]
            return (block >= 0) & (block * block_size + kv % block_size <= query_position[q])

        groups = []
        for start in range(0, self.num_tokens, QUERY_BLOCK):
            members = dict.fromkeys(row_of[start : start + QUERY_BLOCK])
            groups.append(list(dict.fromkeys(chain.from_iterable(held[r] for r in members))))  # shared blocks once
        most = max(map(len, groups))
        counts = _ints([len(g) for g in groups], device)
        indices = _ints(chain.from_iterable(g + [0] * (most - len(g)) for g in groups), device).view(len(groups), most)
        self.mask = BlockMask.from_kv_blocks(
            counts[None, None],
            indices[None, None],
            BLOCK_SIZE=(QUERY_BLOCK, block_size),
            mask_mod=mask_mod,
            seq_lengths=(self.num_tokens, num_blocks * block_size),
            compute_q_blocks=False,
        )
        self.compiled = device.type == "cuda"

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """q [1, heads, tokens, dim] (the rows' tokens in order) over one layer's pool; returns the same shape."""
        kv_heads, blocks, size, dim = keys.shape
        k, v = keys.view(1, kv_heads, blocks * size, dim), values.view(1, kv_heads, blocks * size, dim)
        if not self.compiled:
            return flex_attention(q, k, v, block_mask=self.mask, scale=scale, enable_gqa=True)
        return compiled_flex()(
            q, k, v, block_mask=self.mask, scale=scale, enable_gqa=True, kernel_options=KERNEL_OPTIONS
        )


def check(keys: torch.Tensor, values: torch.Tensor, heads: int) -> str | None:
    """Runs FlexAttention over random blocks of an idle pool layer (its `keys` and `values`, overwritten) against
    SDPA over the same blocks gathered, at two batch shapes: the pool's own shape and the second call make
    torch.compile build the kernel the first requests will use. Returns why it cannot serve (an exception, or
    outputs that differ), or None when it can."""
    start = time.perf_counter()
    kv_heads, num_blocks, _, dim = keys.shape
    if num_blocks < SCRATCH_BLOCKS:  # a pool too small to hold the check: check on one of its own
        keys, values = (t.new_zeros(kv_heads, SCRATCH_BLOCKS, 16, dim) for t in (keys, values))
        num_blocks = SCRATCH_BLOCKS
    device, gen = keys.device, torch.Generator().manual_seed(0)
    order = torch.randperm(SCRATCH_BLOCKS, generator=gen).tolist()
    for pool in (keys, values):
        pool[:, :SCRATCH_BLOCKS].copy_(torch.randn(pool[:, :SCRATCH_BLOCKS].shape, generator=gen))
    cases = [
        [(order[0:3], 40, 1), (order[3:5], 20, 3), (order[0:2], 31, 1)],  # a shared prefix, several pending tokens
        [(order[5 + 5 * i : 10 + 5 * i], 17 + 3 * i, 1) for i in range(20)],  # more rows than one query group
    ]
    try:
        for rows in cases:
            tokens = sum(new for _, _, new in rows)
            q = torch.randn(1, heads, tokens, dim, generator=gen).to(device, keys.dtype)
            got = FlexRows(rows, num_blocks, 16, device).attend(q, keys, values, dim**-0.5)
            want = _gathered_reference(q, keys, values, rows, dim**-0.5)
            error = (got.float() - want).abs().max().item()
            if not error < 2e-2:
                return f"FlexAttention differs from SDPA by {error:.3g} on this device"
    except Exception as exc:  # noqa: BLE001 - any failure means the fallback serves, with the reason shown
        return f"FlexAttention failed its start-up check: {type(exc).__name__}: {str(exc)[:200]}"
    log.info("FlexAttention over the KV pool checked in %.1fs", time.perf_counter() - start)
    return None


def _ints(values: Iterable[int], device: torch.device) -> torch.Tensor:
    """int32 values on the device. Through array, not torch.tensor: for 64 rows of 2k tokens, torch.tensor's
    conversion of the step's lists took 5 ms of the 8 ms it took to build a step's mask on this host."""
    return torch.frombuffer(array("i", values), dtype=torch.int32).to(device, non_blocking=True)


def _gathered_reference(q, keys, values, rows, scale: float) -> torch.Tensor:
    """Each row's queries by SDPA in float32 over its blocks gathered, causal among its pending tokens."""
    kv_heads, dim, outs, start = keys.shape[0], keys.shape[3], [], 0
    for table, past, new in rows:
        length = past + new
        k, v = (t[:, table].reshape(kv_heads, -1, dim)[None, :, :length].float() for t in (keys, values))
        allowed = torch.arange(length, device=q.device)[None, :] <= torch.arange(past, length, device=q.device)[:, None]
        part = q[:, :, start : start + new].float()
        outs.append(F.scaled_dot_product_attention(part, k, v, attn_mask=allowed, scale=scale, enable_gqa=True))
        start += new
    return torch.cat(outs, dim=2)
