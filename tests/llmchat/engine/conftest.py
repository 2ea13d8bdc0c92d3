"""What the engine tests share: the bundled model in float32, one-message chat prompts, and a paged step."""

import dataclasses

import pytest
import torch

from llmchat.engine.loader import ModelConfig, load_model
from llmchat.settings import Settings


@pytest.fixture(scope="module")
def loaded():
    # float32: in bfloat16 a row's attention sums round differently beside longer (padded) rows, so a
    # near-tie can flip a greedy token; the engine's bookkeeping is what these modules check. For the same
    # reason no checkpoint, so no 4-bit weights (they round activations, and serve small batches where large
    # ones take the dense matmuls; test_int4.py has them).
    model = load_model(ModelConfig("bundled", device="cpu", dtype="float32", cache_dir=Settings().cache_dir))
    return dataclasses.replace(model, checkpoint=None)


def paged_step(segments, in_place, dtype: torch.dtype, heads: int = 6, kv_heads: int = 2, dim: int = 64):
    """One step's attention over a random 16-block pool of two layers (the same pool, queries and new keys for any
    `in_place`): the PagedBatch and each layer's output."""
    from llmchat.engine.paged_kv import PagedBatch, PagedKV

    gen = torch.Generator().manual_seed(5)
    tokens = sum(s.num_new for s in segments)
    q, k, v = (torch.randn(1, n, tokens, dim, generator=gen).to(dtype) for n in (heads, kv_heads, kv_heads))
    kv = PagedKV(2, kv_heads, dim, 16, 16, dtype, torch.device("cpu"))
    for pool in (*kv.keys, *kv.values):
        pool.copy_(torch.randn(pool.shape, generator=gen))
    batch = PagedBatch(kv, segments, torch.device("cpu"), expand_heads=False, in_place=in_place)
    return batch, [batch.attend(layer, q, k, v, 0.125) for layer in range(2)]
