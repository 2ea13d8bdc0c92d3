"""llmchat's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) over the loaded weights.

Measured on a 2-core CPU, a quarter to a third of transformers' decode step was Python and
small-op overhead around the matmuls. This pass fuses the q/k/v and gate/up projections into one
matmul each, applies rotary embeddings to queries and keys together, and on CPUs with AMX runs
bfloat16 matmuls on weights prepacked once for oneDNN instead of repacking them every call. On any
CPU, weights converted from a 4-bit GGUF keep a 4-bit copy for steps of up to a measured number of rows, or for
every step, prompts included, where that copy wins at every row count timed (projections.py, int4.py);
bitsandbytes' layers run inside the pass (quantized.py). It reads and writes the same KV cache layers
as transformers' forward, so the runner does not care which ran.
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from llmchat.engine import input_rounding
from llmchat.engine.attention import Attention
from llmchat.engine.choices import Choices
from llmchat.engine.cpu import has_amx_bf16
from llmchat.engine.kv_cache import GrowingLayer
from llmchat.engine.paged_kv import PagedBatch
from llmchat.engine.projections import (
    ALL_ROWS,
    LOGITS,
    ROLES,
    Linear,
    checkpoint_grids,
    four_bit_kind,
    kept,
    measure_int4_rows,
    packed_rows,
)
from llmchat.engine.quantized import QUANTIZED, Modules, dequantize_on_cpu, projection_kind

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("llmchat.engine.fused_forward")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Rows a step's oneDNN matmuls are padded to a multiple of (FusedForward.matmul_rows): 16 in bfloat16 (AMX's tiles
# are 16 rows), and in float32 8 up to 128 rows, where each padding row costs about as much as a real one.
ROW_BUCKET = 16
FLOAT32_BUCKET, FLOAT32_FINE_UP_TO = 8, 128


def growing_layers(cache: DynamicCache) -> list[GrowingLayer]:
    """A cache's layers, kv_cache.GrowingLayer as new_cache makes every cache here (DynamicCache types them as any
    kind of cache layer)."""
    return cast(list[GrowingLayer], cache.layers)


def unsupported_reason(model: "PreTrainedModel") -> str | None:
    """Why this model must use transformers' forward, or None when the fused pass can run it."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type!r} is not one of {', '.join(FAMILIES)}"
    if getattr(model, "hf_device_map", None) is not None or getattr(model, "_hf_hook", None) is not None:
        return "the model is placed by a device map"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    window = getattr(config, "sliding_window", None)
    if window is not None and (getattr(config, "use_sliding_window", True) or config.model_type == "mistral"):
        return "sliding-window attention"
    layer = model.model.layers[0]
    linears = [*_attention_linears(layer), *_mlp_linears(layer), model.lm_head]
    if unknown := [type(m).__name__ for m in linears if projection_kind(m) is None]:
        return f"projections of type {unknown[0]} (the fused pass runs torch's Linear and bitsandbytes' 4- and 8-bit)"
    return None


def _attention_linears(layer) -> list[torch.nn.Linear]:
    attn = layer.self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]


def _mlp_linears(layer) -> list[torch.nn.Linear]:
    return [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]


def uses_packed_bf16(model: "PreTrainedModel") -> bool:
    """oneDNN's prepacked bfloat16 matmul: about twice as fast as the unpacked one on AMX CPUs (bench.levers)."""
    return (
        model.device.type == "cpu"
        and model.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and has_amx_bf16()
    )


def pick_packing(
    model: "PreTrainedModel",
    projections: list[list[torch.nn.Linear]],
    roles: list[str],
    quantized: bool,
    choices: Choices | None,
) -> tuple[int, str]:
    """Up to how many rows a step's dense matmuls use weights prepacked once for oneDNN (projections.Linear's
    packed_rows), and why: every step in bfloat16 on AMX CPUs, up to the row count timed on other CPUs
    (projections.packed_rows), none on a GPU or beside bitsandbytes' layers."""
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return 0, f"not prepacked: oneDNN's matmul is for the CPU (not the {model.device.type}'s)"
    if uses_packed_bf16(model):
        return ALL_ROWS, "prepacked: bfloat16 on an AMX CPU"
    if quantized:
        return 0, "not prepacked: bitsandbytes' projections run their own matmuls"
    return packed_rows(projections, roles, model.dtype, choices)


def _projections(layer) -> list[list[torch.nn.Linear]]:
    """A layer's matmuls, each as the modules fused into it: q/k/v, o, gate/up, down."""
    q, k, v, o = _attention_linears(layer)
    gate, up, down = _mlp_linears(layer)
    return [[q, k, v], [o], [gate, up], [down]]


Norm = tuple[torch.Tensor, float]  # an RMSNorm's weight and epsilon


class Layer:
    def __init__(self, layer, projections: list[Linear | Modules]) -> None:
        """`projections`: this layer's matmuls, in the order `_projections` lists them."""
        attn = layer.self_attn
        self.qkv, self.o, self.gate_up, self.down = projections
        self.norm1: Norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2: Norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        # Qwen3 normalises each head's query and key before the rotation.
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norms: tuple[Norm, Norm] | None = None
        if q_norm is not None:
            assert k_norm is not None  # the two come together
            self.qk_norms = ((q_norm.weight, q_norm.variance_epsilon), (k_norm.weight, k_norm.variance_epsilon))
        self.scaling: float = attn.scaling


def rms_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """transformers' Llama RMSNorm to the bit: statistics in float32, weight applied in the model's dtype."""
    weight, eps = norm
    if x.dtype == torch.float32:  # one op instead of four: a decode step runs two per layer
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin to the bit, as x * cos + roll(x) * signed_sin (rotary_for's
    sin with its first half negated): four ops instead of seven, in every layer. (A fused addcmul rounds
    differently, which in float16 moves LLM.int8's outlier columns.)"""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class FusedForward:
    """Callable like the runner's model: (ids, mask, positions, cache) -> logits of each row's last token."""

    def __init__(
        self,
        model: "PreTrainedModel",
        packed: bool | None = None,
        checkpoint: Path | None = None,
        int4_rows: int | None = None,
        choices: Choices | None = None,
        gguf: Path | None = None,
        max_rows: int | None = None,
    ) -> None:
        """`checkpoint`: the float32 safetensors converted from `gguf`, checked for 4-bit grids (int4.py), used
        on the CPU for steps of up to `int4_rows` rows (None: the crossover measured here; 0: never). `choices`:
        where the measured kernels and crossovers are kept (default: in this process). `max_rows`: the most
        sequences a step runs (the logits' rows), where known."""
        config = model.config
        projections: list[list[torch.nn.Linear]] = [
            *(p for layer in model.model.layers for p in _projections(layer)),
            [model.lm_head],
        ]
        kinds = [projection_kind(p[0]) for p in projections]
        quantized = [kind for kind in kinds if kind != "dense"]
        roles = [*ROLES * len(model.model.layers), LOGITS]
        if packed is None:
            packed_up_to, why = pick_packing(model, projections, roles, bool(quantized), choices)
            log.info("dense weights %s", why)
        else:
            packed_up_to = ALL_ROWS if packed else 0
        dequantize, why = dequantize_on_cpu(model, projections)
        # A quantized model's own values are its quantized ones, not the grids of the checkpoint it came from.
        four_bit = model.device.type == "cpu" and int4_rows != 0 and not quantized
        grids = checkpoint_grids(model, projections, checkpoint if four_bit else None, gguf)
        input_rounding.choose(model, projections, grids, kept(choices))
        linears: list[Linear | Modules] = [
            Linear(p, packed_up_to, grid)
            if kind == "dense"
            else Linear(p, packed_up_to, dequantize_to=model.dtype)
            if dequantize and kind == QUANTIZED["Linear4bit"]
            else Modules(p)
            for p, kind, grid in zip(projections, kinds, grids, strict=True)
        ]
        self.kind = ""
        if quantized:
            self.kind += f", {quantized[0]} projections" + (f" {why}" if why else "")
        # LLM.int8 splits out the input columns holding outliers, found by value each step: shapes a CUDA
        # graph cannot fix.
        self.graph_blocker = "bitsandbytes' 8-bit layers" if QUANTIZED["Linear8bitLt"] in quantized else None
        if any(p.int4 is not None for p in linears):
            if int4_rows is None:
                rows = measure_int4_rows(linears, roles, model.dtype, choices)
            else:
                rows = dict.fromkeys(roles, int4_rows)
            for p, role in zip(linears, roles, strict=True):
                p.int4_rows = rows.get(role, 0) if p.int4 is not None else 0
                p.int4 = p.int4 if p.int4_rows else None  # never faster: not kept
            self.kind += four_bit_kind(linears, roles)
        for p in linears:
            if isinstance(p, Linear):
                p.settle(max_rows if p is linears[-1] else None)
        if any(isinstance(p, Linear) and p.packed for p in linears):
            prepacked = f", prepacked {str(model.dtype).removeprefix('torch.')}"
            self.kind = prepacked + (f" up to {packed_up_to} rows" if packed_up_to < ALL_ROWS else "") + self.kind
        self.kind = "fused" + self.kind
        self.layers = [Layer(layer, linears[4 * i : 4 * i + 4]) for i, layer in enumerate(model.model.layers)]
        self.lm_head = linears[-1]
        self.embed: torch.Tensor = model.model.embed_tokens.weight
        self.final_norm: Norm = (model.model.norm.weight, model.model.norm.variance_epsilon)
        self.extra_bytes = sum(p.extra_bytes for p in linears)
        self.rotary: torch.nn.Module = model.model.rotary_emb
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # oneDNN keeps a kernel per number of rows (see matmul_rows): in bfloat16 for every step (its matmuls go
        # through oneDNN, prepacked or not), in float32 for the steps that take the prepacked weights.
        cpu = model.device.type == "cpu"
        self.bucket_up_to = ALL_ROWS if cpu and model.dtype == torch.bfloat16 else packed_up_to if cpu else 0
        if all(p.int4_rows == ALL_ROWS for p in linears[:-1]):  # no layer's matmul goes through oneDNN
            self.bucket_up_to = 0
        self.fine_buckets = model.dtype == torch.float32

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary_for(x, positions)
        cache_layers = growing_layers(cache)
        attend = self.attention(mask, ids.shape[1], cache_layers[0].get_seq_length(), x)
        prefill = ids.shape[1] > 1
        for layer, cache_layer in zip(self.layers, cache_layers, strict=True):
            q, k, v = self.pre_attention(layer, x, cos, sin, prefill)
            keys, values = cache_layer.update(k, v)
            out = attend(q, keys, values, layer.scaling)
            x = self.post_attention(layer, x, out.transpose(1, 2).flatten(2), prefill)
        return self.head(x[:, -1])

    def attention(self, mask: torch.Tensor | None, num_queries: int, past: int, x: torch.Tensor) -> Attention:
        """How this step calls SDPA (attention.py): expanded key/value heads on a GPU where a mask is needed."""
        return Attention(mask, num_queries, past, x, expand_heads=x.device.type == "cuda")

    def ragged(
        self, ids: torch.Tensor, positions: torch.Tensor, sizes: list[int], caches: list[DynamicCache]
    ) -> torch.Tensor:
        """Several sequences' chunks side by side in one row of tokens, each attending over its own cache.

        `ids` and `positions` are [1, tokens]: chunks of `sizes` tokens one after another, in the order
        of `caches`. The matmuls run over every token at once with no padding; only attention runs per
        sequence. Returns each chunk's last-token logits [chunks, V].
        """
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary_for(x, positions)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        # Each chunk is one unpadded row over its own cache: causal, with a mask only after cached keys.
        attends = [self.attention(None, n, c.get_seq_length(), x) for c, n in zip(caches, sizes, strict=True)]
        for index, layer in enumerate(self.layers):
            q, k, v = self.pre_attention(layer, x, cos, sin, prefill=True)
            outs = []
            for cache, start, n, attend in zip(caches, starts, sizes, attends, strict=True):
                end = start + n
                keys, values = growing_layers(cache)[index].update(k[:, :, start:end], v[:, :, start:end])
                outs.append(attend(q[:, :, start:end], keys, values, layer.scaling))
            x = self.post_attention(layer, x, torch.cat(outs, dim=2).transpose(1, 2).flatten(2), prefill=True)
        last = torch.tensor([start + n - 1 for start, n in zip(starts, sizes, strict=True)], device=ids.device)
        return self.head(x[0, last])

    def paged(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """One step over the paged pool: decode rows and prompt chunks side by side in one row of tokens [1, tokens]
        (paged_kv.PagedBatch says whose they are), the weights read once for all. Returns each segment's last-token
        logits [segments, V]."""
        prefill = batch.has_prompt
        tokens = ids.shape[1]
        extra = self.matmul_rows(tokens) - tokens  # rows of padding the matmuls carry, never attended or read
        if extra:
            ids, positions = F.pad(ids, (0, extra)), F.pad(positions, (0, extra))
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary_for(x, positions)
        for index, layer in enumerate(self.layers):
            q, k, v = self.pre_attention(layer, x, cos, sin, prefill)
            if extra:
                q, k, v = q[:, :, :tokens], k[:, :, :tokens], v[:, :, :tokens]
            attended = batch.attend(index, q, k, v, layer.scaling).transpose(1, 2).flatten(2)
            if extra:
                attended = F.pad(attended, (0, 0, 0, extra))
            x = self.post_attention(layer, x, attended, prefill)
        return self.head(x[0, batch.last])

    def matmul_rows(self, tokens: int) -> int:
        """Rows a step of `tokens` tokens runs its matmuls over. oneDNN builds and keeps a kernel for each number of
        rows it meets: 3-5 ms and about 0.6 MiB each in bfloat16, 1.5 MiB in float32 (per projection's shape), so
        a server meeting every chunk size grew by hundreds of MiB and paid that time on each new size. Past
        ROW_BUCKET rows, steps that go through oneDNN are padded up to a bucket; larger float32 steps take MKL's
        plain matmul, which keeps nothing per size, and are not padded.

        In bfloat16 a whole step padded to a multiple of 16 measured within -8% and +15% of the unpadded one from
        19 to 515 tokens (2-core AMX host). In float32 each padding row costs about what a real row does: the
        layers' prepacked matmuls took 220 ms for 36 rows and 290 ms for 48, 164 ms for 20 and 211 ms for 32
        (Qwen2.5-Coder-0.5B, 2-core AVX2 AMD host), so there the buckets are 8 rows up to 128. Where every layer's
        matmuls take the 4-bit weights in every step, nothing goes through oneDNN and nothing is padded."""
        if tokens <= ROW_BUCKET or tokens > self.bucket_up_to:
            return tokens
        bucket = FLOAT32_BUCKET if self.fine_buckets and tokens <= FLOAT32_FINE_UP_TO else ROW_BUCKET
        return min(-(-tokens // bucket) * bucket, self.bucket_up_to)

    def uneven(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, real: torch.Tensor
    ) -> torch.Tensor:
        """A decode step whose rows bring different numbers of tokens: like __call__ over the [rows, k] block,
        but the matmuls run over the `real` tokens only (1 in `real` [rows, k]); padding gets zero keys and
        values in the cache, masked out by `mask`. Each row's last column must be real."""
        rows, k = ids.shape
        index = real.flatten().nonzero().flatten()
        x = F.embedding(ids.flatten()[index], self.embed)[None]
        cos, sin = self.rotary_for(x, positions.flatten()[index][None])
        cache_layers = growing_layers(cache)
        attend = self.attention(mask, k, cache_layers[0].get_seq_length(), x)

        def spread(t: torch.Tensor) -> torch.Tensor:  # [1, heads, tokens, dim] -> [rows, heads, k, dim]
            out = t.new_zeros((rows * k, t.shape[1], t.shape[3]))
            out[index] = t[0].transpose(0, 1)
            return out.view(rows, k, t.shape[1], t.shape[3]).transpose(1, 2)

        for layer, cache_layer in zip(self.layers, cache_layers, strict=True):
            q, key, value = self.pre_attention(layer, x, cos, sin)
            keys, values = cache_layer.update(spread(key), spread(value))
            out = attend(spread(q), keys, values, layer.scaling)
            x = self.post_attention(layer, x, out.transpose(1, 2).flatten(2).flatten(0, 1)[index][None])
        last = real.sum(dim=1).cumsum(0) - 1
        return self.head(x[0, last])

    def rotary_for(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and `rotate`'s signed sin, [rows, queries, 1, dim] to broadcast over heads."""
        cos, sin = self.rotary(x, positions)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos[:, :, None, :], sin[:, :, None, :]

    def pre_attention(
        self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefill: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [rows, heads, queries, dim], keys and values [rows, kv_heads, queries, dim] of one layer."""
        heads, kv_heads = self.num_heads, self.num_kv_heads
        rows, num_queries = x.shape[:2]
        qkv = layer.qkv(rms_norm(x, layer.norm1), prefill).view(rows, num_queries, heads + 2 * kv_heads, self.head_dim)
        qk = qkv[:, :, : heads + kv_heads]
        if layer.qk_norms is not None:
            q_norm, k_norm = layer.qk_norms
            qk = torch.cat((rms_norm(qk[:, :, :heads], q_norm), rms_norm(qk[:, :, heads:], k_norm)), dim=2)
        qk = rotate(qk, cos, sin)
        return (
            qk[:, :, :heads].transpose(1, 2),
            qk[:, :, heads:].transpose(1, 2),
            qkv[:, :, heads + kv_heads :].transpose(1, 2),
        )

    def post_attention(
        self, layer: Layer, x: torch.Tensor, attended: torch.Tensor, prefill: bool = False
    ) -> torch.Tensor:
        """The rest of one layer (output projection, MLP, residuals); `attended` is [rows, queries, heads * dim]."""
        x = x + layer.o(attended, prefill)
        gate, up = layer.gate_up(rms_norm(x, layer.norm2), prefill).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up, prefill)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of `x`'s rows [rows, hidden]. Its kernel goes by their number alone, as in a decode step: logits
        feed no cache, so a prompt's may come from either kernel however it was chunked."""
        return self.lm_head(rms_norm(x, self.final_norm))
