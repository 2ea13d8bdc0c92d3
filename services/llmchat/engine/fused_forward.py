"""llmchat's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) over the loaded weights.

Measured on a 2-core CPU, a quarter to a third of transformers' decode step was Python and
small-op overhead around the matmuls. This pass fuses the q/k/v and gate/up projections into one
matmul each, applies rotary embeddings to queries and keys together, and on CPUs with AMX runs
bfloat16 matmuls on weights prepacked once for oneDNN instead of repacking them every call; there,
weights converted from a Q4_1 GGUF also keep a 4-bit copy for steps of few rows (int4.py). It reads
and writes the same KV cache layers as transformers' forward, so the runner does not care which ran.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from llmchat.engine import int4
from llmchat.engine.attention import Attention
from llmchat.engine.cpu import has_amx_bf16

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported_reason(model: torch.nn.Module) -> str | None:
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


# bitsandbytes' layers, by class name (bitsandbytes is an optional extra), and what /health calls them.
QUANTIZED = {"Linear4bit": "bitsandbytes 4-bit", "Linear8bitLt": "bitsandbytes 8-bit"}


def projection_kind(module: torch.nn.Module) -> str | None:
    """ "dense" for torch's Linear, QUANTIZED's name for a bitsandbytes layer, None for anything else."""
    if type(module) is torch.nn.Linear:
        return "dense"
    names = [cls.__name__ for cls in type(module).__mro__ if cls.__module__.startswith("bitsandbytes")]
    return next((QUANTIZED[name] for name in names if name in QUANTIZED), None)


def _attention_linears(layer) -> list[torch.nn.Linear]:
    attn = layer.self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]


def _mlp_linears(layer) -> list[torch.nn.Linear]:
    return [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]


def uses_packed_bf16(model: torch.nn.Module) -> bool:
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
        grid: int4.Int4Weight | None = None,
        dequantize_to: torch.dtype | None = None,
    ) -> None:
        """`grid`: the weights' 4-bit form, used for steps of up to `int4_rows` rows (set once measured).
        `dequantize_to`: bitsandbytes 4-bit layers, whose weights are dequantized once into this dtype."""
        self.int4 = grid
        self.int4_rows = 0
        weights = [_dequantized(m, dequantize_to) if dequantize_to else m.weight.detach() for m in linears]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        biases = [m.bias for m in linears]
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
    def extra_bytes(self) -> int:
        """Memory this projection holds beyond the model's own weights (prepacked and 4-bit copies)."""
        extra = self.weight.nbytes if self.copied else 0
        return extra + (sum(t.nbytes for t in self.int4) if self.int4 is not None else 0)

    def __call__(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Prefill always takes the dense matmul, so a prompt's keys and values do not depend on its chunking."""
        flat = x.reshape(-1, x.shape[-1])
        out = self.dense(flat) if prefill or flat.shape[0] > self.int4_rows else self.quantized(flat)
        return out.view(*x.shape[:-1], self.out_features)

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(flat, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")

    def quantized(self, flat: torch.Tensor) -> torch.Tensor:
        out = int4.matmul(flat, self.int4)
        return out if self.bias is None else out + self.bias


def _dequantized(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit layer's weight [out, in] in `dtype`: the values its own matmul computes with."""
    import bitsandbytes.functional

    return bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)


def dequantize_on_cpu(model: torch.nn.Module, projections: list[list[torch.nn.Module]]) -> tuple[bool, str]:
    """Whether the fused pass keeps a CPU model's bitsandbytes 4-bit weights dequantized, and why.

    bitsandbytes' CPU matmul (without AVX512_BF16) dequantizes a 4-bit weight on every call: a decode
    step of the bundled model took 151 ms in nf4 against 67 ms in float32. A copy made once, where it
    takes at most half the available memory, computes with the same values at the dense speed.
    """
    layers = [m for p in projections for m in p if projection_kind(m) == QUANTIZED["Linear4bit"]]
    if model.device.type != "cpu" or not layers:
        return False, ""
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        return False, "kept in 4 bits: bitsandbytes repacked them for its AVX512_BF16 kernel"
    import psutil

    need = sum(m.out_features * m.in_features for m in layers) * model.dtype.itemsize
    dtype = str(model.dtype).removeprefix("torch.")
    if need > psutil.virtual_memory().available // 2:
        return False, f"kept in 4 bits: a {dtype} copy ({need / 2**30:.1f} GiB) would take over half the free memory"
    return True, f"dequantized once to {dtype} (bitsandbytes' CPU matmul dequantizes every call)"


class Modules:
    """Quantized projections (bitsandbytes), each run by its own module and kernel, their outputs side by side.

    On a GPU the fused pass around them (and CUDA graphs, for 4-bit) removes the launches between matmuls.
    On the CPU the quantized matmuls themselves dominate a step: with the rest fused, the bundled model's
    8-bit step was 0.97x to 1.18x as fast as through transformers' forward (1 to 16 rows, AVX2).
    """

    int4, int4_rows, packed, extra_bytes = None, 0, False, 0

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = modules
        self.out_features = sum(m.out_features for m in modules)
        self.in_features = modules[0].in_features

    def __call__(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)


def _projections(layer) -> list[list[torch.nn.Linear]]:
    """A layer's matmuls, each as the modules fused into it: q/k/v, o, gate/up, down."""
    q, k, v, o = _attention_linears(layer)
    gate, up, down = _mlp_linears(layer)
    return [[q, k, v], [o], [gate, up], [down]]


class Layer:
    def __init__(self, layer, projections: list[Linear]) -> None:
        """`projections`: this layer's matmuls, in the order `_projections` lists them."""
        attn = layer.self_attn
        self.qkv, self.o, self.gate_up, self.down = projections
        self.norm1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        # Qwen3 normalises each head's query and key before the rotation.
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norms = None
        if q_norm is not None:
            self.qk_norms = ((q_norm.weight, q_norm.variance_epsilon), (k_norm.weight, k_norm.variance_epsilon))
        self.scaling = attn.scaling


def _checkpoint_grids(
    model: torch.nn.Module, projections: list[list[torch.nn.Linear]], checkpoint: Path | None
) -> list[int4.Int4Weight | None]:
    """Each projection's 4-bit form from the checkpoint, by its modules' parameter names (None without one)."""
    if checkpoint is None:
        return [None] * len(projections)
    # By parameter, so a logits matmul tied to the embedding finds the embedding's name in the checkpoint.
    names = {id(param): name for name, param in model.named_parameters()}
    return int4.load_grids(checkpoint, [[names[id(m.weight)] for m in linears] for linears in projections])


# Crossovers measured in this process, by what decides them: engines loaded again (tests) reuse them.
_crossovers: dict[tuple, int] = {}


# Dense weight bytes timed for the crossover: more than a CPU cache holds, as in a decode step, and for a
# large model only its first layers, so that timing stays around a second.
CROSSOVER_BYTES = 256 * 2**20


def _int4_rows(linears: list[Linear], dtype: torch.dtype) -> int:
    """The crossover of the 4-bit and dense matmuls on this machine, timed on the MLPs' input projections."""
    mlp = [p for p in linears[2:-1:4] if p.int4 is not None] or [p for p in linears if p.int4 is not None]
    layer_bytes = mlp[0].in_features * mlp[0].out_features * dtype.itemsize
    mlp = mlp[: max(1, CROSSOVER_BYTES // layer_bytes)]
    key = (len(mlp), mlp[0].in_features, mlp[0].out_features, mlp[0].packed, dtype)
    if key not in _crossovers:
        _crossovers[key] = int4.crossover(int4.timer([(p.dense, p.quantized) for p in mlp], mlp[0].in_features, dtype))
    return _crossovers[key]


def rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """transformers' Llama RMSNorm to the bit: statistics in float32, weight applied in the model's dtype."""
    weight, eps = norm
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class FusedForward:
    """Callable like the runner's model: (ids, mask, positions, cache) -> logits of each row's last token."""

    def __init__(
        self,
        model: torch.nn.Module,
        packed: bool | None = None,
        checkpoint: Path | None = None,
        int4_rows: int | None = None,
    ) -> None:
        """`checkpoint`: the float32 safetensors converted from a GGUF, checked for 4-bit grids (int4.py), used
        on the CPU for steps of up to `int4_rows` rows (None: the crossover measured here; 0: never)."""
        config = model.config
        packed = uses_packed_bf16(model) if packed is None else packed
        projections = [*(p for layer in model.model.layers for p in _projections(layer)), [model.lm_head]]
        kinds = [projection_kind(p[0]) for p in projections]
        quantized = [kind for kind in kinds if kind != "dense"]
        dequantize, why = dequantize_on_cpu(model, projections)
        # A quantized model's own values are its quantized ones, not the grids of the checkpoint it came from.
        four_bit = model.device.type == "cpu" and int4_rows != 0 and not quantized
        grids = _checkpoint_grids(model, projections, checkpoint if four_bit else None)
        linears = [
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
        if num_int4 := sum(p.int4 is not None for p in linears):
            rows = _int4_rows(linears, model.dtype) if int4_rows is None else int4_rows
            for p in linears:
                p.int4, p.int4_rows = (p.int4, rows) if rows else (None, 0)  # never faster: not kept
            self.kind += f", 4-bit weights up to {rows} rows ({num_int4} of {len(linears)} matmuls)"
        self.layers = [Layer(layer, linears[4 * i : 4 * i + 4]) for i, layer in enumerate(model.model.layers)]
        self.lm_head = linears[-1]
        self.embed = model.model.embed_tokens.weight
        self.final_norm = (model.model.norm.weight, model.model.norm.variance_epsilon)
        self.extra_bytes = sum(p.extra_bytes for p in linears)
        self.rotary = model.model.rotary_emb
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary_for(x, positions)
        attend = self.attention(mask, ids.shape[1], cache.layers[0].get_seq_length(), x)
        prefill = ids.shape[1] > 1
        for layer, cache_layer in zip(self.layers, cache.layers, strict=True):
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
                keys, values = cache.layers[index].update(k[:, :, start:end], v[:, :, start:end])
                outs.append(attend(q[:, :, start:end], keys, values, layer.scaling))
            x = self.post_attention(layer, x, torch.cat(outs, dim=2).transpose(1, 2).flatten(2), prefill=True)
        last = torch.tensor([start + n - 1 for start, n in zip(starts, sizes, strict=True)], device=ids.device)
        return self.lm_head(rms_norm(x[0, last], self.final_norm), prefill=True)

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
        attend = self.attention(mask, k, cache.layers[0].get_seq_length(), x)

        def spread(t: torch.Tensor) -> torch.Tensor:  # [1, heads, tokens, dim] -> [rows, heads, k, dim]
            out = t.new_zeros((rows * k, t.shape[1], t.shape[3]))
            out[index] = t[0].transpose(0, 1)
            return out.view(rows, k, t.shape[1], t.shape[3]).transpose(1, 2)

        for layer, cache_layer in zip(self.layers, cache.layers, strict=True):
            q, key, value = self.pre_attention(layer, x, cos, sin)
            keys, values = cache_layer.update(spread(key), spread(value))
            out = attend(spread(q), keys, values, layer.scaling)
            x = self.post_attention(layer, x, out.transpose(1, 2).flatten(2).flatten(0, 1)[index][None])
        last = real.sum(dim=1).cumsum(0) - 1
        return self.lm_head(rms_norm(x[0, last], self.final_norm))

    def rotary_for(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, positions)
        return cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads in [rows, queries, heads, dim]

    def pre_attention(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefill=False):
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

    def post_attention(self, layer: Layer, x: torch.Tensor, attended: torch.Tensor, prefill=False) -> torch.Tensor:
        """The rest of one layer (output projection, MLP, residuals); `attended` is [rows, queries, heads * dim]."""
        x = x + layer.o(attended, prefill)
        gate, up = layer.gate_up(rms_norm(x, layer.norm2), prefill).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up, prefill)

    def head(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Logits of each row's last position."""
        return self.lm_head(rms_norm(x[:, -1], self.final_norm), prefill)
