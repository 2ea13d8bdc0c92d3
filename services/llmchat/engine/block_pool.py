"""The KV block pool's bookkeeping: which blocks each sequence holds, which hold a cached prefix, which are free.

The keys and values live in one preallocated tensor per layer (paged_kv.py), cut into blocks of
`block_size` tokens; this module only hands out block numbers. A block is referenced by every sequence
whose block table lists it. A full block whose tokens are known is cached under its chain key (the
chain id of the block before it, its own tokens), so a later prompt starting with the same tokens
takes references to the same blocks instead of computing them (automatic prefix caching, as in vLLM
and nano-vllm). A cached block nobody references stays in the pool until its memory is needed; such
blocks are evicted least recently used first, and a chain's blocks are released leaf first, so a
chain's end goes before its start. No torch here.
"""

from collections import OrderedDict
from dataclasses import dataclass

ROOT = -1  # the chain id before a chain's first block

ChainKey = tuple[int, tuple[int, ...]]


class PoolFull(Exception):
    """Not enough free or evictable blocks for what was asked."""


@dataclass(slots=True)
class PrefixStats:
    num_lookups: int = 0
    num_prompt_tokens: int = 0  # prompt tokens looked up
    num_cached_tokens: int = 0  # of those, found in the pool
    num_evicted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16, caching: bool = True) -> None:
        """`caching`: whether full blocks are kept for reuse by later prompts (prefix caching)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.refs = [0] * num_blocks
        # Hold nothing anybody may want; last freed, first reused, so a CPU's untouched pages stay uncommitted.
        self.free = list(range(num_blocks - 1, -1, -1))
        # Blocks ever handed out: never-used ones leave `free` in ascending order, so this is one past the highest.
        self.touched = 0
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently used first
        self.cached: dict[ChainKey, int] = {}  # chain key -> block
        self.key_of: dict[int, ChainKey] = {}  # block -> its chain key, for cached blocks
        self.chain_id: dict[int, int] = {}  # cached block -> the id its successors' keys name
        self.stats = PrefixStats()
        self._next_chain_id = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now: the empty ones and the cached ones nobody references."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def describe(self) -> dict:
        return {
            "block_size": self.block_size,
            "blocks_total": self.num_blocks,
            "blocks_used": self.num_used,
            "blocks_cached": len(self.evictable),
            "blocks_free": len(self.free),
            "blocks_touched": self.touched,
        }

    def describe_prefix(self) -> dict:
        stats = self.stats
        return {
            "block_size": self.block_size,
            "num_blocks": len(self.cached),
            "num_tokens": len(self.cached) * self.block_size,
            "hit_rate": round(stats.hit_rate, 4),
            "num_lookups": stats.num_lookups,
            "num_cached_tokens": stats.num_cached_tokens,
            "num_prompt_tokens": stats.num_prompt_tokens,
            "num_evicted": stats.num_evicted,
        }

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _walk(self, tokens: list[int]) -> list[int]:
        """The cached blocks `tokens` starts with; the last token is never matched (its logits are needed)."""
        if not self.caching:
            return []
        size, parent, found = self.block_size, ROOT, []
        for i in range((len(tokens) - 1) // size):
            block = self.cached.get((parent, tuple(tokens[i * size : (i + 1) * size])))
            if block is None:
                break
            found.append(block)
            parent = self.chain_id[block]
        return found

    def num_cached(self, tokens: list[int]) -> int:
        """How many leading tokens `match` would find, without counting a lookup or taking references."""
        return len(self._walk(tokens)) * self.block_size

    def blocks_needed(self, tokens: list[int], extra: int = 0) -> int:
        """Blocks admitting `tokens` (and `extra` more blocks) takes from the free ones: cached blocks that some
        sequence already references cost nothing."""
        shared = sum(1 for b in self._walk(tokens) if self.refs[b] > 0)
        return self.blocks_for(len(tokens)) - shared + extra

    def match(self, tokens: list[int], count: bool = True) -> list[int]:
        """References the cached blocks `tokens` starts with and returns them; `count`: in the hit rate."""
        found = self._walk(tokens)
        for block in found:
            self._take(block)
        if not count:
            return found
        self.stats.num_lookups += 1
        self.stats.num_prompt_tokens += len(tokens)
        self.stats.num_cached_tokens += len(found) * self.block_size
        return found

    def allocate(self, n: int) -> list[int]:
        """`n` blocks referenced once each; empty ones first, then the least recently used cached ones."""
        if n > self.num_free:
            raise PoolFull(f"{n} blocks asked, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
                self.touched = max(self.touched, block + 1)
            else:
                block, _ = self.evictable.popitem(last=False)
                self._forget(block)
                self.stats.num_evicted += 1
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more reference to each (a fork reading its parent's full blocks)."""
        for block in blocks:
            self._take(block)

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each; leaf first, so the chain's end is evicted before its start."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def commit(self, blocks: list[int], tokens: list[int], num_committed: int, parent: int) -> tuple[int, int]:
        """Caches the full blocks of a sequence past its first `num_committed`, whose tokens (prompt and reply so far,
        all computed) are `tokens`; `parent` is the chain id of block `num_committed - 1`. Returns the new count and
        chain id, for the next call. A block whose key is already cached (computed by two sequences at once) stays
        private to this sequence; the chain goes on through the cached one."""
        if not self.caching:
            return num_committed, parent
        size = self.block_size
        for i in range(num_committed, len(tokens) // size):
            key = (parent, tuple(tokens[i * size : (i + 1) * size]))
            existing = self.cached.get(key)
            if existing is None:
                existing = blocks[i]
                self.cached[key] = existing
                self.key_of[existing] = key
                self.chain_id[existing] = self._next_chain_id
                self._next_chain_id += 1
            parent = self.chain_id[existing]
            num_committed = i + 1
        return num_committed, parent

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def _forget(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.cached[key]
            del self.chain_id[block]
