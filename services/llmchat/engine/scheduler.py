"""Continuous batching bookkeeping: waiting and running sequences, schedule(), plan_prefill() and postprocess().

Admitted sequences prefill in chunks sized by a per-step token budget, then decode with the running
batch until they finish; the waiting queue is bounded so memory cannot grow without limit. No torch
here: the runner owns the tensors.
"""

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from llmchat.engine.block_pool import BlockPool
from llmchat.engine.sampling import SamplingParams, StopChecker, TokenLogprob

if TYPE_CHECKING:  # for the annotations only: the engine thread makes these, this module never does
    import torch
    from tokenizers.decoders import DecodeStream
    from transformers.cache_utils import DynamicCache

_ids = itertools.count()
# The smallest prefill chunk a step runs, however many rows decode: a long prompt always advances. Where a
# prompt token costs little beside a decode step the stall bound lies above it (2-core AMX host: below about 32
# rows a step's matmuls take the time of reading the weights). With AVX2 only (2-core AMD EPYC) a chunk token cost
# about 6 ms at 2.8k tokens of context beside a 65 ms decode step of 4 rows, bound by arithmetic in its matmuls
# and its attention alike (SDPA there runs at 70% of MKL's sgemm), and the bound allows about 16. There a floor of
# 32 made the longest gap of 4 streams beside two 3k-token prompts 330 ms, 4.3x a decode step; 16 made it 239 ms,
# the streams ran twice as fast while the prompts prefilled, and the prompts' TTFT grew from 25.0 and 47.7 s to
# 25.3 and 51.8. Short prompts, agents' turns, are not chunked at all (plan_prefill's whole_up_to).
MIN_CHUNK = 16


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Output:
    """One step's news for a sequence: new text, the completion's token count so far, and why it ended."""

    text: str
    num_completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it
    logprobs: list[TokenLogprob] | None = None  # the tokens sampled since the last output, when asked for
    # Why a grammar refused the model's next token, which ended the output with what was valid before it.
    refusal: str | None = None


@dataclass(slots=True, eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    completion_ids: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # sampled or forced, not yet in the KV cache
    num_steps: int = 0  # forward passes whose logits chose one of its tokens (fewer than its tokens when forced)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # sampled, not yet sent with an output
    is_aborted: bool = False
    submitted_ns: int = field(default_factory=time.time_ns)  # wall clock, for span events
    admitted_ns: int | None = None  # when its prefill started
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (set when admitted)
    num_computed: int = 0  # prompt tokens in its KV so far: it is prefilling until all are
    kv: "DynamicCache | None" = None  # its own KV cache while it is prefilling (the runner's)
    # n > 1: the other choices of the same request. They wait on this sequence's prefill, then join the batch
    # with a copy of its KV and their own first token drawn from its logits; `parent` points back.
    forks: list["Sequence"] = field(default_factory=list)
    parent: "Sequence | None" = None
    # What it prefills: its prompt, or after a preemption its prompt and the reply it had, recomputed.
    prefill_ids: list[int] = field(default_factory=list)
    num_preempted: int = 0
    # Its block table in the paged KV pool, how many leading blocks are cached, and the last one's chain id.
    blocks: list[int] = field(default_factory=list)
    num_committed: int = 0
    chain: int = -1
    # The prompt's distinct token ids, for a repetition penalty (the sampler's).
    prompt_seen: "torch.Tensor | None" = None
    finish_reason: str | None = None
    # Per-sequence decoding state, made by the engine thread when the sequence is admitted.
    generator: "torch.Generator | None" = None
    decoder: "DecodeStream | None" = None
    stops: StopChecker | None = None

    def __post_init__(self) -> None:
        self.prefill_ids = self.prompt_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, output: Output) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prefill_ids)

    def finish(self, output: Output) -> None:
        self.status = Status.FINISHED
        self.finish_reason = output.finish_reason
        self.emit(output)


@dataclass(slots=True)
class SchedulerConfig:
    # None: chosen for the device by the engine (GPU-sized batches on a GPU).
    max_running: int | None = 16
    max_batched_tokens: int | None = 512
    max_waiting: int = 64
    # Most tokens (prompt and reply so far) the running sequences may hold in the KV cache together; a
    # newcomer waits while admitting it would pass this (None: no bound). Set from free GPU memory.
    max_kv_tokens: int | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()
        self.has_work = threading.Event()
        # How many newcomers joined a batch that was already running (continuous batching at work).
        self.num_admitted_while_running = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # The engine has set the config's bounds for the device (None there) before it makes the scheduler.
    @property
    def _max_running(self) -> int:
        assert self.config.max_running is not None, "the engine sets max_running before scheduling"
        return self.config.max_running

    @property
    def _max_batched_tokens(self) -> int:
        assert self.config.max_batched_tokens is not None, "the engine sets max_batched_tokens before scheduling"
        return self.config.max_batched_tokens

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; called from the event loop thread."""
        with self._lock:
            if len(self.waiting) >= self.config.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
        self.has_work.set()

    def remove_waiting(self, seq: Sequence) -> bool:
        """Takes a sequence out of the waiting queue; False if it was not there (already admitted)."""
        with self._lock:
            try:
                self.waiting.remove(seq)
            except ValueError:
                return False
            return True

    def reap_aborted(self) -> list[Sequence]:
        """Ends aborted waiting sequences and returns the aborted running ones, for the engine to finish."""
        with self._lock:
            dropped = [s for s in self.waiting if s.is_aborted]
            for seq in dropped:
                self.waiting.remove(seq)
            forks = [f for s in self.waiting for f in s.forks if f.is_aborted and not f.is_finished]
        for seq in [*dropped, *forks]:
            seq.finish(Output("", 0, "abort"))
        for seq in dropped:
            end_forks(seq)
        return [s for s in self.running if s.is_aborted]

    def schedule(self, hold_shared: bool = False, pool: BlockPool | None = None) -> list[Sequence]:
        """Admits waiting sequences, in order, while the running batch has room; they prefill from the next step.

        With `hold_shared` (a prefix cache is on), a sequence whose prompt shares at least a step's worth
        of tokens with one still computing them waits for it (others may pass it meanwhile), and then
        reads those tokens from the prefix cache instead of computing them again. With a paged KV `pool`, a
        sequence is admitted when the blocks its prompt needs are free, beside a reserve for the running rows'
        next blocks; else while the tokens held stay within `max_kv_tokens`.
        """
        admitted: list[Sequence] = []
        held = sum(s.num_prompt_tokens + len(s.completion_ids) for s in self.running)
        free = 0 if pool is None else pool.num_free - len(self.running)
        with self._lock:
            for seq in list(self.waiting):
                group = [seq, *(f for f in seq.forks if not f.is_finished)]
                busy = self.running or admitted
                # A request's choices are admitted together (one alone when nothing runs, however many).
                if busy and len(self.running) + len(admitted) + len(group) > self._max_running:
                    break
                need = 0 if pool is None else pool.blocks_needed(seq.prefill_ids, extra=len(group) - 1)
                if busy and not self._fits(held + len(group) * seq.num_prompt_tokens, need + len(group), free, pool):
                    break  # in order: a long prompt is not passed by shorter ones for ever
                if hold_shared and self._should_wait(seq, [*self.running, *admitted]):
                    continue
                held += len(group) * seq.num_prompt_tokens
                free -= need + len(group)  # and one for each one's next block
                self.waiting.remove(seq)
                admitted.extend(group)
        if admitted and self.running:
            self.num_admitted_while_running += len(admitted)
        for seq in admitted:
            seq.status = Status.RUNNING
        self.running.extend(admitted)
        return [s for s in admitted if s.parent is None]

    def _fits(self, tokens: int, blocks: int, free: int, pool: BlockPool | None) -> bool:
        if pool is not None:
            return blocks <= free
        return self.config.max_kv_tokens is None or tokens <= self.config.max_kv_tokens

    def _should_wait(self, seq: Sequence, others: list[Sequence]) -> bool:
        """Whether a sequence still prefilling will compute at least a step's worth of this one's prompt."""
        for leader in others:
            if leader.is_prefilling and not leader.is_finished:
                shared = _common_prefix(seq.prompt_ids, leader.prompt_ids)
                if shared >= self._max_batched_tokens and leader.num_computed < shared:
                    return True
        return False

    def plan_prefill(
        self, num_decoding: int, max_chunk: int | None = None, whole_up_to: int = 0
    ) -> list[tuple[Sequence, int]]:
        """How many prompt tokens each prefilling sequence computes this step, within the step's token budget.

        The budget is what the decoding rows leave of max_batched_tokens, and at most `max_chunk`
        tokens (the engine's bound on how long running streams may wait). Shortest remaining prompt
        first, so a short newcomer is not stuck behind a long one; the longest-waiting sequence always
        gets at least an equal share, so a long prompt still advances every step. A prompt of at most
        `whole_up_to` tokens beyond its cached prefix (an agent's next turn) is computed whole, in a step
        of up to that many prompt tokens: split, it would stall the running streams as long in all and
        wait a decode step more for each piece.
        """
        pending = [
            s for s in self.running if s.is_prefilling and s.parent is None and not s.is_finished and not s.is_aborted
        ]
        if not pending:
            return []
        budget = self._max_batched_tokens - num_decoding
        bound = max(budget if max_chunk is None else min(budget, max_chunk), MIN_CHUNK)
        plan = {id(pending[0]): min(_remaining(pending[0]), max(bound // len(pending), 1))}
        taken, room = plan[id(pending[0])], max(bound, min(whole_up_to, budget))
        for seq in sorted(pending, key=_remaining):
            if len(seq.prefill_ids) - seq.num_cached_tokens > whole_up_to:
                continue
            need = _remaining(seq) - plan.get(id(seq), 0)
            if taken + need > room:
                break
            plan[id(seq)] = plan.get(id(seq), 0) + need
            taken += need
        left = bound - taken
        for seq in sorted(pending, key=_remaining):
            if left <= 0:
                break
            take = min(_remaining(seq) - plan.get(id(seq), 0), left)
            plan[id(seq)] = plan.get(id(seq), 0) + take
            left -= take
        return [(s, plan[id(s)]) for s in pending if plan.get(id(s))]

    def preempt(self, seq: Sequence, forks: list[Sequence]) -> None:
        """Puts a running sequence (with its choices still waiting on its prompt) back at the head of the queue, to
        be prefilled again when blocks are free; it passes the queue's bound."""
        gone = {id(seq), *map(id, forks)}
        self.running = [s for s in self.running if id(s) not in gone]
        with self._lock:
            for member in (seq, *forks):
                member.status = Status.WAITING
            self.waiting.appendleft(seq)
        self.has_work.set()

    def postprocess(self) -> list[Sequence]:
        """Drops finished sequences from the running batch and returns them."""
        # Aborted but unfinished sequences stay until reap_aborted() has told their consumers.
        for seq in self.running:
            if seq.is_finished:
                end_forks(seq)
        done = [s for s in self.running if s.is_finished]
        if done:
            self.running = [s for s in self.running if not s.is_finished]
        with self._lock:
            # Under the lock, so a request added right now cannot have its wake-up cleared.
            if not self.running and not self.waiting:
                self.has_work.clear()
        return done


def end_forks(seq: Sequence) -> None:
    """Ends the choices still waiting on a sequence that finished before its prompt was prefilled."""
    for fork in seq.forks:
        if not fork.is_finished and fork.is_prefilling:
            error = None if seq.finish_reason != "error" else "the prompt this request's choices share failed"
            fork.finish(Output("", 0, seq.finish_reason or "abort", error))


def _remaining(seq: Sequence) -> int:
    return len(seq.prefill_ids) - seq.num_computed


def _common_prefix(a: list[int], b: list[int], step: int = 16) -> int:
    """Length of the common start of two token lists, to the nearest `step` below (slices compare in C)."""
    n = 0
    while n + step <= min(len(a), len(b)) and a[n : n + step] == b[n : n + step]:
        n += step
    return n
