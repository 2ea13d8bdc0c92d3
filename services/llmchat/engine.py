"""The inference thread: owns the model, runs one sequence's prefill and decode steps, streams outputs.

Sequences wait in a FIFO and are generated one at a time; each streams text deltas to its own
asyncio queue and can be aborted between steps.
"""

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from llmchat.llm import LoadedModel
from llmchat.sampling import SamplingParams, StopChecker, sample_next

log = logging.getLogger("llmchat.engine")

_ids = itertools.count()


class EngineError(RuntimeError):
    """Generation failed inside the engine; the sequence ends with this error."""


@dataclass(slots=True)
class Output:
    """One step's news for a sequence: new text, the completion's token count so far, and why it ended."""

    text: str
    num_completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: str | None = None


@dataclass(slots=True, eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int = field(default_factory=lambda: next(_ids))
    completion_ids: list[int] = field(default_factory=list)
    is_aborted: bool = False
    is_finished: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def emit(self, output: Output) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)


class Engine:
    """Facade the chat layer talks to: start(), submit(), stream(), abort(), shutdown()."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_context = loaded.max_context
        self.waiting: queue.Queue[Sequence | None] = queue.Queue()
        self.num_running = 0
        self._thread: threading.Thread | None = None
        eos = loaded.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmchat-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.waiting.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(prompt_ids, params, asyncio.get_running_loop())
        self.waiting.put(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        # Read by the engine thread before each step; a bool store is atomic under the GIL.
        seq.is_aborted = True

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

    def _run(self) -> None:
        while (seq := self.waiting.get()) is not None:
            if seq.is_aborted:
                self._finish(seq, Output("", 0, "abort"))
                continue
            self.num_running = 1
            try:
                with torch.inference_mode():
                    self._generate(seq)
            except Exception as exc:  # one bad request must not stop the engine
                log.exception("generation failed for sequence %d", seq.seq_id)
                self._finish(seq, Output("", len(seq.completion_ids), "error", f"{type(exc).__name__}: {exc}"))
            finally:
                self.num_running = 0

    def _finish(self, seq: Sequence, output: Output) -> None:
        seq.is_finished = True
        seq.emit(output)

    def _generate(self, seq: Sequence) -> None:
        model, params = self.loaded.model, seq.params
        device = model.device
        generator = torch.Generator(device=device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        decoder = DecodeStream(ids=seq.prompt_ids[-4:], skip_special_tokens=True)
        stops = StopChecker(params.stop)
        input_ids = torch.tensor([seq.prompt_ids], device=device)
        cache = None
        while True:
            if seq.is_aborted:
                self._finish(seq, Output(stops.flush(), len(seq.completion_ids), "abort"))
                return
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = sample_next(out.logits[0, -1], params, generator)
            if token in self.eos_ids:
                self._finish(seq, Output(stops.flush(), len(seq.completion_ids), "stop"))
                return
            seq.completion_ids.append(token)
            piece = decoder.step(self.tokenizer.backend_tokenizer, token) or ""
            text, stopped = stops.feed(piece)
            num = len(seq.completion_ids)
            if stopped:
                self._finish(seq, Output(text, num, "stop"))
                return
            if num >= params.max_tokens:
                self._finish(seq, Output(text + stops.flush(), num, "length"))
                return
            if text:
                seq.emit(Output(text, num))
            input_ids = torch.tensor([[token]], device=device)
