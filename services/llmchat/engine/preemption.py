"""When the paged KV pool runs out: blocks for the decoding rows' next tokens, taken from the newest request.

A preempted request gives its blocks back and goes first in the queue, to be prefilled again, its prompt
and the reply so far, mostly from the prefix cache where its blocks are still cached; it then resumes
with the token it had drawn (vLLM's preemption by recompute). Nothing fails for lack of KV memory.
"""

import logging

from llmchat.engine.paged_runner import PagedRunner
from llmchat.engine.scheduler import Scheduler, Sequence

log = logging.getLogger("llmchat.engine")


class Preemption:
    def __init__(self, scheduler: Scheduler, runner: PagedRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.count = 0  # since start

    def make_room(self) -> list[Sequence]:
        """Blocks for every decoding row's pending tokens, oldest row first, preempting the newest running request
        while the pool has none left. Returns the rows it found no room for (alone in a full pool: cannot happen
        within the context limit, which the pool bounds)."""
        runner, stuck = self.runner, []
        for seq in list(runner.rows):
            while seq in runner.rows and (short := runner.blocks_short(seq)) > 0:
                if short <= runner.pool.num_free:
                    runner.grow(seq, short)
                    break
                victim = self.scheduler.running[-1]
                if victim is seq and len(self.scheduler.running) == 1:
                    stuck.append(seq)
                    break
                if victim.parent is not None and victim.is_prefilling:  # a choice waiting on its prompt
                    victim = victim.parent
                self.preempt(victim)
        return stuck

    def preempt(self, seq: Sequence) -> None:
        """Frees the sequence's blocks (and its waiting choices') and queues it to be prefilled again."""
        waiting_forks = [f for f in seq.forks if f.is_prefilling and not f.is_finished] if seq.is_prefilling else []
        for member in (seq, *waiting_forks):
            self.runner.release(member)
        if not seq.is_prefilling or seq.completion_ids:  # it had joined the batch: it resumes where it was
            done = len(seq.completion_ids) - len(seq.pending)
            seq.prefill_ids = seq.prompt_ids + seq.completion_ids[:done]
            if seq.parent is not None:
                seq.parent.forks.remove(seq)
            for fork in seq.forks:  # its other choices run on their own now
                fork.parent = None
            seq.forks, seq.parent = [], None
        seq.num_computed = 0
        seq.num_preempted += 1
        self.count += 1
        log.info("KV pool full: preempted a request of %d tokens (recomputed later)", len(seq.prefill_ids))
        self.scheduler.preempt(seq, waiting_forks)
