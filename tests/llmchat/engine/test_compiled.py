"""One-row decode steps compiled by torch.compile on the CPU (LLMCHAT_COMPILE), on the bundled model."""

import pytest
import torch
from torch._dynamo.utils import counters

from llmchat.engine import SchedulerConfig
from llmchat.engine.compiled import CompiledDecode
from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.kv_cache import new_cache
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.engine.sampling import SamplingParams
from llmchat.settings import Settings
from tests.conftest import drain, prompt_ids, run_engine, teacher_forced

LOADED = {}


def bundled():
    if not LOADED:
        LOADED["model"] = load_model(ModelConfig("bundled", device="cpu", cache_dir=Settings().cache_dir))
    return LOADED["model"]


def test_compiled_steps_stay_as_close_to_exact_as_the_eager_four_bit_pass():
    loaded = bundled()
    four_bit = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=4)
    compiled = CompiledDecode(four_bit)
    compiled.compile_now(new_cache(loaded.model))
    assert compiled.failure is None and compiled.kind.endswith(", one-row decode compiled")
    exact = teacher_forced(FusedForward(loaded.model, int4_rows=0), loaded.model, loaded.tokenizer, masked=False)
    eager = teacher_forced(four_bit, loaded.model, loaded.tokenizer, masked=False)
    ours = teacher_forced(compiled, loaded.model, loaded.tokenizer, masked=False)
    assert torch.equal(ours.argmax(-1), exact.argmax(-1))
    # Compiled kernels round float32 differently: as close to the exact logits as the eager 4-bit pass, not
    # equal to it.
    assert (ours - exact).abs().max() <= 1.5 * (eager - exact).abs().max()


def test_one_compile_serves_every_cache_length_as_the_cache_grows():
    loaded = bundled()
    compiled = CompiledDecode(FusedForward(loaded.model))
    compiled.compile_now(new_cache(loaded.model))
    graphs = counters["stats"]["unique_graphs"]
    cache = new_cache(loaded.model)
    with torch.inference_mode():  # as the engine runs: the graph was compiled for inference tensors
        token = torch.tensor([[5]])
        compiled.fused(torch.randint(100, 1000, (1, 10)), None, torch.arange(10)[None], cache)
        room = cache.layers[0].buffers[0].shape[2]
        for step in range(room):  # past the spare columns: the buffers grow, and one step fills them exactly
            compiled(token, None, torch.tensor([[10 + step]]), cache)
    assert cache.layers[0].buffers[0].shape[2] > room and compiled.failure is None
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failed_compile_decodes_eagerly_and_says_why():
    loaded = bundled()
    fused = FusedForward(loaded.model)
    compiled = CompiledDecode(fused)

    def no_compiler(*args):
        raise RuntimeError("Compiler: g++ not found\nmore detail")

    compiled._step = no_compiler
    exact = teacher_forced(fused, loaded.model, loaded.tokenizer, masked=False)
    ours = teacher_forced(compiled, loaded.model, loaded.tokenizer, masked=False)
    assert torch.equal(ours, exact)
    assert compiled.kind == f"{fused.kind}, one-row decode not compiled (RuntimeError: Compiler: g++ not found)"


def test_a_one_token_prompt_and_its_first_step_run_eagerly():
    loaded = bundled()
    compiled = CompiledDecode(FusedForward(loaded.model))
    compiled._step = lambda *args: pytest.fail("compiled for a cache of 0 or 1 columns")
    cache = new_cache(loaded.model)
    with torch.inference_mode():
        for column in (0, 1):
            compiled(torch.tensor([[5]]), None, torch.tensor([[column]]), cache)
    assert cache.layers[0].get_seq_length() == 2 and compiled.failure is None


class Recording:
    """The runner's forward pass, noting each call's ids shape and whether it had a mask."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __call__(self, ids, mask, positions, cache):
        self.calls.append((tuple(ids.shape), mask is None))
        return self.inner(ids, mask, positions, cache)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_engine_compiles_before_serving_and_runs_only_one_row_steps_compiled():
    loaded = bundled()
    compiled_calls = []

    async def body(engine):
        forward = engine.runner.forward
        assert isinstance(forward, CompiledDecode) and forward.failure is None  # compiled by prepare()
        step = forward._step
        forward._step = lambda *args: compiled_calls.append(args[3]) or step(*args)
        engine.runner.forward = recording = Recording(forward)
        alone = await drain(engine, engine.submit(prompt_ids(loaded, "Hi"), SamplingParams(8, temperature=0.0)))
        seqs = [engine.submit(prompt_ids(loaded, t), SamplingParams(8, temperature=0.0)) for t in ("Hi", "Hello")]
        together = [await drain(engine, seq) for seq in seqs]
        return alone, together, recording.calls

    alone, together, calls = run_engine(loaded, SchedulerConfig(max_running=4), body, compile_decode=True)
    assert len(alone) == 8 and all(len(tokens) == 8 for tokens in together)
    assert len(compiled_calls) == calls.count(((1, 1), True)) >= 7  # every unpadded one-row step, and only those
    assert any(shape[0] == 2 for shape, _ in calls)  # two rows decoded through the eager fused pass
