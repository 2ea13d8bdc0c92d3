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

import torch
from tokenizers.decoders import DecodeStream

from llmchat.engine.constraints import GrammarError, GrammarMasks
from llmchat.engine.kv_cache import kv_token_budget, make_prefix_cache
from llmchat.engine.loader import LoadedModel
from llmchat.engine.runner import BatchRunner
from llmchat.engine.sampler import adjust, sample, token_logprobs
from llmchat.engine.sampling import SamplingParams, StopChecker
from llmchat.engine.scheduler import Output, Scheduler, SchedulerConfig, Sequence

log = logging.getLogger("llmchat.engine")

# While sequences decode, a step's prefill chunks may take at most this many decode steps' time, so a
# running stream's longest gap stays within about 1 + STALL_STEPS of its usual one on any machine.
STALL_STEPS = 4


class Engine:
    """Facade the chat layer talks to: start(), submit(), stream(), abort(), shutdown()."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: SchedulerConfig | None = None,
        fused_forward: bool = True,
        cuda_graphs: bool = False,
        prefix_cache_bytes: int | None = None,
        jump_forward: bool = True,
        int4_rows: int | None = None,
        compile_decode: bool = False,
    ) -> None:
        """`prefix_cache_bytes`: the prefix cache's bound (None: derived from free memory; 0: no prefix cache).
        `jump_forward`: append the tokens a grammar forces without a model step for each. `int4_rows`: decode
        steps of up to this many rows use a GGUF's 4-bit weights on the CPU (None: measured at load; 0: never).
        `compile_decode`: one-row decode steps on the CPU run compiled by torch.compile (compiled on prepare())."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_context = loaded.max_context
        self.vocab_size = loaded.model.config.vocab_size
        config = config or SchedulerConfig()
        self.scheduler = Scheduler(config)
        eos = loaded.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        self.prefix_cache, self.prefix_cache_off = make_prefix_cache(loaded.model, prefix_cache_bytes)
        if config.max_kv_tokens is None:
            reserved = self.prefix_cache.capacity_bytes if self.prefix_cache is not None else 0
            config.max_kv_tokens = kv_token_budget(loaded.model, reserved)
        self.runner = BatchRunner(
            loaded.model,
            pad,
            fused_forward,
            cuda_graphs,
            config.max_running,
            checkpoint=loaded.checkpoint,
            gguf=loaded.gguf,
            prefix_cache=self.prefix_cache,
            int4_rows=int4_rows,
            compile_decode=compile_decode,
            choices=loaded.choices,
        )
        self.masks = GrammarMasks()
        self.jump_forward = jump_forward
        # Since start: tokens generated, and model steps whose logits chose one (fewer when tokens were forced).
        self.num_output_tokens = 0
        self.num_model_steps = 0
        self.num_prefilled_tokens = 0  # prompt tokens computed (not read from the prefix cache or shared by forks)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Recent seconds per decode step and per prefilled token (moving averages), for the chunk bound.
        self.decode_step_s: float | None = None
        self.prefill_token_s: float | None = None
        # When the loop last came round (monotonic); the systemd watchdog reads it.
        self.last_beat = time.monotonic()

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
        return self.prefix_cache.num_bytes if self.prefix_cache is not None else 0

    def describe(self) -> dict:
        """What /health shows of the engine: the model as loaded, its forward pass, prefix cache and load."""
        cache = self.prefix_cache.describe() if self.prefix_cache is not None else {"off": self.prefix_cache_off}
        return self.loaded.describe() | {
            "forward": self.runner.forward.kind,
            # Weights the forward pass keeps beside the model's own (prepacked and 4-bit copies).
            "forward_memory_bytes": self.runner.forward.extra_bytes,
            "prefix_cache": cache,
            "max_batched_tokens": self.scheduler.config.max_batched_tokens,
            "max_kv_tokens": self.scheduler.config.max_kv_tokens,
            "decoding": {
                "jump_forward": self.jump_forward,
                "output_tokens": self.num_output_tokens,
                "model_steps": self.num_model_steps,
                "prefilled_tokens": self.num_prefilled_tokens,
            },
            "engine_alive": self.is_alive,
            "num_waiting": self.num_waiting,
            "num_running": self.num_running,
        }

    def prepare(self) -> None:
        """Captures the forward pass's CUDA graphs for every batch size; call before start()."""
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
            while not self._stopping:
                self.last_beat = time.monotonic()
                if not self.scheduler.has_work.wait(timeout=1.0):
                    continue
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
                        seq.kv = None
                    self.runner.reset()

    def step(self) -> None:
        """One scheduling step: admit newcomers, prefill a chunk of each prompt, decode every prefilled sequence.

        Aborts are honoured before each forward pass, so a hung-up client's slot is free within one pass.
        """
        self._reap()
        for seq in self.scheduler.schedule(hold_shared=self.prefix_cache is not None):
            try:
                self._admit(seq)
            except torch.OutOfMemoryError:
                self._out_of_memory([seq])
        chunks = self.scheduler.plan_prefill(sum(len(s.pending) for s in self.runner.rows), self._max_chunk())
        if chunks:
            start = time.perf_counter()
            try:
                joined, logits = self.runner.prefill(chunks)
            except torch.OutOfMemoryError:  # raised before the batch's cache was touched: only newcomers fail
                self._out_of_memory([s for seq, _ in chunks for s in (seq, *seq.forks)])
                joined = []
            if joined:
                self._sample(joined, logits)
            self.num_prefilled_tokens += sum(n for _, n in chunks)
            self.prefill_token_s = _average(
                self.prefill_token_s, (time.perf_counter() - start) / sum(n for _, n in chunks)
            )
            self._reap()
        if self.runner.rows:
            start = time.perf_counter()
            rows = list(self.runner.rows)
            self._sample(rows, self.runner.decode())
            self.decode_step_s = _average(self.decode_step_s, time.perf_counter() - start)
            self.runner.drop(self.scheduler.postprocess())

    def _out_of_memory(self, seqs: list[Sequence]) -> None:
        """Ends sequences whose admission or prefill ran out of device memory; the running batch goes on."""
        log.warning("out of memory admitting or prefilling %d requests; ending them", len(seqs))
        for seq in seqs:
            seq.kv = None
            if not seq.is_finished:
                error = "out of memory: the prompt did not fit beside the running requests; retry later"
                seq.finish(Output("", len(seq.completion_ids), "error", error))
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def _max_chunk(self) -> int | None:
        """Prompt tokens this step may prefill without stalling the decoding rows for over STALL_STEPS steps."""
        if not self.runner.rows or self.decode_step_s is None or self.prefill_token_s is None:
            return None
        return int(STALL_STEPS * self.decode_step_s / self.prefill_token_s)

    def _reap(self) -> None:
        for seq in self.scheduler.reap_aborted():
            seq.finish(Output(seq.stops.flush() if seq.stops else "", len(seq.completion_ids), "abort"))
        self.runner.drop(self.scheduler.postprocess())

    def _admit(self, seq: Sequence) -> None:
        for choice in (seq, *seq.forks):
            if not choice.is_finished:
                self._start_decoding(choice)
        self.runner.start(seq)

    def _start_decoding(self, seq: Sequence) -> None:
        """The per-sequence decoding state: its generator, detokenizer, stop strings, first grammar mask."""
        seq.admitted_ns = time.time_ns()
        generator = torch.Generator(device=self.runner.device)
        if seq.params.seed is not None:
            generator.manual_seed(seq.params.seed)
        else:
            generator.seed()
        seq.generator = generator
        # Seeding the decoder with the prompt's tail gives the first token its correct leading space.
        seq.decoder = DecodeStream(ids=seq.prompt_ids[-4:], skip_special_tokens=seq.params.skip_special_tokens)
        seq.stops = StopChecker(seq.params.stop, seq.params.include_stop)
        if seq.params.constraint is not None:  # its first mask is computed while its prompt prefills
            self.masks.start([seq.params.constraint])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Picks every sequence's next token in one pass (grammar masks for all constrained rows at once),
        appends it and any tokens its grammar then forces, and starts the constrained rows' next masks.

        A row whose grammar refuses its token ends there, with what was valid (the output's `refusal` says why);
        one whose processor or logits fail (NaN) ends in an error. The other rows go on.
        """
        constraints = [seq.params.constraint for seq in seqs]
        asking = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        # Log-probabilities are the model's own: taken before masks, processors and temperature.
        raw = logits[asking] if asking else None  # a copy (indexed by a list)
        adjust(logits, seqs, self.eos_ids)
        errors: list[Exception | None] = list(self.masks.apply(constraints, logits))
        for i, seq in enumerate(seqs):
            try:
                for processor in seq.params.logits_processors:
                    logits[i] = processor(seq.completion_ids, logits[i])
            except Exception as exc:
                errors[i] = errors[i] or exc
        tokens, broken = sample(logits, [seq.params for seq in seqs], [seq.generator for seq in seqs])
        if asking:
            nums = [seqs[i].params.logprobs for i in asking]
            entries = token_logprobs(raw, [tokens[i] for i in asking], nums, self._decode_one)
            for i, entry in zip(asking, entries, strict=True):
                if not self._ends(seqs[i], tokens[i]):
                    seqs[i].logprobs.append(entry)
        self.num_model_steps += len(seqs)
        for i, seq in enumerate(seqs):
            seq.num_steps += 1
            if broken[i] and errors[i] is None:
                errors[i] = FloatingPointError(
                    "the model's logits for this request are not numbers (NaN or inf), or its constraints "
                    "(allowed_token_ids, bad_words, min_tokens, a grammar) together allow no token"
                )
            try:
                if errors[i] is not None:
                    raise errors[i]
                forced, complete = self._forced_after(seq, tokens[i])
            except GrammarError as exc:  # the output so far is valid: it ends there, not in an error
                output = self._output(seq, seq.stops.flush(), "stop")
                output.refusal = str(exc)
                seq.finish(output)
                continue
            except Exception as exc:  # a processor's or the logits' failure ends its own sequence
                log.error("sampling failed; ending one sequence", exc_info=exc)
                seq.finish(Output("", len(seq.completion_ids), "error", f"{type(exc).__name__}: {exc}"))
                continue
            self._append(seq, forced, complete)
        self.masks.start([c for seq, c in zip(seqs, constraints, strict=True) if c and not seq.is_finished])

    def _forced_after(self, seq: Sequence, token: int) -> tuple[list[int], bool]:
        """The sampled token and those the grammar forces after it, and whether the grammar is then complete.

        Forced tokens are skipped when log-probabilities are asked for: they would need a model step each.
        """
        constraint = seq.params.constraint
        if constraint is None or self._ends(seq, token):
            return [token], False
        constraint.consume([token])
        if not self.jump_forward or seq.params.logprobs is not None:
            return [token], False
        forced = constraint.forced()
        # llguidance spells forced text in its canonical tokens; where the grammar refuses one of them (a marker
        # the tokenizer also has as a token of its own), the rest is decoded step by step under the mask.
        forced = forced[: constraint.try_consume(forced)]
        return [token, *forced], constraint.is_done

    def _ends(self, seq: Sequence, token: int) -> bool:
        """Whether the token ends the output: an end of sequence (unless ignore_eos) or one of stop_token_ids."""
        return (token in self.eos_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids

    def _decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _append(self, seq: Sequence, tokens: list[int], complete: bool = False) -> None:
        """Adds the tokens to the completion and streams their text as one output; ends the sequence at an end
        of sequence token, a stop string, max_tokens, or (`complete`) a grammar that allows nothing more."""
        text = ""
        for token in tokens:
            if self._ends(seq, token):
                seq.finish(self._output(seq, text + seq.stops.flush(), "stop"))
                return
            seq.completion_ids.append(token)
            self.num_output_tokens += 1
            piece = seq.decoder.step(self.tokenizer.backend_tokenizer, token) or ""
            safe, stopped = seq.stops.feed(piece, armed=len(seq.completion_ids) >= seq.params.min_tokens)
            text += safe
            if stopped:
                seq.finish(self._output(seq, text, "stop", seq.stops.matched))
                return
            if len(seq.completion_ids) >= seq.params.max_tokens:
                seq.finish(self._output(seq, text + seq.stops.flush(), "length"))
                return
        if complete:
            seq.finish(self._output(seq, text + seq.stops.flush(), "stop"))
            return
        seq.pending = tokens
        if text:
            seq.emit(self._output(seq, text))

    @staticmethod
    def _output(seq: Sequence, text: str, finish_reason: str | None = None, stop: str | None = None) -> Output:
        """An output with the log-probabilities of the tokens sampled since the last one (held-back text's too)."""
        logprobs, seq.logprobs = (seq.logprobs or None), []
        return Output(text, len(seq.completion_ids), finish_reason, stop_sequence=stop, logprobs=logprobs)


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA or HIP error that leaves the device context unusable (a device-side assert, an illegal memory
    access); out of memory is not one."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, torch.AcceleratorError) or any(m in str(exc) for m in ("CUDA error", "HIP error"))


def _average(average: float | None, value: float, weight: float = 0.3) -> float:
    return value if average is None else (1 - weight) * average + weight * value
