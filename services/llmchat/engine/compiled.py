"""One-row decode steps of the fused pass compiled whole by torch.compile, on the CPU (LLMCHAT_COMPILE).

A single stream's decode step of a small model is, beside its matmuls, about 1,500 small ops of a few
microseconds each. Inductor fuses them into a few C++ loops. The whole step is one graph, so its guards
are checked once per step rather than once per layer (compiling each layer's pieces apart saved a third
as much). Shapes are dynamic, so one compile serves every cache length; the spare-columns cache's
buffers are written in place. Other steps (several rows, padding, forced tokens, prefill) run the fused
pass eagerly.

Compiling needs a C++ compiler and takes about a minute on two cores at start-up; inductor keeps the
result in `TORCHINDUCTOR_CACHE_DIR` (the service sets it under its cache directory), so later starts
take seconds. If
compiling fails the service decodes eagerly and `/health` says why.
"""

import logging
import time

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from llmchat.engine.fused_forward import FusedForward, growing_layers

log = logging.getLogger("llmchat.engine.compiled")


class CompiledDecode:
    """Callable like FusedForward; one-row unpadded decode steps go through the compiled step."""

    def __init__(self, fused: FusedForward) -> None:
        self.fused = fused
        self.extra_bytes = fused.extra_bytes
        self.failure: str | None = None
        self._step = torch.compile(self._one_row, dynamic=True)

    @property
    def kind(self) -> str:
        if self.failure is not None:
            return f"{self.fused.kind}, one-row decode not compiled ({self.failure})"
        return f"{self.fused.kind}, one-row decode compiled"

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        layers = growing_layers(cache)
        length = layers[0].get_seq_length()
        # A cache of 0 or 1 columns (a one-token prompt): torch.compile specialises the sizes 0 and 1, so
        # compiling for them would take another minute for a step the eager pass takes in milliseconds.
        if ids.shape != (1, 1) or mask is not None or length < 2 or self.failure is not None:
            return self.fused(ids, mask, positions, cache)
        for layer in layers:
            # A spare column past the new one: the graph was compiled for a buffer longer than the keys it
            # attends over, and a step whose keys filled the buffer exactly would compile another (a minute).
            layer.reserve(length + 2)
        buffers = [layer.buffers for layer in layers]
        try:
            logits = self._step(ids, positions, buffers, length)
        except Exception as exc:  # noqa: BLE001 -- no compiler, an op inductor cannot take: decode eagerly
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            log.warning("compiling the one-row decode step failed; decoding eagerly: %s", self.failure)
            return self.fused(ids, mask, positions, cache)
        for layer in layers:
            layer.grow(1)
        return logits

    def _one_row(self, ids: torch.Tensor, positions: torch.Tensor, buffers: list, length: int) -> torch.Tensor:
        """The fused pass's decode step, with the new keys and values written into column `length`."""
        fused = self.fused
        x = F.embedding(ids, fused.embed)
        cos, sin = fused.rotary_for(x, positions)
        attend = fused.attention(None, 1, length, x)
        for layer, (keys, values) in zip(fused.layers, buffers, strict=True):
            q, k, v = fused.pre_attention(layer, x, cos, sin)
            keys.narrow(2, length, 1).copy_(k)
            values.narrow(2, length, 1).copy_(v)
            out = attend(q, keys[:, :, : length + 1], values[:, :, : length + 1], layer.scaling)
            x = fused.post_attention(layer, x, out.transpose(1, 2).flatten(2))
        return fused.head(x[:, -1])

    def ragged(self, *args) -> torch.Tensor:
        return self.fused.ragged(*args)

    def uneven(self, *args) -> torch.Tensor:
        return self.fused.uneven(*args)

    def compile_now(self, cache: DynamicCache) -> None:
        """Compiles at start-up, before the service reports ready, over `cache`, a throwaway empty one."""
        start = time.perf_counter()
        device = self.fused.embed.device
        with torch.inference_mode():
            self.fused(
                torch.zeros(1, 2, dtype=torch.long, device=device), None, torch.arange(2, device=device)[None], cache
            )
            self(torch.zeros(1, 1, dtype=torch.long, device=device), None, torch.full((1, 1), 2, device=device), cache)
        if self.failure is None:
            log.info("compiled the one-row decode step in %.1fs", time.perf_counter() - start)
