"""Decoding rows reading their blocks in place: FlexAttention over the pool (a GPU's way), run here through torch's
eager reference with the same block mask and mask function, and llmchat's CPU kernel, against SDPA over gathered
blocks; and how the runner chooses. FlexAttention's compiled kernels run in `just gpu-check` (tests/gpu)."""

import asyncio
import random
from types import SimpleNamespace

import pytest
import torch

from llmchat.engine import Engine, SchedulerConfig, dot8, paged_flex
from llmchat.engine.block_pool import BlockPool
from llmchat.engine.paged_flex import FlexRows
from llmchat.engine.paged_kv import FLEX, KERNEL, PagedKV, Segment, in_place_kernel, pool_bytes_per_token
from llmchat.engine.paged_runner import PagedRunner
from llmchat.engine.sampling import SamplingParams
from tests.conftest import drain, prompt_ids, run_engine
from tests.llmchat.engine.conftest import paged_step

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(6, 2, 64), (32, 8, 128), (4, 4, 64)])
def test_the_start_up_check_passes_where_flex_attention_is_right(dtype, heads, kv_heads, dim):
    keys, values = (torch.zeros(kv_heads, 200, 16, dim, dtype=dtype) for _ in range(2))
    assert paged_flex.check(keys, values, heads) is None
    small = torch.zeros(kv_heads, 8, 16, dim, dtype=dtype)  # too small for the check: it uses its own blocks
    assert paged_flex.check(small, small.clone(), heads) is None


def test_the_start_up_check_names_what_went_wrong(monkeypatch):
    keys, values = (torch.empty(2, 128, 16, 64) for _ in range(2))
    monkeypatch.setattr(FlexRows, "attend", lambda self, q, k, v, scale: torch.zeros_like(q))
    assert "differs from SDPA" in paged_flex.check(keys, values, 6)

    def fails(self, q, k, v, scale):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(FlexRows, "attend", fails)
    assert paged_flex.check(keys, values, 6) == (
        "FlexAttention failed its start-up check: RuntimeError: no kernel for this device"
    )


def test_each_query_group_lists_its_rows_blocks_once_and_no_others():
    order = list(range(300))
    random.Random(2).shuffle(order)
    shared = order[:4]  # a prefix every row holds
    rows = [(shared + order[4 + 3 * i : 7 + 3 * i], 60 + i, 1 + i % 3) for i in range(30)]
    flex = FlexRows(rows, 300, 16, CPU)
    row_of = [i for i, (_, _, new) in enumerate(rows) for _ in range(new)]
    assert flex.num_tokens == len(row_of) > 32
    counts, indices = flex.mask.kv_num_blocks[0, 0], flex.mask.kv_indices[0, 0]
    assert len(counts) == -(-len(row_of) // 16)
    for group, count in enumerate(counts.tolist()):
        listed = indices[group, :count].tolist()
        members = set(row_of[16 * group : 16 * group + 16])
        needed = {b for r in members for b in rows[r][0][: -(-(rows[r][1] + rows[r][2]) // 16)]}
        assert len(listed) == len(set(listed)) and set(listed) == needed


NO_KERNEL = pytest.mark.skipif(dot8.unavailable() is not None, reason=f"no llmchat kernel here: {dot8.unavailable()}")


@pytest.mark.parametrize("in_place", [FLEX, pytest.param(KERNEL, marks=NO_KERNEL)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_attends_the_same_with_decoding_rows_in_place(in_place, dtype):
    """Decoding rows (one token, several forced ones, two sharing a prefix block) and prompt chunks in one step,
    through FlexAttention or llmchat's CPU kernel, against every segment gathered for SDPA."""
    if in_place == KERNEL:
        assert in_place_kernel(CPU, dtype) is None
    segments = [
        Segment([5, 1, 9], 40, 1),
        Segment([2, 3], 20, 3),
        Segment([7, 8], 0, 30, is_prompt=True),
        Segment([5, 14], 17, 1),
        Segment([10, 11, 12, 13], 33, 20, is_prompt=True),
        Segment([0], 0, 1),
    ]
    plain, gathered = paged_step(segments, None, dtype)
    batch, attended = paged_step(segments, in_place, dtype)
    assert plain.flex is plain.decode is None
    assert (batch.flex is not None) == (in_place == FLEX) and (batch.decode is not None) == (in_place == KERNEL)
    for expected, got in zip(gathered, attended, strict=True):
        assert expected.shape == got.shape == (1, 6, sum(s.num_new for s in segments), 64)
        assert torch.allclose(expected.float(), got.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


class NoGraphs:
    """A forward pass with nothing to capture."""


def test_blocks_handed_out_for_flex_attention_have_their_values_zeroed_before_the_next_step():
    """FlexAttention reads the unwritten slots of a row's last block (masked): a NaN an earlier sequence left there
    must not reach the next one."""
    kv = PagedKV(2, 2, 64, 8, 16, torch.float32, CPU)
    for values in kv.values:
        values.fill_(float("nan"))
    runner = PagedRunner(NoGraphs(), kv, BlockPool(8, 16, caching=True), torch.device("cuda"), num_heads=6)
    runner.in_place = FLEX  # as prepare() sets it once the check passes
    seq = SimpleNamespace(blocks=[])
    runner.grow(seq, 2)
    assert runner.fresh == seq.blocks and len(seq.blocks) == 2
    kv.clear_values(torch.tensor(runner.fresh))
    for values in kv.values:
        assert values[:, seq.blocks].eq(0).all()
        others = [b for b in range(8) if b not in seq.blocks]
        assert values[:, others].isnan().all()
    gathering = PagedRunner(NoGraphs(), kv, BlockPool(8, 16, caching=True), CPU, num_heads=6)
    gathering.in_place = None
    gathering.grow(SimpleNamespace(blocks=[]), 2)
    assert gathering.fresh == []  # gathered blocks are cut to the row's length: no slot is read before it is written


@pytest.mark.parametrize("reason", [None, "FlexAttention differs from SDPA by 0.5 on this device"])
def test_a_gpu_runner_reads_blocks_in_place_only_after_the_check_passes(monkeypatch, reason):
    checked = []
    monkeypatch.setattr(paged_flex, "check", lambda keys, values, heads: checked.append(heads) or reason)
    kv = PagedKV(1, 2, 64, 8, 16, torch.float32, CPU)  # the pool's tensors stay on the CPU: only the choice runs
    runner = PagedRunner(NoGraphs(), kv, BlockPool(8, 16, caching=True), torch.device("cuda"), num_heads=6)
    assert runner.in_place is None and "checked at start-up" in runner.why_gathered
    runner.prepare()
    assert checked == [6]
    assert runner.in_place == (FLEX if reason is None else None)
    assert runner.why_gathered == reason


def test_greedy_tokens_are_the_same_with_decoding_rows_through_flex_attention(loaded):
    """The engine as a GPU runs it, here with torch's eager FlexAttention (a small pool: it reads all of it): rows
    arriving one after another, their system prompt's blocks shared through the prefix cache."""
    prompts = [prompt_ids(loaded, f"Name {i} animals that live in the sea.") for i in range(2, 7)]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    def body(in_place):
        async def run(engine: Engine):
            assert engine.paged is not None
            engine.paged.in_place = in_place  # before any request: the engine thread reads it each step
            for pool in (*engine.paged.kv.keys, *engine.paged.kv.values):
                pool.zero_()  # the eager reference reads every block, never written ones too
            seqs = []
            for ids in prompts:
                seqs.append(engine.submit(ids, greedy))
                await asyncio.sleep(0.05)
            return [await drain(engine, seq) for seq in seqs], engine.describe()["kv_pool"]

        return run

    options = {"int4_rows": 0, "pool_bytes": 48 * 16 * pool_bytes_per_token(loaded.model)}
    gathered, _ = run_engine(loaded, SchedulerConfig(), body(None), **options)
    flex, pool = run_engine(loaded, SchedulerConfig(), body(FLEX), **options)
    assert flex == gathered
    assert pool["blocks_total"] == 48 and pool["attention"].startswith("decoding rows: FlexAttention")
