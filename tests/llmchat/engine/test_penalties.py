"""The sampler's adjustments (penalties, logit_bias, min_tokens, min_p) on hand-made logits, and n > 1 as
forks of one prefill on the bundled model."""

import asyncio
from types import SimpleNamespace

import torch

from llmchat.engine import SchedulerConfig
from llmchat.engine.sampler import adjust, sample
from llmchat.engine.sampling import SamplingParams
from tests.conftest import drain, prompt_ids, run_engine

EOS = frozenset({0})


def row(prompt: list[int], completion: list[int], **params) -> SimpleNamespace:
    """What adjust() reads of a sequence."""
    return SimpleNamespace(
        prompt_ids=prompt,
        completion_ids=completion,
        params=SamplingParams(max_tokens=8, **params),
        prompt_seen=None,
    )


def test_frequency_counts_each_occurrence_and_presence_each_token_once():
    logits = torch.zeros(2, 6)
    seqs = [
        row([5], [2, 2, 3], frequency_penalty=0.5),
        row([5], [2, 2, 3], presence_penalty=0.5),
    ]
    adjust(logits, seqs, EOS)
    assert logits[0].tolist() == [0, 0, -1.0, -0.5, 0, 0]
    assert logits[1].tolist() == [0, 0, -0.5, -0.5, 0, 0]  # the prompt's 5 is not a generated token


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, 2.0, 2.0]])
    adjust(logits, [row([1, 1, 2], [3], repetition_penalty=2.0)], EOS)
    assert logits[0].tolist() == [2.0, -4.0, 1.0, 1.0, 2.0]


def test_logit_bias_adds_to_its_tokens_only_in_its_row():
    logits = torch.zeros(2, 4)
    adjust(logits, [row([1], [], logit_bias=((3, -100.0), (1, 5.0))), row([1], [])], EOS)
    assert logits.tolist() == [[0, 5.0, 0, -100.0], [0, 0, 0, 0]]


def test_min_tokens_holds_back_the_end_and_stop_token_ids_until_reached():
    logits = torch.zeros(2, 4)
    early = row([1], [2], min_tokens=2, stop_token_ids=frozenset({3}))
    done = row([1], [2, 2], min_tokens=2, stop_token_ids=frozenset({3}))
    adjust(logits, [early, done], EOS)
    assert logits[0].tolist() == [float("-inf"), 0, 0, float("-inf")]
    assert logits[1].tolist() == [0, 0, 0, 0]


def test_allowed_token_ids_leave_only_those_and_bad_words_are_never_completed():
    logits = torch.zeros(3, 5)
    only = row([1], [], allowed_token_ids=(1, 3))
    words = ((4,), (2, 3))  # 4 alone; 3 after a 2
    after_two = row([1], [0, 2], bad_words_ids=words)
    after_one = row([1], [0, 1], bad_words_ids=words)
    adjust(logits, [only, after_two, after_one], EOS)
    inf = float("-inf")
    assert logits.tolist() == [[inf, 0, inf, 0, inf], [0, 0, 0, inf, inf], [0, 0, 0, 0, inf]]


def test_a_row_whose_constraints_allow_nothing_is_broken_not_token_zero():
    logits = torch.zeros(1, 4)
    adjust(logits, [row([1], [], allowed_token_ids=(0,), min_tokens=2)], EOS)  # 0 is the end of sequence
    assert sample(logits, [SamplingParams(max_tokens=1, temperature=0.0)], [torch.Generator()])[1] == [True]


def test_rows_without_adjustments_are_untouched():
    logits = torch.randn(3, 8)
    before = logits.clone()
    adjust(logits, [row([1, 2], [3, 4]) for _ in range(3)], EOS)
    assert torch.equal(logits, before)


def test_min_p_drops_tokens_far_below_the_likeliest():
    logits = torch.tensor([[1.0, 0.9, -0.5, -3.0]])  # token 2 is 0.22 times as likely as token 0
    params = SamplingParams(max_tokens=1, temperature=1.0, min_p=0.3)
    picks = {sample(logits.clone(), [params], [torch.Generator().manual_seed(n)])[0][0] for n in range(300)}
    assert picks == {0, 1}
    free = SamplingParams(max_tokens=1, temperature=1.0)
    picks = {sample(logits.clone(), [free], [torch.Generator().manual_seed(n)])[0][0] for n in range(300)}
    assert 2 in picks


def test_choices_fork_one_prefill_and_greedy_choices_agree(loaded):
    ids = prompt_ids(loaded, "Write a sentence about the moon.")
    greedy = SamplingParams(max_tokens=12, temperature=0.0)

    async def body(engine):
        alone = await drain(engine, engine.submit(ids, greedy))
        before = engine.num_prefilled_tokens
        seqs = engine.submit_choices(ids, [greedy] * 3)
        outputs = await asyncio.gather(*(drain(engine, s) for s in seqs))
        return alone, outputs, engine.num_prefilled_tokens - before

    alone, outputs, prefilled = run_engine(loaded, SchedulerConfig(max_running=4), body, prefix_cache_bytes=0)
    assert outputs == [alone] * 3
    assert prefilled == len(ids)  # computed once for the three choices


def test_seeded_choices_differ_and_repeat(loaded):
    ids = prompt_ids(loaded, "Name an animal.")

    def choices(seed: int) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=10, temperature=1.0, seed=seed + i) for i in range(3)]

    async def body(engine):
        return [await asyncio.gather(*(drain(engine, s) for s in engine.submit_choices(ids, choices(7))))]

    first = run_engine(loaded, SchedulerConfig(max_running=4), body)[0]
    second = run_engine(loaded, SchedulerConfig(max_running=4), body)[0]
    assert first == second
    assert len({tuple(c) for c in first}) > 1


def test_a_fork_aborted_while_its_prompt_waits_ends_and_the_others_go_on(loaded):
    ids = prompt_ids(loaded, "Count to ten.")
    params = SamplingParams(max_tokens=6, temperature=0.0)

    async def body(engine):
        blocker = engine.submit(prompt_ids(loaded, "Tell me a long story."), SamplingParams(max_tokens=40))
        seqs = engine.submit_choices(ids, [params] * 3)
        engine.abort(seqs[1])
        results = await asyncio.gather(*(drain(engine, s) for s in seqs))
        await drain(engine, blocker)
        for _ in range(100):  # the engine thread drops finished rows just after it empties `running`
            if engine.num_running == 0 and not engine.runner.rows:
                break
            await asyncio.sleep(0.02)
        return results, [s.finish_reason for s in seqs], engine.num_running, engine.runner.rows

    results, reasons, running, rows = run_engine(loaded, SchedulerConfig(max_running=1), body)
    assert reasons[1] == "abort"
    assert results[0] == results[2] and len(results[0]) == 6
    assert (running, rows) == (0, [])
