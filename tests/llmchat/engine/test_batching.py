"""Continuous batching: same tokens as one at a time, mid-batch admission, aborts, and the queue bound."""

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from llmchat.engine import Engine, SchedulerConfig
from llmchat.engine.core import IDLE_S
from llmchat.engine.sampling import SamplingParams
from llmchat.lifecycle import engine_config
from llmchat.server import create_app
from llmchat.settings import Settings
from tests.conftest import drain, prompt_ids, run_engine, spawn_llmchat, start_server

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain photosynthesis in one long paragraph with many details.",
    "Hi",
]


def test_batched_greedy_equals_sequential(loaded):
    ids = [prompt_ids(loaded, p) for p in PROMPTS]
    params = SamplingParams(max_tokens=24, temperature=0.0)

    async def together(engine):
        seqs = [engine.submit(p, params) for p in ids]
        return await asyncio.gather(*(drain(engine, s) for s in seqs))

    async def one_by_one(engine):
        return [await drain(engine, engine.submit(p, params)) for p in ids]

    batched = run_engine(loaded, SchedulerConfig(max_running=8), together)
    sequential = run_engine(loaded, SchedulerConfig(max_running=1), one_by_one)
    assert batched == sequential
    assert all(len(tokens) > 0 for tokens in batched)


def test_newcomer_joins_running_batch_without_waiting_for_it(loaded):
    long_params = SamplingParams(max_tokens=200, temperature=0.0)
    short_params = SamplingParams(max_tokens=4, temperature=0.0)

    async def body(engine):
        first = engine.submit(prompt_ids(loaded, "Tell me a very long story about dragons."), long_params)
        outputs = engine.stream(first)
        await anext(outputs)  # the long one is decoding now
        second = engine.submit(prompt_ids(loaded, "Hi"), short_params)
        await drain(engine, second)
        # The short request finished while the long one was still generating.
        assert not first.is_finished
        assert engine.scheduler.num_admitted_while_running >= 1
        engine.abort(first)
        async for _ in outputs:
            pass
        return first.completion_ids

    assert len(run_engine(loaded, SchedulerConfig(max_running=4), body)) < 200


def test_abort_during_waiting_and_running_frees_slots(loaded):
    params = SamplingParams(max_tokens=500, temperature=0.7)

    async def body(engine):
        seqs = [engine.submit(prompt_ids(loaded, p), params) for p in PROMPTS]
        await anext(engine.stream(seqs[0]))
        for seq in seqs:
            engine.abort(seq)
        for _ in range(100):
            if engine.num_running == 0 and engine.num_waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert (engine.num_running, engine.num_waiting) == (0, 0)
        assert engine.runner.rows == []
        assert all(s.is_finished for s in seqs)

    run_engine(loaded, SchedulerConfig(max_running=2), body)


@pytest.fixture(scope="module")
def small_queue(loaded):
    settings = Settings(port=0, max_running=1, max_waiting=1)
    engine = Engine(loaded, engine_config(settings))
    live = start_server(create_app(settings, engine=engine))
    yield live
    live.stop()


def _long(stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 300,
        "ignore_eos": True,  # a sampled reply may not end before the test is done with it
        "stream": stream,
    }


async def _wait_health(client: httpx.AsyncClient, key: str, value: int) -> None:
    for _ in range(200):
        if (await client.get("/health")).json()[key] == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} never reached {value}")


def test_full_queue_is_429_with_retry_after(small_queue):
    async def body():
        async with httpx.AsyncClient(base_url=small_queue.base_url, timeout=60) as client:
            running = asyncio.create_task(client.post("/v1/chat/completions", json=_long(False)))
            await _wait_health(client, "num_running", 1)
            waiting = asyncio.create_task(client.post("/v1/chat/completions", json=_long(False)))
            await _wait_health(client, "num_waiting", 1)
            refused = await client.post("/v1/chat/completions", json=_long(True))
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) > 0
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            running.cancel()
            waiting.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
            await _wait_health(client, "num_running", 0)
            assert (await client.get("/health")).json()["status"] == "ok"

    asyncio.run(body())


def test_overload_beyond_the_bound_is_429_while_health_keeps_answering(small_queue):
    async def body():
        async with httpx.AsyncClient(base_url=small_queue.base_url, timeout=120) as client:
            short = _long(False) | {"max_tokens": 40}
            burst = [asyncio.create_task(client.post("/v1/chat/completions", json=short)) for _ in range(8)]
            await _wait_health(client, "num_running", 1)
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json()["num_running"] + health.json()["num_waiting"] <= 2  # the bounds hold
            responses = await asyncio.gather(*burst)
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429}, statuses
        assert 1 <= statuses.count(200) <= 2 + 1  # the running one, the waiting one, maybe one admitted later
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["type"] == "rate_limit_error"

    asyncio.run(body())


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """llmchat as its own process, as in production: the test's clients do not share its interpreter."""
    server = spawn_llmchat(tmp_path_factory.mktemp("server"), {"OTEL_SDK_DISABLED": "true"})
    yield server
    server.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def disconnect_storm(base_url: str, clients: int) -> None:
    """`clients` streams hang up mid-generation; returns once the engine has nothing running (or raises)."""

    async def one(client: httpx.AsyncClient, started: asyncio.Event) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=_long(True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content"' in line:
                    started.set()

    limits = httpx.Limits(max_connections=clients + 10)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        started = asyncio.Event()
        tasks = [asyncio.create_task(one(client, started)) for _ in range(clients)]
        await started.wait()
        await asyncio.sleep(1.0)
        health = (await client.get("/health")).json()
        assert health["num_running"] + health["num_waiting"] > 0  # mid-generation
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        # Aborts land within an engine step; the slack is for a loaded CI machine delivering 50 hang-ups.
        # A ghost generation would run on for the rest of its 300 tokens, far beyond this.
        deadline = loop.time() + 5.0
        while loop.time() < deadline:
            health = (await client.get("/health")).json()
            if health["num_running"] == 0 and health["num_waiting"] == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"engine still busy 5 s after the hang-ups: {health}")


def test_disconnect_storms_free_the_engine_promptly_and_return_memory(server_process):
    """Every block comes back to the KV pool, and once idle the process holds no more memory than the pool's
    newly written blocks (on the CPU its pages are committed as blocks are first written)."""

    def storm() -> tuple[int, dict]:
        asyncio.run(disconnect_storm(server_process.base_url, 50))
        time.sleep(3 * IDLE_S)  # the idle engine gives the freed heap back
        pool = httpx.get(f"{server_process.base_url}/health").json()["kv_pool"]
        return rss_bytes(server_process.proc.pid), pool

    storm()  # the same load warms up the pool and what the allocator keeps in use
    before, pool_before = storm()
    after, pool = storm()
    assert pool["blocks_used"] == 0
    written = (pool["blocks_touched"] - pool_before["blocks_touched"]) * pool["block_size"] * pool["bytes_per_token"]
    assert after < before * 1.05 + written, (
        f"RSS {before / 2**20:.0f} MiB before the storm, {after / 2**20:.0f} MiB after, {written / 2**20:.0f} MiB of"
        " blocks first written"
    )


def test_an_idle_engine_gives_the_freed_heap_back_once(loaded, monkeypatch):
    trims = []
    monkeypatch.setattr("llmchat.engine.core.return_free_heap", lambda: trims.append(time.monotonic()))

    async def body(engine):
        await drain(engine, engine.submit(prompt_ids(loaded, PROMPTS[0]), SamplingParams(max_tokens=4)))
        done = time.monotonic()
        await asyncio.sleep(3.5 * IDLE_S)  # idle through three more heartbeats
        return done

    done = run_engine(loaded, SchedulerConfig(), body)
    assert len(trims) == 1 and trims[0] >= done


def test_failing_logits_processor_ends_only_its_sequence(loaded):
    def explode_at_third(completion_ids, logits):
        if len(completion_ids) == 2:
            raise ValueError("grammar broke")
        return logits

    async def body(engine):
        ids = prompt_ids(loaded, PROMPTS[1])
        bad = engine.submit(ids, SamplingParams(max_tokens=12, temperature=0, logits_processors=(explode_at_third,)))
        good = engine.submit(ids, SamplingParams(max_tokens=12, temperature=0))
        bad_outputs = [o async for o in engine.stream(bad)]
        good_tokens = await drain(engine, good)
        return bad_outputs, good_tokens

    bad_outputs, good_tokens = run_engine(loaded, SchedulerConfig(), body)
    assert bad_outputs[-1].finish_reason == "error" and "grammar broke" in bad_outputs[-1].error
    assert len(good_tokens) == 12


def test_logprobs_cover_every_generated_token_and_stop_strings_are_named(loaded):
    ids = prompt_ids(loaded, PROMPTS[0])

    async def body(engine):
        seq = engine.submit(ids, SamplingParams(max_tokens=12, temperature=0.0, logprobs=3))
        outputs = [out async for out in engine.stream(seq)]
        greedy = engine.submit(ids, SamplingParams(max_tokens=12, temperature=0.0))
        text = "".join([out.text async for out in engine.stream(greedy)])
        stop = text.split()[2]
        stopped = engine.submit(ids, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)))
        last = [out async for out in engine.stream(stopped)][-1]
        return seq, outputs, last, stop

    seq, outputs, last, stop = run_engine(loaded, SchedulerConfig(), body)
    entries = [entry for out in outputs for entry in out.logprobs or ()]
    assert len(entries) == len(seq.completion_ids)
    assert "".join(e.token for e in entries) == "".join(out.text for out in outputs)
    for entry in entries:
        # Greedy: each sampled token is the likeliest, so it heads its own top list.
        assert len(entry.top) == 3 and entry.top[0] == (entry.token, pytest.approx(entry.logprob))
        assert entry.logprob <= 0
    assert (last.finish_reason, last.stop_sequence) == ("stop", stop)
