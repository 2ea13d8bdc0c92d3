"""The KV cache layer the runner and both forward passes use (spare columns, so a decode step writes in place),
and how much KV memory the running batch and the prefix cache may take."""

from typing import TYPE_CHECKING

import psutil
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from llmchat.engine.prefix_cache import PrefixCache

if TYPE_CHECKING:  # importing it loads transformers' modeling code, which nothing here needs at run time
    from transformers import PreTrainedModel

SPARE_COLUMNS = 64


class GrowingLayer(DynamicLayer):
    """A cache layer with spare columns: a decode step writes one column instead of copying the cache.

    The stock layer concatenates on every update, which copies the whole batch's keys and values
    each step; measured on this CPU that was a quarter of a 16-row decode step.
    """

    length: int  # columns cached
    _keys: torch.Tensor | None  # the whole buffers, None until the first update
    _values: torch.Tensor | None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._keys = self._values = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._keys is None:
            empty = key_states[..., :0, :]
            self.replace(empty, empty, extra=n)
        elif self.length + n > self._keys.shape[-2]:
            assert self.keys is not None and self.values is not None  # the buffers' cached columns
            self.replace(self.keys, self.values, extra=n)
        keys, values = self.buffers
        keys[..., self.length : self.length + n, :] = key_states
        values[..., self.length : self.length + n, :] = value_states
        self.grow(n)
        return self.keys, self.values

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys' and values' whole buffers, spare columns included, for a pass that writes them in place."""
        assert self._keys is not None and self._values is not None, "the first update makes them"
        return self._keys, self._values

    def grow(self, n: int) -> None:
        """Takes in the `n` columns after the cached ones, written into the buffers."""
        self.length += n
        keys, values = self.buffers
        self.keys = keys[..., : self.length, :]
        self.values = values[..., : self.length, :]

    def replace(self, keys: torch.Tensor, values: torch.Tensor, extra: int = 0) -> None:
        """Sets the cached keys and values (after rows were added or dropped), with fresh spare room."""
        shape = list(keys.shape)
        shape[-2] += extra + SPARE_COLUMNS
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self.length = keys.shape[-2]
        self._keys[..., : self.length, :] = keys
        self._values[..., : self.length, :] = values
        self.keys = self._keys[..., : self.length, :]
        self.values = self._values[..., : self.length, :]

    def reserve(self, num_columns: int) -> None:
        """Makes room for `num_columns` in all (plus the spare ones), so a chunked prefill grows in place."""
        if self._keys is not None and self._keys.shape[-2] < num_columns:
            assert self.keys is not None and self.values is not None  # the buffers' cached columns
            self.replace(self.keys, self.values, extra=num_columns - self.length)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


def new_cache(model: "PreTrainedModel") -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def make_prefix_cache(model: "PreTrainedModel", capacity_bytes: int | None) -> tuple[PrefixCache | None, str | None]:
    """The prefix cache for this model, or None and why not."""
    if capacity_bytes == 0:
        return None, "turned off in the settings"
    if getattr(model, "hf_device_map", None) is not None:
        return None, "the model is placed by a device map"
    if capacity_bytes is None:
        capacity_bytes = default_capacity(model)
    return PrefixCache(capacity_bytes), None


def kv_shape(model: "PreTrainedModel") -> tuple[int, int, int]:
    """Layers, key/value heads and head size of the model's KV cache."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def kv_bytes_per_token(model: "PreTrainedModel", dtype: torch.dtype | None = None) -> int:
    """Bytes of one token's keys and values in every layer, in `dtype` (default: the model's)."""
    layers, heads, dim = kv_shape(model)
    return 2 * layers * heads * dim * (dtype or model.dtype).itemsize


def kv_token_budget(model: "PreTrainedModel", reserved_bytes: int) -> int | None:
    """On a GPU, how many tokens of KV the running batch may hold: 80% of the memory free at start (the rest
    for activations and the allocator's slack) less `reserved_bytes` (the prefix cache's bound). None on the
    CPU, where memory is the host's and the kernel, not an exception, answers overuse."""
    if model.device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(model.device)[0]
    return max(int(0.8 * free) - reserved_bytes, 0) // kv_bytes_per_token(model)


def default_pool_bytes(model: "PreTrainedModel", max_context: int, dtype: torch.dtype) -> int:
    """The paged KV pool's size when the settings give none: on a GPU 80% of the memory free after loading (the
    rest for activations, CUDA graphs and the allocator's slack); on the CPU a quarter of the free RAM, at most 64
    full contexts (pages of blocks never written are never committed)."""
    if model.device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(model.device)[0])
    contexts = 64 * kv_bytes_per_token(model, dtype) * max_context
    return int(min(psutil.virtual_memory().available // 4, contexts))


def default_capacity(model: "PreTrainedModel") -> int:
    """A tenth of the memory free on the model's device at start-up (a fifth of a GPU's), at most 64 contexts' KV."""
    config = model.config
    contexts = 64 * kv_bytes_per_token(model) * getattr(config, "max_position_embeddings", 8192)
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0] // 5
    else:
        free = psutil.virtual_memory().available // 10
    return int(min(free, contexts))
