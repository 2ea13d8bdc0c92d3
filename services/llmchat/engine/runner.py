"""The model runner: one KV cache for the whole running batch, rows added by prefill and dropped on finish.

Rows are left-padded to a common length; the attention mask hides the padding and position ids
count each row's real tokens, the same layout `generate()` uses for a padded batch. Padding is
trimmed when the rows that needed it leave. The forward pass is llmchat's fused one where the model
allows (llama.py), else transformers'; both read and write the same cache.
"""

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache

from llmchat.engine.choices import Choices
from llmchat.engine.compiled import CompiledDecode
from llmchat.engine.cuda_graphs import GraphedDecode
from llmchat.engine.fused_forward import FusedForward, unsupported_reason
from llmchat.engine.gpu import on_device
from llmchat.engine.kv_cache import new_cache
from llmchat.engine.prefix_cache import PrefixCache
from llmchat.engine.scheduler import Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("llmchat.engine.runner")

# Computed tokens up to which a prefilling sequence is batched with others (its KV copied into the batch).
MAX_BATCHED_PAST = 256


def input_device(model: "PreTrainedModel") -> torch.device:
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
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40);
        # releases before 5.24 know only the old one.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]


def pick_forward(
    model: "PreTrainedModel",
    fused: bool,
    cuda_graphs: bool = False,
    max_rows: int = 16,
    checkpoint: Path | None = None,
    int4_rows: int | None = None,
    compile_decode: bool = False,
    choices: Choices | None = None,
    gguf: Path | None = None,
) -> FusedForward | GraphedDecode | CompiledDecode | TransformersForward:
    """`checkpoint`, `gguf`, `int4_rows` and `choices`: where the fused pass looks for 4-bit weights, up to how many
    rows it uses them (None: measured) and where it keeps what it measured, see FusedForward. `max_rows`: the most
    sequences a step runs (the CUDA graphs' largest batch, the logits' rows). `compile_decode`: one-row decode steps
    on the CPU compiled (compiled.py)."""
    reason = unsupported_reason(model) if fused else "chosen in the settings"
    forward: FusedForward | GraphedDecode | CompiledDecode | TransformersForward
    if reason is None:
        forward = FusedForward(
            model, checkpoint=checkpoint, int4_rows=int4_rows, choices=choices, gguf=gguf, max_rows=max_rows
        )
    else:
        forward = TransformersForward(model, reason)
    if cuda_graphs:
        if not isinstance(forward, FusedForward):  # reason says why not
            log.info("CUDA graphs need the fused forward pass (%s); not used", reason)
        elif forward.graph_blocker is not None:
            log.info("CUDA graphs cannot capture %s; not used", forward.graph_blocker)
        elif model.device.type != "cuda":
            log.info("CUDA graphs are for a GPU; not used on the %s", model.device.type)
        else:
            forward = GraphedDecode(forward, max_rows, capture=True)
    if compile_decode:
        if reason is not None:
            log.info("compiling the decode step needs the fused forward pass (%s); not used", reason)
        elif model.device.type != "cpu":
            log.info("compiling the decode step is for the CPU; not used on the %s", model.device.type)
        else:
            assert isinstance(forward, FusedForward)  # graphs wrap it on a GPU only
            forward = CompiledDecode(forward)
    log.info("forward pass: %s", forward.kind)
    return forward


class BatchRunner:
    """Prefills sequences chunk by chunk in caches of their own, then decodes them together in one batch cache.

    A sequence's prompt may start with blocks from the prefix cache (copied in when it starts) and is
    computed in chunks the scheduler sizes; each chunk's full blocks are copied into the prefix cache at
    once, and a finished sequence's reply too, so the next turn of a conversation reuses both.
    """

    def __init__(
        self,
        model: "PreTrainedModel",
        forward: TransformersForward | CompiledDecode,
        pad_token_id: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.forward = forward
        self.device = input_device(model)
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached columns], 1 = real token
        self.padded = False  # whether the mask has any 0 (known here, so no step reads it from the device)
        self.positions: torch.Tensor | None = None  # [rows], position of each row's pending token

    def prepare(self) -> None:
        """Start-up work of the forward pass that would otherwise stall the first requests (CUDA graphs)."""
        capture_all = getattr(self.forward, "capture_all", None)
        if capture_all is not None:
            capture_all(self.device)
        compile_now = getattr(self.forward, "compile_now", None)
        if compile_now is not None:
            compile_now(new_cache(self.model))

    @property
    def num_columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def start(self, seq: Sequence) -> None:
        """Seeds the sequence's own cache with the cached blocks its prompt starts with."""
        seq.num_computed = seq.num_cached_tokens = 0
        seq.kv = None
        if self.prefix_cache is None:
            return
        blocks = self.prefix_cache.match(seq.prompt_ids)
        if not blocks:
            return
        kv = self.prefix_cache.load(blocks)
        seq.kv = new_cache(self.model)
        for i, layer in enumerate(_layers(seq.kv)):
            layer.update(kv[i, 0, None], kv[i, 1, None])
            layer.reserve(seq.num_prompt_tokens)
        seq.num_computed = seq.num_cached_tokens = kv.shape[3]

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Computes the next `n` prompt tokens of each (sequence, n); those whose prompt is done join the batch.

        Returns the sequences that joined and their next-token logits [joined, V]. The fused forward
        runs every chunk in one pass, each over its own cache. Through transformers' forward, sequences
        with few tokens computed so far are prefilled together as one padded batch; one with many (a
        long cached prefix, or a long prompt's later chunks) runs alone rather than have its cache copied.
        """
        ragged = getattr(self.forward, "ragged", None)
        if ragged is not None and len(chunks) > 1:
            logits = self._prefill_ragged(chunks, ragged)
        else:
            few = [(s, n) for s, n in chunks if s.num_computed <= MAX_BATCHED_PAST]
            logits = self._prefill_batch(few) if len(few) > 1 else {}
        for seq, n in chunks:
            if id(seq) not in logits:
                logits[id(seq)] = self._prefill_one(seq, n)
        for seq, n in chunks:
            seq.num_computed += n
            for layer in _layers(seq.kv):
                layer.reserve(seq.num_prompt_tokens)  # so later chunks write in place
            self._cache_prefix(seq)
        joined = []
        for seq in (s for s, _ in chunks if s.num_computed == s.num_prompt_tokens):
            joined.append(seq)
            for fork in seq.forks:  # n > 1: the other choices join with the prompt's KV and logits
                if not fork.is_finished:
                    fork.kv, fork.num_computed, fork.num_cached_tokens = seq.kv, seq.num_computed, seq.num_cached_tokens
                    logits[id(fork)] = logits[id(seq)]
                    joined.append(fork)
        if not joined:
            return [], torch.empty(0)
        try:
            self._join(joined)
        except torch.OutOfMemoryError as exc:  # the batch's cache may be half rebuilt: the whole step fails
            raise RuntimeError(f"out of memory adding rows to the batch: {exc}") from exc
        return joined, torch.stack([logits[id(s)] for s in joined])

    def _prefill_one(self, seq: Sequence, n: int) -> torch.Tensor:
        start = seq.num_computed
        if seq.kv is None:
            seq.kv = new_cache(self.model)
        ids = on_device([seq.prompt_ids[start : start + n]], self.device, torch.long)
        positions = torch.arange(start, start + n, device=self.device)[None]
        return self.forward(ids, None, positions, seq.kv)[0]  # one row, no padding

    def _prefill_ragged(self, chunks: list[tuple[Sequence, int]], ragged) -> dict[int, torch.Tensor]:
        """All chunks in one pass of the fused forward, each sequence attending over its own cache."""
        ids = [t for seq, n in chunks for t in seq.prompt_ids[seq.num_computed : seq.num_computed + n]]
        positions = [p for seq, n in chunks for p in range(seq.num_computed, seq.num_computed + n)]
        for seq, _ in chunks:
            if seq.kv is None:
                seq.kv = new_cache(self.model)
        logits = ragged(
            on_device([ids], self.device),
            on_device([positions], self.device),
            [n for _, n in chunks],
            [seq.kv for seq, _ in chunks],
        )
        return {id(seq): row for (seq, _), row in zip(chunks, logits, strict=True)}

    def _prefill_batch(self, chunks: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """Chunks of several sequences as one batch; each row then gets its own cache back.

        Rows are left-padded twice: their computed tokens (copied in) end where the chunk region
        starts, and their chunks end at the last column, so every row's last position is real.
        """
        past = max(s.num_computed for s, _ in chunks)
        longest = max(n for _, n in chunks)
        ids = torch.full((len(chunks), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunks), past + longest), dtype=torch.long)
        positions = torch.zeros((len(chunks), longest), dtype=torch.long)
        for i, (seq, n) in enumerate(chunks):
            done = seq.num_computed
            ids[i, longest - n :] = torch.tensor(seq.prompt_ids[done : done + n])
            mask[i, past - done : past] = 1
            mask[i, past + longest - n :] = 1
            positions[i, longest - n :] = torch.arange(done, done + n)
        cache = new_cache(self.model)
        if past:
            self._fill_past(cache, chunks, past)
        ids, mask, positions = (t.to(self.device, non_blocking=True) for t in (ids, mask, positions))
        logits = self.forward(ids, mask, positions, cache)
        for i, (seq, n) in enumerate(chunks):
            done = seq.num_computed
            columns = torch.cat([torch.arange(past - done, past), torch.arange(past + longest - n, past + longest)])
            seq.kv = new_cache(self.model)
            for own, batch in zip(_layers(seq.kv), _layers(cache), strict=True):
                index = columns.to(batch.keys.device)
                own.update(batch.keys[i : i + 1, :, index], batch.values[i : i + 1, :, index])
        return {id(seq): row for (seq, _), row in zip(chunks, logits, strict=True)}

    @staticmethod
    def _fill_past(cache: DynamicCache, chunks: list[tuple[Sequence, int]], past: int) -> None:
        """Copies each row's computed keys and values into `cache`, right-aligned at column `past`."""
        owners = [(i, s) for i, (s, _) in enumerate(chunks) if s.kv is not None]
        for layer_index, layer in enumerate(_layers(cache)):
            like = _layers(owners[0][1].kv)[layer_index].keys
            keys = like.new_zeros((len(chunks), like.shape[1], past, like.shape[3]))
            values = torch.zeros_like(keys)
            for i, seq in owners:
                own = _layers(seq.kv)[layer_index]
                keys[i, :, past - seq.num_computed :] = own.keys[0]
                values[i, :, past - seq.num_computed :] = own.values[0]
            layer.update(keys, values)
            layer.reserve(past + max(n for _, n in chunks))

    def _join(self, seqs: list[Sequence]) -> None:
        """Moves prefilled sequences from their own caches into the batch cache as new rows."""
        if self.cache is None and len(seqs) == 1:
            seq = seqs[0]
            self.rows, self.cache = [seq], seq.kv
            self.mask = torch.ones((1, seq.num_computed), dtype=torch.long, device=self.device)
            self.padded = False
            self.positions = torch.tensor([seq.num_computed], device=self.device)
            seq.kv = None
            return
        width = max(self.num_columns, *(s.num_computed for s in seqs))
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, seq in enumerate(seqs):
            mask[i, width - seq.num_computed :] = 1
        old, had_rows = self.num_columns, bool(self.rows)
        layers = zip(*(_layers(s.kv) for s in seqs), strict=True)
        if self.cache is None:
            self.cache = new_cache(self.model)
            self.mask = mask[:0, :0]
            self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        for batch, own in zip(_layers(self.cache), layers, strict=True):
            keys = [_left_pad(layer.keys, width - layer.keys.shape[2]) for layer in own]
            values = [_left_pad(layer.values, width - layer.values.shape[2]) for layer in own]
            if had_rows:
                keys.insert(0, _left_pad(batch.keys, width - old))
                values.insert(0, _left_pad(batch.values, width - old))
                batch.replace(torch.cat(keys), torch.cat(values))
            else:
                batch.update(torch.cat(keys), torch.cat(values))
        assert self.mask is not None and self.positions is not None  # with the batch cache
        self.mask = torch.cat([_left_pad(self.mask, width - old), mask])
        self.padded = self.padded or (had_rows and old < width) or any(s.num_computed < width for s in seqs)
        self.positions = torch.cat([self.positions, mask.sum(dim=1)])
        self.rows.extend(seqs)
        for seq in seqs:
            seq.kv = None

    def _cache_prefix(self, seq: Sequence) -> None:
        """Copies the sequence's newly computed full blocks into the prefix cache."""
        if self.prefix_cache is not None:
            layers = _layers(seq.kv)
            tokens = seq.prompt_ids[: seq.num_computed]
            self.prefix_cache.insert(tokens, [layer.keys[0] for layer in layers], [layer.values[0] for layer in layers])

    def decode(self) -> torch.Tensor:
        """Feeds every row its pending tokens; returns the next-token logits [rows, V].

        A row usually has one pending token. One whose grammar forced more has several: the step then
        takes `k` columns, each row's tokens right-aligned in them and the columns before a shorter row's
        tokens masked out (they stay in the cache as padding). The fused pass runs its matmuls over the
        real tokens only; transformers' forward runs the padded block.
        """
        assert self.cache is not None and self.mask is not None and self.positions is not None  # rows are running
        num_pending = [len(s.pending) for s in self.rows]
        k, fewest = max(num_pending), min(num_pending)
        padded_ids = [[self.pad_token_id] * (k - n) + s.pending for s, n in zip(self.rows, num_pending, strict=True)]
        ids = on_device(padded_ids, self.device, torch.long)
        real = on_device([[0] * (k - n) + [1] * n for n in num_pending], self.device, self.mask.dtype)
        counts = on_device(num_pending, self.device)
        # A padding column's position is that of the row's first real one: any value would do, it is masked.
        positions = self.positions[:, None] + (torch.arange(k, device=self.device) - (k - counts)[:, None]).clamp(min=0)
        mask = torch.cat([self.mask, real], dim=1)
        self.padded = self.padded or k > fewest
        uneven = getattr(self.forward, "uneven", None)
        if k > 1 and uneven is not None:
            logits = uneven(ids, mask, positions, self.cache, real)
        else:
            logits = self.forward(ids, mask if self.padded else None, positions, self.cache)
        self.mask = mask
        self.positions = self.positions + counts
        for seq in self.rows:
            seq.pending = []
        return logits

    def release(self, seq: Sequence) -> None:
        """Forgets a sequence that ended while prefilling (its own cache); rows leave by drop()."""
        seq.kv = None

    def drop(self, seqs: list[Sequence]) -> None:
        """Frees the rows of `seqs` (caching the prompt and reply of those that ended well) and unneeded padding."""
        for seq in seqs:
            seq.kv = None  # a sequence that ended while prefilling
        gone = set(map(id, seqs))
        keep = [i for i, s in enumerate(self.rows) if id(s) not in gone]
        if len(keep) == len(self.rows):
            return
        if self.prefix_cache is not None:
            for i, seq in enumerate(self.rows):
                if id(seq) in gone and seq.finish_reason in ("stop", "length"):
                    self._cache_row(i, seq)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.device)
        assert self.mask is not None and self.positions is not None  # rows were running
        self.mask, self.positions = self.mask[index], self.positions[index]
        first_used = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, first_used:]
        self.padded = not bool(self.mask.all())
        for layer in _layers(self.cache):
            # Under a device map split over GPUs each layer's cache lives on that layer's GPU.
            rows = index.to(layer.keys.device)
            layer.replace(layer.keys[rows, :, first_used:, :], layer.values[rows, :, first_used:, :])

    def _cache_row(self, i: int, seq: Sequence) -> None:
        """Caches a finished row's prompt and reply: the row's unmasked columns, in order."""
        assert self.mask is not None and self.prefix_cache is not None  # a running row, with a prefix cache
        columns = self.mask[i].nonzero().flatten()
        tokens = (seq.prompt_ids + seq.completion_ids)[: len(columns)]
        layers = _layers(self.cache)
        if len(columns) == self.num_columns - int(columns[0]):  # no padding inside the row: slices, not copies
            keys = [layer.keys[i, :, int(columns[0]) :] for layer in layers]
            values = [layer.values[i, :, int(columns[0]) :] for layer in layers]
        else:
            keys = [layer.keys[i, :, columns.to(layer.keys.device)] for layer in layers]
            values = [layer.values[i, :, columns.to(layer.values.device)] for layer in layers]
        self.prefix_cache.insert(tokens, keys, values)

    def kv_cache_bytes(self) -> int:
        """Bytes allocated for the batch's keys and values, spare columns included (read by metrics)."""
        cache = self.cache
        if cache is None:
            return 0
        layers = [layer for layer in _layers(cache) if getattr(layer, "_keys", None) is not None]
        return sum(layer._keys.nbytes + layer._values.nbytes for layer in layers)

    def reset(self) -> None:
        self.rows, self.cache, self.mask, self.positions = [], None, None, None
        self.padded = False


def _layers(cache: DynamicCache | None) -> list[Any]:
    """The layers of a cache the caller knows is there. They are kv_cache.GrowingLayer, their keys and values set by
    their first update: loosely typed, as transformers types a cache's layers as any kind and their keys optional."""
    assert cache is not None
    return cache.layers


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pads dimension 2 of a KV tensor [B, H, T, D] (or dimension 1 of a mask [B, T]) with n zeros in front."""
    if n == 0:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
