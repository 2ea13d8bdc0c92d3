"""llmchat's fused forward pass computes what transformers' does, for every family it claims, and only for those."""

import warnings
from types import SimpleNamespace

import httpx
import psutil
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from llmchat.engine import Engine, fused_forward, projections
from llmchat.engine.attention import Attention
from llmchat.engine.choices import Choices
from llmchat.engine.cuda_graphs import GraphedDecode, buckets_for
from llmchat.engine.fused_forward import FusedForward, unsupported_reason, uses_packed_bf16
from llmchat.engine.kv_cache import new_cache
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.engine.runner import TransformersForward, pick_forward
from llmchat.server import create_app
from llmchat.settings import Settings
from tests.conftest import start_server

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
# Each family's own twist: Llama3 rope scaling, Mistral, Qwen2's q/k/v biases, Qwen3's per-head q/k norms.
FAMILIES = {
    "llama": dict(
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(use_sliding_window=False, attention_bias=False),
}


def tiny_model(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(TINY | FAMILIES.get(model_type, {}) | overrides))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if model_type == "qwen2":  # randomly initialised biases are zeros; make them count
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    return model


def left_padded(rows: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(rows)
    ids = torch.randint(3, vocab, (len(rows), longest))
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, n in enumerate(rows):
        mask[i, longest - n :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def run(forward, model, ids, mask, positions, tokens: list[torch.Tensor] | None = None, steps: int = 4):
    """Logits of a prefill and decode steps: feeding `tokens` (teacher forcing) or else the greedy ones."""
    cache = new_cache(model)
    logits = [forward(ids, mask, positions, cache)]
    positions = positions[:, -1:]
    for step in range(len(tokens) if tokens is not None else steps):
        mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype)], dim=1)
        positions = positions + 1
        token = tokens[step] if tokens is not None else logits[-1].argmax(-1, keepdim=True)
        logits.append(forward(token, mask, positions, cache))
    return logits


def compare(model, rows: list[int], steps: int, ours=None, theirs=None) -> tuple[list, list]:
    """(ours, theirs) logits for the same left-padded batch and the same fed-back tokens.

    By default ours is the fused pass and theirs transformers' forward.
    """
    ours = ours or FusedForward(model)
    theirs = theirs or TransformersForward(model, "reference")
    ids, mask, positions = left_padded(rows, model.config.vocab_size)
    with torch.inference_mode():
        reference = run(theirs, model, ids, mask, positions, steps=steps)
        tokens = [t.argmax(-1, keepdim=True) for t in reference[:-1]]
        return run(ours, model, ids, mask, positions, tokens), reference


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "prepacked"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_fused_pass_matches_transformers_for_each_family(model_type, packed):
    """With plain matmuls and with float32 weights prepacked for oneDNN (chosen where timed faster)."""
    model = tiny_model(model_type)
    assert unsupported_reason(model) is None
    fused = FusedForward(model, packed=packed)
    assert fused.kind == ("fused, prepacked float32" if packed else "fused")
    ours, theirs = compare(model, [9, 4, 13], steps=4, ours=fused)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    # Unpacked, the model's own projections view the fused weights instead of holding a second copy.
    attn = model.model.layers[0].self_attn
    shared = attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert shared != packed


def test_fused_weights_are_made_at_first_use_and_go_where_every_step_takes_four_bits():
    attn = tiny_model("llama").model.layers[0].self_attn
    modules = (attn.q_proj, attn.k_proj, attn.v_proj)
    own = [m.weight.detach().clone() for m in modules]
    storages = [m.weight.untyped_storage().data_ptr() for m in modules]
    qkv = projections.Linear([attn.q_proj, attn.k_proj, attn.v_proj], packed_rows=0)
    assert qkv._weight is None  # nothing concatenated yet
    assert torch.equal(qkv.weight, torch.cat(own))
    unused = projections.Linear([attn.q_proj, attn.k_proj, attn.v_proj], packed_rows=64)
    unused.int4_rows = projections.ALL_ROWS
    unused.settle()
    assert unused.weight is None and not unused.packed and unused._weight is None
    # The model's own projections keep their own weights (not views of a fused copy).
    assert [m.weight.untyped_storage().data_ptr() for m in modules] == storages


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_ragged_chunks_match_one_sequence_at_a_time(model_type):
    """Chunks of several sequences in one pass, each over its own cache (some empty, some with tokens)."""
    model = tiny_model(model_type)
    fused = FusedForward(model)
    pasts, sizes = [0, 7, 3], [5, 4, 1]
    torch.manual_seed(2)
    prompts = [torch.randint(3, model.config.vocab_size, (1, p + n)) for p, n in zip(pasts, sizes, strict=True)]

    def cache_after(prompt: torch.Tensor, past: int):
        cache = new_cache(model)
        if past:
            fused(prompt[:, :past], torch.ones(1, past), torch.arange(past)[None], cache)
        return cache

    with torch.inference_mode():
        alone, alone_caches = [], []
        for prompt, past, n in zip(prompts, pasts, sizes, strict=True):
            cache = cache_after(prompt, past)
            alone.append(fused(prompt[:, past:], torch.ones(1, past + n), torch.arange(past, past + n)[None], cache))
            alone_caches.append(cache)
        caches = [cache_after(prompt, past) for prompt, past in zip(prompts, pasts, strict=True)]
        ids = torch.cat([prompt[:, past:] for prompt, past in zip(prompts, pasts, strict=True)], dim=1)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(pasts, sizes, strict=True)])[None]
        together = fused.ragged(ids, positions, sizes, caches)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)
    for a, b in zip(caches, alone_caches, strict=True):
        torch.testing.assert_close(a.layers[-1].keys, b.layers[-1].keys, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_step_of_uneven_rows_matches_the_padded_block(model_type):
    """Rows bringing 3, 1 and 2 tokens (forced ones) to one decode step: the fused pass's matmuls over the
    real tokens only give the logits and cache of the padded block, as transformers' forward computes it,
    and the step after reads that cache alike."""
    model = tiny_model(model_type)
    fused, theirs = FusedForward(model), TransformersForward(model, "reference")
    ids, mask, positions = left_padded([9, 4, 13], model.config.vocab_size)
    counts = [3, 1, 2]
    step_ids = torch.randint(3, model.config.vocab_size, (3, 3))
    real = torch.tensor([[0] * (3 - n) + [1] * n for n in counts])
    ends = positions[:, -1:]
    step_positions = ends + (torch.arange(1, 4) - (3 - torch.tensor(counts))[:, None]).clamp(min=1)
    step_mask = torch.cat([mask, real], dim=1)
    with torch.inference_mode():
        results = []
        for name, whole in (("uneven", fused), ("fused block", fused), ("transformers block", theirs)):
            cache = new_cache(model)
            whole(ids, mask, positions, cache)
            if name == "uneven":
                logits = fused.uneven(step_ids, step_mask, step_positions, cache, real)
            else:
                logits = whole(step_ids, step_mask, step_positions, cache)
            after = whole(
                logits.argmax(-1, keepdim=True),
                torch.cat([step_mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1),
                ends + torch.tensor(counts)[:, None] + 1,
                cache,
            )
            results.append((name, logits, after))
    _, logits, after = results[0]
    for name, other_logits, other_after in results[1:]:
        torch.testing.assert_close(logits, other_logits, rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(after, other_after, rtol=1e-4, atol=1e-4, msg=f"{name}, the step after")


class RecordSDPA:
    """Records the keyword arguments and key shapes of every SDPA call the fused pass makes."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        real = torch.nn.functional.scaled_dot_product_attention

        def record(q, k, v, **kwargs):
            self.calls.append(kwargs | {"heads": (q.shape[1], k.shape[1])})
            return real(q, k, v, **kwargs)

        monkeypatch.setattr("llmchat.engine.attention.F.scaled_dot_product_attention", record)


def test_attention_is_unmasked_where_no_row_is_padded(monkeypatch):
    """A lone prompt is plain causal and an unpadded decode step needs no mask; only padding (or a chunk after
    cached tokens) builds one, once per step, as an additive float mask."""
    model = tiny_model("llama")
    fused = FusedForward(model)
    sdpa = RecordSDPA(monkeypatch)
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        cache = new_cache(model)
        ids = torch.randint(3, 200, (1, 6))
        fused(ids, None, torch.arange(6)[None], cache)
        assert all(c.get("is_causal") and c.get("attn_mask") is None for c in sdpa.calls)
        sdpa.calls.clear()
        fused(ids[:, :1], None, torch.tensor([[6]]), cache)
        assert all(not c.get("is_causal") and c.get("attn_mask") is None for c in sdpa.calls)
        sdpa.calls.clear()
        fused(ids[:, :3], None, torch.arange(7, 10)[None], cache)  # a chunk after cached tokens
        masks = [c["attn_mask"] for c in sdpa.calls]
        assert len(masks) == layers and all(m is masks[0] and m.dtype == torch.float32 for m in masks)
        sdpa.calls.clear()
        ids, mask, positions = left_padded([5, 3], model.config.vocab_size)
        fused(ids, mask, positions, new_cache(model))
        assert all(c["attn_mask"] is not None and c["enable_gqa"] for c in sdpa.calls)


def test_on_a_gpu_masked_attention_expands_key_value_heads_with_the_same_result(monkeypatch):
    """The grouped key/value heads are expanded where a mask is needed (the memory-efficient kernel takes no
    groups on ROCm); here on the CPU, the expanded call computes what the grouped one does."""
    model = tiny_model("llama")
    grouped, expanded = FusedForward(model), FusedForward(model)
    expanded.attention = lambda mask, n, past, x: Attention(mask, n, past, x, expand_heads=True)
    ids, mask, positions = left_padded([7, 4, 9], model.config.vocab_size)
    with torch.inference_mode():
        reference = run(grouped, model, ids, mask, positions, steps=3)
        tokens = [t.argmax(-1, keepdim=True) for t in reference[:-1]]
        sdpa = RecordSDPA(monkeypatch)
        ours = run(expanded, model, ids, mask, positions, tokens)
    heads = model.config.num_attention_heads
    assert sdpa.calls and all(c["heads"] == (heads, heads) and "enable_gqa" not in c for c in sdpa.calls)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_cuda_graph_bucket_is_built_at_start_up():
    model = tiny_model("llama")
    graphed = GraphedDecode(FusedForward(model), max_rows=6, capture=False)
    graphed.capture_all(torch.device("cpu"))
    assert sorted(graphed.buckets) == [1, 2, 4, 8]


@pytest.fixture(scope="module")
def bundled_bf16():
    return load_model(ModelConfig("bundled", device="cpu", dtype="bfloat16", cache_dir=Settings().cache_dir))


def test_bundled_model_in_bfloat16_agrees_with_transformers(bundled_bf16):
    """The real weights in bfloat16 (prepacked matmuls where the CPU has AMX): as close to float32 as transformers'."""
    model = bundled_bf16.model
    fused = FusedForward(model)
    packed = fused.kind.startswith("fused, prepacked bfloat16")  # always with AMX, elsewhere where timed faster
    assert packed or (fused.kind == "fused" and not uses_packed_bf16(model))
    # Prepacked, every matmul is a second copy of its weights; unpacked, the model views the fused weights.
    linear_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert fused.extra_bytes == (linear_bytes if packed else 0)
    torch.manual_seed(1)
    rows = [30, 12, 21]
    ours, theirs = compare(model, rows, steps=8)
    # Both round differently from float32 (by how much depends on the CPU's bfloat16 kernels); the
    # fused pass may not drift further from the float32 logits than transformers' own bfloat16 pass.
    exact = load_model(ModelConfig("bundled", device="cpu", dtype="float32", cache_dir=Settings().cache_dir)).model
    torch.manual_seed(1)  # the same ids as compare() drew
    ids, mask, positions = left_padded(rows, model.config.vocab_size)
    tokens = [t.argmax(-1, keepdim=True) for t in theirs[:-1]]
    with torch.inference_mode():
        reference = run(TransformersForward(exact, "reference"), exact, ids, mask, positions, tokens)
    for a, b, r in zip(ours, theirs, reference, strict=True):
        ours_error, theirs_error = (a.float() - r).abs().max(), (b.float() - r).abs().max()
        assert ours_error <= 1.5 * theirs_error + 0.01 * r.abs().max()


@pytest.mark.parametrize("amx", [True, False], ids=["AMX", "no AMX"])
def test_bfloat16_weights_are_prepacked_untimed_only_on_amx_cpus(monkeypatch, amx):
    """The choice on any CPU (faked flags); the prepacked matmuls themselves run in the test above where the CPU
    has AMX. Elsewhere, and in float32, packing is timed (the test below)."""
    monkeypatch.setattr(fused_forward, "has_amx_bf16", lambda: amx)
    assert uses_packed_bf16(tiny_model("llama").to(torch.bfloat16)) == (amx and torch.backends.mkldnn.is_available())
    assert not uses_packed_bf16(tiny_model("llama"))


@pytest.mark.parametrize(
    ("faster_up_to", "kind"),
    [(512, "fused, prepacked float32"), (64, "fused, prepacked float32 up to 64 rows"), (0, "fused")],
)
def test_weights_are_prepacked_up_to_the_rows_timed_faster_and_a_restart_keeps_that(monkeypatch, faster_up_to, kind):
    """Any CPU, faked timings: steps of up to the most rows at which oneDNN's matmul on prepacked weights was timed
    faster take them, larger ones the plain weights; the choice is kept with the other measured ones, so a restart
    makes it again whatever its own timings say."""
    monkeypatch.setattr(projections, "_seconds", lambda weights, x: (1.0, 0.5 if len(x) <= faster_up_to else 2.0))
    choices = Choices()
    fused = FusedForward(tiny_model("llama"), choices=choices)
    assert fused.kind == kind
    # oneDNN keeps a kernel per row count, so its steps are padded to a bucket (matmul_rows); MKL's are not.
    assert fused.matmul_rows(36) == (40 if faster_up_to else 36)
    assert fused.matmul_rows(200) == (208 if faster_up_to > 200 else 200)
    mlp = fused.layers[0].gate_up
    for rows in (64, 65):
        x = torch.randn(rows, mlp.in_features)
        if rows <= faster_up_to:
            assert torch.equal(mlp.dense(x), projections.prepacked(x, mlp.packed_weight, mlp.bias))
        else:
            assert torch.equal(mlp.dense(x), torch.nn.functional.linear(x, mlp.weight, mlp.bias))
    monkeypatch.setattr(projections, "_seconds", lambda weights, x: (1.0, 0.5 if len(x) <= 16 else 2.0))
    assert FusedForward(tiny_model("llama"), choices=choices).kind == kind


def test_bfloat16_steps_are_padded_to_16_rows_on_the_cpu():
    """oneDNN runs every bfloat16 matmul, prepacked or not (AMX's tiles are 16 rows)."""
    fused = FusedForward(tiny_model("llama").to(torch.bfloat16), packed=False, int4_rows=0)
    assert [fused.matmul_rows(n) for n in (5, 16, 17, 36, 600)] == [5, 16, 32, 48, 608]


def test_weights_are_not_prepacked_when_the_copy_would_not_fit(monkeypatch):
    monkeypatch.setattr(projections, "_seconds", lambda weights, x: pytest.fail("timed"))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    assert FusedForward(tiny_model("llama"), choices=Choices()).kind == "fused"


def test_models_it_cannot_run_say_why_and_quantized_ones_it_can(tmp_path):
    assert "model type 'gpt2'" in unsupported_reason(
        AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    )
    assert unsupported_reason(tiny_model("mistral", sliding_window=16)) == "sliding-window attention"
    assert "activation" in unsupported_reason(tiny_model("llama", hidden_act="gelu"))
    tiny_model("llama").save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    assert unsupported_reason(quantized) is None  # bitsandbytes layers run inside the fused pass

    class LoRALinear(torch.nn.Linear):  # a layer it does not know, even one derived from torch's Linear
        pass

    custom = tiny_model("llama")
    custom.model.layers[0].self_attn.q_proj = LoRALinear(8, 8)
    assert unsupported_reason(custom).startswith("projections of type LoRALinear")


def test_the_setting_chooses_the_pass_and_health_says_which():
    loaded = load_model(ModelConfig("bundled", device="cpu", cache_dir=Settings().cache_dir))
    assert Engine(loaded).runner.forward.kind.startswith("fused")
    live = start_server(create_app(Settings(port=0, device="cpu", forward="transformers")))
    try:
        health = httpx.get(f"{live.base_url}/health").json()
        reply = httpx.post(
            f"{live.base_url}/v1/chat/completions",
            json={"model": health["model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
    finally:
        live.stop()
    assert health["forward"] == "transformers (chosen in the settings)" and health["forward_memory_bytes"] == 0
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0


def test_bucketed_decode_pieces_compute_the_fused_pass():
    """On a GPU, LLMCHAT_CUDA_GRAPHS replays these pieces; here they run eagerly over the same static buffers."""
    model = tiny_model("qwen3")  # per-head q/k norms: every piece there is
    fused = FusedForward(model)
    graphed = GraphedDecode(fused, max_rows=4, capture=False)
    ours, theirs = compare(model, [9, 4, 13], steps=5, ours=graphed, theirs=fused)  # 3 rows pad to a bucket of 4
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert set(graphed.buckets) == {4}
    compare(model, [3, 5, 7, 9, 11], steps=1, ours=graphed, theirs=fused)  # more rows than any bucket: plain fused
    assert set(graphed.buckets) == {4}
    assert buckets_for(16) == [1, 2, 4, 8, 16] and buckets_for(5) == [1, 2, 4, 8]


def test_cuda_graphs_are_not_used_off_the_gpu():
    model = tiny_model("llama")
    assert type(pick_forward(model, fused=True, cuda_graphs=True)) is FusedForward
    assert pick_forward(model, fused=False, cuda_graphs=True).kind == "transformers (chosen in the settings)"


def test_transformers_forward_uses_no_deprecated_argument():
    """transformers warns (FutureWarning) for arguments it is about to remove, `past_key_values` among them."""
    model = tiny_model("llama")
    ids, mask, positions = left_padded([5, 3], model.config.vocab_size)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        run(TransformersForward(model, "reference"), model, ids, mask, positions, steps=2)
