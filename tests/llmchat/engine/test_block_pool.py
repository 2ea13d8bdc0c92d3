"""The KV block pool's bookkeeping, without a model: references, prefix hits by chain, LRU eviction leaf first."""

import pytest

from llmchat.engine.block_pool import BlockPool, PoolFull


def test_allocate_and_release_return_every_block():
    pool = BlockPool(8, block_size=4)
    a, b = pool.allocate(3), pool.allocate(5)
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0
    with pytest.raises(PoolFull):
        pool.allocate(1)
    pool.release(a)
    pool.release(b)
    assert pool.describe() | {"block_size": 4} == {
        "block_size": 4,
        "blocks_total": 8,
        "blocks_used": 0,
        "blocks_cached": 0,
        "blocks_free": 8,
        "blocks_touched": 8,
    }


def test_touched_counts_the_blocks_ever_handed_out():
    """A freed block is the next one reused, so blocks never written stay untouched (uncommitted pages)."""
    pool = BlockPool(8, block_size=4)
    pool.release(pool.allocate(3))
    pool.release(pool.allocate(2))
    assert pool.describe()["blocks_touched"] == 3
    pool.allocate(4)
    assert pool.describe()["blocks_touched"] == 4


def test_committed_blocks_are_matched_by_chain_and_the_last_token_is_computed():
    pool = BlockPool(8, block_size=4)
    tokens = list(range(10))
    blocks = pool.allocate(3)
    assert pool.commit(blocks, tokens, 0, -1)[0] == 2  # the last two tokens wait for a full block
    assert pool.match(tokens) == blocks[:2]
    assert pool.match(list(range(8))) == blocks[:1]  # the 8th token must be computed for its logits
    assert pool.match(list(range(4, 10)) + [0] * 4) == []  # the same tokens at another position
    assert pool.num_cached([0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4
    assert pool.stats.num_lookups == 3 and pool.refs[blocks[0]] == 3


def test_a_hit_takes_references_and_a_released_chain_stays_cached():
    pool = BlockPool(4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    first = pool.allocate(3)
    pool.commit(first, tokens[:4], 0, -1)
    pool.release(first)
    assert pool.describe()["blocks_cached"] == 2 and pool.describe()["blocks_free"] == 2
    hit = pool.match(tokens)
    assert hit == first[:2] and pool.describe()["blocks_cached"] == 0 and pool.num_used == 2
    # Blocks somebody references cost a newcomer with the same prompt nothing.
    assert pool.blocks_needed(tokens) == 1


def test_eviction_is_least_recently_used_and_leaf_first():
    pool = BlockPool(4, block_size=2)
    old = pool.allocate(3)
    pool.commit(old, [1, 2, 3, 4, 5, 6], 0, -1)
    pool.release(old)  # cached: the chain's end is the first to go
    pool.allocate(2)  # the free block, then the chain's last block
    assert pool.num_cached([1, 2, 3, 4, 5, 6, 7]) == 4 and pool.stats.num_evicted == 1
    pool.allocate(1)
    assert pool.num_cached([1, 2, 3, 4, 5, 6, 7]) == 2


def test_a_block_computed_twice_is_cached_once_and_the_chain_goes_on():
    pool = BlockPool(8, block_size=2)
    a, b = pool.allocate(2), pool.allocate(3)
    pool.commit(a, [1, 2, 3, 4], 0, -1)
    count, _ = pool.commit(b, [1, 2, 3, 4, 5, 6], 0, -1)
    assert count == 3 and len(pool.cached) == 3
    assert pool.num_cached([1, 2, 3, 4, 5, 6, 0]) == 6 and pool.key_of[b[2]][0] == pool.chain_id[a[1]]
    pool.release(b)
    assert b[0] in pool.free and b[2] in pool.evictable  # b's duplicates were private


def test_shared_blocks_are_freed_by_their_last_reference():
    pool = BlockPool(4, block_size=2, caching=False)
    blocks = pool.allocate(2)
    pool.share(blocks)
    pool.release(blocks)
    assert pool.num_free == 2
    pool.release(blocks)
    assert pool.num_free == 4 and pool.commit(blocks, [1, 2, 3, 4], 0, -1) == (0, -1)
