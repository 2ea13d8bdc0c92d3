"""The chunk bound's averages, fed synthetic steps: no model, no timing."""

import pytest

from llmchat.engine.scheduler import MIN_CHUNK
from llmchat.engine.step_cost import StepCost

DECODE_S = 0.060


def test_the_bound_is_the_stall_allowance_over_a_prompt_tokens_cost():
    step_cost = StepCost()
    step_cost.observe_decode(DECODE_S)
    step_cost.observe_chunks(100, 0.060)  # 0.6 ms a token
    assert step_cost.max_chunk(1.5) == 150


def test_the_rests_of_prompts_do_not_move_the_per_token_cost():
    """Rests of prompts found in the prefix cache cost far more a token than a chunk does: the step's fixed part
    is spread over a few tokens. Counted, they made a 60-token agent turn take two steps."""
    step_cost = StepCost()
    step_cost.observe_decode(DECODE_S)
    for _ in range(5):
        step_cost.observe_chunks(100, 0.060)
    for _ in range(3):
        step_cost.observe_chunks(5, 0.015)  # 3 ms a token
    assert step_cost.prefill_token_s == pytest.approx(0.0006)
    assert step_cost.max_chunk(1.5) == 150


def test_the_first_step_counts_whatever_its_size():
    step_cost = StepCost()
    step_cost.observe_chunks(5, 0.015)
    assert step_cost.prefill_token_s == pytest.approx(0.003)
    step_cost.observe_chunks(MIN_CHUNK, 0.6e-3 * MIN_CHUNK)
    assert step_cost.prefill_token_s < 0.003


def test_chunks_move_it_when_the_cost_changes():
    """A prompt late in a long context costs more a token; the average follows within a few steps."""
    step_cost = StepCost()
    step_cost.observe_decode(DECODE_S)
    step_cost.observe_chunks(100, 0.060)
    for _ in range(10):
        step_cost.observe_chunks(40, 0.048)  # 1.2 ms a token
    assert step_cost.prefill_token_s == pytest.approx(0.0012, rel=0.1)


def test_no_bound_before_a_decode_step_and_a_chunk_were_measured():
    step_cost = StepCost()
    assert step_cost.max_chunk(1.5) is None
    step_cost.observe_chunks(100, 0.1)
    assert step_cost.max_chunk(1.5) is None
    step_cost.observe_decode(DECODE_S)
    assert step_cost.max_chunk(1.5) == int(1.5 * DECODE_S / 0.001)


def test_a_step_faster_than_a_decode_step_counts_as_free_tokens_not_negative_ones():
    step_cost = StepCost()
    step_cost.observe_decode(DECODE_S)
    step_cost.observe_chunks(64, 0.050)
    step_cost.observe_chunks(64, -0.100)  # noise: the mixed step ran faster than the average decode step
    assert step_cost.prefill_token_s == pytest.approx(0.7 * 0.050 / 64)
