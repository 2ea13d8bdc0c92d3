"""The GPU path, checked where there is a GPU (`bin/just gpu-check`); skipped elsewhere. The CPU suite checks
the same logic with the capability, memory and faults faked."""

import asyncio

import httpx
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmchat.engine import Engine, SchedulerConfig, paged_flex
from llmchat.engine.cuda_graphs import GraphedDecode
from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.kv_cache import new_cache
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.engine.runner import TransformersForward
from llmchat.engine.sampler import sample
from llmchat.engine.sampling import SamplingParams
from llmchat.server import create_app
from llmchat.settings import Settings
from tests.conftest import drain, prompt_ids, run_engine, start_server

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
CACHE = Settings().cache_dir
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Hi", "List three colors."]


def loaded_as(dtype: str = "auto", quantization: str = "none"):
    return load_model(ModelConfig("bundled", device="cuda", dtype=dtype, quantization=quantization, cache_dir=CACHE))


def generate(loaded, **options) -> list[list[int]]:
    """Greedy tokens of every prompt, arriving one after another so rows join and leave a running batch."""

    async def body(engine: Engine):
        seqs = []
        for text in PROMPTS:
            seqs.append(engine.submit(prompt_ids(loaded, text), SamplingParams(24, temperature=0.0)))
            await asyncio.sleep(0.05)
        return [await drain(engine, seq) for seq in seqs]

    return run_engine(loaded, SchedulerConfig(max_running=8), body, **options)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fused_pass_on_the_gpu_gives_transformers_tokens_as_rows_come_and_go(cuda_graphs):
    loaded = loaded_as("float32")
    assert generate(loaded, cuda_graphs=cuda_graphs) == generate(loaded, fused_forward=False)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_nf4_model_runs_the_fused_pass_with_transformers_tokens(cuda_graphs):
    loaded = loaded_as("float32", "nf4")  # float32 compute: the two passes may differ only in rounding order
    assert "bitsandbytes 4-bit projections" in FusedForward(loaded.model).kind
    assert generate(loaded, cuda_graphs=cuda_graphs) == generate(loaded, fused_forward=False)


def test_int8_model_runs_the_fused_pass_and_agrees_with_transformers():
    loaded = loaded_as(quantization="int8")  # computes in float16
    fused = FusedForward(loaded.model)
    assert "bitsandbytes 8-bit projections" in fused.kind and fused.graph_blocker is not None
    ids = torch.tensor([prompt_ids(loaded, PROMPTS[0])], device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda")[None]
    with torch.inference_mode():
        theirs = TransformersForward(loaded.model, "reference")(ids, None, positions, new_cache(loaded.model))
        ours = fused(ids, None, positions, new_cache(loaded.model))
    assert int(theirs.argmax()) == int(ours.argmax())
    assert all(generate(loaded, cuda_graphs=True))  # graphs declined for int8, decoding goes on without


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_graphed_decode_replays_equal_eager_steps_across_batch_sizes(quantization):
    """Buckets captured at start-up, replayed for 1, 3, 5 and 2 rows (padding rows inside a bucket), and after
    a reset, give the eager fused pass's logits, for a model in float32 and one in nf4."""
    loaded = loaded_as("float32", quantization)
    fused = FusedForward(loaded.model)
    graphed = GraphedDecode(fused, max_rows=8, capture=True)
    graphed.capture_all(loaded.model.device)
    # Every bucket captured: none fell back to eager pieces (replays are bound methods of a CUDAGraph).
    assert all(isinstance(getattr(b.head, "__self__", None), torch.cuda.CUDAGraph) for b in graphed.buckets.values())
    vocab = loaded.model.config.vocab_size
    with torch.inference_mode():
        for rows in (1, 3, 5, 2):
            ids = torch.randint(3, vocab, (rows, 6), device="cuda")
            eager_cache, graph_cache = new_cache(loaded.model), new_cache(loaded.model)
            positions = torch.arange(6, device="cuda")[None].expand(rows, 6)
            fused(ids, None, positions, eager_cache)
            fused(ids, None, positions, graph_cache)
            token = torch.randint(3, vocab, (rows, 1), device="cuda")
            step = torch.full((rows, 1), 6, device="cuda")
            torch.testing.assert_close(
                graphed(token, None, step, graph_cache), fused(token, None, step, eager_cache), rtol=1e-4, atol=1e-4
            )


def test_prefill_and_decode_run_on_the_fast_attention_kernels():
    """With the math kernel ruled out, a batch still prefills and decodes (no mask where rows are unpadded,
    expanded heads where padding needs one)."""
    loaded = loaded_as()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        assert all(generate(loaded))


def test_transformers_forward_and_fused_pass_agree_in_bfloat16_within_rounding():
    loaded = loaded_as("bfloat16")
    ids = torch.tensor([prompt_ids(loaded, PROMPTS[0])], device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda")[None]
    with torch.inference_mode():
        theirs = TransformersForward(loaded.model, "reference")(ids, None, positions, new_cache(loaded.model))
        ours = FusedForward(loaded.model)(ids, None, positions, new_cache(loaded.model))
    theirs, ours = theirs[-1].float(), ours[-1].float()
    # Different attention kernels round bfloat16 differently through 30 layers: on an H200 the logits (near
    # 10) differed by up to 0.375, and the two top tokens swapped where they nearly tied. A real fault
    # moves logits by whole units.
    assert float((ours - theirs).abs().max()) < 1.0
    assert float(ours[theirs.argmax()]) >= float(ours.max()) - 0.25


def test_sampling_reads_the_device_once():
    logits = torch.randn(16, 49152, device="cuda")
    params = [SamplingParams(1, temperature=0.0 if i % 2 else 0.8, top_p=0.9, top_k=40) for i in range(16)]
    generators = [torch.Generator(device="cuda").manual_seed(i) for i in range(16)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:
            sample(logits, params, generators)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_default_settings_serve_on_the_gpu_and_health_shows_its_memory():
    live = start_server(create_app(Settings(port=0)))
    try:
        health = httpx.get(f"{live.base_url}/health").json()
        assert health["device"] == "cuda" and health["quantization"] == "none"
        assert "half the GPU's free memory" in health["quantization_reason"]
        assert health["forward"].endswith("CUDA graphs around attention"), health["forward"]
        assert health["kv_pool"]["attention"].startswith("decoding rows: FlexAttention"), health["kv_pool"]
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # its per-shape plans cost ms every decode step
        gpu = health["gpu"]
        assert 0 < gpu["allocated_bytes"] <= gpu["reserved_bytes"] < gpu["total_bytes"]
        assert health["max_kv_tokens"] > 0
        body = {
            "model": health["model"],
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 24,
            "seed": 5,
        }
        replies = [httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=60).json() for _ in range(2)]
        assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]
    finally:
        live.stop()


def test_without_cuda_graphs_decoding_rows_still_read_their_blocks_in_place():
    live = start_server(create_app(Settings(port=0, cuda_graphs=False)))
    try:
        health = httpx.get(f"{live.base_url}/health").json()
        assert "CUDA graphs" not in health["forward"], health["forward"]
        assert health["kv_pool"]["attention"].startswith("decoding rows: FlexAttention"), health["kv_pool"]
    finally:
        live.stop()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(32, 8, 128), (9, 3, 64), (28, 4, 128)])
def test_flex_attention_over_the_pool_passes_its_check_here(dtype, heads, kv_heads, dim):
    """The compiled kernels that decoding rows use on a GPU, against SDPA over gathered blocks (shapes of Llama 3
    8B, the bundled SmolLM2 and Qwen2.5-7B)."""
    keys, values = (torch.zeros(kv_heads, 1000, 16, dim, dtype=dtype, device="cuda") for _ in range(2))
    assert paged_flex.check(keys, values, heads) is None
