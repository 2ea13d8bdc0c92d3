"""The scheduler on its own, without a model: admission in order within max_running and the KV budget, a
request's choices admitted together, prefill budgets, and how choices end when their prompt cannot run."""

import asyncio

import pytest

from llmchat.engine.block_pool import BlockPool
from llmchat.engine.sampling import SamplingParams
from llmchat.engine.scheduler import MIN_CHUNK, QueueFull, Scheduler, SchedulerConfig, Sequence, Status

PARAMS = SamplingParams(max_tokens=8)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def seq(loop, prompt_tokens: int = 10) -> Sequence:
    return Sequence(list(range(prompt_tokens)), PARAMS, loop)


def group(loop, n: int, prompt_tokens: int = 10) -> list[Sequence]:
    """One request's n choices, as Engine.submit_choices links them."""
    first, *others = (seq(loop, prompt_tokens) for _ in range(n))
    first.forks = others
    for fork in others:
        fork.parent = first
    return [first, *others]


def test_admits_in_order_up_to_max_running(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=2))
    seqs = [seq(loop) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert scheduler.schedule() == seqs[:2]
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    assert scheduler.num_waiting == 1


def test_the_waiting_queue_is_bounded(loop):
    scheduler = Scheduler(SchedulerConfig(max_waiting=1))
    scheduler.add(seq(loop))
    with pytest.raises(QueueFull):
        scheduler.add(seq(loop))


def test_a_requests_choices_are_admitted_together_and_only_the_first_prefills(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=4))
    alone = seq(loop)
    choices = group(loop, 3)
    scheduler.add(alone)
    scheduler.add(choices[0])
    assert scheduler.schedule() == [alone, choices[0]]  # the engine starts the leaders; forks ride along
    assert scheduler.running == [alone, *choices]
    planned = [s for s, _ in scheduler.plan_prefill(num_decoding=0)]
    assert planned == [alone, choices[0]]


def test_a_group_waits_for_room_for_all_its_choices_but_runs_alone_however_large(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=2))
    first = seq(loop)
    big = group(loop, 3)
    scheduler.add(first)
    scheduler.add(big[0])
    assert scheduler.schedule() == [first]  # three choices do not fit beside it
    first.status = Status.FINISHED
    scheduler.postprocess()
    assert scheduler.schedule() == [big[0]]  # nothing else runs: the group goes, over max_running
    assert scheduler.num_running == 3


def test_the_kv_budget_counts_every_choices_copy_of_the_prompt(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=8, max_kv_tokens=100))
    first = seq(loop, 30)
    pair = group(loop, 2, 40)  # 80 tokens of KV: over the 70 left
    scheduler.add(first)
    scheduler.add(pair[0])
    assert scheduler.schedule() == [first]
    assert scheduler.num_waiting == 1


def test_a_choice_aborted_while_its_prompt_waits_ends_alone(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=1))
    scheduler.add(seq(loop))
    scheduler.schedule()
    choices = group(loop, 3)
    scheduler.add(choices[0])
    choices[1].is_aborted = True
    scheduler.reap_aborted()
    assert choices[1].finish_reason == "abort"
    assert not choices[0].is_finished and not choices[2].is_finished


def test_choices_end_with_their_prompt_when_it_is_dropped_or_fails(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=4))
    waiting = group(loop, 2)
    scheduler.add(waiting[0])
    waiting[0].is_aborted = True
    scheduler.reap_aborted()
    assert [s.finish_reason for s in waiting] == ["abort", "abort"]

    failing = group(loop, 3)
    scheduler.add(failing[0])
    scheduler.schedule()
    failing[0].status = Status.FINISHED
    failing[0].finish_reason = "error"
    done = scheduler.postprocess()
    assert set(map(id, done)) == set(map(id, failing))
    assert [s.finish_reason for s in failing[1:]] == ["error", "error"]
    assert scheduler.num_running == 0


def test_prefill_gives_the_oldest_an_equal_share_and_shortest_first_the_rest(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=4, max_batched_tokens=64))
    long, short = seq(loop, 200), seq(loop, 20)
    scheduler.add(long)
    scheduler.add(short)
    scheduler.schedule()
    plan = dict((id(s), n) for s, n in scheduler.plan_prefill(num_decoding=4))
    assert plan[id(short)] == 20  # all of it
    assert plan[id(long)] == 60 - 20  # the rest of the 60 the decoding rows leave
    assert sum(plan.values()) == 60


def test_admission_by_the_pools_free_blocks(loop):
    """A newcomer joins a running batch only when its prompt's blocks are free beside one block per running
    sequence; nothing running, the first is always admitted."""
    pool = BlockPool(9, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_running=8))
    first, second, third = seq(loop, 20), seq(loop, 12), seq(loop, 4)
    for s in (first, second, third):
        scheduler.add(s)
    # first: 5 blocks and 1 for its next token; second: 3 + 1, one more than the 3 left; third: 1 + 1 would fit.
    assert scheduler.schedule(pool=pool) == [first]
    pool.allocate(5)
    assert scheduler.schedule(pool=pool) == []  # in order: the third does not pass the second
    assert [s.status for s in (second, third)] == [Status.WAITING, Status.WAITING]


def test_a_preempted_sequence_goes_back_to_the_head_of_the_queue(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=1, max_waiting=1))
    running, waiting = seq(loop), seq(loop)
    scheduler.add(running)
    scheduler.schedule()
    scheduler.add(waiting)
    scheduler.preempt(running, [])
    assert list(scheduler.waiting) == [running, waiting] and scheduler.running == []
    assert running.status is Status.WAITING
    assert scheduler.schedule() == [running]  # first again, past the queue's bound


def test_beside_decoding_rows_a_short_prompt_goes_whole_and_a_long_one_within_the_bound(loop):
    """An agent's next turn (40 tokens beyond its cached conversation) is computed in one step; a long prompt
    arriving with it takes its share of the stall bound, however much it has left."""
    scheduler = Scheduler(SchedulerConfig(max_running=4, max_batched_tokens=512))
    long, turn = seq(loop, 3000), seq(loop, 2740)
    turn.num_cached_tokens = turn.num_computed = 2700
    scheduler.add(long)
    scheduler.add(turn)
    scheduler.schedule()
    plan = dict((id(s), n) for s, n in scheduler.plan_prefill(num_decoding=4, max_chunk=20, whole_up_to=60))
    assert plan == {id(long): 10, id(turn): 40}  # the longest waiting keeps an equal share of the bound
    # Over whole_up_to, the turn is a prompt like any other: chunks of the bound, at least MIN_CHUNK.
    plan = dict((id(s), n) for s, n in scheduler.plan_prefill(num_decoding=4, max_chunk=4, whole_up_to=30))
    assert sum(plan.values()) == MIN_CHUNK and plan[id(long)] == MIN_CHUNK // 2


def test_short_prompts_go_whole_only_as_far_as_one_step_of_whole_up_to_tokens(loop):
    scheduler = Scheduler(SchedulerConfig(max_running=4, max_batched_tokens=512))
    turns = [seq(loop, 50) for _ in range(3)]
    for turn in turns:
        scheduler.add(turn)
    scheduler.schedule()
    plan = [n for _, n in scheduler.plan_prefill(num_decoding=4, max_chunk=20, whole_up_to=110)]
    assert plan == [50, 50]  # two whole; the third would take the step past 110, and goes whole in the next
