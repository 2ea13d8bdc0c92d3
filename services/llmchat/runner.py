"""The model runner: one KV cache for the whole running batch, rows added by prefill and dropped on finish.

Rows are left-padded to a common length; the attention mask hides the padding and position ids
count each row's real tokens, the same layout `generate()` uses for a padded batch. Padding is
trimmed when the rows that needed it leave. The forward pass is llmchat's fused one where the model
allows (llama.py), else transformers'; both read and write the same cache.
"""

import logging
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from llmchat.cuda_graphs import GraphedDecode
from llmchat.llama import FusedForward, unsupported_reason
from llmchat.scheduler import Sequence

log = logging.getLogger("llmchat.runner")

SPARE_COLUMNS = 64


class GrowingLayer(DynamicLayer):
    """A cache layer with spare columns: a decode step writes one column instead of copying the cache.

    The stock layer concatenates on every update, which copies the whole batch's keys and values
    each step; measured on this CPU that was a quarter of a 16-row decode step.
    """

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
            self.replace(self.keys, self.values, extra=n)
        self._keys[..., self.length : self.length + n, :] = key_states
        self._values[..., self.length : self.length + n, :] = value_states
        self.length += n
        self.keys = self._keys[..., : self.length, :]
        self.values = self._values[..., : self.length, :]
        return self.keys, self.values

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

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


def new_cache(model: torch.nn.Module) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go and logits come back: the main device of an accelerate device map, else the model's.

    Under a device map the first parameter may be offloaded (on the meta device); accelerate's
    top-level hook runs the model on its main device and returns outputs on the inputs' device.
    """
    hook = getattr(model, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return model.device if device is None else torch.device(device)


class TransformersForward:
    """The model's own forward pass, for any architecture and placement transformers supports."""

    extra_bytes = 0

    def __init__(self, model: torch.nn.Module, why: str) -> None:
        self.model = model
        self.kind = f"transformers ({why})"

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]


def pick_forward(
    model: torch.nn.Module,
    fused: bool,
    cuda_graphs: bool = False,
    max_rows: int = 16,
    checkpoint: Path | None = None,
) -> FusedForward | GraphedDecode | TransformersForward:
    reason = unsupported_reason(model) if fused else "chosen in the settings"
    forward = FusedForward(model, checkpoint=checkpoint) if reason is None else TransformersForward(model, reason)
    if cuda_graphs:
        if reason is not None:
            log.warning("CUDA graphs need the fused forward pass (%s); not used", reason)
        elif model.device.type != "cuda":
            log.info("CUDA graphs are for a GPU; not used on the %s", model.device.type)
        else:
            forward = GraphedDecode(forward, max_rows, capture=True)
    log.info("forward pass: %s", forward.kind)
    return forward


class BatchRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        pad_token_id: int,
        fused: bool = True,
        cuda_graphs: bool = False,
        max_rows: int = 16,
        checkpoint: Path | None = None,
    ) -> None:
        self.model = model
        self.forward = pick_forward(model, fused, cuda_graphs, max_rows, checkpoint)
        self.device = input_device(model)
        self.pad_token_id = pad_token_id
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached columns], 1 = real token
        self.positions: torch.Tensor | None = None  # [rows], position of each row's pending token

    @property
    def num_columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Runs the prompts of `seqs` as one left-padded batch, adds them as rows; returns last logits [n, V]."""
        longest = max(s.num_prompt_tokens for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = seq.num_prompt_tokens
            ids[i, longest - n :] = torch.tensor(seq.prompt_ids)
            mask[i, longest - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.model)
        logits = self.forward(ids, mask, positions, cache)
        self._add_rows(seqs, cache, mask)
        return logits

    def decode(self) -> torch.Tensor:
        """Feeds every row its pending token; returns the next-token logits [rows, V]."""
        ids = torch.tensor([[s.pending_token] for s in self.rows], dtype=torch.long, device=self.device)
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        mask = torch.cat([self.mask, ones], dim=1)
        logits = self.forward(ids, mask, self.positions[:, None], self.cache)
        self.mask = mask
        self.positions = self.positions + 1
        return logits

    def drop(self, seqs: list[Sequence]) -> None:
        """Frees the rows of `seqs` and the padding columns no remaining row needs."""
        gone = set(map(id, seqs))
        keep = [i for i, s in enumerate(self.rows) if id(s) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        first_used = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, first_used:]
        for layer in self.cache.layers:
            # Under a device map split over GPUs each layer's cache lives on that layer's GPU.
            rows = index.to(layer.keys.device)
            layer.replace(layer.keys[rows, :, first_used:, :], layer.values[rows, :, first_used:, :])

    def kv_cache_bytes(self) -> int:
        """Bytes allocated for the batch's keys and values, spare columns included (read by metrics)."""
        cache = self.cache
        if cache is None:
            return 0
        layers = [layer for layer in cache.layers if getattr(layer, "_keys", None) is not None]
        return sum(layer._keys.nbytes + layer._values.nbytes for layer in layers)

    def reset(self) -> None:
        self.rows, self.cache, self.mask, self.positions = [], None, None, None

    def _add_rows(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        positions = mask.sum(dim=1)
        if self.cache is None:
            self.rows, self.cache, self.mask, self.positions = list(seqs), cache, mask, positions
            return
        width = max(self.num_columns, mask.shape[1])
        old_pad, new_pad = width - self.num_columns, width - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.replace(
                torch.cat([_left_pad(old.keys, old_pad), _left_pad(new.keys, new_pad)], dim=0),
                torch.cat([_left_pad(old.values, old_pad), _left_pad(new.values, new_pad)], dim=0),
            )
        self.mask = torch.cat([_left_pad(self.mask, old_pad), _left_pad(mask, new_pad)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.rows.extend(seqs)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pads dimension 2 of a KV tensor [B, H, T, D] (or dimension 1 of a mask [B, T]) with n zeros in front."""
    if n == 0:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
