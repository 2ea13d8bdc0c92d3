"""Automatic prefix caching: the KV of earlier prompts and replies, kept in blocks of tokens for reuse.

A block holds the keys and values of `block_size` tokens at fixed positions, so it is only valid after
the exact tokens before it: its key is (the block before it, its own tokens), which makes a lookup an
exact walk down a chain of blocks (no hash collisions to guard against). Blocks are copied out of a
sequence's cache when it computes them and copied into a newcomer's cache when its prompt starts with
them, so a running sequence never holds a block and any block may be evicted at any time; eviction
takes the least recently used block that no cached block follows.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from llmchat.engine.block_pool import ROOT, PrefixStats


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    parent: int
    kv: torch.Tensor  # [layers, 2 (keys, values), kv_heads, block_size, head_dim]
    num_children: int = 0


@dataclass(slots=True)
class PrefixCache:
    capacity_bytes: int
    block_size: int = 16
    blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = field(default_factory=OrderedDict)  # LRU first
    by_id: dict[int, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    num_bytes: int = 0
    stats: PrefixStats = field(default_factory=PrefixStats)
    _next_id: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def describe(self) -> dict:
        return {
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "num_tokens": self.num_blocks * self.block_size,
            "bytes": self.num_bytes,
            "capacity_bytes": self.capacity_bytes,
            "hit_rate": round(self.stats.hit_rate, 4),
            "num_lookups": self.stats.num_lookups,
            "num_cached_tokens": self.stats.num_cached_tokens,
            "num_prompt_tokens": self.stats.num_prompt_tokens,
            "num_evicted": self.stats.num_evicted,
        }

    def _keys(self, tokens: list[int], num_blocks: int):
        """Yields the keys of the chain `tokens` spells, as long as its blocks are cached."""
        parent = ROOT
        size = self.block_size
        for i in range(num_blocks):
            key = (parent, tuple(tokens[i * size : (i + 1) * size]))
            block = self.blocks.get(key)
            if block is None:
                return
            yield key
            parent = block.block_id

    def match(self, tokens: list[int]) -> list[Block]:
        """The cached blocks `tokens` starts with; the last token is always left to compute (it gives the logits)."""
        keys = list(self._keys(tokens, (len(tokens) - 1) // self.block_size))
        self._touch(keys)
        self.stats.num_lookups += 1
        self.stats.num_prompt_tokens += len(tokens)
        self.stats.num_cached_tokens += len(keys) * self.block_size
        return [self.blocks[key] for key in keys]

    def num_cached(self, tokens: list[int]) -> int:
        """How many leading tokens `match` would find, without counting a lookup or touching anything."""
        return sum(1 for _ in self._keys(tokens, (len(tokens) - 1) // self.block_size)) * self.block_size

    def insert(self, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
        """Caches the full blocks of `tokens` not cached yet; returns how many of its leading blocks are now cached.

        `keys[layer]` and `values[layer]` are [kv_heads, >= len(tokens), head_dim], position 0 first.
        Stops early, leaving the rest uncached, when the cache cannot make room without evicting this chain.
        """
        size = self.block_size
        num_full = len(tokens) // size
        parent = ROOT
        chain: list[tuple[int, tuple[int, ...]]] = []
        for i in range(num_full):
            key = (parent, tuple(tokens[i * size : (i + 1) * size]))
            block = self.blocks.get(key)
            if block is None:
                kv = _stack(keys, values, i * size, (i + 1) * size)
                if not self._make_room(kv.nbytes, protected=set(chain)):
                    break
                block = self._add(key, parent, kv)
            chain.append(key)
            parent = block.block_id
        self._touch(chain)
        return len(chain)

    def load(self, blocks: list[Block]) -> torch.Tensor:
        """The blocks' keys and values in one tensor [layers, 2, kv_heads, tokens, head_dim]."""
        return torch.cat([b.kv for b in blocks], dim=3)

    def _add(self, key: tuple[int, tuple[int, ...]], parent: int, kv: torch.Tensor) -> Block:
        block = Block(self._next_id, parent, kv)
        self._next_id += 1
        self.blocks[key] = block
        self.by_id[block.block_id] = key
        self.num_bytes += kv.nbytes
        if parent != ROOT:
            self.blocks[self.by_id[parent]].num_children += 1
        return block

    def _touch(self, chain: list[tuple[int, tuple[int, ...]]]) -> None:
        # Leaf first, so a block is always more recently used than the blocks after it: LRU order then
        # reaches a chain's end before its start, and an evicted block never strands cached children.
        for key in reversed(chain):
            self.blocks.move_to_end(key)

    def _make_room(self, num_bytes: int, protected: set) -> bool:
        if num_bytes > self.capacity_bytes:
            return False
        while self.num_bytes + num_bytes > self.capacity_bytes:
            victim = next((k for k, b in self.blocks.items() if b.num_children == 0 and k not in protected), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, key: tuple[int, tuple[int, ...]]) -> None:
        block = self.blocks.pop(key)
        del self.by_id[block.block_id]
        self.num_bytes -= block.kv.nbytes
        self.stats.num_evicted += 1
        if block.parent != ROOT:
            self.blocks[self.by_id[block.parent]].num_children -= 1


def _stack(keys: list[torch.Tensor], values: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """One block's slice of every layer as [layers, 2, kv_heads, tokens, head_dim]."""
    return torch.stack([torch.stack((k[:, start:end], v[:, start:end])) for k, v in zip(keys, values, strict=True)])
