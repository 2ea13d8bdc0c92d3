"""The inference thread: owns the model and runs the continuous-batching loop.

Each step reaps aborted sequences, admits newcomers (their prompts' cached prefixes copied in),
prefills the next chunk of each prompt within the step's token budget, decodes every prefilled
sequence by its pending tokens (one, or more where a grammar forced them), samples every row in one
pass, and streams text to each sequence's asyncio queue.
"""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import torch

from llmchat.engine.block_pool import BlockPool, PoolFull
from llmchat.engine.config import EngineConfig
from llmchat.engine.constraints import GrammarMasks
from llmchat.engine.gpu import is_device_fault
from llmchat.engine.heap import return_free_heap
from llmchat.engine.kv_cache import kv_token_budget, make_prefix_cache
from llmchat.engine.loader import LoadedModel
from llmchat.engine.outputs import OutputProcessor
from llmchat.engine.paged_runner import PagedRunner, in_kv, paged_runner
from llmchat.engine.preemption import Preemption
from llmchat.engine.prefix_cache import PrefixCache
from llmchat.engine.runner import BatchRunner, pick_forward
from llmchat.engine.sampler import pick
from llmchat.engine.sampling import SamplingParams
from llmchat.engine.scheduler import Output, Scheduler, Sequence
from llmchat.engine.step_cost import StepCost

log = logging.getLogger("llmchat.engine")

# While sequences decode, a step's prefill chunks may take at most this many decode steps' time, so a
# running stream's longest gap stays within about 1 + STALL_STEPS of its usual one on any machine. With 4, 2 and 1.5,
# a 3k-token prompt arriving beside 4 streams made gaps 6x, 3.5x and 2.6x their median (2-core AMX host).
STALL_STEPS = 1.5
# A prompt whose uncached part takes at most this many decode steps' time (an agent's next turn, 20-35 tokens
# beyond its cached conversation) is computed in one step, not in chunks of the bound: split, it stalls the
# streams as long in all and waits a step more for each piece (Scheduler.plan_prefill).
WHOLE_STEPS = 10

# The loop's heartbeat while idle, and how long the engine idles before the freed heap goes back (heap.py).
IDLE_S = 1.0


class Engine:
    """Facade the chat layer talks to: start(), submit(), stream(), abort(), shutdown()."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_context = loaded.max_context
        self.vocab_size = loaded.model.config.vocab_size
        scheduling = replace(config.scheduler)  # its device defaults filled in here, not in the caller's
        gpu = loaded.model.device.type == "cuda"
        if scheduling.max_running is None:
            scheduling.max_running = 256 if gpu else 64
        if scheduling.max_batched_tokens is None:
            scheduling.max_batched_tokens = 2048 if gpu else 512
        self.scheduler = Scheduler(scheduling)
        eos = loaded.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        model = loaded.model
        forward = pick_forward(
            model,
            config.fused_forward,
            config.cuda_graphs,
            scheduling.max_running,
            checkpoint=loaded.checkpoint,
            int4_rows=config.int4_rows,
            compile_decode=config.compile_decode,
            choices=loaded.choices,
            gguf=loaded.gguf,
        )
        self.paged: PagedRunner | None = None  # the runner, where it runs over the pool
        self.prefix_cache: PrefixCache | None = None
        self.prefix_cache_off: str | None = "turned off in the settings" if config.prefix_cache_bytes == 0 else None
        if hasattr(forward, "paged"):  # llmchat's fused pass: the paged KV pool
            self.paged = paged_runner(
                forward, model, self.max_context, config.pool_bytes, config.prefix_cache_bytes != 0
            )
            self.runner: PagedRunner | BatchRunner = self.paged
            self.preemption = Preemption(self.scheduler, self.paged)
            # Every request must fit the pool alone: a longer context is refused before any work (a 400).
            pool_tokens = self.paged.kv.num_blocks * self.paged.kv.block_size
            self.max_context = min(self.max_context, pool_tokens - self.paged.kv.block_size)
            scheduling.max_kv_tokens = pool_tokens
        else:  # transformers' forward, or the compiled one-row decode: one padded batch cache
            self.prefix_cache, self.prefix_cache_off = make_prefix_cache(model, config.prefix_cache_bytes)
            if scheduling.max_kv_tokens is None:
                reserved = self.prefix_cache.capacity_bytes if self.prefix_cache is not None else 0
                scheduling.max_kv_tokens = kv_token_budget(model, reserved)
            self.runner = BatchRunner(model, forward, pad, self.prefix_cache)
        self.masks = GrammarMasks()
        self.outputs = OutputProcessor(self.tokenizer, self.eos_ids, config.jump_forward)
        self.num_model_steps = 0  # since start: model steps whose logits chose a token (fewer when tokens were forced)
        self.num_prefilled_tokens = 0  # prompt tokens computed (not read from the prefix cache or shared by forks)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.step_cost = StepCost()  # what decode steps and prompt chunks take, for the chunk bound
        # When the loop last came round (monotonic); the systemd watchdog reads it.
        self.last_beat = time.monotonic()

    @property
    def pool(self) -> BlockPool | None:
        """The paged KV pool's blocks, where the runner runs over the pool."""
        return self.paged.pool if self.paged is not None else None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def batch_size(self) -> int:
        """Rows in the batch's KV cache (running sequences that have been prefilled)."""
        return len(self.runner.rows)

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.kv_cache_bytes()

    @property
    def prefix_cache_bytes(self) -> int:
        if self.paged is not None:
            return len(self.paged.pool.cached) * self.paged.pool.block_size * self.paged.kv.bytes_per_token
        return self.prefix_cache.num_bytes if self.prefix_cache is not None else 0

    def describe(self) -> dict:
        """What /health shows of the engine: the model as loaded, its forward pass, KV pool, prefix cache and load."""
        if self.prefix_cache_off is not None:
            cache = {"off": self.prefix_cache_off}
        elif self.paged is not None:
            # Cached blocks may fill whatever of the pool the running sequences leave.
            cache = self.paged.pool.describe_prefix() | {
                "bytes": self.prefix_cache_bytes,
                "capacity_bytes": self.paged.kv.nbytes,
            }
        else:
            cache = self.prefix_cache.describe() if self.prefix_cache is not None else {}
        return self.loaded.describe() | {
            "forward": self.runner.forward.kind,
            # Weights the forward pass keeps beside the model's own (prepacked and 4-bit copies).
            "forward_memory_bytes": self.runner.forward.extra_bytes,
            "kv_pool": self._describe_pool(),
            "prefix_cache": cache,
            "max_batched_tokens": self.scheduler.config.max_batched_tokens,
            "max_kv_tokens": self.scheduler.config.max_kv_tokens,
            "decoding": {
                "jump_forward": self.outputs.jump_forward,
                "output_tokens": self.outputs.num_output_tokens,
                "model_steps": self.num_model_steps,
                "prefilled_tokens": self.num_prefilled_tokens,
            },
            "engine_alive": self.is_alive,
            "num_waiting": self.num_waiting,
            "num_running": self.num_running,
        }

    def _describe_pool(self) -> dict:
        if self.paged is None:
            return {"off": f"the forward pass is {self.runner.forward.kind}: one padded batch cache"}
        return self.paged.describe() | {
            "tokens_held": sum(in_kv(s) for s in self.scheduler.running if s.blocks),  # at most 15 more in blocks
            "preemptions": self.preemption.count,
        }

    def prepare(self) -> None:
        """Start-up work before start(): on a GPU, FlexAttention's check over the pool and the CUDA graphs; on the
        CPU, LLMCHAT_COMPILE's one-row step."""
        self._use_device()
        with torch.inference_mode():
            self.runner.prepare()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmchat-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self.scheduler.has_work.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.masks.shutdown()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queues a request; raises QueueFull when the waiting queue is at its bound."""
        return self.submit_choices(prompt_ids, [params])[0]

    def submit_choices(self, prompt_ids: list[int], choices: list[SamplingParams]) -> list[Sequence]:
        """Queues one sequence per choice of one prompt: the prompt is prefilled once, for the first, and the
        others fork from it (a copy of its KV, their own first token from its logits)."""
        loop = asyncio.get_running_loop()
        first, *others = (Sequence(prompt_ids, params, loop) for params in choices)
        first.forks = others
        for fork in others:
            fork.parent = first
        self.scheduler.add(first)
        if not self.is_alive:  # it died since the caller checked: answer now rather than never
            self._fail_all("the inference engine is not running")
        return [first, *others]

    def abort(self, seq: Sequence) -> None:
        """Ends a waiting sequence at once; a running one leaves before the engine's next forward pass."""
        # Read by the engine thread between passes; a bool store is atomic under the GIL.
        seq.is_aborted = True
        if self.scheduler.remove_waiting(seq):
            seq.finish(Output("", 0, "abort"))
        self.scheduler.has_work.set()

    async def stream(self, seq: Sequence) -> AsyncIterator[Output]:
        """Yields the sequence's outputs until it finishes; aborts it if the consumer goes away."""
        try:
            while True:
                output = await seq.outputs.get()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            if not seq.is_finished:
                self.abort(seq)

    def _use_device(self) -> None:
        """Sends this thread's kernels, graph captures and allocations to the model's GPU, not GPU 0."""
        if self.runner.device.type == "cuda" and self.runner.device.index is not None:
            torch.cuda.set_device(self.runner.device)

    def _run(self) -> None:
        try:
            self._use_device()
            self._loop()
        finally:
            # However the loop ended (shutdown, or an error that escaped it), nobody may wait forever.
            self._fail_all("the inference engine stopped" if self._stopping else "the inference engine died")

    def _fail_all(self, reason: str) -> None:
        if not self._stopping:
            log.critical("%s; failing %d requests", reason, self.num_running + self.num_waiting)
        waiting = [f for s in self.scheduler.waiting for f in (s, *s.forks)]
        for seq in [*self.scheduler.running, *waiting]:
            if not seq.is_finished:
                seq.finish(Output("", len(seq.completion_ids), "error", reason))

    def _loop(self) -> None:
        with torch.inference_mode():
            worked = False  # since the heap was last trimmed
            while not self._stopping:
                self.last_beat = time.monotonic()
                if not self.scheduler.has_work.wait(timeout=IDLE_S):
                    if worked:
                        return_free_heap()
                        worked = False
                    continue
                worked = True
                try:
                    self.step()
                except Exception as exc:  # a failed step ends the batch it ran, not the engine
                    if is_device_fault(exc):
                        # The device context is unusable: every later step would fail while /health said ok.
                        # Ending the loop fails every request and /health, and systemd restarts the service.
                        log.critical("unrecoverable device error, stopping the engine: %s", exc)
                        return
                    log.exception("generation step failed; ending %d running sequences", len(self.runner.rows))
                    error = f"{type(exc).__name__}: {exc}"
                    for seq in self.scheduler.running:
                        if not seq.is_finished:
                            seq.finish(Output("", len(seq.completion_ids), "error", error))
                    for seq in self.scheduler.postprocess():
                        self.runner.release(seq)  # blocks written in the failed step were never cached
                    self.runner.reset()

    def step(self) -> None:
        """One scheduling step: admit newcomers, prefill a chunk of each prompt, decode every prefilled sequence.

        Aborts are honoured before each forward pass, so a hung-up client's slot is free within one pass.
        """
        if self.paged is not None:
            self._step_paged()
        else:
            self._step_batched()

    def _step_paged(self) -> None:
        """Over the paged pool the decoding rows and the prompt chunks go through one forward pass together."""
        paged = self.paged
        assert paged is not None
        self._reap()
        for seq in self.scheduler.schedule(hold_shared=paged.pool.caching, pool=paged.pool):
            try:
                self._admit(seq)
            except PoolFull:  # only when nothing else runs: the pool cannot hold this request at all
                self._fail_group(seq, "the KV pool cannot hold this request's prompt and choices")
        for seq in self.preemption.make_room():
            self._fail_group(seq, "the KV pool is full")
        chunks = self.scheduler.plan_prefill(sum(len(s.pending) for s in self.runner.rows), *self._chunk_bounds())
        if not chunks and not self.runner.rows:
            return
        start = time.perf_counter()
        try:
            seqs, logits = paged.step(chunks)
        except torch.OutOfMemoryError:
            self._out_of_memory_paged(chunks)
            return
        elapsed = time.perf_counter() - start
        num_prompt = sum(n for _, n in chunks)
        if num_prompt:
            decode_s = (self.step_cost.decode_step_s or 0.0) if self.runner.rows else 0.0
            self.step_cost.observe_chunks(num_prompt, elapsed - decode_s)
            self.num_prefilled_tokens += num_prompt
        else:
            self.step_cost.observe_decode(elapsed)
        if seqs:
            self._sample(seqs, logits)
        self.runner.drop(self.scheduler.postprocess())

    def _fail_group(self, seq: Sequence, error: str) -> None:
        for member in (seq, *seq.forks):
            if not member.is_finished:
                member.finish(Output("", len(member.completion_ids), "error", error))
        self.runner.drop(self.scheduler.postprocess())

    def _out_of_memory_paged(self, chunks: list[tuple[Sequence, int]]) -> None:
        """Out of device memory in a step: the prompts being prefilled end (they are the newcomers), or with none,
        the newest request is preempted; the other rows' pending tokens run again in the next step."""
        if chunks:
            self._out_of_memory([s for seq, _ in chunks for s in (seq, *seq.forks)])
            self.runner.drop(self.scheduler.postprocess())
        elif len(self.runner.rows) > 1:
            self.preemption.preempt(self.runner.rows[-1])
        else:
            self._out_of_memory(list(self.scheduler.running))
            self.runner.drop(self.scheduler.postprocess())
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def _step_batched(self) -> None:
        """With one padded batch cache: prefill chunks, sample the prompts that are done, then a decode step."""
        runner = self.runner
        assert isinstance(runner, BatchRunner)
        self._reap()
        for seq in self.scheduler.schedule(hold_shared=self.prefix_cache is not None):
            try:
                self._admit(seq)
            except torch.OutOfMemoryError:
                self._out_of_memory([seq])
        chunks = self.scheduler.plan_prefill(sum(len(s.pending) for s in self.runner.rows), *self._chunk_bounds())
        if chunks:
            start = time.perf_counter()
            try:
                joined, logits = runner.prefill(chunks)
            except torch.OutOfMemoryError:  # raised before the batch's cache was touched: only newcomers fail
                self._out_of_memory([s for seq, _ in chunks for s in (seq, *seq.forks)])
                joined = []
            if joined:
                self._sample(joined, logits)
            num_prompt = sum(n for _, n in chunks)
            self.num_prefilled_tokens += num_prompt
            self.step_cost.observe_chunks(num_prompt, time.perf_counter() - start)
            self._reap()
        if self.runner.rows:
            start = time.perf_counter()
            rows = list(self.runner.rows)
            self._sample(rows, runner.decode())
            self.step_cost.observe_decode(time.perf_counter() - start)
            self.runner.drop(self.scheduler.postprocess())

    def _out_of_memory(self, seqs: list[Sequence]) -> None:
        """Ends sequences whose admission or prefill ran out of device memory; the running batch goes on."""
        log.warning("out of memory admitting or prefilling %d requests; ending them", len(seqs))
        for seq in seqs:
            self.runner.release(seq)
            if not seq.is_finished:
                error = "out of memory: the prompt did not fit beside the running requests; retry later"
                seq.finish(Output("", len(seq.completion_ids), "error", error))
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def _chunk_bounds(self) -> tuple[int | None, int]:
        """Prompt tokens this step may prefill without stalling the decoding rows for over STALL_STEPS steps, and
        the size of a prompt that goes whole (WHOLE_STEPS); (None, 0) with nothing decoding."""
        if not self.runner.rows:
            return None, 0
        return self.step_cost.max_chunk(STALL_STEPS), self.step_cost.max_chunk(WHOLE_STEPS) or 0

    def _reap(self) -> None:
        for seq in self.scheduler.reap_aborted():
            seq.finish(Output(seq.stops.flush() if seq.stops else "", len(seq.completion_ids), "abort"))
        self.runner.drop(self.scheduler.postprocess())

    def _admit(self, seq: Sequence) -> None:
        for choice in (seq, *seq.forks):
            if not choice.is_finished and choice.generator is None:  # not when it resumes after a preemption
                self.outputs.start(choice, self.runner.device)
                if choice.params.constraint is not None:  # its first mask is computed while its prompt prefills
                    self.masks.start([choice.params.constraint])
        self.runner.start(seq)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Picks every sequence's next token in one pass and hands each to its reply; starts the constrained rows'
        next grammar masks."""
        tokens, errors, entries = pick(logits, seqs, self.eos_ids, self.masks, self.outputs.decode_one)
        self.num_model_steps += len(seqs)
        for seq, token, error, entry in zip(seqs, tokens, errors, entries, strict=True):
            self.outputs.take(seq, token, error, entry)
        constraints = [seq.params.constraint for seq in seqs]
        self.masks.start([c for seq, c in zip(seqs, constraints, strict=True) if c and not seq.is_finished])
