"""Continuous batching bookkeeping: waiting and running sequences, schedule() and postprocess().

Sequences join the running batch at step boundaries (prefill) and leave when they finish; the waiting
queue is bounded so memory cannot grow without limit. No torch here: the runner owns the tensors.
"""

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from llmchat.sampling import SamplingParams, StopChecker, TokenLogprob

_ids = itertools.count()


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


@dataclass(slots=True, eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    completion_ids: list[int] = field(default_factory=list)
    pending_token: int | None = None  # sampled but not yet in the KV cache
    logprobs: list[TokenLogprob] = field(default_factory=list)  # sampled, not yet sent with an output
    is_aborted: bool = False
    submitted_ns: int = field(default_factory=time.time_ns)  # wall clock, for span events
    admitted_ns: int | None = None  # when its prefill started
    # Per-sequence decoding state, made by the engine thread when the sequence is admitted.
    generator: object = None
    decoder: object = None
    stops: StopChecker | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, output: Output) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)

    def finish(self, output: Output) -> None:
        self.status = Status.FINISHED
        self.emit(output)


@dataclass(slots=True)
class SchedulerConfig:
    max_running: int = 16
    max_batched_tokens: int = 256
    max_waiting: int = 64


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
        for seq in dropped:
            seq.finish(Output("", 0, "abort"))
        return [s for s in self.running if s.is_aborted]

    def schedule(self) -> list[Sequence]:
        """Admits waiting sequences for prefill this step, as far as the running and token limits allow.

        Prefilled together, newcomers cost their padded size; the running batch costs one token each.
        One newcomer is always admitted when a slot is free, however long, so none can starve.
        """
        budget = self.config.max_batched_tokens - len(self.running)
        admitted: list[Sequence] = []
        longest = 0
        with self._lock:
            while self.waiting and len(self.running) + len(admitted) < self.config.max_running:
                seq = self.waiting[0]
                longest_if = max(longest, seq.num_prompt_tokens)
                if admitted and longest_if * (len(admitted) + 1) > budget:
                    break
                self.waiting.popleft()
                admitted.append(seq)
                longest = longest_if
        if admitted and self.running:
            self.num_admitted_while_running += len(admitted)
        for seq in admitted:
            seq.status = Status.RUNNING
        self.running.extend(admitted)
        return admitted

    def postprocess(self) -> list[Sequence]:
        """Drops finished sequences from the running batch and returns them."""
        # Aborted but unfinished sequences stay until reap_aborted() has told their consumers.
        done = [s for s in self.running if s.is_finished]
        if done:
            self.running = [s for s in self.running if not s.is_finished]
        with self._lock:
            # Under the lock, so a request added right now cannot have its wake-up cleared.
            if not self.running and not self.waiting:
                self.has_work.clear()
        return done
