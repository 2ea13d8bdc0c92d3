"""Faults that must cost only the requests they touch: NaN logits, out of memory while admitting or
prefilling, and admission waiting for the KV pool's blocks."""

import asyncio

import pytest
import torch

from llmchat.engine import Engine, SchedulerConfig
from llmchat.engine.paged_kv import pool_bytes_per_token
from llmchat.engine.sampling import SamplingParams
from tests.conftest import prompt_ids, run_engine


async def stream_all(engine: Engine, seq) -> list:
    return [output async for output in engine.stream(seq)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_end_only_their_own_request(loaded, temperature):
    """float16 overflow shows up as NaN logits; on CUDA torch.multinomial would assert on the device. Here the
    row's request ends with an error and its neighbour in the batch completes."""

    def nan_at_third(completion_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        return torch.full_like(row, float("nan")) if len(completion_ids) == 2 else row

    async def body(engine: Engine):
        bad = SamplingParams(10, temperature=temperature, logits_processors=(nan_at_third,))
        good = SamplingParams(10, temperature=temperature, seed=1)
        seqs = [engine.submit(prompt_ids(loaded, "Tell me a story."), p) for p in (bad, good)]
        outputs = await asyncio.gather(*(stream_all(engine, s) for s in seqs))
        return seqs, outputs

    (bad, good), (bad_outputs, _) = run_engine(loaded, SchedulerConfig(), body)
    assert bad.finish_reason == "error" and "not numbers" in bad_outputs[-1].error
    assert len(bad.completion_ids) == 2
    assert good.finish_reason == "length" and len(good.completion_ids) == 10


class OutOfMemoryOnPrefill:
    """Wraps the forward pass: raises CUDA's out-of-memory error on the prefill of a prompt ending with `marker`."""

    def __init__(self, forward, marker: int) -> None:
        self.forward, self.marker, self.raised = forward, marker, 0

    def __getattr__(self, name: str):
        return getattr(self.forward, name)

    def paged(self, ids, positions, batch):
        if batch.has_prompt and int(ids[0, -1]) == self.marker:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.forward.paged(ids, positions, batch)


def test_out_of_memory_in_prefill_fails_only_the_newcomer(loaded):
    running_ids = prompt_ids(loaded, "Tell me a long story about the sea.")
    newcomer_ids = prompt_ids(loaded, "What is two plus two?") + [loaded.tokenizer.encode("!")[0]]

    async def body(engine: Engine):
        fault = OutOfMemoryOnPrefill(engine.runner.forward, newcomer_ids[-1])
        engine.runner.forward = fault
        running = engine.submit(running_ids, SamplingParams(40, temperature=0.0))
        stream = engine.stream(running)
        first = [await anext(stream)]
        newcomer = engine.submit(newcomer_ids, SamplingParams(8, temperature=0.0))
        newcomer_outputs = await stream_all(engine, newcomer)
        rest = [output async for output in stream]
        after = engine.submit(prompt_ids(loaded, "Hi"), SamplingParams(4, temperature=0.0))
        await stream_all(engine, after)
        return fault, running, first + rest, newcomer, newcomer_outputs, after

    fault, running, outputs, newcomer, newcomer_outputs, after = run_engine(loaded, SchedulerConfig(), body)
    assert fault.raised == 1
    assert newcomer.finish_reason == "error" and "out of memory" in newcomer_outputs[-1].error
    assert running.finish_reason == "length" and len(running.completion_ids) == 40
    assert outputs[-1].finish_reason == "length"
    assert after.finish_reason == "length", "the engine serves on"


def test_admission_waits_while_the_pool_is_full(loaded):
    """With blocks for about one request, a second waits until the first is done instead of joining."""
    first_ids, second_ids = prompt_ids(loaded, "Tell me a story."), prompt_ids(loaded, "Hi")

    async def body(engine: Engine):
        first = engine.submit(first_ids, SamplingParams(16, temperature=0.0))
        stream = engine.stream(first)
        outputs = [await anext(stream)]  # the first is decoding now
        second = engine.submit(second_ids, SamplingParams(16, temperature=0.0))
        outputs += [output async for output in stream]
        await stream_all(engine, second)
        return engine, [first, second]

    blocks = -(-(len(first_ids) + 16) // 16) + 1
    pool_bytes = blocks * 16 * pool_bytes_per_token(loaded.model)
    engine, seqs = run_engine(loaded, SchedulerConfig(), body, pool_bytes=pool_bytes)
    assert all(s.finish_reason in ("length", "stop") for s in seqs)
    assert engine.scheduler.num_admitted_while_running == 0
    assert engine.describe()["kv_pool"]["blocks_total"] == blocks
    engine, seqs = run_engine(loaded, SchedulerConfig(), body)
    assert engine.scheduler.num_admitted_while_running == 1, "with room the second joins the first"
