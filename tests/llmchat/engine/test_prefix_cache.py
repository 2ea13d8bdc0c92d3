"""Prefix caching and chunked prefill: the same greedy tokens as without them, bounded memory, clean faults."""

import asyncio
import time
import uuid

import httpx
import openai
import torch

from llmchat.engine import Engine, SchedulerConfig
from llmchat.engine.paged_kv import pool_bytes_per_token
from llmchat.engine.prefix_cache import PrefixCache
from llmchat.engine.sampling import SamplingParams
from tests.conftest import run_engine, settled

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = " ".join(f"Rule {i}: check valve {i * 7 % 13} before pump {i % 5} starts." for i in range(24))
QUESTIONS = ["What is rule 3?", "Which valve comes before pump 2?", "Summarize the rules.", "Hi"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def chat_ids(loaded, question: str, system: str = SYSTEM, history: list[dict] | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": question}]
    rendered = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(rendered["input_ids"])


def run(loaded, body, cache_bytes: int | None = None, budget: int = 64, pool_bytes: int | None = None):
    """Runs `body(engine)` on a started engine (small chunks by default, so prompts span several steps)."""
    config = SchedulerConfig(max_batched_tokens=budget)
    return run_engine(loaded, config, body, prefix_cache_bytes=cache_bytes, pool_bytes=pool_bytes)


async def generate(engine: Engine, ids: list[int], params: SamplingParams = GREEDY):
    seq = engine.submit(ids, params)
    async for _ in engine.stream(seq):
        pass
    return seq


def reference(loaded, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens without a prefix cache, each prompt prefilled whole."""

    async def body(engine):
        return [(await generate(engine, p)).completion_ids for p in prompts]

    return run(loaded, body, cache_bytes=0, budget=4096)


def test_blocks_are_matched_by_chain_and_last_token_is_computed():
    cache = PrefixCache(capacity_bytes=1 << 20, block_size=4)
    tokens = list(range(10))
    kv = [torch.arange(10.0)[None, :, None].repeat(2, 1, 3)]  # one layer, 2 heads, 10 positions, dim 3
    assert cache.insert(tokens, kv, kv) == 2  # two full blocks; the last two tokens wait for a full block
    assert [b.kv[0, 0, 0, :, 0].tolist() for b in cache.match(tokens)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(cache.match(list(range(8)))) == 1  # the 8th token must be computed for its logits
    assert cache.match([0, 1, 2, 3, 4, 5, 6, 7, 8, 9][4:] + [0] * 4) == []  # same tokens, other position
    assert cache.num_cached([0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4
    assert cache.stats.num_lookups == 3


def test_eviction_is_lru_leaves_first_and_bounded():
    block = torch.zeros(1, 2, 1, 4, 1)
    cache = PrefixCache(capacity_bytes=3 * block.nbytes, block_size=4)
    kv = [torch.zeros(1, 12, 1)]
    cache.insert(list(range(12)), kv, kv)  # a chain of three blocks fills it
    cache.insert([7] * 8, kv, kv)  # two more: the first chain's tail goes, its start stays
    assert cache.num_bytes <= cache.capacity_bytes and cache.num_blocks == 3
    assert cache.num_cached(list(range(12)) + [0]) == 4
    assert cache.num_cached([7] * 9) == 8
    cache.match(list(range(5)))  # touched: now the other chain is the least recently used
    cache.insert([5] * 8, kv, kv)
    assert cache.num_cached(list(range(5))) == 4 and cache.num_cached([7] * 9) == 0


def test_prompt_longer_than_the_cache_keeps_its_start():
    block = torch.zeros(1, 2, 1, 4, 1)
    cache = PrefixCache(capacity_bytes=2 * block.nbytes, block_size=4)
    kv = [torch.zeros(1, 40, 1)]
    assert cache.insert(list(range(40)), kv, kv) == 2
    assert cache.num_cached(list(range(41))) == 8 and cache.num_bytes == cache.capacity_bytes


def test_cached_prefixes_give_the_same_greedy_tokens(loaded):
    """Prompts sharing nothing, a system prompt, or everything with cached ones; then a conversation's next turn."""
    prompts = [chat_ids(loaded, q) for q in QUESTIONS] + [chat_ids(loaded, QUESTIONS[0])]
    prompts.append(chat_ids(loaded, "Hi", system="You are terse."))
    expected = reference(loaded, prompts)

    async def body(engine):
        seqs = [await generate(engine, p) for p in prompts]
        reply = loaded.tokenizer.decode(seqs[0].completion_ids, skip_special_tokens=True)
        history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": reply}]
        next_turn = chat_ids(loaded, "And rule 4?", history=history)
        return seqs, next_turn, await generate(engine, next_turn), engine.describe()["prefix_cache"]

    seqs, next_turn, turn2, stats = run(loaded, body)
    assert [s.completion_ids for s in seqs] == expected
    cached = [s.num_cached_tokens for s in seqs]
    assert cached[0] == 0 and cached[-1] == 0  # nothing before it; another system prompt
    assert all(n >= len(chat_ids(loaded, "")) - 32 for n in cached[1:4])  # the shared system prompt
    assert cached[4] == (len(prompts[4]) - 1) // 16 * 16  # everything but the last token's block
    # The next turn reuses the first turn's prompt and at least part of its reply.
    assert turn2.num_cached_tokens > len(prompts[0]) - 16
    assert turn2.completion_ids == reference(loaded, [next_turn])[0]
    assert stats["hit_rate"] > 0.5 and stats["bytes"] > 0


def test_concurrent_prompts_batched_and_chunked_match(loaded):
    """Several prompts at once, some sharing a prefix, prefilled in chunks beside running decodes."""
    prompts = [chat_ids(loaded, q) for q in QUESTIONS] + [chat_ids(loaded, q) for q in QUESTIONS[:2]]
    expected = reference(loaded, prompts)

    async def body(engine):
        seqs = await asyncio.gather(*(generate(engine, p) for p in prompts))
        return [s.completion_ids for s in seqs]

    assert run(loaded, body) == expected


def test_eviction_and_a_small_pool_keep_outputs_and_free_every_block(loaded):
    """A pool for about one of these prompts: concurrent ones wait for blocks, cached blocks are evicted, the
    outputs stay the same, and every block is free or cached again when the engine is idle."""
    terse = "You are terse and exact. " * 30
    prompts = [chat_ids(loaded, q, system=s) for q in QUESTIONS[:2] for s in (SYSTEM, terse)]
    expected = reference(loaded, prompts)
    bytes_per_block = 16 * pool_bytes_per_token(loaded.model)

    async def body(engine):
        seqs = [await generate(engine, p) for p in prompts]
        concurrent = await asyncio.gather(*(generate(engine, p) for p in prompts))
        return seqs + list(concurrent), await settled(engine)

    blocks = -(-(max(map(len, prompts)) + GREEDY.max_tokens) // 16) + 4  # less than both system prompts
    seqs, health = run(loaded, body, pool_bytes=blocks * bytes_per_block)
    assert [s.completion_ids for s in seqs] == expected * 2
    pool = health["kv_pool"]
    assert pool["blocks_total"] == blocks and pool["blocks_used"] == 0
    assert pool["blocks_free"] + pool["blocks_cached"] == blocks and health["prefix_cache"]["num_evicted"] > 0


def test_long_prompt_prefills_in_chunks_between_decode_steps(loaded):
    """While a long prompt prefills, a running stream keeps getting a token every step."""
    long_prompt = chat_ids(loaded, "Summarize.", system=SYSTEM * 2)
    assert len(long_prompt) > 10 * 64

    async def body(engine):
        never_stop = SamplingParams(max_tokens=80, logits_processors=(no_eos(engine),))
        runner = engine.submit(chat_ids(loaded, "Count to fifty.", system="Be long."), never_stop)
        stream = engine.stream(runner)
        await anext(stream)
        long_seq = engine.submit(long_prompt, SamplingParams(max_tokens=2, temperature=0.0))
        tokens_before = len(runner.completion_ids)
        long_stream = engine.stream(long_seq)
        await anext(long_stream)  # the long prompt's first token
        decoded_meanwhile = len(runner.completion_ids) - tokens_before
        async for _ in stream:
            pass
        async for _ in long_stream:
            pass
        return decoded_meanwhile, long_seq

    decoded_meanwhile, long_seq = run(loaded, body, cache_bytes=0, budget=64)
    # About one decode step per 63-token chunk; without chunking it would be one step in all.
    assert decoded_meanwhile >= len(long_prompt) // 64 - 2
    assert long_seq.completion_ids == reference(loaded, [long_prompt])[0][:2]


def no_eos(engine: Engine):
    def processor(_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[list(engine.eos_ids)] = float("-inf")
        return logits

    return processor


def test_same_long_prompt_from_many_clients_is_computed_once(loaded):
    prompt = chat_ids(loaded, "What is rule 9?", system=SYSTEM * 2)
    expected = reference(loaded, [prompt])

    async def body(engine):
        seqs = await asyncio.gather(*(generate(engine, prompt) for _ in range(5)))
        return seqs, engine.describe()["prefix_cache"]

    seqs, stats = run(loaded, body)
    assert [s.completion_ids for s in seqs] == expected * 5
    # One computes it; the others wait for its blocks instead of computing them again.
    assert sorted(s.num_cached_tokens for s in seqs)[1:] == [(len(prompt) - 1) // 16 * 16] * 4
    assert stats["num_prompt_tokens"] - stats["num_cached_tokens"] < 2 * len(prompt)


def test_abort_mid_prefill_frees_it_and_leaves_good_blocks(loaded):
    prompt = chat_ids(loaded, "What is rule 5?", system=SYSTEM * 2)

    async def body(engine):
        seq = engine.submit(prompt, GREEDY)
        while seq.num_computed < 4 * 64:  # a few chunks in
            await asyncio.sleep(0.01)
        engine.abort(seq)
        outputs = [o async for o in engine.stream(seq)]
        computed_at_abort = seq.num_computed
        while engine.num_running:
            await asyncio.sleep(0.01)
        again = await generate(engine, prompt)
        return outputs, computed_at_abort, seq, again

    outputs, computed_at_abort, aborted, again = run(loaded, body)
    assert outputs[-1].finish_reason == "abort" and aborted.blocks == []
    assert computed_at_abort < len(prompt)  # its chunks stopped
    assert again.num_cached_tokens >= 4 * 64 - 16
    assert again.completion_ids == reference(loaded, [prompt])[0]


class PoisonOnce:
    """A forward pass that, at its `at`-th step with a prompt chunk, writes NaN over the pool slots it was given
    and fails."""

    def __init__(self, forward, at: int) -> None:
        self.forward, self.at = forward, at

    def __getattr__(self, name: str):
        return getattr(self.forward, name)

    def paged(self, ids, positions, batch):
        logits = self.forward.paged(ids, positions, batch)
        self.at -= batch.has_prompt
        if self.at == 0:
            for pool in (*batch.kv.keys, *batch.kv.values):
                pool.view(pool.shape[0], -1, pool.shape[-1])[:, batch.slots] = float("nan")
            raise RuntimeError("simulated device fault")
        return logits


def test_failed_step_leaves_no_poisoned_blocks(loaded):
    prompt = chat_ids(loaded, "What is rule 7?", system=SYSTEM * 2)

    async def body(engine):
        engine.runner.forward = PoisonOnce(engine.runner.forward, at=3)
        failed = await generate(engine, prompt)
        again = await generate(engine, prompt)
        return failed, again

    failed, again = run(loaded, body)
    assert failed.finish_reason == "error"
    # The two chunks computed before the fault are reused; the poisoned third is not.
    assert 2 * 64 - 16 <= again.num_cached_tokens < 3 * 64
    assert again.completion_ids == reference(loaded, [prompt])[0]


def test_cached_tokens_reach_the_wire_and_health(live):
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
    system = f"Session {uuid.uuid4()}. {SYSTEM}"  # nothing cached yet by earlier tests

    def ask(question: str):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0).usage

    first, second = ask(QUESTIONS[0]), ask(QUESTIONS[1])
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens > second.prompt_tokens - 32
    cache = httpx.get(f"{live.base_url}/health").json()["prefix_cache"]
    assert cache["num_blocks"] > 0 and cache["bytes"] <= cache["capacity_bytes"] and cache["hit_rate"] > 0


def test_client_gone_mid_prefill_stops_its_chunks(live):
    system = f"Session {uuid.uuid4()}. {SYSTEM * 3}"
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "stream": True,
    }
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
    deadline = time.monotonic() + 60
    while httpx.get(f"{live.base_url}/health").json()["num_running"]:
        assert time.monotonic() < deadline, "the abandoned request still runs"
        time.sleep(0.1)
    again = httpx.post(f"{live.base_url}/v1/chat/completions", json=body | {"stream": False}, timeout=120).json()
    usage = again["usage"]
    # It had computed a chunk or a few when it left (kept, and reused now), not the whole prompt.
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] - 256
