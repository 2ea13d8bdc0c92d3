"""The model runner over the paged KV pool: one forward pass per step for every decoding row and prompt chunk.

Each sequence holds a block table into the pool (paged_kv.py). Nothing is padded and nothing is copied
when a row joins or leaves: a step writes each new token's keys and values into its sequence's next
slot and attends over that sequence's blocks. A prompt's leading blocks may be cached ones (a prefix
hit takes references, block_pool.py); every block that fills up is cached at once, prompt or reply,
so the next turn of a conversation reuses both. The choices of an `n` > 1 request share their prompt's
full blocks and each copy its last, partial one.
"""

import torch

from llmchat.engine import paged_flex
from llmchat.engine.block_pool import ROOT, BlockPool
from llmchat.engine.gpu import on_device
from llmchat.engine.kv_cache import default_pool_bytes, kv_bytes_per_token, kv_shape
from llmchat.engine.paged_kv import FLEX, KERNEL, PagedBatch, PagedKV, Segment, in_place_kernel, pool_dtype
from llmchat.engine.scheduler import Sequence

BLOCK_SIZE = 16  # tokens of one KV block (the prefix cache's unit)


def in_kv(seq: Sequence) -> int:
    """Tokens whose keys and values are in the sequence's blocks."""
    if seq.is_prefilling:
        return seq.num_computed
    return seq.num_prompt_tokens + len(seq.completion_ids) - len(seq.pending)


def paged_runner(forward, model, max_context: int, pool_bytes: int | None, caching: bool) -> "PagedRunner":
    """The runner for llmchat's fused pass over a pool of `pool_bytes` (default: default_pool_bytes) allocated now."""
    dtype = pool_dtype(model.dtype, model.device)
    if pool_bytes is None:
        pool_bytes = default_pool_bytes(model, max_context, dtype)
    num_blocks = max(pool_bytes // (kv_bytes_per_token(model, dtype) * BLOCK_SIZE), 2)
    kv = PagedKV(*kv_shape(model), num_blocks, BLOCK_SIZE, dtype, model.device, query_dtype=model.dtype)
    pool = BlockPool(num_blocks, BLOCK_SIZE, caching=caching)
    return PagedRunner(forward, kv, pool, model.device, model.config.num_attention_heads)


class PagedRunner:
    def __init__(self, forward, kv: PagedKV, pool: BlockPool, device: torch.device, num_heads: int) -> None:
        self.forward = forward
        self.kv = kv
        self.pool = pool
        self.device = device
        self.num_heads = num_heads
        self.rows: list[Sequence] = []  # prefilled, decoding
        # Blocks handed out since the last step. With FlexAttention their values are zeroed before the step: it
        # reads a last block's unwritten slots and masks them, but a masked NaN left there by an earlier sequence
        # (one whose step broke) would still poison the weighted sum of the next one.
        self.fresh: list[int] = []
        self.expand_heads = device.type == "cuda"
        # How decoding rows attend in place (KERNEL, FLEX), or None with the reason they gather blocks for SDPA.
        self.in_place: str | None = None
        self.why_gathered = in_place_kernel(device, kv.keys[0].dtype)
        if self.why_gathered is None:
            self.in_place = KERNEL
        elif device.type == "cuda":
            self.why_gathered = "FlexAttention is checked at start-up (prepare)"

    def prepare(self) -> None:
        """Start-up work that would otherwise stall the first requests: on a GPU, the check (and compilation) of
        FlexAttention over the pool and the capture of CUDA graphs."""
        if self.device.type == "cuda" and self.in_place is None:
            self.why_gathered = paged_flex.check(self.kv.keys[0], self.kv.values[0], self.num_heads)
            self.in_place = FLEX if self.why_gathered is None else None
        capture_all = getattr(self.forward, "capture_all", None)
        if capture_all is not None:
            capture_all(self.device)

    def start(self, seq: Sequence) -> None:
        """Gives an admitted sequence its block table: the cached blocks its prompt starts with, then new ones for
        the rest of it (and one for each of its choices' own last block)."""
        first = seq.num_preempted == 0
        cached = self.pool.match(seq.prefill_ids, count=first)
        fresh = self._allocate(self.pool.blocks_for(len(seq.prefill_ids)) - len(cached))
        seq.blocks = cached + fresh
        seq.num_computed = len(cached) * self.pool.block_size
        if first:
            seq.num_cached_tokens = seq.num_computed
        seq.num_committed = len(cached)
        seq.chain = self.pool.chain_id[cached[-1]] if cached else ROOT
        for fork in seq.forks:
            if not fork.is_finished:
                fork.blocks = self._allocate(1)

    def blocks_short(self, seq: Sequence) -> int:
        """Blocks a decoding row lacks for its pending tokens."""
        return self.pool.blocks_for(in_kv(seq) + len(seq.pending)) - len(seq.blocks)

    def grow(self, seq: Sequence, n: int) -> None:
        seq.blocks.extend(self._allocate(n))

    def _allocate(self, n: int) -> list[int]:
        blocks = self.pool.allocate(n)
        if self.in_place == FLEX:
            self.fresh += blocks
        return blocks

    def release(self, seq: Sequence) -> None:
        """Returns the sequence's blocks to the pool (its cached ones stay cached) and takes it out of the batch."""
        if seq.blocks:
            self.pool.release(seq.blocks)
            seq.blocks = []
        if seq in self.rows:
            self.rows.remove(seq)

    def drop(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.release(seq)

    def step(self, chunks: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """One forward pass: every decoding row's pending tokens and the next `n` prompt tokens of each (sequence,
        n). Returns the sequences to sample (the rows, and those whose prompt is now done, with their choices) and
        their next-token logits. A sequence resumed after preemption rejoins the rows with the token it had."""
        rows = list(self.rows)
        segments: list[Segment] = []
        ids: list[int] = []
        positions: list[int] = []
        for seq in rows:
            past = in_kv(seq)
            segments.append(Segment(seq.blocks, past, len(seq.pending)))
            ids += seq.pending
            positions += range(past, past + len(seq.pending))
        for seq, n in chunks:
            past = seq.num_computed
            segments.append(Segment(seq.blocks, past, n, is_prompt=True))
            ids += seq.prefill_ids[past : past + n]
            positions += range(past, past + n)
        if self.fresh:
            self.kv.clear_values(on_device(self.fresh, self.device))
            self.fresh = []
        batch = PagedBatch(self.kv, segments, self.device, self.expand_heads, in_place=self.in_place)
        logits = self.forward.paged(on_device([ids], self.device), on_device([positions], self.device), batch)
        # Only now, after the pass succeeded, do its blocks count as computed (and get cached).
        for seq in rows:
            seq.pending = []
            self._commit(seq)
        sampled, picked = list(rows), list(range(len(rows)))
        for i, (seq, n) in enumerate(chunks, start=len(rows)):
            seq.num_computed += n
            self._commit(seq)
            if seq.is_prefilling:
                continue
            self.rows.append(seq)
            if seq.pending:  # resumed after preemption: its next token was drawn before
                continue
            for choice in (seq, *(f for f in seq.forks if not f.is_finished)):
                if choice is not seq:
                    self._fork(seq, choice)
                    self.rows.append(choice)
                sampled.append(choice)
                picked.append(i)
        return sampled, logits[picked] if picked != list(range(len(logits))) else logits

    def _fork(self, seq: Sequence, fork: Sequence) -> None:
        """A choice joins with its prompt's full blocks shared and its own copy of the last, partial one."""
        size = self.pool.block_size
        own = fork.blocks
        full = seq.num_prompt_tokens // size
        self.pool.share(seq.blocks[:full])
        if seq.num_prompt_tokens % size:
            self.kv.copy_block(seq.blocks[full], own[0])
            fork.blocks = seq.blocks[:full] + own
        else:
            self.pool.release(own)
            fork.blocks = seq.blocks[:full]
        fork.num_computed, fork.num_cached_tokens = seq.num_computed, seq.num_cached_tokens
        fork.num_committed, fork.chain = seq.num_committed, seq.chain

    def _commit(self, seq: Sequence) -> None:
        """Caches the sequence's blocks that filled up in this step."""
        count = in_kv(seq)
        if count // self.pool.block_size > seq.num_committed:
            tokens = (seq.prompt_ids + seq.completion_ids)[:count]  # a resumed prompt spells the same tokens
            seq.num_committed, seq.chain = self.pool.commit(seq.blocks, tokens, seq.num_committed, seq.chain)

    def describe(self) -> dict:
        """What /health shows of the pool: its blocks, memory and how sequences attend over it."""
        gathered = "SDPA per sequence over its gathered blocks, grouped heads kept"
        if self.in_place is not None:
            attention = f"decoding rows: {self.in_place}, blocks read in place; prompt chunks: {gathered}"
        else:
            attention = f"{gathered} (reading blocks in place: {self.why_gathered})"
        return self.pool.describe() | {
            "dtype": str(self.kv.keys[0].dtype).removeprefix("torch."),
            "bytes_per_token": self.kv.bytes_per_token,
            "bytes_total": self.kv.nbytes,
            "bytes_used": self.kv_cache_bytes(),
            "attention": attention,
        }

    def kv_cache_bytes(self) -> int:
        """Bytes of the pool's blocks in use by running sequences (read by metrics)."""
        return self.pool.num_used * self.kv.block_size * self.kv.bytes_per_token

    def reset(self) -> None:
        self.rows = []
