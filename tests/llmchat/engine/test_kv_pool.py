"""The paged KV pool under load: preemption when it is full, choices sharing their prompt's blocks, the context cut
to what the pool holds, and every block back when the engine is idle."""

import asyncio

import pytest

from llmchat.engine import Engine, EngineConfig, SchedulerConfig, dot8
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.engine.paged_kv import pool_bytes_per_token
from llmchat.engine.projections import ALL_ROWS
from llmchat.engine.sampling import SamplingParams
from llmchat.settings import Settings
from tests.conftest import prompt_ids, run_engine, settled

QUESTIONS = [f"Tell me about the number {i} in a few sentences." for i in range(16)]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def block_bytes(loaded) -> int:
    return 16 * pool_bytes_per_token(loaded.model)


async def generate(engine: Engine, ids: list[int], params: SamplingParams = GREEDY):
    seq = engine.submit(ids, params)
    outputs = [o async for o in engine.stream(seq)]
    return seq, outputs


def idle_pool(health: dict) -> bool:
    pool = health["kv_pool"]
    return pool["blocks_used"] == 0 and pool["blocks_free"] + pool["blocks_cached"] == pool["blocks_total"]


# One kernel for every row count (the two runs decode different numbers of rows at a time): the dense matmuls, or the
# 4-bit weights in every step, as where they win at a prompt's rows (where the crossover lies is measured per CPU).
ONE_KERNEL = {"dense": 0, "4-bit": ALL_ROWS}


@pytest.mark.parametrize("int4_rows", ONE_KERNEL.values(), ids=ONE_KERNEL.keys())
def test_a_full_pool_preempts_and_every_request_completes_with_the_same_tokens(loaded, int4_rows):
    """16 clients on a pool for about four of them: the newest are preempted and recomputed, none fails, and the
    greedy tokens are those of a pool with room for all."""
    if int4_rows:
        if dot8.unavailable():
            pytest.skip(f"llmchat's 4-bit kernel cannot run here: {dot8.unavailable()}")
        # The fixture's model leaves its checkpoint out, and with it the 4-bit weights (conftest.py).
        loaded = load_model(ModelConfig("bundled", device="cpu", dtype="float32", cache_dir=Settings().cache_dir))
    prompts = [prompt_ids(loaded, q) for q in QUESTIONS]

    async def body(engine: Engine):
        results = await asyncio.gather(*(generate(engine, p) for p in prompts))
        return [seq for seq, _ in results], await settled(engine)

    options = {"prefix_cache_bytes": 0, "int4_rows": int4_rows}
    roomy, _ = run_engine(loaded, SchedulerConfig(), body, **options)
    per_request = -(-(len(prompts[0]) + 24) // 16)
    pool_bytes = 4 * per_request * block_bytes(loaded)
    tight, health = run_engine(loaded, SchedulerConfig(), body, pool_bytes=pool_bytes, **options)
    assert ("4-bit weights in every step" in health["forward"]) == bool(int4_rows)
    # A float32 model's keys and values in float16 where llmchat's decode kernel reads them (paged_kv.pool_dtype).
    assert health["kv_pool"]["dtype"] == ("float32" if dot8.unavailable() else "float16")
    assert [s.finish_reason for s in tight] == ["length"] * 16
    assert [s.completion_ids for s in tight] == [s.completion_ids for s in roomy]
    assert health["kv_pool"]["preemptions"] > 0 and sum(s.num_preempted for s in tight) > 0
    assert idle_pool(health)


def test_choices_share_the_prompts_blocks(loaded):
    """n = 3 over a prompt of several blocks: its full blocks are held once, each choice copies only the last."""
    prompt = prompt_ids(loaded, " ".join(QUESTIONS[:6]))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def body(engine: Engine):
        seqs = engine.submit_choices(prompt, [params] * 3)
        stream = engine.stream(seqs[0])
        await anext(stream)
        used = engine.describe()["kv_pool"]["blocks_used"]
        tables = [list(s.blocks) for s in seqs]
        for seq in seqs:
            async for _ in engine.stream(seq):
                pass
        return used, tables, await settled(engine)

    used, tables, health = run_engine(loaded, SchedulerConfig(), body, prefix_cache_bytes=0)
    full = len(prompt) // 16
    assert len(prompt) % 16 and tables[0][:full] == tables[1][:full] == tables[2][:full]
    assert len({t[full] for t in tables}) == 3  # each choice's own copy of the partial block
    assert used <= full + 3 * 2  # not three copies of the prompt
    assert idle_pool(health)


def test_the_context_is_cut_to_what_the_pool_holds(loaded):
    async def body(engine: Engine):
        return engine.max_context, engine.describe()["kv_pool"]

    max_context, pool = run_engine(loaded, SchedulerConfig(), body, pool_bytes=10 * block_bytes(loaded))
    assert pool["blocks_total"] == 10 and max_context == 9 * 16


def test_many_identical_prompts_leave_no_block_behind(loaded):
    prompt = prompt_ids(loaded, " ".join(QUESTIONS))

    async def body(engine: Engine):
        results = await asyncio.gather(*(generate(engine, prompt) for _ in range(12)))
        seq, _ = await generate(engine, prompt)
        return [s for s, _ in results], seq, await settled(engine)

    seqs, again, health = run_engine(loaded, SchedulerConfig(max_batched_tokens=64), body, int4_rows=0)  # as above
    assert len({tuple(s.completion_ids) for s in seqs}) == 1 and again.completion_ids == seqs[0].completion_ids
    assert again.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert idle_pool(health)


def test_bucketed_decode_over_the_pool_matches_the_fused_pass(loaded):
    """The CUDA-graph pieces (run eagerly here) read and write the pool as the fused pass does."""
    import torch

    from llmchat.engine.cuda_graphs import GraphedDecode
    from llmchat.engine.paged_kv import PagedBatch, Segment

    engine = Engine(loaded, EngineConfig(pool_bytes=64 * block_bytes(loaded)))
    fused, kv = engine.runner.forward, engine.runner.kv
    graphed = GraphedDecode(fused, 4, capture=False)
    prompts = [prompt_ids(loaded, q) for q in QUESTIONS[:3]]
    tables = [engine.pool.allocate(-(-(len(p) + 1) // 16)) for p in prompts]

    def step(forward, segments, ids, positions):
        batch = PagedBatch(kv, segments, torch.device("cpu"), expand_heads=False)
        return forward.paged(torch.tensor([ids]), torch.tensor([positions]), batch)

    with torch.inference_mode():
        ids = [t for p in prompts for t in p]
        positions = [i for p in prompts for i in range(len(p))]
        prefill = step(fused, [Segment(t, 0, len(p)) for t, p in zip(tables, prompts, strict=True)], ids, positions)
        tokens = prefill.argmax(dim=-1).tolist()
        segments = [Segment(t, len(p), 1) for t, p in zip(tables, prompts, strict=True)]
        lengths = [len(p) for p in prompts]
        ours = step(graphed, segments, tokens, lengths)
        theirs = step(fused, segments, tokens, lengths)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)  # its matmuls run over a padded bucket


def test_matmuls_over_rows_padded_to_a_bucket_give_the_same_step(loaded):
    """A step's padding rows (fused_forward.matmul_rows) change neither its logits nor the keys it writes."""
    import torch

    from llmchat.engine.paged_kv import PagedBatch, Segment

    engine = Engine(loaded, EngineConfig(pool_bytes=64 * block_bytes(loaded)))
    fused, kv = engine.runner.forward, engine.runner.kv
    prompts = [prompt_ids(loaded, q) for q in QUESTIONS[:3]]
    ids = [t for p in prompts for t in p]
    positions = [i for p in prompts for i in range(len(p))]

    def step(bucket: bool) -> tuple[torch.Tensor, torch.Tensor]:
        fused.bucket_up_to = ALL_ROWS if bucket else 0
        tables = [engine.pool.allocate(-(-len(p) // 16)) for p in prompts]
        batch = PagedBatch(kv, [Segment(t, 0, len(p)) for t, p in zip(tables, prompts, strict=True)], "cpu", False)
        logits = fused.paged(torch.tensor([ids]), torch.tensor([positions]), batch)
        keys = kv.keys[-1]
        return logits, keys.view(keys.shape[0], -1, keys.shape[-1])[:, batch.slots]  # the slots the step wrote

    with torch.inference_mode():
        exact, padded = step(False), step(True)
    assert fused.matmul_rows(len(ids)) > len(ids)  # len(ids) is not a multiple of the bucket
    torch.testing.assert_close(padded[0], exact[0], atol=0, rtol=0)
    torch.testing.assert_close(padded[1], exact[1], atol=0, rtol=0)
