"""The paged KV pool's memory, and one step's attention over block tables.

Every layer has one keys and one values tensor, [kv_heads, blocks, block_size, head_dim], allocated
once at start-up. A step's new keys and values are written into their sequences' slots in place;
each sequence then attends over its own blocks, gathered block by block (16 tokens of one head are
one contiguous run, so a gather is a few large copies) into one contiguous [kv_heads, tokens, dim]
view per head group. Grouped key/value heads are never expanded: SDPA takes them (enable_gqa).

Measured on a 2-core CPU for 8 sequences of ~2k tokens (Qwen2.5-0.5B's shapes, bfloat16), one
layer's attention took 1.4 ms over contiguous caches, 3.5 ms gathered by token, 3 ms gathered by
block, 5-6 ms as one padded, masked SDPA over all rows (which reads every row at the longest
row's width); the per-sequence block gather is kept.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmchat.engine.gpu import on_device


class PagedKV:
    """The pool's keys and values: `num_blocks` blocks of `block_size` tokens in every layer."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        # torch.empty: on the CPU pages are only committed when a block is first written.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.block_size * self.num_blocks

    def copy_block(self, source: int, target: int) -> None:
        """Copy-on-write of a shared partial block: a fork's own copy of its parent's last block."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[:, target] = keys[:, source]
            values[:, target] = values[:, source]


@dataclass(slots=True)
class Segment:
    """One sequence's part of a step: `num_new` tokens after `num_past` already in its blocks."""

    blocks: list[int]
    num_past: int
    num_new: int
    mirror: "Mirror | None" = None  # its contiguous copy, where the runner keeps one (the CPU)
    is_prompt: bool = False  # a chunk of a prompt, not a decode row's pending tokens


class Mirror:
    """A sequence's keys and values in one contiguous buffer per layer beside the pool, appended to each step.

    On the CPU, SDPA reads a sequence's context in place only when it is contiguous; gathering its blocks
    every step took 17% of a decode step at 8 rows of 1.3k tokens (Qwen2.5-0.5B, 2 cores, AMX). The
    copy is made once, when the sequence first attends, and then grows by the step's new tokens; the
    pool stays the record (prefix caching, preemption, forks), so a mirror is dropped at any time and
    rebuilt from the blocks. It costs the running sequences' KV memory a second time.
    """

    SPARE = 64  # columns of room past the tokens, so most steps append in place

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.filled: list[int] = []

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))

    def extend(
        self, layer: int, pool: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor | int, past: int, k, v
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values [1, kv_heads, past + new, dim] after appending `k` and `v` [kv_heads, new,
        dim]; rebuilt from the pool's blocks (`table`) when the copy does not hold exactly the first `past`."""
        new = k.shape[1]
        if layer == len(self.keys):
            self.keys.append(k.new_empty(0))
            self.values.append(v.new_empty(0))
            self.filled.append(-1)
        if self.filled[layer] != past or self.keys[layer].shape[1] < past + new:
            heads, dim = k.shape[0], k.shape[2]
            keys, values = (k.new_empty((heads, past + new + self.SPARE, dim)) for _ in range(2))
            if past:
                if self.filled[layer] >= past:  # growing: what it holds is right
                    keys[:, :past], values[:, :past] = self.keys[layer][:, :past], self.values[layer][:, :past]
                else:
                    keys[:, :past] = _gathered(pool[0], table, past)[0]
                    values[:, :past] = _gathered(pool[1], table, past)[0]
            self.keys[layer], self.values[layer] = keys, values
        self.keys[layer][:, past : past + new] = k
        self.values[layer][:, past : past + new] = v
        self.filled[layer] = past + new
        return self.keys[layer][None, :, : past + new], self.values[layer][None, :, : past + new]


class PagedBatch:
    """One step's layout: the new tokens of every segment side by side in one row, where they go in the pool, and
    how each segment attends (over its own blocks, causally among its new tokens)."""

    def __init__(self, kv: PagedKV, segments: list[Segment], device: torch.device, expand_heads: bool) -> None:
        size = kv.block_size
        self.kv = kv
        self.expand_heads = expand_heads
        slots: list[int] = []
        tables: list[int | list[int]] = []
        self.spans: list[tuple[int, int]] = []
        self.lengths: list[int] = []
        self.masks: list[torch.Tensor | None] = []
        start = 0
        for seg in segments:
            length = seg.num_past + seg.num_new
            slots.extend(seg.blocks[p // size] * size + p % size for p in range(seg.num_past, length))
            self.spans.append((start, start + seg.num_new))
            table = seg.blocks[: -(-length // size)]
            # Blocks that follow one another in the pool are read in place, without a gather.
            tables.append(table[0] if table == list(range(table[0], table[0] + len(table))) else table)
            self.lengths.append(length)
            self.masks.append(_causal_bias(seg, kv.keys[0].dtype, device))
            start += seg.num_new
        self.slots = on_device(slots, device)
        self.tables = [t if isinstance(t, int) else on_device(t, device) for t in tables]
        self.last = on_device([end - 1 for _, end in self.spans], device)
        # A step with a prompt chunk runs dense matmuls, so a prompt's keys and values never depend on its chunking.
        self.has_prompt = any(seg.is_prompt for seg in segments)
        self.mirrors = [seg.mirror for seg in segments]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Writes this layer's new keys and values [1, kv_heads, tokens, dim] into the pool and returns every
        segment's attention output, [1, heads, tokens, dim] in the same order as `q`."""
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        heads, dim = keys.shape[0], keys.shape[3]
        keys.view(heads, -1, dim).index_copy_(1, self.slots, k[0])
        values.view(heads, -1, dim).index_copy_(1, self.slots, v[0])
        outs = []
        for i, ((start, end), table, length, mask) in enumerate(
            zip(self.spans, self.tables, self.lengths, self.masks, strict=True)
        ):
            mirror = self.mirrors[i]
            if mirror is not None:
                past = length - (end - start)
                own_k, own_v = mirror.extend(layer, (keys, values), table, past, k[0, :, start:end], v[0, :, start:end])
            else:
                own_k, own_v = _gathered(keys, table, length), _gathered(values, table, length)
            outs.append(self._sdpa(q[:, :, start:end], own_k, own_v, mask, scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _sdpa(self, q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        causal = mask is None and q.shape[2] > 1  # new tokens with nothing before them
        if self.expand_heads and mask is not None:
            # On a GPU, SDPA's kernels that take a mask do not all take grouped heads (see attention.py).
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


def _gathered(pool: torch.Tensor, table: torch.Tensor | int, length: int) -> torch.Tensor:
    """A sequence's first `length` tokens of one layer's keys or values [1, kv_heads, length, dim], from its block
    `table` (an int: the first of consecutive blocks, read in place)."""
    heads, size, dim = pool.shape[0], pool.shape[2], pool.shape[3]
    num = -(-length // size)
    blocks = pool[:, table : table + num] if isinstance(table, int) else pool.index_select(1, table[:num])
    return blocks.reshape(1, heads, num * size, dim)[:, :, :length]


def _causal_bias(seg: Segment, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The additive mask of new tokens after cached ones (SDPA's is_causal would align the first query with the
    first key); None where no mask is needed (one new token, or nothing cached before them)."""
    if seg.num_new == 1 or seg.num_past == 0:
        return None
    length = seg.num_past + seg.num_new
    queries = torch.arange(seg.num_past, length, device=device)[:, None]
    allowed = torch.arange(length, device=device)[None, :] <= queries
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, float("-inf"))
