"""How the fused pass calls scaled_dot_product_attention, decided once per step.

SDPA's fast kernels are picky: flash attention takes no mask, and the memory-efficient one takes grouped
key/value heads only on recent CUDA builds and never on ROCm. With a mask and grouped heads a GPU falls
to the "math" kernel, which upcasts the cache and builds full score matrices. So: no mask where no row is
padded (a decode step sees every cached key; a prompt with nothing cached before it is plain causal), and
where a mask is needed, one additive mask per step (not a boolean one converted by every layer) and, on a
GPU, key/value heads expanded to the query heads. The CPU keeps grouped heads: expanding would copy the
whole cache every layer, and its kernels take them.
"""

import torch
import torch.nn.functional as F


def attention_mask(mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """[rows, 1, queries, keys] booleans from the runner's [rows, keys] mask (1 = real token), causal over queries.

    A padding query may always see itself: a query that sees nothing would make NaN keys and values
    for the next layer, and a masked NaN still poisons the weighted sum.
    """
    real = mask.bool()[:, None, None, :]
    if num_queries == 1:
        return real
    keys = mask.shape[1]
    key_index = torch.arange(keys, device=mask.device)
    query_index = torch.arange(keys - num_queries, keys, device=mask.device)[:, None]
    return (key_index <= query_index) & (real | (key_index == query_index))


class Attention:
    """One step's attention call for every layer: `mask` [rows, keys] (None: no row is padded), `num_queries`
    new tokens per row after `past` cached ones."""

    def __init__(
        self, mask: torch.Tensor | None, num_queries: int, past: int, like: torch.Tensor, expand_heads: bool
    ) -> None:
        self.causal = False
        self.bias: torch.Tensor | None = None
        if mask is None and past and num_queries > 1:
            # SDPA's is_causal aligns the first query with the first key: wrong with keys cached before.
            mask = torch.ones(like.shape[0], past + num_queries, device=like.device)
        if mask is None:
            self.causal = num_queries > 1
        else:
            allowed = attention_mask(mask, num_queries)
            self.bias = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
            self.bias.masked_fill_(~allowed, float("-inf"))
        self.expand = expand_heads and self.bias is not None

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        if self.expand:
            groups = q.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.bias, scale=scale)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self.bias, is_causal=self.causal, scale=scale, enable_gqa=True
        )
