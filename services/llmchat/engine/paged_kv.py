"""The paged KV pool's memory, and one step's attention over block tables.

Every layer has one keys and one values tensor, [kv_heads, blocks, block_size, head_dim], allocated
once at start-up. A step's new keys and values are written into their sequences' slots in place. Then:

- On the CPU, where llmchat's kernels build (dot8.py), every decoding row's queries go through one call
  of its paged decode kernel (paged_attention.cpp), which reads each sequence's blocks in place and each
  key once for all the query heads that share it. For 8 rows of 2k tokens (Qwen2.5-0.5B's shapes,
  bfloat16, every layer's blocks cold as in a real step) it took 1.0-1.5 ms a layer on a 2-core AMX host
  (blocks in order or scattered), where SDPA per sequence took 1.6 ms over contiguous per-sequence copies
  (which the pool would have to keep beside it, twice the memory), about 3 ms gathering blocks, and 5-6 ms
  as one padded, masked SDPA over all rows.
- On a GPU, decoding rows go through one FlexAttention call per layer over the pool in place
  (paged_flex.py), once a start-up check on the device has passed.
- Prompt chunks, and decoding rows where neither can run, attend with SDPA over the sequence's blocks
  gathered block by block (16 tokens of one head are one contiguous run, so a gather is a few large
  copies), grouped key/value heads never expanded (enable_gqa). A prompt chunk's attention is a matmul
  that SDPA runs near peak; the gather is small beside it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmchat.engine import dot8
from llmchat.engine.gpu import on_device
from llmchat.engine.kv_cache import kv_bytes_per_token
from llmchat.engine.paged_flex import FlexRows

FLOAT16_MAX = torch.finfo(torch.float16).max
KERNEL, FLEX = "llmchat's paged decode kernel", "FlexAttention"  # how decoding rows attend in place


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
        query_dtype: torch.dtype | None = None,
    ) -> None:
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        # torch.empty: on the CPU pages are only committed when a block is first written.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.query_dtype = query_dtype or dtype  # the model's, where the pool's differs (pool_dtype)
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.block_size * self.num_blocks

    def clear_values(self, blocks: torch.Tensor) -> None:
        """Zeroes the values of `blocks` in every layer (see PagedRunner.fresh)."""
        for values in self.values:
            values.index_fill_(1, blocks, 0)

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
    is_prompt: bool = False  # a chunk of a prompt, not a decode row's pending tokens


class PagedBatch:
    """One step's layout: the new tokens of every segment side by side in one row, where they go in the pool, and
    how each segment attends (over its own blocks, causally among its new tokens). With `in_place` (KERNEL or
    FLEX), decoding rows attend through it, reading their blocks in place; other segments gather."""

    def __init__(
        self,
        kv: PagedKV,
        segments: list[Segment],
        device: torch.device,
        expand_heads: bool,
        in_place: str | None = None,
    ) -> None:
        size = kv.block_size
        self.kv = kv
        self.expand_heads = expand_heads
        slots: list[int] = []
        self.spans: list[tuple[int, int]] = []
        # Segments that gather: (start, end, block table or first of consecutive blocks, length, causal mask).
        self.gathers: list[tuple[int, int, torch.Tensor | int, int, torch.Tensor | None]] = []
        queries: list[int] = []  # the kernel's: each query token, its sequence's block table and context length
        tables: list[list[int]] = []
        lengths: list[int] = []
        rows: list[tuple[list[int], int, int]] = []  # FlexAttention's: each row's table, past and new tokens
        start = 0
        for seg in segments:
            length = seg.num_past + seg.num_new
            end = start + seg.num_new
            slots.extend(seg.blocks[p // size] * size + p % size for p in range(seg.num_past, length))
            self.spans.append((start, end))
            table = seg.blocks[: -(-length // size)]
            if in_place and not seg.is_prompt:
                queries += range(start, end)
                tables += [table] * seg.num_new
                lengths += range(seg.num_past + 1, length + 1)
                rows.append((table, seg.num_past, seg.num_new))
            else:
                # Blocks that follow one another in the pool are read in place, without a gather.
                consecutive = table == list(range(table[0], table[0] + len(table)))
                first_or_table = table[0] if consecutive else on_device(table, device)
                self.gathers.append((start, end, first_or_table, length, _causal_bias(seg, kv.query_dtype, device)))
            start = end
        self.num_tokens = start
        self.slots = on_device(slots, device)
        self.last = on_device([end - 1 for _, end in self.spans], device)
        self.decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.flex: tuple[FlexRows, torch.Tensor] | None = None
        if queries and in_place == FLEX:
            self.flex = FlexRows(rows, kv.num_blocks, size, device), on_device(queries, device)
        elif queries:
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            self.decode = tuple(torch.tensor(x, dtype=torch.int32) for x in (queries, padded, lengths))  # type: ignore[assignment]
        # A step with a prompt chunk takes the prompt's kernels (projections.Linear), so a prompt's keys and values
        # never depend on its chunking.
        self.has_prompt = any(seg.is_prompt for seg in segments)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Writes this layer's new keys and values [1, kv_heads, tokens, dim] into the pool and returns every
        segment's attention output, [1, heads, tokens, dim] in the same order as `q`."""
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        heads, dim = keys.shape[0], keys.shape[3]
        if keys.dtype == torch.float16:  # a float32 model's (pool_dtype): clipped, never infinite
            k, v = k.clamp(-FLOAT16_MAX, FLOAT16_MAX), v.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        keys.view(heads, -1, dim).index_copy_(1, self.slots, k[0].to(keys.dtype))
        values.view(heads, -1, dim).index_copy_(1, self.slots, v[0].to(values.dtype))
        if self.decode is None and self.flex is None and len(self.gathers) == 1:
            return self._gathered_sdpa(q, keys, values, *self.gathers[0][2:], scale)
        out = q.new_empty((self.num_tokens, q.shape[1], q.shape[3]))  # [tokens, heads, dim]
        if self.decode is not None:
            paged_decode(q[0].transpose(0, 1), keys, values, *self.decode, scale, out)
        if self.flex is not None:
            rows, index = self.flex
            attended = rows.attend(q.index_select(2, index).to(keys.dtype), keys, values, scale)
            out.index_copy_(0, index, attended[0].transpose(0, 1).to(out.dtype))
        for start, end, table, length, mask in self.gathers:
            attended = self._gathered_sdpa(q[:, :, start:end], keys, values, table, length, mask, scale)
            out[start:end] = attended[0].transpose(0, 1)
        return out.transpose(0, 1)[None]

    def _gathered_sdpa(self, q, keys, values, table, length: int, mask: torch.Tensor | None, scale: float):
        k, v = _gathered(keys, table, length).to(q.dtype), _gathered(values, table, length).to(q.dtype)
        causal = mask is None and q.shape[2] > 1  # new tokens with nothing before them
        if self.expand_heads and mask is not None:
            # On a GPU, SDPA's kernels that take a mask do not all take grouped heads (see attention.py).
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


def paged_decode(q, keys, values, queries, tables, lengths, scale: float, out: torch.Tensor) -> None:
    """llmchat's kernel (paged_attention.cpp): writes out[queries[i]] [heads, dim], the attention of q[queries[i]]
    [heads, dim] over the first lengths[i] tokens of the blocks tables[i] of one layer's `keys` and `values`."""
    torch.ops.llmchat_attention.paged_decode(q, keys, values, queries, tables, lengths, scale, out)


def in_place_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why decoding rows cannot attend through llmchat's paged decode kernel here, or None where they do."""
    if device.type != "cpu":
        return "not on the CPU"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the KV pool is {dtype}"
    return dot8.unavailable()


def pool_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV pool's dtype: the model's, but float16 for a float32 model on a CPU where llmchat's decode kernel
    runs. Decode attention reads every cached key and value each step: 4 rows of 2.8k tokens (Qwen2.5-0.5B's
    shapes, all 24 layers) took 22 ms from a 16-bit pool against 41 ms from a float32 one, 8 rows of 2k 33 against
    48 (2-core AMD EPYC, AVX2), and the pool holds twice the tokens in the same memory. Scores and sums stay in
    float32. float16 rather than bfloat16, as llama.cpp's cache: with its 3 more bits, teacher-forced logits of
    Qwen2.5-Coder-0.5B moved by a mean KL of 1.4e-6 from a float32 pool's, against 1.8e-4 with bfloat16. Keys and
    values past float16's range (about 220 at most there) are clipped to it (PagedBatch.attend)."""
    if model_dtype == torch.float32 and in_place_kernel(device, torch.float16) is None:
        return torch.float16
    return model_dtype


def pool_bytes_per_token(model) -> int:
    """Bytes of one token's keys and values in every layer of the pool the engine builds for `model`."""
    return kv_bytes_per_token(model, pool_dtype(model.dtype, model.device))


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
