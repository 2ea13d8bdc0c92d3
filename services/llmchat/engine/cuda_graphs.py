"""Decode steps of the fused pass replayed from CUDA graphs, piece by piece around attention (LLMCHAT_CUDA_GRAPHS).

A decode step of a small model on a GPU is mostly kernel launches. A graph needs fixed shapes and
fixed memory, but the batch's KV cache grows every step and is rebuilt when rows come and go, so
only the pieces between attentions are captured: per layer, norm + q/k/v + rotation before it, and
output projection + MLP after it, plus the final norm and logits. Rows are padded up to a bucket
(1, 2, 4, 8, ...) and every bucket is captured once, at start-up.
Attention and the cache update run eagerly on the real rows.

Without capture (on the CPU) the same pieces run eagerly over the same static buffers, which is how
the tests check this path where no GPU is present.
"""

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from llmchat.engine.fused_forward import FusedForward, growing_layers
from llmchat.engine.paged_kv import PagedBatch

log = logging.getLogger("llmchat.engine.cuda_graphs")


def buckets_for(max_rows: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(sizes[-1] * 2)
    return sizes


class Bucket:
    """Static buffers for one padded batch size and the pieces that read and write them."""

    def __init__(self, fused: FusedForward, rows: int, device: torch.device, dtype: torch.dtype) -> None:
        heads, kv_heads, dim = fused.num_heads, fused.num_kv_heads, fused.head_dim
        hidden = fused.embed.shape[1]
        self.fused = fused
        self.x = torch.zeros(rows, 1, hidden, device=device, dtype=dtype)
        self.cos = torch.zeros(rows, 1, 1, dim, device=device, dtype=dtype)
        self.sin = torch.zeros(rows, 1, 1, dim, device=device, dtype=dtype)
        self.q = torch.zeros(rows, heads, 1, dim, device=device, dtype=dtype)
        self.k = torch.zeros(rows, kv_heads, 1, dim, device=device, dtype=dtype)
        self.v = torch.zeros(rows, kv_heads, 1, dim, device=device, dtype=dtype)
        self.attended = torch.zeros(rows, 1, heads * dim, device=device, dtype=dtype)
        self.logits = torch.zeros(rows, fused.lm_head.out_features, device=device, dtype=dtype)
        layers = fused.layers
        self.pre = [self._pre(layer) for layer in layers]
        self.post = [self._post(layer) for layer in layers]
        self.head = self._head

    def _pre(self, layer) -> Callable[[], None]:
        def run() -> None:
            q, k, v = self.fused.pre_attention(layer, self.x, self.cos, self.sin)
            self.q.copy_(q)
            self.k.copy_(k)
            self.v.copy_(v)

        return run

    def _post(self, layer) -> Callable[[], None]:
        def run() -> None:
            self.x.copy_(self.fused.post_attention(layer, self.x, self.attended))

        return run

    def _head(self) -> None:
        self.logits.copy_(self.fused.head(self.x[:, -1]))

    def capture(self, pool) -> None:
        """Replaces each piece by the replay of its CUDA graph (warmed up on a side stream first, as capture needs)."""
        n = len(self.pre)
        # Captured in the order they replay; each graph's scratch memory is reused from one shared pool.
        pieces = [piece for pair in zip(self.pre, self.post, strict=True) for piece in pair] + [self.head]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for piece in pieces:
                piece()
        torch.cuda.current_stream().wait_stream(side)
        replays = []
        for piece in pieces:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                piece()
            replays.append(graph.replay)
        self.pre, self.post, self.head = replays[0 : 2 * n : 2], replays[1 : 2 * n : 2], replays[-1]


class GraphedDecode:
    """Callable like FusedForward; decode steps go through bucketed pieces, prefills through the fused pass."""

    def __init__(self, fused: FusedForward, max_rows: int, capture: bool) -> None:
        self.fused = fused
        self.kind = fused.kind + ", CUDA graphs around attention" if capture else fused.kind + ", bucketed pieces"
        self.sizes = buckets_for(max_rows)
        self.is_capturing = capture
        self.buckets: dict[int, Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.extra_bytes = fused.extra_bytes

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        rows = ids.shape[0]
        if ids.shape[1] != 1 or rows > self.sizes[-1]:
            return self.fused(ids, mask, positions, cache)
        bucket = self._bucket(next(size for size in self.sizes if size >= rows), ids.device)
        fused = self.fused
        self._load(bucket, ids, positions)
        cache_layers = growing_layers(cache)
        attend = fused.attention(mask, 1, cache_layers[0].get_seq_length(), bucket.x[:rows])
        for pre, post, layer, cache_layer in zip(bucket.pre, bucket.post, fused.layers, cache_layers, strict=True):
            pre()
            keys, values = cache_layer.update(bucket.k[:rows], bucket.v[:rows])
            out = attend(bucket.q[:rows], keys, values, layer.scaling)
            bucket.attended[:rows].copy_(out.transpose(1, 2).flatten(2))
            post()
        bucket.head()
        return bucket.logits[:rows].clone()

    def paged(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """A step over the paged pool: through the buckets when every segment decodes one token, else the fused
        pass's. `ids` and `positions` are [1, tokens], one token per row here."""
        rows = ids.shape[1]
        if batch.has_prompt or rows != len(batch.spans) or rows > self.sizes[-1]:
            return self.fused.paged(ids, positions, batch)
        bucket = self._bucket(next(size for size in self.sizes if size >= rows), ids.device)
        self._load(bucket, ids.view(rows, 1), positions.view(rows, 1))
        for index, (pre, post, layer) in enumerate(zip(bucket.pre, bucket.post, self.fused.layers, strict=True)):
            pre()
            # Rows of one token each are the tokens of one row to the pool: [rows, h, 1, d] <-> [1, h, rows, d].
            q, k, v = (t[:rows].transpose(0, 2) for t in (bucket.q, bucket.k, bucket.v))
            out = batch.attend(index, q, k, v, layer.scaling)
            bucket.attended[:rows].copy_(out.transpose(0, 2).transpose(1, 2).flatten(2))
            post()
        bucket.head()
        return bucket.logits[:rows].clone()

    def _load(self, bucket: Bucket, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """The step's embeddings and rotations into the bucket's buffers; padding rows keep zeros, finite values
        whose results nobody reads."""
        x = F.embedding(ids, self.fused.embed)
        cos, sin = self.fused.rotary_for(x, positions)
        rows = ids.shape[0]
        for buffer, value in ((bucket.x, x), (bucket.cos, cos), (bucket.sin, sin)):
            buffer.zero_()
            buffer[:rows].copy_(value)

    def ragged(self, *args) -> torch.Tensor:
        """Prefill chunks of several sequences: the fused pass's, uncaptured (shapes vary with every step)."""
        return self.fused.ragged(*args)

    def capture_all(self, device: torch.device) -> None:
        """Builds (on a GPU, captures) every bucket now, at start-up before the service reports ready: captured
        lazily, each first batch of a new size stalled every running stream for the capture."""
        for size in self.sizes:
            self._bucket(size, device)

    def uneven(self, *args) -> torch.Tensor:
        """A decode step where some rows bring forced tokens: the fused pass's, uncaptured."""
        return self.fused.uneven(*args)

    def _bucket(self, size: int, device: torch.device) -> Bucket:
        bucket = self.buckets.get(size)
        if bucket is None:
            start = time.perf_counter()
            bucket = Bucket(self.fused, size, device, self.fused.embed.dtype)
            if self.is_capturing:
                try:
                    bucket.capture(self.pool)
                    log.info("captured decode graphs for %d rows in %.2fs", size, time.perf_counter() - start)
                except RuntimeError as exc:  # serve without graphs rather than fail every step that needs them
                    log.warning("CUDA graph capture failed (%s); decoding %d rows without graphs", exc, size)
                    bucket = Bucket(self.fused, size, device, self.fused.embed.dtype)
            self.buckets[size] = bucket
        return bucket
