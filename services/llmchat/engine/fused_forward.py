"""llmchat's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) over the loaded weights.

Measured on a 2-core CPU, a quarter to a third of transformers' decode step was Python and
small-op overhead around the matmuls. This pass fuses the q/k/v and gate/up projections into one
matmul each, applies rotary embeddings to queries and keys together, and on CPUs with AMX runs
bfloat16 matmuls on weights prepacked once for oneDNN instead of repacking them every call. On any
CPU, weights converted from a 4-bit GGUF keep a 4-bit copy for decode steps of few rows (int4.py);
bitsandbytes' layers run inside the pass (quantized.py). It reads and writes the same KV cache layers
as transformers' forward, so the runner does not care which ran.
"""

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from llmchat.engine import dot8, int4
from llmchat.engine.attention import Attention
from llmchat.engine.choices import Choices
from llmchat.engine.cpu import has_amx_bf16
from llmchat.engine.kv_cache import GrowingLayer
from llmchat.engine.paged_kv import PagedBatch
from llmchat.engine.quantized import QUANTIZED, Modules, dequantize_on_cpu, dequantized, projection_kind

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


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


class Linear:
    """One projection, or several fused into one: a plain matmul, or oneDNN's on a prepacked weight."""

    def __init__(
        self,
        linears: list[torch.nn.Linear],
        packed: bool,
        grid: int4.Grid | None = None,
        dequantize_to: torch.dtype | None = None,
    ) -> None:
        """`grid`: the weights' 4-bit form, used for steps of up to `int4_rows` rows (set once measured).
        `dequantize_to`: bitsandbytes 4-bit layers, whose weights are dequantized once into this dtype."""
        self.int4 = grid
        self.int4_rows = 0
        weights = [dequantized(m, dequantize_to) if dequantize_to else m.weight.detach() for m in linears]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        biases = [m.bias for m in linears]
        self.bias: torch.Tensor | None
        if any(b is not None for b in biases):
            zeros = [weight.new_zeros(w.shape[0]) for w in weights]
            self.bias = torch.cat([z if b is None else b.detach() for b, z in zip(biases, zeros, strict=True)])
            self.bias = self.bias.to(weight.dtype)
        else:
            self.bias = None
        self.out_features, self.in_features = weight.shape
        self.packed = packed
        self.copied = packed or dequantize_to is not None  # held beside the model's own weights
        if packed:
            # The batch-size hint only tunes the layout; any number of rows can use the packed weight.
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            return
        self.weight = weight
        # The model's own projections become views of the fused weight, so it is not held twice.
        offset = 0
        for m in linears if len(linears) > 1 and not dequantize_to else []:
            rows = m.weight.shape[0]
            m.weight.data = weight[offset : offset + rows]
            offset += rows

    @property
    def grid(self) -> int4.Grid:
        """`int4`, of a projection known to keep a 4-bit form."""
        assert self.int4 is not None
        return self.int4

    @property
    def extra_bytes(self) -> int:
        """Memory this projection holds beyond the model's own weights (prepacked and 4-bit copies)."""
        extra = self.weight.nbytes if self.copied else 0
        return extra + (self.int4.nbytes if self.int4 is not None else 0)

    def __call__(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Prefill always takes the dense matmul, so a prompt's keys and values do not depend on its chunking."""
        flat = x.reshape(-1, x.shape[-1])
        out = self.dense(flat) if prefill or flat.shape[0] > self.int4_rows else self.quantized(flat)
        return out.view(*x.shape[:-1], self.out_features)

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(flat, self.weight, self.bias)
        if torch.compiler.is_compiling():
            return packed_linear(flat, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")

    def quantized(self, flat: torch.Tensor) -> torch.Tensor:
        assert self.int4 is not None  # int4_rows is 0 without it
        out = self.int4.matmul(flat)
        return out if self.bias is None else out + self.bias


@torch.library.custom_op("llmchat::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's matmul on a prepacked weight, opaque to torch.compile: inductor's own lowering of it fails on
    dynamic shapes (LLMCHAT_COMPILE on AMX CPUs), and the matmul is one call either way."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


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


def _checkpoint_grids(
    model: torch.nn.Module, projections: list[list[torch.nn.Linear]], checkpoint: Path | None, gguf: Path | None
) -> list[int4.Grid | None]:
    """Each projection's 4-bit form from the checkpoint (and the GGUF it came from), by its modules' parameter
    names (None without one)."""
    if checkpoint is None:
        return [None] * len(projections)
    # By parameter, so a logits matmul tied to the embedding finds the embedding's name in the checkpoint.
    names = {id(param): name for name, param in model.named_parameters()}
    return int4.load_grids(checkpoint, [[names[id(m.weight)] for m in linears] for linears in projections], gguf)


# Kernel choices and crossovers measured in this process, for forward passes built without kept choices: engines
# loaded again (tests) reuse them.
_measured = Choices()


# Projections whose crossovers are timed apart, in `_projections` order (the logits matmul comes last): their
# shapes differ, and a Q8_0 weight's two grids take the input twice. Measured on AVX2, the 4-bit weights won
# up to 12 rows for the logits, 16 for down, 32 for gate/up.
ROLES = ("q/k/v", "o", "gate/up", "down")

# Dense weight bytes timed per role: more than a CPU cache holds, as in a decode step, and for a large model
# only its first layers, so that timing stays within a second or two.
CROSSOVER_BYTES = 64 * 2**20


def _int4_rows(
    linears: list[Linear | Modules], roles: list[str], dtype: torch.dtype, choices: Choices
) -> dict[str, int]:
    """Each role's crossover of the 4-bit and dense matmuls on this machine (of the roles with 4-bit weights),
    after moving a role's grids to torch's int4 kernel where that is faster at one row than llmchat's.
    `choices` keeps both per role and shape, so a restart (or a second engine) makes the same ones."""
    crossovers = {}
    for role in dict.fromkeys(roles):
        # Only a Linear keeps a 4-bit form (a Modules' int4 is None).
        grids = [
            p for p, r in zip(linears, roles, strict=True) if r == role and isinstance(p, Linear) and p.int4 is not None
        ]
        if not grids:
            continue
        first = grids[0]
        group = grids[: max(1, CROSSOVER_BYTES // (first.in_features * first.out_features * dtype.itemsize))]
        layout = "prepacked" if first.packed else "plain"
        # The kernel first meant to multiply them is part of the key: where llmchat's can no longer be built (no
        # compiler), torch's must not inherit its crossover.
        key = (
            f"4-bit {role}: {len(group)} x {first.out_features}x{first.in_features}, {layout} {dtype}, "
            f"from {first.grid.kernel}"
        )
        chosen = choices.get(key, partial(_measure_role, group, role, dtype))
        if chosen["kernel"] == int4.TORCH_KERNEL:
            on_torch_kernel(grids)
        crossovers[role] = chosen["rows"]
    return crossovers


def _measure_role(group: list[Linear], role: str, dtype: torch.dtype) -> dict:
    """The kernel for one kind of projection (timed on `group`, a few of them) and its crossover."""
    first = group[0]
    if first.grid.kernel == int4.DOT8_KERNEL and int4.torch_kernel_is_faster(
        [p.grid for p in group], first.in_features, dtype
    ):
        on_torch_kernel(group)  # before the crossover is timed, which then times torch's kernel
    timer = int4.timer([(p.dense, p.quantized) for p in group], first.in_features, dtype)
    return {"kernel": first.grid.kernel, "rows": int4.crossover(timer, role)}


def on_torch_kernel(linears: list[Linear]) -> None:
    """Their grids multiplied by torch's int4 kernel from now on (those it can take)."""
    for p in linears:
        if p.grid.kernel != int4.TORCH_KERNEL and int4.torch_takes(p.grid.dot8_levels):
            p.int4 = int4.Grid(*p.grid.dot8_levels, dot8_kernel=False)


def _four_bit_kind(linears: list[Linear | Modules], roles: list[str]) -> str:
    """How /health names the 4-bit weights in use: "up to 24 rows", or each role's row count where they differ,
    and the kernel that multiplies them ("" when none are kept)."""
    used = {role: p.int4_rows for p, role in zip(linears, roles, strict=True) if p.int4 is not None}
    num_int4 = sum(p.int4 is not None for p in linears)
    if not used:
        return ""
    if len(set(used.values())) == 1:
        limit = f"{next(iter(used.values()))} rows"
    else:
        limit = ", ".join(f"{role} {n}" for role, n in used.items()) + " rows"
    kernels = dict.fromkeys(p.int4.kernel for p in linears if p.int4 is not None)
    kernel = ", ".join(kernels)
    if int4.DOT8_KERNEL not in kernels and (why := dot8.unavailable()):
        kernel += f": {why}"
    return f", 4-bit weights up to {limit} ({num_int4} of {len(linears)} matmuls, {kernel})"


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
    ) -> None:
        """`checkpoint`: the float32 safetensors converted from `gguf`, checked for 4-bit grids (int4.py), used
        on the CPU for steps of up to `int4_rows` rows (None: the crossover measured here; 0: never). `choices`:
        where the measured kernels and crossovers are kept (default: in this process)."""
        config = model.config
        packed = uses_packed_bf16(model) if packed is None else packed
        projections: list[list[torch.nn.Linear]] = [
            *(p for layer in model.model.layers for p in _projections(layer)),
            [model.lm_head],
        ]
        kinds = [projection_kind(p[0]) for p in projections]
        quantized = [kind for kind in kinds if kind != "dense"]
        dequantize, why = dequantize_on_cpu(model, projections)
        # A quantized model's own values are its quantized ones, not the grids of the checkpoint it came from.
        four_bit = model.device.type == "cpu" and int4_rows != 0 and not quantized
        grids = _checkpoint_grids(model, projections, checkpoint if four_bit else None, gguf)
        linears: list[Linear | Modules] = [
            Linear(p, packed, grid)
            if kind == "dense"
            else Linear(p, packed, dequantize_to=model.dtype)
            if dequantize and kind == QUANTIZED["Linear4bit"]
            else Modules(p)
            for p, kind, grid in zip(projections, kinds, grids, strict=True)
        ]
        self.kind = "fused, prepacked bfloat16" if packed else "fused"
        if quantized:
            self.kind += f", {quantized[0]} projections" + (f" {why}" if why else "")
        # LLM.int8 splits out the input columns holding outliers, found by value each step: shapes a CUDA
        # graph cannot fix.
        self.graph_blocker = "bitsandbytes' 8-bit layers" if QUANTIZED["Linear8bitLt"] in quantized else None
        roles = [*ROLES * len(model.model.layers), "logits"]
        if any(p.int4 is not None for p in linears):
            if int4_rows is None:
                rows = _int4_rows(linears, roles, model.dtype, _measured if choices is None else choices)
            else:
                rows = dict.fromkeys(roles, int4_rows)
            for p, role in zip(linears, roles, strict=True):
                p.int4_rows = rows.get(role, 0) if p.int4 is not None else 0
                p.int4 = p.int4 if p.int4_rows else None  # never faster: not kept
            self.kind += _four_bit_kind(linears, roles)
        self.layers = [Layer(layer, linears[4 * i : 4 * i + 4]) for i, layer in enumerate(model.model.layers)]
        self.lm_head = linears[-1]
        self.embed: torch.Tensor = model.model.embed_tokens.weight
        self.final_norm: Norm = (model.model.norm.weight, model.model.norm.variance_epsilon)
        self.extra_bytes = sum(p.extra_bytes for p in linears)
        self.rotary: torch.nn.Module = model.model.rotary_emb
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

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
        return self.head(x, prefill)

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
        return self.lm_head(rms_norm(x[0, last], self.final_norm), prefill=True)

    def paged(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """One step over the paged pool: decode rows and prompt chunks side by side in one row of tokens [1, tokens]
        (paged_kv.PagedBatch says whose they are), the weights read once for all. Returns each segment's last-token
        logits [segments, V]."""
        prefill = batch.has_prompt
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary_for(x, positions)
        for index, layer in enumerate(self.layers):
            q, k, v = self.pre_attention(layer, x, cos, sin, prefill)
            out = batch.attend(index, q, k, v, layer.scaling)
            x = self.post_attention(layer, x, out.transpose(1, 2).flatten(2), prefill)
        return self.lm_head(rms_norm(x[0, batch.last], self.final_norm), prefill)

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
        return self.lm_head(rms_norm(x[0, last], self.final_norm))

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

    def head(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Logits of each row's last position."""
        return self.lm_head(rms_norm(x[:, -1], self.final_norm), prefill)
