"""llmchat's paged decode kernel (paged_attention.cpp) against SDPA over the same blocks gathered (a whole step
through it: test_paged_flex.py)."""

import random

import pytest
import torch
import torch.nn.functional as F

from llmchat.engine import dot8
from llmchat.engine.paged_kv import paged_decode

pytestmark = pytest.mark.skipif(
    dot8.unavailable() is not None, reason=f"llmchat's kernels cannot run here: {dot8.unavailable()}"
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def pool(kv_heads: int, dim: int, dtype: torch.dtype, blocks: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(kv_heads, blocks, 16, dim, generator=gen).to(dtype) for _ in range(2))  # type: ignore[return-value]


def reference(q, keys, values, table: list[int], length: int, scale: float) -> torch.Tensor:
    """q [heads, dim] over the first `length` tokens of `table`, by SDPA in float32."""
    kv_heads, dim = keys.shape[0], keys.shape[3]
    k, v = (t[:, table].reshape(kv_heads, -1, dim)[None, :, :length].float() for t in (keys, values))
    return F.scaled_dot_product_attention(q[None, :, None].float(), k, v, scale=scale, enable_gqa=True)[0, :, 0]


# (queries and output, pool): a float32 model's pool is float16 (paged_kv.pool_dtype).
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float32 over float16": (torch.float32, torch.float16),
}


@pytest.mark.parametrize(("dtype", "pool_dtype"), DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(14, 2, 64), (32, 8, 128), (24, 2, 64), (4, 4, 64)])
def test_each_query_matches_sdpa_over_its_gathered_blocks(dtype, pool_dtype, heads, kv_heads, dim):
    keys, values = pool(kv_heads, dim, pool_dtype)
    order = list(range(keys.shape[1]))
    random.Random(1).shuffle(order)
    lengths = [1, 7, 16, 17, 100, 1000, 2500]  # partial and whole last blocks, and long enough to split
    tables = [[order.pop() for _ in range(-(-n // 16))] for n in lengths]
    width = max(map(len, tables))
    # q as the forward pass gives it: a [tokens, heads, dim] view of a wider row (queries, keys and values)
    q = torch.randn(len(lengths), heads + 2 * kv_heads, dim).to(dtype)[:, :heads]
    out = torch.full((len(lengths), heads, dim), float("nan"), dtype=dtype)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    order_of_queries = torch.arange(len(lengths), dtype=torch.int32).flip(0)  # query i of the kernel is token n-1-i
    paged_decode(
        q, keys, values, order_of_queries, padded.flip(0), torch.tensor(lengths[::-1], dtype=torch.int32), 0.1, out
    )
    for i, (table, length) in enumerate(zip(tables, lengths, strict=True)):
        expected = reference(q[i], keys, values, table, length, 0.1)
        assert torch.allclose(out[i].float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]), (i, length)


def test_a_block_outside_the_pool_is_an_error_not_a_read():
    keys, values = pool(2, 64, torch.float32, blocks=4)
    q, out = torch.randn(1, 4, 64), torch.empty(1, 4, 64)
    one = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not in the pool"):
        paged_decode(
            q,
            keys,
            values,
            one,
            torch.tensor([[0, 9]], dtype=torch.int32),
            torch.tensor([20], dtype=torch.int32),
            0.1,
            out,
        )
    with pytest.raises(RuntimeError, match="short table"):
        paged_decode(
            q,
            keys,
            values,
            one,
            torch.tensor([[0]], dtype=torch.int32),
            torch.tensor([20], dtype=torch.int32),
            0.1,
            out,
        )
